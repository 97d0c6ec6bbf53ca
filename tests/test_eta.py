"""The ETA: planned work (epoch-equivalents) x measured seconds per epoch-equivalent, a guess until
every kind of work is measured."""
from conftest import matrix_dict

from bench.matrix import parse_matrix
from bench.execution.cost import CostModel
from bench.execution.progress import Progress

RECIPE = {"epochs": 10, "batch_size": 64}


def _cells():
    # 2 attacks x (undefended, finetuning: repairs; abl: from scratch)
    m = parse_matrix(matrix_dict(recipe=RECIPE, attacks=["badnet", "blend"],
                                 defenses=["undefended", "finetuning", "abl"]))
    by = {(c.attack.key, c.defense.key): c for c in m.cells}
    return by


def test_unknown_until_a_training_is_measured():
    by = _cells()
    cost = CostModel()
    assert cost.remaining([by["badnet", "undefended"]], list(by.values()))[0] is None


def test_estimate_from_synthetic_timings():
    by = _cells()
    cost = CostModel()
    # a backdoored model: 10 epochs (10 ee) in 20 s -> 2 s per ee
    cost.observe_backdoor(by["badnet", "undefended"], seconds=20.0, ee=10.0)
    assert cost.seconds_per_ee(by["blend", "abl"]) == (2.0, True)
    # finetuning measured: 3 ee in 7 s -> overhead 1 s
    cost.observe_cell(by["badnet", "finetuning"], seconds=7.0, ee=3.0)
    # the remaining work: blend's backdoored model (10 ee), blend finetuning (measured: 3 ee),
    # blend undefended (trains nothing: 0 ee), blend abl (not measured: guessed as the recipe's 10 ee)
    left = [by["blend", "finetuning"], by["blend", "undefended"], by["blend", "abl"]]
    seconds, guesses = cost.remaining([by["blend", "undefended"]], left)
    assert seconds == 20.0 + (1 + 3 * 2) + (1 + 0) + (1 + 10 * 2)
    assert guesses == 1  # abl is not measured yet
    cost.observe_cell(by["badnet", "undefended"], seconds=1.0, ee=0.0)  # trains nothing: 1 s of overhead
    cost.observe_cell(by["badnet", "abl"], seconds=45.0, ee=20.0)  # ABL costs 20 ee, not the guessed 10
    # the speed is now (20 + (7 - 1) + (45 - 1)) s / (10 + 3 + 20) ee = 70/33 s per ee, and the
    # remaining 10 + 3 + 0 + 20 = 33 ee take 70 s, plus 1 s of overhead for each of the 3 cells
    seconds, guesses = cost.remaining([by["blend", "undefended"]], left)
    assert round(seconds, 9) == 73.0 and guesses == 0
    assert round(cost.remaining([by["blend", "undefended"]], left, workers=2)[0], 9) == 36.5


def test_the_speed_follows_the_recent_trainings():
    by = _cells()
    cost = CostModel()
    for _ in range(3):
        cost.observe_backdoor(by["badnet", "undefended"], seconds=60.0, ee=10.0)  # a loaded machine
    for _ in range(CostModel.WINDOW):
        cost.observe_backdoor(by["badnet", "undefended"], seconds=20.0, ee=10.0)  # the load is gone
    assert cost.seconds_per_ee(by["blend", "abl"]) == (2.0, True)


def test_a_from_scratch_cell_measures_the_speed_when_no_training_has():
    by = _cells()
    cost = CostModel()
    cost.observe_cell(by["badnet", "abl"], seconds=40.0, ee=20.0)
    assert cost.seconds_per_ee(by["blend", "abl"]) == (2.0, True)


def test_progress_line_says_when_it_is_a_guess():
    by = _cells()
    backdoors = {"k1": by["badnet", "undefended"], "k2": by["blend", "undefended"]}
    cells = list(by.values())
    prog = Progress(len(cells), 1, None, CostModel(), backdoors, cells)
    assert prog.line().endswith("ETA unknown until a training finishes")
    prog.backdoor_done("k1", 20.0, 10.0)
    prog.cell_done(by["badnet", "undefended"], 1.0, {"epoch_equivalents": 0.0})
    prog.done = 1
    line = prog.line()
    # left: k2 (20 s) + 5 cells: undefended (1 s), finetunings 2 x (1 + 1 x 2) guessed, abls 2 x (1 + 20) guessed
    assert line == "[1/6] done 1, running 0, failed 0, ETA ~1m09s (a guess: 4 of 6 tasks not measured yet)"
    for c in cells:
        prog.cell_done(c, 0.0, None)
    prog.backdoor_done("k2")
    assert "ETA" not in prog.line()
