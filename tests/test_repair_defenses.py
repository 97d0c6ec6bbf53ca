"""Defenses that repair a trained model: FineTuning, FinePruning, CLP, CutMix."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.execution.loop import run_matrix
from bench.core.data import ImageSet, load_dataset
from bench.core.defense import DefenseContext
from bench.core.models import Classifier, build_model
from bench.core.registry import DEFENSES
from bench.core.trainer import Recipe, Trainer
from bench.matrix import parse_matrix
from bench.runner import Runner
from bench.store import Store
from conftest import TEST_SEED
from defenses.clp import CLP, CLPError, channel_lipschitz, conv_bn_pairs
from defenses.cutmix import CutMix, CutMixLoss
from defenses.fineprune import (
    ChannelMask,
    FinePruning,
    class_balanced_split,
    second_layer_index,
)
from defenses.finetuning import FineTuning


def make_ctx(model, trainer, reserve=None, train=None, num_classes=10):
    train = train if train is not None else reserve
    return DefenseContext(train=train, num_classes=num_classes, make_model=lambda: None, trainer=trainer,
                          seed=0, clean_reserve=reserve, _backdoored=lambda: copy.deepcopy(model))


# --- registration ---------------------------------------------------------------------------------

def test_registered_with_paper_display_names():
    import csv
    from pathlib import Path
    ref = Path(__file__).resolve().parents[1] / "bench" / "reference" / "advrbd_paper_tables.csv"
    paper = {row["defense"] for row in csv.DictReader(open(ref))}
    for key, name in [("finetuning", "FineTuning"), ("fineprune", "FinePruning"), ("clp", "CLP"),
                      ("cutmix", "CutMix")]:
        cls = DEFENSES.get(key)
        assert cls.display_name == name and name in paper
        assert cls().needs().backdoored_model
    assert FineTuning().needs().clean_data and FinePruning().needs().clean_data
    assert not CLP().needs().clean_data and not CutMix().needs().clean_data
    assert CLP(repair_epochs=2).needs().clean_data  # a repair on the reserve breaks the data-free model
    assert not CutMix(mode="scratch").needs().backdoored_model


# --- FineTuning -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_model():
    ds = load_dataset("digits")
    trainer = Trainer(recipe=Recipe(epochs=2, batch_size=32, crop_padding=2))
    model = build_model("small_cnn", ds.channels, ds.num_classes, ds.mean, ds.std, ds.size)
    torch.manual_seed(TEST_SEED)
    trainer.fit(model, ds.train, seed=TEST_SEED)
    return ds, trainer, model


@pytest.mark.slow
def test_finetuning_changes_weights_and_keeps_accuracy(digits_model, threshold):
    ds, trainer, model = digits_model
    acc0 = trainer.accuracy(model, ds.test)
    threshold("ACC before", acc0, ">", 0.6)
    reserve = ds.train.subset(torch.arange(0, len(ds.train), 4))
    out = FineTuning(epochs=2).run(make_ctx(model, trainer, reserve))
    before, after = model.state_dict(), out.model.state_dict()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert any("weight" in k for k in changed)
    threshold("ACC change", trainer.accuracy(out.model, ds.test) - acc0, ">=", -0.1)


@pytest.mark.slow
def test_finetuning_refuses_without_reserve(digits_model):
    ds, trainer, model = digits_model
    with pytest.raises(RuntimeError, match="clean reserve"):
        FineTuning().run(make_ctx(model, trainer, None, train=ds.train))


# --- FinePruning ------------------------------------------------------------------------------------

def toy_pruning_task(n=400, seed=0):
    """A 1x1-conv model whose channel activations we know.

    Channels 0-2 are dormant (weights 0.01-0.03, head weight 0); channel 3 carries input 0 and
    channel 4 input 1 (they decide the class); channel 5 is the most active (weight 3) but unused.
    Labels are the intact model's predictions, so the unpruned accuracy is 100%.
    """
    conv = nn.Conv2d(3, 6, 1, bias=False)
    w = torch.zeros(6, 3)
    w[0, 0], w[1, 1], w[2, 2] = 0.01, 0.02, 0.03
    w[3, 0], w[4, 1], w[5, 2] = 1.0, 1.2, 3.0
    model = Classifier(nn.Sequential(nn.Sequential(conv, nn.ReLU())), 6, 2, (0.0,) * 3, (1.0,) * 3)
    with torch.no_grad():
        conv.weight.copy_(w.view(6, 3, 1, 1))
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.weight[0, 3] = 1.0
        model.head.weight[1, 4] = 1.0 / 1.2
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 4, 4), generator=gen, dtype=torch.uint8)
    trainer = Trainer(recipe=Recipe(batch_size=32, crop_padding=0, flip=False))
    y = trainer.predict(model, x)
    assert 0.3 < y.float().mean() < 0.7
    return model, trainer, ImageSet(x, y)


def features(model, x):
    with torch.no_grad():
        return model.features(x.float() / 255)


@pytest.mark.parametrize("acc_drop,expected", [(0.04, [0, 1, 2]), (0.6, [0, 1, 2, 3, 4])])
def test_fineprune_prunes_dormant_first_and_stops_at_threshold(acc_drop, expected):
    model, trainer, reserve = toy_pruning_task()
    fp = FinePruning(acc_drop=acc_drop, finetune_epochs=0)
    out = fp.run(make_ctx(model, trainer, reserve, num_classes=2))
    assert sorted(out.info["pruned_channels"]) == expected
    assert out.info["pruned_channels"] == expected  # in increasing order of mean activation
    f = features(out.model, reserve.x)
    assert torch.all(f[:, expected] == 0)
    kept = [c for c in range(6) if c not in expected]
    assert torch.all(f[:, kept].abs().sum(0) > 0)
    # the stop: the kept pruning is within tolerance, one more channel would exceed it
    base = out.info["holdout_acc_unpruned"]
    curve = out.info["holdout_acc_curve"]
    assert base == 1.0
    assert all(base - a <= acc_drop for a in curve[:len(expected)])
    if len(expected) < 5:
        assert base - curve[len(expected)] > acc_drop
    # the original model is untouched (a copy was pruned), and the result is still a Classifier
    assert isinstance(out.model, Classifier)
    assert not any(isinstance(m, ChannelMask) for m in model.modules())


def test_fineprune_mask_survives_finetuning():
    model, trainer, reserve = toy_pruning_task()
    out = FinePruning(acc_drop=0.04, finetune_epochs=3, lr=0.05).run(make_ctx(model, trainer, reserve, num_classes=2))
    assert not torch.equal(out.model.body[0][0].weight, model.body[0][0].weight)  # fine-tuning ran
    f = features(out.model, reserve.x)
    assert torch.all(f[:, [0, 1, 2]] == 0)
    mask = [m for m in out.model.modules() if isinstance(m, ChannelMask)]
    assert len(mask) == 1 and mask[0].mask.tolist() == [0, 0, 0, 1, 1, 1]
    assert "body.0.2.mask" in out.model.state_dict()
    assert "pruned_only" in out.extra_models


@pytest.mark.slow
def test_fineprune_advrbd_preset_layer_and_rate(digits_model):
    ds, trainer, model = digits_model
    assert second_layer_index(model) == 1                      # small CNN: no stem
    rn = build_model("resnet18", 3, 10, (0.5,) * 3, (0.25,) * 3, 32)
    assert second_layer_index(rn) == 2                         # ResNet: body[0] is the stem
    reserve = ds.train.subset(torch.arange(0, len(ds.train), 5))
    out = FinePruning(preset="advrbd").run(make_ctx(model, trainer, reserve))
    assert out.info["layer"] == 1 and out.info["channels"] == 64
    assert out.info["pruned"] == int(0.2 * 64) and out.info["finetune_epochs"] == 0
    mask = out.model.body[1][-1]
    assert isinstance(mask, ChannelMask) and int((mask.mask == 0).sum()) == 12
    # the pruned channels are the 12 least active on the activation part of the reserve
    main, _ = class_balanced_split(reserve.y, 0.2, make_ctx(model, trainer, reserve).rng("holdout"))  # the defense's split
    with torch.no_grad():
        x = reserve.x[main].float() / 255
        act = model.body[:2](model.normalize(x)).mean(dim=(0, 2, 3))
    # (recomputed here in another memory format and batch split: channels whose activations differ by
    # less than the float noise could swap places at the 12th rank)
    pruned = torch.tensor(out.info["pruned_channels"])
    kept = torch.tensor([c for c in range(64) if c not in set(pruned.tolist())])
    tol = 1e-4 * float(act.abs().max())
    assert float(act[pruned].max()) <= float(act[kept].min()) + tol
    assert len(set(pruned.tolist()) ^ set(torch.argsort(act)[:12].tolist())) <= 2  # at most one swap
    assert trainer.predict(out.model, ds.test.x).shape == (len(ds.test),)


def test_class_balanced_split():
    y = torch.arange(10).repeat_interleave(20)
    main, hold = class_balanced_split(y, 0.2, torch.Generator().manual_seed(1))
    assert len(set(main.tolist()) & set(hold.tolist())) == 0 and len(main) + len(hold) == 200
    assert torch.bincount(y[hold]).tolist() == [4] * 10


# --- CLP ----------------------------------------------------------------------------------------------

def handmade_conv_bn(seed=0, outlier=5):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 16, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(16)
    with torch.no_grad():
        conv.weight.normal_()
        conv.weight[outlier] *= 8
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_var.uniform_(0.2, 2.0)
        bn.weight[3] = -1.0  # |gamma| is used
    body = nn.Sequential(nn.Sequential(conv, bn, nn.ReLU()))
    return Classifier(body, 16, 3, (0.0,) * 4, (1.0,) * 4).eval(), conv, bn


def direct_uclc(conv, bn, eps=1e-5):
    w = conv.weight.detach().numpy()
    g, var = bn.weight.detach().numpy(), bn.running_var.numpy()
    out = []
    for k in range(w.shape[0]):
        m = w[k].reshape(w.shape[1], -1) * abs(g[k] / np.sqrt(max(var[k], eps)))
        out.append(np.linalg.svd(m, compute_uv=False)[0])
    return np.array(out)


def test_clp_constants_match_direct_svd_and_prune_above_threshold():
    model, conv, bn = handmade_conv_bn()
    ref = direct_uclc(conv, bn)
    np.testing.assert_allclose(channel_lipschitz(conv, bn, 1e-5).numpy(), ref, rtol=1e-4)
    u = 3.0
    expected = set(np.nonzero(ref > ref.mean() + u * ref.std(ddof=1))[0].tolist())
    assert 5 in expected
    gamma0, beta0 = bn.weight.detach().clone(), bn.bias.detach().clone()
    info = CLP(u=u).prune(model)
    assert set(info["layers"][0]["pruned"]) == expected and info["pairs"] == 1
    assert info["layers"][0]["threshold"] == pytest.approx(ref.mean() + u * ref.std(ddof=1), rel=1e-4)
    keep = [k for k in range(16) if k not in expected]
    assert torch.all(bn.weight[list(expected)] == 0) and torch.all(bn.bias[list(expected)] == 0)
    assert torch.equal(bn.weight[keep], gamma0[keep]) and torch.equal(bn.bias[keep], beta0[keep])
    # a lower u prunes a superset
    model2, conv2, bn2 = handmade_conv_bn()
    low = set(CLP(u=1.0).prune(model2)["layers"][0]["pruned"])
    assert low == set(np.nonzero(ref > ref.mean() + ref.std(ddof=1))[0].tolist()) and expected <= low


def test_clp_eps_guard_on_dead_channel():
    _, conv, bn = handmade_conv_bn()
    bn.running_var[7] = 0.0
    lips = channel_lipschitz(conv, bn, 1e-5)
    assert torch.isfinite(lips).all()
    np.testing.assert_allclose(lips.numpy(), direct_uclc(conv, bn), rtol=1e-4)


def test_clp_preact_pairs_by_dataflow_and_strict_refuses():
    m = build_model("preact_resnet18", 3, 10, (0.5,) * 3, (0.25,) * 3, 32).eval()
    pairs, unpaired = conv_bn_pairs(m)
    # the genuine pairs are conv1 -> bn2 of every block; module-order pairing would (wrongly)
    # pair each bn1 with the previous block's conv2
    assert pairs == [(f"body.{s}.{b}.conv1", f"body.{s}.{b}.bn2") for s in range(1, 5) for b in range(2)]
    assert set(unpaired) == {f"body.{s}.{b}.bn1" for s in range(1, 5) for b in range(2)} | {"body.4.2.bn"}
    with pytest.raises(CLPError, match="PreAct"):
        CLP(strict=True).prune(m)
    g = m.body[2][0].bn1.weight.detach().clone()
    info = CLP().prune(m)
    assert info["pairs"] == 8 and torch.equal(m.body[2][0].bn1.weight, g)
    # plain ResNet-18 and the small CNN: every BN is paired
    assert conv_bn_pairs(build_model("resnet18", 3, 10, (0.5,) * 3, (0.25,) * 3, 32))[1] == []
    assert len(conv_bn_pairs(build_model("small_cnn", 3, 10, (0.5,) * 3, (0.25,) * 3, 32))[0]) == 6


def test_clp_refuses_model_without_bn():
    model, _, _ = toy_pruning_task()
    with pytest.raises(CLPError, match="no conv -> BatchNorm2d pair"):
        CLP().prune(model)


# --- CutMix -------------------------------------------------------------------------------------------

def test_cutmix_lambda_is_box_area_and_loss_is_area_weighted():
    b, h, w = 8, 16, 12
    # every image a distinct constant, so the pasted box and its source are readable from pixels
    x = (torch.arange(b, dtype=torch.float32) / b + 0.01).view(b, 1, 1, 1).expand(b, 3, h, w).contiguous()
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * h * w, 5))
    checked = 0
    for seed in range(12):
        lf = CutMixLoss(seed=seed)
        loss = lf(model, x, y, None)
        lam = lf.last_lambda
        # the batch the loss saw: the same seed makes the same draws (p-draw first, then the mix)
        lf2 = CutMixLoss(seed=seed)
        lf2._uniform()
        xm, ya, yb, lam2, box = lf2.mix(x, y)
        assert box == lf.last_box and lam2 == lam and torch.equal(ya, y)
        # lambda directly from the pixels: the changed region is the box
        changed = (xm != x).any(dim=1).any(dim=0)
        area = int(changed.sum())
        if area:
            rows, cols = changed.any(1).nonzero().squeeze(1), changed.any(0).nonzero().squeeze(1)
            assert area == len(rows) * len(cols)  # a rectangle
            assert (rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1) == box
            # which image was pasted into each one, read from the box's pixels
            src = torch.round((xm[:, 0, rows[0], cols[0]] - 0.01) * b).long()
            assert torch.equal(yb, y[src])
            checked += 1
        assert lam == pytest.approx(1 - area / (h * w))
        out = model(xm)
        direct = lam * F.cross_entropy(out, y, reduction="none") + (1 - lam) * F.cross_entropy(out, yb, reduction="none")
        torch.testing.assert_close(loss, direct)
    assert checked >= 6


def test_cutmix_p0_is_plain_ce_and_clamp_range():
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    lf = CutMixLoss(p=0.0)
    torch.testing.assert_close(lf(model, x, y, None), F.cross_entropy(model(x), y, reduction="none"))
    assert lf.plain_batches == 1 and lf.mixed_batches == 0
    draws = [CutMixLoss(clamp=True, seed=s).sample_lambda() for s in range(50)]
    assert all(0.3 <= d <= 0.7 for d in draws) and min(draws) == 0.3 and max(draws) == 0.7
    free = [CutMixLoss(seed=s).sample_lambda() for s in range(50)]
    assert min(free) < 0.3 and max(free) > 0.7


class _Stop(Exception):
    pass


def test_cutmix_training_killed_mid_way_resumes_to_the_same_weights(tmp_path):
    """The mixing generator travels with the training checkpoint: without it a resumed training
    draws other boxes than an uninterrupted one and ends with other weights."""
    from bench.core.trainer import Checkpoint
    ds = load_dataset("digits")

    def fresh():
        torch.manual_seed(0)
        model = build_model("tiny_cnn", ds.channels, ds.num_classes, ds.mean, ds.std, ds.size)
        return model, Trainer(recipe=Recipe(epochs=3, batch_size=64, lr=0.05, crop_padding=1, flip=False))

    ref, tr = fresh()
    ref_loss = CutMixLoss(seed=TEST_SEED)
    tr.fit(ref, ds.train, loss_fn=ref_loss, seed=TEST_SEED)

    def killed_in_epoch_2(epoch, m):  # after epoch 1's checkpoint, before epoch 2's
        if epoch == 1:
            raise _Stop

    ckpt = Checkpoint(tmp_path / "c.pt", every_s=0)
    model, tr = fresh()
    with pytest.raises(_Stop):
        tr.fit(model, ds.train, loss_fn=CutMixLoss(seed=TEST_SEED), seed=TEST_SEED, checkpoint=ckpt,
               on_epoch=killed_in_epoch_2)
    assert ckpt.load()["epoch"] == 0
    model, tr = fresh()  # a new process: a fresh model and a fresh loss hook at the same seed
    resumed_loss = CutMixLoss(seed=TEST_SEED)
    tr.fit(model, ds.train, loss_fn=resumed_loss, seed=TEST_SEED, checkpoint=ckpt)
    assert (resumed_loss.mixed_batches, resumed_loss.plain_batches) == (ref_loss.mixed_batches, ref_loss.plain_batches)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))


# --- end to end through the runner on digits -----------------------------------------------------------

@pytest.mark.slow
def test_end_to_end_runner_digits(tmp_path, threshold):
    raw = {"datasets": [{"name": "digits", "train_limit": 700}], "models": ["small_cnn"], "seeds": [TEST_SEED],
           "recipe": {"epochs": 2, "batch_size": 32, "crop_padding": 2}, "attacks": ["badnet"],
           "defenses": ["undefended", {"name": "finetuning", "epochs": 2},
                        {"name": "fineprune", "finetune_epochs": 2}, {"name": "fineprune", "preset": "advrbd"},
                        "clp", {"name": "cutmix", "repair_epochs": 1},
                        {"name": "cutmix", "mode": "scratch"}]}
    matrix = parse_matrix(raw)
    outcomes = run_matrix(matrix, Runner(Store(tmp_path)), progress=None)
    assert [o.status for o in outcomes] == ["done"] * 7, [o.error for o in outcomes]
    rows = {(o.result["defense"], str(o.result["defense_params"].get("preset") or
                                      o.result["defense_params"].get("mode") or "")): o.result for o in outcomes}
    for r in rows.values():
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["asr"] <= 1.0 and 0.0 <= r["ra"] <= 1.0
    threshold("lowest defended ACC", min(r["acc"] for r in rows.values()), ">", 0.3)
    und = rows[("undefended", "")]
    threshold("undefended ACC", und["acc"], ">", 0.6)
    assert rows[("finetuning", "")]["clean_data"] == 0.05 and rows[("clp", "")]["clean_data"] == 0.0
    fp = rows[("fineprune", "original")]["info"]
    assert fp["pruned"] == len(fp["pruned_channels"]) == round(fp["pruned_fraction"] * fp["channels"])
    assert fp["pruned_channels"] == fp["channel_order"][:fp["pruned"]]  # the most dormant channels go first
    assert rows[("fineprune", "original")]["defense_name"].startswith("FinePruning")
    assert "pruned_only" in rows[("fineprune", "original")]["extra"]
    assert rows[("cutmix", "repair")]["info"]["mixed_batches"] > 0
    # repaired models start from the shared backdoored model
    assert rows[("clp", "")]["backdoor"]["acc"] == pytest.approx(und["acc"])
