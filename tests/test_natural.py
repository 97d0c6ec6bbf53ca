"""Natural-backdoor measurement (bench/natural.py): calibration on a planted BadNet trigger, the hard
budget, disjoint splits, the MAD index, and the matrix ``evaluate`` field end to end."""
import math

import pytest
import torch
from conftest import TINY_RECIPE, matrix_dict

from bench.execution.loop import run_matrix
from bench.core.models import build_model
from bench.core.params import ConfigError
from bench.core.registry import ATTACKS
from bench.core.trainer import Recipe, Trainer
from bench.matrix import parse_matrix
from bench.report import build_sections
from bench.results import collect
from bench.runner import Runner
from bench.store import Store
from conftest import TEST_SEED
from evaluations.natural_backdoor import NaturalBackdoor, split_indices

TARGET = 1
#: calibration settings: the 2 % budget (~5 px on 16x16) fits the 2x2 BadNet patch (4 px); the toy
#: model's own trigger reaches ~95 %, so inversion success is judged at 0.9 rather than 0.99.  Four
#: restarts: with two, one draw in six (seed 0, 2 threads) inverted the target to only 0.69 at 2 %
#: and the MAD test missed it (anomaly index 0.99)
CALIB = NaturalBackdoor(budgets=(0.02, 0.06), steps=80, restarts=4, per_class=15, eval_size=300, success=0.9)


@pytest.fixture(scope="module")
def backdoored(digits):
    attack = ATTACKS.get("badnet")(target=TARGET)
    poisoned = attack.poison(digits.train, seed=TEST_SEED)
    torch.manual_seed(TEST_SEED)
    model = build_model("tiny_cnn", digits.channels, digits.num_classes, digits.mean, digits.std, digits.size)
    model = Trainer(recipe=Recipe(**TINY_RECIPE)).fit(model, poisoned.train, seed=TEST_SEED)
    return model


@pytest.fixture(scope="module")
def measured(backdoored, digits):
    return CALIB.evaluate(backdoored, digits.test, digits.num_classes, seed=TEST_SEED)


@pytest.mark.slow
def test_inversion_finds_the_planted_target_at_the_smallest_budget(measured, threshold):
    """At the 2 % budget the planted target is the label whose inverted trigger works best.
    Measured over seeds 0-2 at 1 and 2 threads (four restarts): the target is the best label in
    all six runs, its inverted ASR 0.97-1.0; the best other label's 0.05-0.87 (seed 1, 2 threads:
    label 5 at 0.87), so whether the target stands out is asked by the MAD test below, not by a
    lead here.  Bound: target ASR 0.9."""
    s = measured.summary()
    assert s["budgets"][0] == 0.02
    assert s["asr_max_label"][0] == TARGET
    threshold("inverted ASR of the target at 2 %", s["asr_max"][0], ">=", 0.9)


@pytest.mark.slow
def test_mask_respects_the_hard_budget(measured, digits):
    hw = digits.size * digits.size
    l1 = measured.masks.sum((2, 3))  # B x K
    for i, b in enumerate(CALIB.budgets):
        assert bool((l1[i] <= b * hw + 1e-3).all()), (b, l1[i])
    assert torch.allclose(l1, measured.mask_l1, atol=1e-4)
    assert float(measured.masks.min()) >= 0 and float(measured.masks.max()) <= 1
    # the projection: a saturated mask is scaled down to the budget exactly, a small one is kept
    budget = torch.tensor([5.0, 5.0])
    M = torch.stack([torch.full((1, 16, 16), 10.0), torch.full((1, 16, 16), -10.0)])
    m = NaturalBackdoor.masks(M, budget)
    assert abs(float(m[0].sum()) - 5.0) < 1e-4
    assert torch.allclose(m[1], torch.tanh(M[1]) / 2 + 0.5)


@pytest.mark.slow
def test_evaluation_split_is_disjoint_from_inversion_split(measured, digits):
    inv, ev = set(measured.inversion_idx.tolist()), set(measured.eval_idx.tolist())
    assert not inv & ev
    assert len(inv) == 15 * digits.num_classes
    assert torch.bincount(digits.test.y[measured.inversion_idx], minlength=10).tolist() == [15] * 10
    assert len(ev) == min(300, len(digits.test) - len(inv))
    y = torch.arange(10).repeat(7)
    a, b = split_indices(y, 10, 3, 100, seed=1)
    assert len(a) == 30 and len(b) == 40 and not set(a.tolist()) & set(b.tolist())
    a2, _ = split_indices(y, 10, 3, 100, seed=2)
    assert set(a.tolist()) != set(a2.tolist())  # seeded


