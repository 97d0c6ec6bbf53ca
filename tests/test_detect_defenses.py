"""The defenses that find poisoned samples: ABL, DBR, SCAnFT, NONE.

One backdoored toy model (digits 16x16, BadNet 5%, a narrow small CNN trained without crop/flip so
the 2x2 corner patch stays put and the backdoor takes within a few epochs) is trained once per
module; the detectors must single out the poison on it, and each defense must run end to end
through the runner.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from attacks.badnet import BadNet
from bench.execution.loop import run_matrix
from bench.core.data import load_dataset
from bench.core.defense import DefenseContext
from bench.core.models import small_cnn
from bench.core.registry import DEFENSES
from bench.core.trainer import Recipe, Trainer
from bench.matrix import parse_matrix
from bench.runner import Runner
from bench.store import Store
from defenses.abl import ABL
from defenses.dbr import DBR, intra_class_loss, random_affine
from defenses.nonlinearity import NONE, monitored_units, reset_selected
from defenses.scan import SCAnFT, scan_detect
from conftest import TEST_SEED

TARGET = 1


@pytest.fixture(scope="module")
def toy():
    ds = load_dataset("digits")
    attack = BadNet(target=TARGET)
    poisoned = attack.poison(ds.train, seed=TEST_SEED)
    trainer = Trainer(recipe=Recipe(epochs=8, batch_size=64, crop_padding=0, flip=False))

    def make():
        torch.manual_seed(TEST_SEED)
        return trainer.prepare(small_cnn(1, 10, ds.mean, ds.std, ds.size, widths=(16, 32, 64)))

    model = trainer.fit(make(), poisoned.train, seed=TEST_SEED)
    trig = attack.test_set(ds.test)
    asr = (trainer.predict(model, trig.x)[trig.counts] == TARGET).float().mean().item()
    assert asr > 0.8, f"the toy backdoor did not take (ASR {asr:.2f})"
    ctx = DefenseContext(train=poisoned.train, num_classes=10, make_model=make, trainer=trainer, seed=TEST_SEED,
                         _backdoored=lambda: copy.deepcopy(model))
    return ctx, model, poisoned.is_poison


def test_registered_names():
    names = DEFENSES.names()
    for key, shown in (("abl", "ABL"), ("dbr", "DBR"), ("scanft", "SCAnFT"), ("nonlinearity", "NONE")):
        assert key in names
        assert DEFENSES.get(key).display_name == shown


# --- ABL --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_abl_isolates_the_lowest_loss_one_percent(toy):
    # Isolation keeps the floor(1%) lowest-loss samples, as the authors' isolate_data does.  (Whether those are poison depends on ABL's
    # premise that the backdoor is learned before the clean task.  On these 16x16 digits it is not:
    # after one isolation epoch the poison's median loss is 3.4 against 1.2 for clean samples, and
    # the isolated precision varies from 0.0 to 0.8 with the seed, so no precision is asserted here.)
    ctx, _, is_poison = toy

    class KnownLosses:
        def per_sample_loss(self, model, data):
            return torch.linspace(1.0, 0.0, len(data)) ** 2  # the last samples have the lowest loss

    n = len(is_poison)
    fake = DefenseContext(train=ctx.train, num_classes=10, make_model=ctx.make_model, trainer=KnownLosses(), seed=0)
    isolated, losses = ABL(isolation_ratio=0.01).isolate(fake, None)
    assert torch.equal(isolated, torch.arange(n - int(0.01 * n), n))
    assert losses.shape == (n,)
    isolated, _ = ABL(isolation_ratio=0.1).isolate(fake, None)
    assert len(isolated) == int(0.1 * n) and int(isolated.min()) == n - int(0.1 * n)


def test_abl_lga_modes_differ():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    per = ABL(lga="sample", gamma=10.0).lga_loss(model, x, y, None)
    assert per.shape == (8,) and bool((per <= 0).all())  # every sample below the floor: ascent
    batch = ABL(lga="batch", gamma=1e-6).lga_loss(model, x, y, None)
    assert batch.dim() == 0 and batch.item() > 0
    with pytest.raises(ValueError):
        ABL(lga="nope")


# --- DBR --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_dbr_fct_ranks_poison_higher(toy, threshold):
    """The SD model must learn the backdoor: on 1,347 digits the authors' 2 epochs at lr 0.01 are ~40
    steps, so the toy trains it longer.  tau = translation only: a +-180 degree rotation of a 16 px
    digit moves clean features as much as poisoned ones.

    One draw is a coin here.  Measured AUROC over the DBR seed (0-4) at 1 and 2 threads (torch 2.14,
    an AVX-512/AMX CPU): 0.727 0.609 0.851 0.734 0.861 (1 thread), 0.847 0.652 0.696 0.593 0.717
    (2 threads).  So the test takes the median of three draws (seeds 0-2: 0.727 and 0.696 in those
    measurements) against 0.6, about 2.8 standard errors above chance (0.5 +- 0.036 for 67 poisoned
    of 1,347) and 0.1 below the lowest measured median."""
    ctx, _, is_poison = toy
    dbr = DBR(sd_epochs=8, sd_lr=0.05, intra_epochs=2, transforms=("affine",))
    aurocs, deltas = [], []
    for seed in (TEST_SEED, TEST_SEED + 1, TEST_SEED + 2):
        draw = dataclasses.replace(ctx, seed=seed)
        deltas.append(dbr.fct(draw, dbr.sd_model(draw)))
        aurocs.append(roc_auc_score(is_poison.numpy(), deltas[-1].numpy()))
    threshold("median AUROC of 3 draws", sorted(aurocs)[1], ">=", 0.6)
    delta = deltas[0]
    clean, poison = dbr.split(delta)
    # the authors' thresholds: delta <= s[floor(0.2 N)] is clean (one more than floor(0.2 N) without ties)
    assert len(clean) == int(0.2 * len(delta)) + 1 and len(poison) == int(0.05 * len(delta))
    assert delta[poison].min() >= delta[clean].max()


def test_dbr_transform_and_intra_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(random_affine(x, g, 0.0, 0.0), x)   # identity transform keeps the image
    moved = random_affine(x, g, 180.0, 0.2)
    assert moved.shape == x.shape and not torch.equal(moved, x)
    y = torch.tensor([0, 0, 1, 1])
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    orth = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert intra_class_loss(same, y, 2) > intra_class_loss(orth, y, 2)


# --- SCAn -------------------------------------------------------------------------------------------

def _mixture_features(gen, k=5, m=16, n=150, n_poison=60, target=TARGET, means=None, shift=None):
    """Class means far apart, unit within-class noise; the target class also holds a second mode."""
    means = torch.randn(k, m, generator=gen) * 4 if means is None else means
    shift = torch.randn(m, generator=gen) if shift is None else shift
    feats, labels = [], []
    for c in range(k):
        feats.append(means[c] + torch.randn(n, m, generator=gen))
        labels.append(torch.full((n,), c))
    feats.append(means[target] + 6 * shift / shift.norm() + torch.randn(n_poison, m, generator=gen))
    labels.append(torch.full((n_poison,), target))
    is_poison = torch.cat([torch.zeros(k * n, dtype=torch.bool), torch.ones(n_poison, dtype=torch.bool)])
    return torch.cat(feats), torch.cat(labels), is_poison, means, shift


def test_scan_flags_the_target_class_only():
    # On features where the target class is a two-component mixture (what a backdoor does to its
    # representations) SCAn must flag that class alone, and its smaller subgroup is the poison.
    # (On the digits toy, fitting the global model on D hides the target class; with a clean
    # reserve it is found: tests/test_scan_fp_fidelity.py.)
    for seed in range(3):
        feats, y, is_poison, means, shift = _mixture_features(torch.Generator().manual_seed(seed))
        det = scan_detect(feats, y, 5, torch.Generator().manual_seed(seed), math.e ** 2)
        assert det["flagged_classes"] == [TARGET], det["j"]
        flagged = det["flagged"]
        assert is_poison[flagged].float().mean().item() >= 0.9
        assert is_poison[flagged].sum() >= 0.9 * is_poison.sum()
        # with trusted clean references, the subgroup holding fewer of them is the poison
        ref, ref_y, *_ = _mixture_features(torch.Generator().manual_seed(seed + 100), n=30, n_poison=0,
                                           means=means, shift=shift)
        det = scan_detect(feats, y, 5, torch.Generator().manual_seed(seed), math.e ** 2, ref, ref_y)
        assert TARGET in det["flagged_classes"]
        assert is_poison[det["flagged"]].float().mean().item() >= 0.9


@pytest.mark.slow
def test_scan_runs_on_the_toy_model(toy):
    ctx, model, _ = toy
    det = SCAnFT(trusted_reserve=False).scan(ctx, model)
    assert det["j"].shape == (10,) and torch.isfinite(det["j"]).all()
    # the median-centred anomaly index with numpy's median of 10 values (mean of the two middle
    # ones): those two are equally far from it, and they are the closest
    lowest = det["j"].sort().values
    assert lowest[0] == pytest.approx(float(lowest[1]), rel=1e-9)


def test_scan_clean_data_flag_is_per_instance():
    assert SCAnFT().needs().clean_data is True                       # the reference design: the reserve
    assert SCAnFT(trusted_reserve=False).needs().clean_data is False
    with pytest.raises(RuntimeError, match="clean reserve"):
        SCAnFT().scan(DefenseContext(train=None, num_classes=10, make_model=None, trainer=_NoFeatures()),
                        None)


class _NoFeatures:
    def features(self, model, x):
        return torch.zeros(1, 2)


# --- NONE -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_none_flags_mostly_poison(toy, threshold):
    ctx, model, is_poison = toy
    det = NONE().detect(ctx, model)
    flagged = det["flagged"]
    assert len(flagged) > 0
    threshold("precision", is_poison[flagged].float().mean(), ">=", 0.8)
    threshold("recall", is_poison[flagged].float().sum() / is_poison.sum(), ">=", 0.5)
    # per monitored conv (all six of the small CNN), ceil(3%) channels are selected
    units = monitored_units(model)
    assert len(units) == 6 and list(det["selected"]) == [u.name for u in units]
    assert all(len(det["selected"][u.name]) == -(-u.conv.out_channels * 3 // 100) for u in units)


@pytest.mark.slow
def test_none_reset_zeroes_channel_and_consumer(toy):
    ctx, model, _ = toy
    m = copy.deepcopy(model)
    units = monitored_units(m)
    assert [u.conv.out_channels for u in units] == [16, 16, 32, 32, 64, 64]  # every conv of the small CNN
    last, first = units[-1], units[0]
    reset_selected(m, {last.name: torch.tensor([3]), first.name: torch.tensor([2])})
    assert last.conv.weight[3].abs().sum() == 0 and m.head.weight[:, 3].abs().sum() == 0
    assert last.bn.weight[3] == 0 and last.bn.bias[3] == 0
    assert first.conv.weight[2].abs().sum() == 0 and units[1].conv.weight[:, 2].abs().sum() == 0
    fm = m.feature_map(ctx.trainer.to_float(ctx.train.x[:16]))
    assert fm[:, 3].abs().max() == 0


# --- end to end through the runner -------------------------------------------------------------------

@pytest.mark.slow
def test_end_to_end_through_runner(tmp_path):
    raw = {"name": "detect", "datasets": [{"name": "digits", "train_limit": 300, "test_limit": 100}],
           "models": ["small_cnn"], "recipe": {"epochs": 2, "batch_size": 64, "crop_padding": 2},
           "attacks": ["badnet"],
           "defenses": [{"name": "abl", "isolation_epochs": 1, "retrain_epochs": 1, "unlearn_epochs": 1},
                        {"name": "dbr", "sd_epochs": 1, "intra_epochs": 1, "repair_epochs": 1},
                        {"name": "scanft", "trusted_reserve": False, "repair_epochs": 1, "threshold": 0.0},
                        {"name": "scanft", "repair_epochs": 1, "threshold": 0.0},
                        {"name": "nonlinearity", "e1_epochs": 1, "e2_epochs": 1}]}
    matrix = parse_matrix(raw)
    outcomes = run_matrix(matrix, Runner(Store(tmp_path)), progress=None)
    assert [o.status for o in outcomes] == ["done"] * 5, [o.error for o in outcomes]
    rows = {(o.result["defense"], o.result["clean_data"]): o.result for o in outcomes}
    for key in ("abl", "dbr", "nonlinearity"):
        r = rows[(key, 0.0)]
        d = r["detection"]  # the rates and the flagged count describe one set of flags
        assert d["flagged"] == round(d["tpr"] * r["n_poison"] + d["fpr"] * (r["n_train"] - r["n_poison"]))
    assert rows[("abl", 0.0)]["detection"]["flagged"] == rows[("abl", 0.0)]["info"]["n_isolated"] == 3
    assert rows[("nonlinearity", 0.0)]["detection"]["flagged"] == rows[("nonlinearity", 0.0)]["info"]["n_flagged"]
    assert ("scanft", 0.0) in rows and ("scanft", 0.05) in rows  # the reserve variant is tagged
    assert rows[("nonlinearity", 0.0)]["defense_name"].startswith("NONE")
