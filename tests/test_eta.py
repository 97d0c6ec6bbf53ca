"""The ETA: planned work (epoch-equivalents) x measured seconds per epoch-equivalent, a guess until
every kind of work is measured."""
from bench.matrix import parse_matrix
from bench.schedule import CostModel, Progress
from conftest import matrix_dict

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
    cost.observe_cell(by["badnet", "undefended"], seconds=1.0, ee=0.0)
    cost.observe_cell(by["badnet", "abl"], seconds=45.0, ee=20.0)  # ABL costs 20 ee, not the guessed 10
    seconds, guesses = cost.remaining([by["blend", "undefended"]], left)
    # overhead = the median of the measured ones (1, 1, 5) = 1
    assert (seconds, guesses) == (20.0 + 7.0 + 1.0 + 41.0, 0)
    assert cost.remaining([by["blend", "undefended"]], left, workers=2)[0] == (20.0 + 7.0 + 1.0 + 41.0) / 2


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