@pytest.mark.slow
def test_mad_anomaly_index_flags_the_target(measured, threshold):
    """Measured over seeds 0-2 at 1 and 2 threads (four restarts): the target is the only label
    flagged, anomaly index 3.6-4.3 against the threshold 2."""
    s = measured.summary()
    assert s["anomaly_label"] == TARGET
    threshold("anomaly index of the target", s["anomaly_max"], ">", CALIB.anomaly_threshold)
    assert TARGET in s["flagged"]
    assert s["min_l1_reached"][TARGET]
    assert s["min_l1"][TARGET] <= 0.02 * 256 + 1e-3


@pytest.mark.slow
def test_cost_counts_every_pass(measured):
    c = measured.cost
    triggers = CALIB.restarts * len(CALIB.budgets) * 10
    assert c["triggers"] == triggers
    assert c["backward"] == CALIB.steps * triggers * CALIB.batch_size
    n_inv, n_ev = len(measured.inversion_idx), len(measured.eval_idx)
    assert c["forward"] == c["backward"] + triggers * n_inv + len(CALIB.budgets) * 10 * n_ev
    assert c["wall_time_s"] > 0


@pytest.mark.parametrize("evaluate,field,message", [
    (["natural_backdor"], "evaluate[0]", "did you mean 'natural_backdoor'"),
    ([{"name": "natural_backdoor", "budgets": [0.06, 0.02]}], "evaluate[0]", "increasing"),
    ([{"name": "natural_backdoor", "steps": "many"}], "evaluate[0].steps", "expected an integer"),
    ([{"name": "natural_backdoor", "stepz": 5}], "evaluate[0].stepz", "did you mean 'steps'"),
    (["natural_backdoor", "natural_backdoor"], "evaluate[1]", "twice"),
])
def test_evaluate_field_validates(evaluate, field, message):
    with pytest.raises(ConfigError) as e:
        parse_matrix(matrix_dict(evaluate=evaluate))
    assert str(e.value).startswith(field + ":") and message in str(e.value)


def test_evaluate_field_changes_the_result_key_only_when_present():
    plain = parse_matrix(matrix_dict()).cells[0]
    assert "evaluate" not in plain.result_ident()
    a = parse_matrix(matrix_dict(evaluate=["natural_backdoor"])).cells[0]
    b = parse_matrix(matrix_dict(evaluate=[{"name": "natural_backdoor", "budgets": [0.02]}])).cells[0]
    assert a.backdoor_ident() == plain.backdoor_ident()
    assert len({str(c.result_ident()) for c in (plain, a, b)}) == 3


@pytest.mark.slow
def test_clean_training_through_the_runner(tmp_path, threshold):
    ev = {"name": "natural_backdoor", "budgets": [0.02, 0.04], "steps": 5, "restarts": 1, "per_class": 3,
          "eval_size": 40}
    m = parse_matrix(matrix_dict(attacks=["none"], evaluate=[ev], recipe={**TINY_RECIPE, "epochs": 4}))
    runner = Runner(Store(tmp_path))
    (out,) = run_matrix(m, runner, progress=None)
    assert out.status == "done", out.error
    r = out.result
    assert r["n_poison"] == 0 and math.isnan(r["asr"])
    threshold("ACC", r["acc"], ">", 0.5)
    nb = r["natural_backdoor"]
    assert nb["n_inversion"] == 30 and nb["n_eval"] == 40
    assert len(nb["asr"]) == 2 and all(len(v) == 10 for v in nb["asr"])
    assert all(0 <= v <= 1 for v in nb["asr_max"])
    rows, missing = collect(m, runner.store)
    tables = [t for s in build_sections(rows) for t in s.tables]
    nat = [t for t in tables if t.caption.startswith("Natural backdoors")]
    assert len(nat) == 1 and nat[0].header[3:5] == ["ASR@2%", "ASR@4%"]
    assert nat[0].rows[0][3] == f"{100 * nb['asr_max'][0]:.1f}"
    main = tables[0]
    assert main.rows[0][2] == "–"  # the ASR of clean training is NaN and prints as a dash
