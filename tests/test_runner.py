"""End-to-end: a matrix through the runner on digits (seconds per cell)."""
import json
from dataclasses import dataclass

import pytest
import torch
from conftest import matrix_dict

from bench.execution.loop import run_matrix
from bench.core.defense import Defense, DefenseContext, Needs, Outcome
from bench.matrix import parse_matrix
from bench.runner import Runner
from bench.store import Store


@dataclass
class Spy(Defense):
    """Test defense: records what it was given and returns the backdoored model."""


    def needs(self):
        return Needs(backdoored_model=True)

    seen = []

    def run(self, ctx: DefenseContext) -> Outcome:
        Spy.seen.append(ctx)
        return Outcome(ctx.backdoored_model(), flagged=torch.arange(10))


@dataclass
class Broken(Defense):
    """Test defense that fails."""

    def run(self, ctx):
        raise RuntimeError("boom")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    m = parse_matrix(matrix_dict(defenses=["undefended", "test_runner:Spy", "test_runner:Broken"]))
    runner = Runner(Store(root))
    outcomes = run_matrix(m, runner, progress=None)
    return m, runner, outcomes, root


@pytest.mark.slow
def test_backdoor_learned_and_results_written(finished, threshold):
    m, runner, outcomes, root = finished
    by = {o.cell.defense.key: o for o in outcomes}
    und = by["undefended"]
    assert und.status == "done"
    threshold("ACC", und.result["acc"], ">=", 0.85)
    threshold("ASR", und.result["asr"], ">=", 0.8)
    assert und.result["n_poison"] == int(0.05 * und.result["n_train"])
    assert len(list((root / "results").glob("*.json"))) == 2


@pytest.mark.slow
def test_backdoored_model_trained_once_and_shared(finished):
    _, _, outcomes, root = finished
    assert len(list((root / "backdoor").iterdir())) == 1
    by = {o.cell.defense.key: o.result for o in outcomes if o.result}
    assert by["undefended"]["acc"] == by["test_runner:Spy"]["acc"]


@pytest.mark.slow
def test_failing_cell_is_recorded_and_others_go_on(finished):
    _, _, outcomes, root = finished
    broken = [o for o in outcomes if o.status == "failed"]
    assert len(broken) == 1 and "boom" in broken[0].error
    failure = list((root / "failures").glob("*.json"))
    assert len(failure) == 1 and "RuntimeError: boom" in failure[0].read_text()


@pytest.mark.slow
def test_defense_never_sees_ground_truth(finished):
    ctx = Spy.seen[-1]
    assert set(vars(ctx.train)) == {"x", "y"}
    n = len(ctx.train)
    for name, value in vars(ctx).items():
        assert not (torch.is_tensor(value) and value.dtype == torch.bool and len(value) == n), name
        assert "poison" not in name.lower() or name.startswith("_")
    assert ctx.clean_reserve is None  # Spy does not declare uses_clean_data
    # the labels it sees are the poisoned ones (relabelled to the target)
    assert int((ctx.train.y == 1).sum()) > int((ctx.train.y == 0).sum())


@pytest.mark.slow
def test_detection_reported_when_flagged(finished):
    _, _, outcomes, _ = finished
    spy = next(o for o in outcomes if o.cell.defense.key == "test_runner:Spy")
    assert set(spy.result["detection"]) == {"tpr", "fpr", "precision", "flagged"}
    assert spy.result["detection"]["flagged"] == 10


@pytest.mark.slow
def test_rerun_uses_cache_without_training(finished, monkeypatch):
    m, _, _, root = finished
    from bench.core import trainer

    def no_training(*a, **k):
        raise AssertionError("trained although cached")

    monkeypatch.setattr(trainer.Trainer, "fit", no_training)
    outcomes = run_matrix(m, Runner(Store(root)), progress=None)
    status = sorted(o.status for o in outcomes)
    assert status == ["cached", "cached", "failed"]


@pytest.mark.slow
def test_same_seed_same_poison_and_metrics(finished, tmp_path):
    m, runner, outcomes, root = finished
    cell = next(c for c in m.cells if c.defense.key == "undefended")
    again = Runner(Store(tmp_path)).run_cell(cell)
    first = next(o.result for o in outcomes if o.cell is cell)
    assert (again["acc"], again["asr"]) == (first["acc"], first["asr"])
    import json
    idx = [json.loads(p.read_text())["poison_idx"] for p in (root / "poison").glob("*/indices.json")]
    idx2 = [json.loads(p.read_text())["poison_idx"] for p in (tmp_path / "poison").glob("*/indices.json")]
    assert idx == idx2


def test_clean_reserve_is_clean_and_balanced(digits):
    from attacks.badnet import BadNet
    from bench.runner import clean_reserve

    p = BadNet().poison(digits.train, seed=0)
    r = clean_reserve(p, 0.1, seed=0)
    assert len(r) == int(0.1 * len(digits.train))
    counts = torch.bincount(r.y, minlength=10)
    assert counts.max() - counts.min() <= 1
    # every reserve image is an unpoisoned training image with its true label
    clean_x = p.train.x[~p.is_poison]
    for x in r.x[:20]:
        assert bool((clean_x == x).flatten(1).all(1).any())


@pytest.mark.slow
def test_tampered_backdoor_checkpoint_is_recomputed(tmp_path):
    m = parse_matrix(matrix_dict(recipe={**matrix_dict()["recipe"], "epochs": 2}))
    runner = Runner(Store(tmp_path))
    [first] = run_matrix(m, runner, progress=None)
    [weights] = list((tmp_path / "backdoor").glob("*/weights.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    for r in (tmp_path / "results").glob("*.json"):
        r.unlink()  # force the cell to need its backdoored model again
    [again] = run_matrix(m, Runner(Store(tmp_path)), progress=None)
    assert again.status == "done"
    assert again.result["acc"] == first.result["acc"]  # retrained identically (seeded CPU training)
    from bench.store import sha256_file
    meta = json.loads((weights.parent / "meta.json").read_text())
    assert meta["sha256"] == sha256_file(weights)
