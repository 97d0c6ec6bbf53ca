"""Guards that tell a reader when a number means little: chance-level models, attacks that did not
implant, warnings a defense recorded."""
from dataclasses import dataclass

import torch
from conftest import TINY_RECIPE, matrix_dict

from bench.core.defense import Defense, DefenseContext, Needs, Outcome
from bench.matrix import parse_matrix
from bench.report import IMPLANT_ASR, WARN_MARK, build_sections
from bench.runner import Runner
from bench.store import Store


@dataclass
class Collapse(Defense):
    """Returns the backdoored model with its head zeroed: every input gets the same prediction."""


    def needs(self):
        return Needs(backdoored_model=True)


    def run(self, ctx: DefenseContext) -> Outcome:
        model = ctx.backdoored_model()
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()
        return Outcome(model, info={"warnings": ["a guard of the defense's own"]})


def test_a_model_at_chance_is_recorded_with_the_defenses_own_warnings(tmp_path, threshold):
    m = parse_matrix(matrix_dict(defenses=["undefended", "test_guards:Collapse"],
                                 recipe={**TINY_RECIPE, "epochs": 6}))
    runner = Runner(Store(tmp_path))
    rows = {c.defense.key: runner.run_cell(c) for c in m.cells}
    assert rows["undefended"]["warnings"] == []
    threshold("undefended training ACC", rows["undefended"]["train_acc"]["defended"], ">", 0.5)
    warnings = rows["test_guards:Collapse"]["warnings"]
    assert warnings[0] == "a guard of the defense's own"
    assert len(warnings) == 2 and warnings[1].startswith("at chance: the defended model")


def _row(attack, defense, acc, asr, warnings=()):
    return {"dataset": "digits", "model": "tiny_cnn", "attack_name": attack, "defense_name": defense,
            "defense": defense.lower(), "attack_display": attack, "defense_display": defense, "seed": 0,
            "acc": acc, "asr": asr, "warnings": list(warnings), "wall_time_s": 1.0, "epoch_equivalents": 1.0}


def test_report_marks_attacks_that_did_not_implant_and_cells_with_warnings():
    rows = [_row("BadNet", "undefended", 0.95, 1.0), _row("BadNet", "X", 0.90, 0.1, ["at chance: ..."]),
            _row("SIG", "undefended", 0.95, IMPLANT_ASR / 2), _row("SIG", "X", 0.50, 0.0)]
    tables = build_sections(rows)[0].tables
    main = tables[0]
    assert [r[0] for r in main.rows] == ["BadNet", "SIG (did not implant)", "Average"]
    assert main.rows[0][3] == f"90.0 {WARN_MARK}"
    # the average leaves SIG out: X's ACC average is BadNet's alone
    assert main.rows[-1][3] == "90.0"
    assert "did not implant" in main.note and WARN_MARK in main.note
    warned = next(t for t in tables if t.caption.startswith("Warnings"))
    assert warned.rows == [["BadNet", "X", "0", "at chance: ..."]]


def test_the_chance_probe_holds_the_poison_at_its_base_rate():
    """The probe is drawn apart from the attack's poison: at 5 % poison of 50,000 samples its
    10,000 hold 5 % poison (binomial sd 0.22 points; the bound is 4.5 sd), not all 2,500 (25 %)."""
    from bench.core.registry import ATTACKS
    from bench.runner import CHANCE_PROBE, chance_probe

    y = torch.arange(50_000) % 10
    attack = ATTACKS.get("badnet")(poison_ratio=0.05)
    for seed in (0, 1, 2):
        poison, _ = attack.select(y, torch.Generator().manual_seed(seed))  # as Attack.poison draws it
        probe = chance_probe(len(y), seed)
        assert len(probe) == CHANCE_PROBE and len(probe.unique()) == CHANCE_PROBE
        share = float(torch.isin(probe, poison).float().mean())
        assert 0.04 < share < 0.06, (seed, share)
