"""Contract tests over the registries: every registered attack, defense, evaluation, dataset and
model, run on a tiny digits cell on CPU.  A new component is checked here without a test of its own."""
import dataclasses
import fnmatch
import json
import pickle

import pytest
import torch
from conftest import SHARED_DATA, matrix_dict

from bench.execution.loop import run_matrix
from bench.core.attack import PoisonedSet, TriggeredTest
from bench.core.data import load_dataset
from bench.core.models import build_model, interface_problems
from bench.core.params import params_of
from bench.core.registry import ATTACKS, DATASETS, DEFENSES, EVALUATIONS, MODELS
from bench.matrix import parse_matrix
from bench.runner import Runner
from bench.store import Store

#: every numeric field whose name matches is lowered to this value for the contract run (a defense's
#: own schedules are long; the contract is about what it returns, not how well it defends)
SHRINK = {"*epochs": 1, "rounds": 1, "pgd_steps": 1, "em_iters": 5, "*_passes": 1, "calibrate_probe": 50,
          "steps": 5, "restarts": 1, "per_class": 3, "eval_size": 50}


def shrunk(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        for pattern, small in SHRINK.items():
            if (fnmatch.fnmatchcase(f.name, pattern) and isinstance(f.default, (int, float))
                    and not isinstance(f.default, bool) and f.default > small):
                out[f.name] = type(f.default)(small)
                break
    return out


# --- attacks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ATTACKS.names())
def test_attack_contract(key, digits):
    attack = ATTACKS.get(key)()
    attack.check(digits.size, digits.num_classes)
    p = attack.poison(digits.train, seed=0)
    again = attack.poison(digits.train, seed=0)
    assert isinstance(p, PoisonedSet) and torch.equal(p.train.x, again.train.x)  # deterministic
    n = len(digits.train)
    assert p.train.x.dtype == torch.uint8 and p.train.x.shape == digits.train.x.shape
    assert p.is_poison.dtype == torch.bool and p.is_poison.shape == (n,)
    assert not bool((p.is_poison & p.is_cover).any())
    assert int(p.is_poison.sum()) <= int(n * attack.poison_ratio)
    assert torch.equal(p.y_orig, digits.train.y)
    untouched = ~(p.is_poison | p.is_cover)
    assert torch.equal(p.train.x[untouched], digits.train.x[untouched])  # only poison and covers change
    assert torch.equal(p.train.y[p.is_cover], digits.train.y[p.is_cover])
    if key != "none":
        assert p.is_poison.any()
        assert not torch.equal(p.train.x[p.is_poison], digits.train.x[p.is_poison])
        if attack.clean_label:
            assert torch.equal(p.train.y, digits.train.y)
        else:
            assert bool((p.train.y[p.is_poison] == attack.target).all())
    t = attack.test_set(digits.test)
    assert isinstance(t, TriggeredTest) and t.x.shape == digits.test.x.shape and t.counts.dtype == torch.bool
    assert not bool(t.counts[digits.test.y == attack.target].any()) if key != "none" else not t.counts.any()
    json.dumps(params_of(attack))
    copy = pickle.loads(pickle.dumps(attack))  # a cell travels to a worker as its key and parameters
    assert type(copy) is type(attack) and type(copy).key == key and params_of(copy) == params_of(attack)


# --- defenses ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def defended(tmp_path_factory):
    """Every registered defense, shrunk, on one BadNet digits cell (one backdoored model shared)."""
    defenses = [{"name": key, **shrunk(DEFENSES.get(key))} for key in DEFENSES.names()]
    m = parse_matrix(matrix_dict(defenses=defenses, recipe={**matrix_dict()["recipe"], "epochs": 3},
                                 reserve_ratio=0.05))
    runner = Runner(Store(tmp_path_factory.mktemp("contract")))
    return {o.cell.defense.key: o for o in run_matrix(m, runner, progress=None)}


@pytest.mark.slow
@pytest.mark.parametrize("key", DEFENSES.names())
def test_defense_contract(key, defended):
    outcome = defended[key]
    assert outcome.status == "done", outcome.error
    row, defense = outcome.result, outcome.cell.defense
    needs = defense.needs()
    for metric in ("acc", "acc_nontarget", "asr"):
        assert 0.0 <= row[metric] <= 1.0
    json.dumps(row["info"])  # the stored diagnostics are plain JSON
    assert row["clean_data"] == (0.05 if needs.clean_data else 0.0)
    if needs.training:  # the trainer counted the defense's work
        assert row["epoch_equivalents"] > 0
    else:
        assert row["epoch_equivalents"] == 0
    if "detection" in row:  # the runner accepted the flagged indices (unique training indices)
        d = row["detection"]
        assert 0 <= d["flagged"] <= row["n_train"] and 0 <= d["tpr"] <= 1 and 0 <= d["fpr"] <= 1
    json.dumps(params_of(defense))
    copy = pickle.loads(pickle.dumps(defense))
    assert type(copy).key == key and params_of(copy) == params_of(defense) and copy.needs() == needs


@pytest.mark.parametrize("flags,message", [([3, 3], "more than once"), ([-1], "outside"), ([10**6], "outside"),
                                           ([[1, 2]], "1-D"), ([0.5], "1-D")])
def test_the_runner_refuses_flagged_indices_that_are_not_training_indices(flags, message):
    from bench.runner import checked_flags

    with pytest.raises((ValueError, TypeError), match=message):
        checked_flags(torch.tensor(flags), 100, "D")
    assert checked_flags(torch.tensor([4, 2]), 100, "D").tolist() == [4, 2]


# --- evaluations, datasets, models ----------------------------------------------------------------

@pytest.mark.parametrize("key", EVALUATIONS.names())
def test_evaluation_contract(key, digits):
    from bench.core.trainer import Trainer

    ev = EVALUATIONS.get(key)(**shrunk(EVALUATIONS.get(key)))
    model = build_model("tiny_cnn", digits.channels, digits.num_classes, digits.mean, digits.std, digits.size)
    summary = ev.evaluate(model, digits.test, digits.num_classes, Trainer(), seed=0).summary()
    json.dumps(summary)
    assert pickle.loads(pickle.dumps(ev)) == ev


@pytest.mark.slow
@pytest.mark.parametrize("key", DATASETS.names())
def test_dataset_contract(key):
    source = DATASETS.get(key)
    aug = source.augmentation()
    assert source.num_classes >= 2 and source.channels in (1, 3) and aug["crop_padding"] >= 0
    if key != "digits" and not (SHARED_DATA / f"{key}.npz").exists():
        pytest.skip(f"no {key} data here")
    ds = load_dataset(key, SHARED_DATA, train_limit=200, test_limit=50)
    assert (ds.num_classes, ds.channels, ds.size) == (source.num_classes, source.channels, source.size)


@pytest.mark.parametrize("key", MODELS.names())
def test_model_contract(key):
    model = build_model(key, 3, 5, (0.5,) * 3, (0.25,) * 3, 32).eval()
    assert interface_problems(model) == []
    x = torch.rand(2, 3, 32, 32)
    assert model.features(x).shape == (2, model.feature_dim)
    assert model.last_block is model.body[-1]


def test_a_model_without_the_interface_is_refused():
    with pytest.raises(TypeError, match="interface defenses rely on.*no attribute 'features'"):
        build_model("test_contracts:plain_model", 3, 5, (0.5,) * 3, (0.25,) * 3, 32)


def plain_model(in_channels, num_classes, mean, std, image_size):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size ** 2, num_classes))
