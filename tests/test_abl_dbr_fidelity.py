"""ABL and DBR against their reference implementations.

Differential tests: the expected numbers were produced once by running the reference code on the
inputs built here (same numpy seeds), outside this repository:

* ABL: the authors' code, bboylyg/ABL at commit 3fd736ce0906f24b0672b471ae20016362eefde4,
  ``backdoor_isolation.train_step`` (one epoch of LGA / Flooding SGD) and
  ``backdoor_isolation.compute_loss_value`` + the slice taken by ``isolate_data``;
* DBR: the authors' code, SCLBD/Effective_backdoor_defense at commit
  63fda0e4f5db696a353e2bea070db882399415c3, ``calculate_consistency.calculate_consistency``
  (the FCT distance on a fixed transformed batch), ``calculate_gamma.py`` and
  ``separate_samples.separate_samples`` (the clean/poison split on fixed FCT values).

Only logging shims were needed to run them (a metric helper that fails on current torch, a
``stty`` call at import, ``np.save`` of ragged lists).  Then schedule tests (per-phase
augmentation, lr per epoch, carried optimizers) and, marked slow, mechanism tests on digits.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from attacks.badnet import BadNet
from bench.core.data import ImageSet, load_dataset
from bench.core.defense import DefenseContext
from bench.core.models import small_cnn
from bench.core.trainer import Recipe, Trainer
from conftest import TEST_SEED
from defenses.abl import ABL
from defenses.dbr import DBR

# --- ABL: LGA loss and isolation ------------------------------------------------------------------

def _abl_inputs():
    rs = np.random.RandomState(0)
    x = rs.randint(0, 256, size=(40, 3, 4, 4)).astype(np.uint8)
    w = (rs.randn(5, 48) * 0.3).astype(np.float32)
    b = (rs.randn(5) * 0.1).astype(np.float32)
    y = rs.randint(0, 5, size=40)
    return x, w, b, y


class _Linear(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.fc = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(torch.from_numpy(w))
            self.fc.bias.copy_(torch.from_numpy(b))

    def forward(self, x):
        return self.fc(x.flatten(1))


def _one_lga_epoch(loss_fn):
    """bboylyg/ABL train_step's loop: batches of 10 in order, SGD lr 0.1, Nesterov momentum 0.9,
    weight decay 1e-4.  The labels of the first 20 samples are the model's own predictions, so
    the first two batches' CE (0.267, 0.249) is below gamma = 0.5 and LGA ascends on them."""
    x, w, b, y = _abl_inputs()
    xf = torch.from_numpy(x).float() / 255
    model = _Linear(w, b)
    y = torch.where(torch.arange(40) < 20, model(xf).argmax(1), torch.from_numpy(y).long())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    for i in range(0, 40, 10):
        loss = loss_fn(model, xf[i:i + 10], y[i:i + 10], None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.fc.weight.detach().double(), model.fc.bias.detach().double()


# bboylyg/ABL@3fd736c backdoor_isolation.train_step, gradient_ascent_type 'LGA' and 'Flooding'
# (gamma = flooding = 0.5): both gave these weights after the epoch.
REF_ABL_WEIGHT_SUM = 1.4192767082
REF_ABL_WEIGHT_ABS_SUM = 53.7904485013
REF_ABL_W0 = [0.1834320128, -0.381005168, -0.0259456541, -0.2869206071]
REF_ABL_BIAS = [-0.0223750435, -0.0297900457, 0.0615171045, 0.0923652351, -0.2453446984]


@pytest.mark.parametrize("lga", ["batch", "flooding"])
def test_abl_lga_step_matches_authors_code(lga):
    weight, bias = _one_lga_epoch(ABL(lga=lga).lga_loss)
    assert float(weight.sum()) == pytest.approx(REF_ABL_WEIGHT_SUM, abs=1e-5)
    assert float(weight.abs().sum()) == pytest.approx(REF_ABL_WEIGHT_ABS_SUM, abs=1e-5)
    assert weight[0, :4].tolist() == pytest.approx(REF_ABL_W0, abs=1e-6)
    assert bias.tolist() == pytest.approx(REF_ABL_BIAS, abs=1e-6)


def test_abl_lga_fixture_exercises_the_ascent():
    # plain descent (no sign flip) and the per-example form must end elsewhere on these batches
    def plain(m, x, y, idx):
        return F.cross_entropy(m(x), y)

    def per_example(m, x, y, idx):  # per-sample values; the trainer takes their mean
        return ABL(lga="sample").lga_loss(m, x, y, idx).mean()

    for fn in (plain, per_example):
        weight, _ = _one_lga_epoch(fn)  # (the weight sum is no witness: CE gradients sum to 0 over classes)
        assert max(abs(a - b) for a, b in zip(weight[0, :4].tolist(), REF_ABL_W0)) > 1e-3


def test_abl_isolation_matches_authors_code():
    # bboylyg/ABL@3fd736c compute_loss_value (eval-mode CE, np.argsort) then isolate_data's
    # losses_idx[:int(N * 0.01)] on these 250 samples and the initial linear model: [24, 179]
    # (the five lowest losses in order: 179, 24, 132, 14, 87).  floor(2.5) = 2, not ceil = 3.
    _, w, b, _ = _abl_inputs()
    rs = np.random.RandomState(1)
    x = torch.from_numpy(rs.randint(0, 256, size=(250, 3, 4, 4)).astype(np.uint8))
    y = torch.from_numpy(rs.randint(0, 5, size=250))
    trainer = Trainer(channels_last=False)
    ctx = DefenseContext(train=ImageSet(x, y), num_classes=5, make_model=None, trainer=trainer)
    isolated, losses = ABL(isolation_ratio=0.01).isolate(ctx, _Linear(w, b))
    assert isolated.tolist() == [24, 179]
    assert losses.argsort()[:5].tolist() == [179, 24, 132, 14, 87]


# --- DBR: FCT distance and split --------------------------------------------------------------------

class _Seq(nn.Module):
    """The network of the DBR fixture: ``features`` = every layer but the last (the reference's
    ``nn.Sequential(*list(model.module.children())[:-1])``)."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                 nn.Flatten(), nn.Linear(16, 5))

    def features(self, x):
        return self.seq[:-1](x)

    def forward(self, x):
        return self.seq(x)


def _dbr_fixture():
    rs = np.random.RandomState(0)
    x1 = rs.randint(0, 256, size=(6, 3, 8, 8)).astype(np.uint8)
    x2 = rs.randint(0, 256, size=(6, 3, 8, 8)).astype(np.uint8)
    torch.manual_seed(0)  # the module's own init, then overwritten in parameter order
    model = _Seq()
    with torch.no_grad():
        for p in model.seq.parameters():
            p.copy_(torch.from_numpy(rs.randn(*p.shape).astype(np.float32) * 0.5))
    return torch.from_numpy(x1), torch.from_numpy(x2), model


# SCLBD/Effective_backdoor_defense@63fda0e calculate_consistency.calculate_consistency on
# (inputs[0] = x1 / 255, inputs[2] = x2 / 255), no normalisation: mean((f(x1) - f(x2))^2, dim=1)
REF_FCT = [0.02431056648, 0.02219654806, 0.0306233149, 0.0305415988, 0.02152584493, 0.02590899542]


def test_dbr_fct_distance_matches_authors_code():
    x1, x2, model = _dbr_fixture()
    trainer = Trainer(channels_last=False)
    ctx = DefenseContext(train=ImageSet(x1, torch.zeros(6, dtype=torch.long)), num_classes=5,
                         make_model=None, trainer=trainer)
    fixed = x2.float() / 255
    delta = DBR().fct(ctx, model, transform=lambda x, gen: fixed[:len(x)])
    assert delta.tolist() == pytest.approx(REF_FCT, rel=1e-5)
    # the random tau path runs too and yields different, positive values
    tau = DBR().fct(ctx, model)
    assert (tau > 0).all() and not torch.allclose(tau, delta)


def test_dbr_split_matches_authors_code():
    # calculate_gamma.py on these 40 values printed gamma_low 0.0625, gamma_high 1.0
    # (floor(0.2 * 40) = 8, floor(0.05 * 40) = 2); separate_samples then put delta <= gamma_low in
    # the clean set and, otherwise, delta >= gamma_high in the poison set.  Ties make both sets
    # larger than 8 and 2.
    delta = torch.from_numpy((np.random.RandomState(2).randint(0, 9, size=40) / 8.0) ** 2)
    clean, poison = DBR().split(delta)
    assert clean.tolist() == [3, 6, 7, 19, 26, 27, 29, 31, 34, 37]
    assert poison.tolist() == [0, 1, 4, 22, 33, 35, 39]


# --- schedules: augmentation per phase, lr per epoch, optimizers carried over -----------------------

class _SpyTrainer(Trainer):
    """Records, per optimisation step, the phase's augmentation flag, the lr and the optimizer."""

    def __post_init__(self):
        super().__post_init__()
        self.steps = []
        self._augment = None

    def load_batch(self, data, idx, gen, augment=True, extra_augment=None, recipe=None):
        self._augment = augment
        return super().load_batch(data, idx, gen, augment, extra_augment, recipe)

    def step(self, model, opt, loss, n):
        g = opt.param_groups[0]
        self.steps.append((self._augment, g["lr"], opt, g["weight_decay"], g["nesterov"]))  # the optimizer itself: an id could be reused
        super().step(model, opt, loss, n)


def _tiny_ctx(n=40, trainer=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 4
    trainer = trainer or _SpyTrainer(recipe=Recipe(batch_size=20))

    def make():
        torch.manual_seed(0)
        return small_cnn(1, 4, (0.5,), (0.25,), 8, widths=(4, 4, 4))

    return DefenseContext(train=ImageSet(x, y), num_classes=4, make_model=make, trainer=trainer, seed=0,
                          _backdoored=make)


def test_dbr_schedule_follows_the_authors_code():
    # SD model and intra-class fine-tuning: no augmentation, one SGD (momentum 0.9 without
    # Nesterov, weight decay 5e-4) whose lr follows torch's CosineAnnealingLR(T_max=100) stepped
    # once per epoch across both phases; repair: crop + flip at a constant 1e-4, another optimizer.
    ctx = _tiny_ctx()
    dbr = DBR(sd_epochs=2, intra_epochs=3, repair_epochs=2)
    dbr.run(ctx)
    steps = ctx.trainer.steps
    sd = steps[:2 * 5 * 2]                        # (2 + 3) epochs x 2 batches, the clean/poison passes follow
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=100)
    expected = []
    for _ in range(5):
        expected += [ref_opt.param_groups[0]["lr"]] * 2
        ref_opt.step()
        ref.step()
    assert [s[1] for s in sd[:10]] == pytest.approx(expected, rel=1e-9)
    assert {s[0] for s in sd[:10]} == {False}
    assert len({s[2] for s in sd[:10]}) == 1 and sd[0][3] == 5e-4 and sd[0][4] is False
    repair = steps[10:]
    assert repair and {s[0] for s in repair} == {True} and {s[1] for s in repair} == {1e-4}
    assert len({s[2] for s in repair}) == 1 and repair[0][2] != sd[0][2] and repair[0][4] is False


def test_abl_schedule_follows_the_authors_code():
    # isolation: no augmentation, constant 0.1, weight decay 1e-4; re-training: crop + flip,
    # 0.1 then 0.01 after 2/3 of its epochs; unlearning: no augmentation at 5e-4 with the
    # re-training optimizer carried over.
    ctx = _tiny_ctx(n=200)
    ABL(isolation_epochs=2, retrain_epochs=3, unlearn_epochs=2).run(ctx)
    steps = ctx.trainer.steps
    iso, retrain, unlearn = steps[:20], steps[20:20 + 3 * 10], steps[50:]
    assert {s[0] for s in iso} == {False} and {s[1] for s in iso} == {0.1} and iso[0][3] == 1e-4
    assert {s[0] for s in retrain} == {True}
    assert [s[1] for s in retrain] == pytest.approx([0.1] * 20 + [0.01] * 10)
    assert len(unlearn) == 2 and {s[0] for s in unlearn} == {False} and {s[1] for s in unlearn} == {5e-4}
    assert unlearn[0][2] == retrain[0][2] != iso[0][2]
    assert retrain[0][4] is True and retrain[0][3] == 1e-4


def test_abl_backdoorbench_preset():
    bb = ABL(preset="backdoorbench")
    assert (bb.isolation_epochs, bb.isolation_lr, bb.retrain_lr, bb.unlearn_epochs, bb.unlearn_lr) == \
        (20, 0.01, 0.01, 20, 1e-4)
    assert ABL(preset="backdoorbench", unlearn_epochs=7).unlearn_epochs == 7  # explicit values win
    with pytest.raises(ValueError):
        ABL(preset="nope")


# --- mechanisms at toy scale ------------------------------------------------------------------------

def _digits_badnet(patch, seed=0):
    ds = load_dataset("digits")
    attack = BadNet(target=1, patch_size=patch, style="checker")
    poisoned = attack.poison(ds.train, seed=seed)
    trainer = Trainer(recipe=Recipe(epochs=8, batch_size=64, crop_padding=0, flip=False))

    def make():
        torch.manual_seed(seed)
        return trainer.prepare(small_cnn(1, 10, ds.mean, ds.std, ds.size, widths=(16, 32, 64)))

    ctx = DefenseContext(train=poisoned.train, num_classes=10, make_model=make, trainer=trainer, seed=seed)
    return ctx, poisoned.is_poison


@pytest.mark.slow
def test_abl_isolation_ranks_poison_low_when_the_backdoor_is_learned_first(threshold):
    """ABL's premise is that the poison is learned before the clean task.  On 16x16 digits the
    default 2x2 BadNet patch is learned *after* the digits (poison median loss 1.7-4.9 against
    0.05-0.2 for clean samples over 10 isolation epochs; isolation precision 0.0), so the premise
    fails and nothing could be isolated.  A 6x6 checker patch is learned within two epochs and its
    loss goes to ~0 while LGA holds the clean loss near gamma.

    At this scale the isolation is sensitive to the data order alone.  With BackdoorBench's
    isolation schedule (20 epochs at lr 0.01, no augmentation), seeds 0-2, measured: precision of
    the lowest 1 % 0.00 / 0.23 / 0.85 and AUROC of -loss 0.45 / 0.74 / 0.93 (with the isolation's
    data order drawn from its own named stream); the same cells with the cell seed as the data
    order gave 0.92 / 0.00 / 0.62 and 0.87 / 0.89 / 0.87.  Per draw (seeds 0-6, this test's
    setting), AUROC at 1 thread 0.49 0.89 0.82 1.00 0.91 0.79 0.96 and at 2 threads 0.51 0.17 0.78
    0.99 0.96 0.44 1.00: a third of the draws at 2 threads are at or below chance, so the median of
    three draws fell to 0.51 (seeds 0-2, 2 threads).  The test asks for the median AUROC over five
    draws (seeds s..s+4, s = 0, 1, 2 at 1 and 2 threads: 0.78 to 0.96) against 0.7, not for one
    run's precision."""
    aurocs = []
    for seed in range(TEST_SEED, TEST_SEED + 5):
        ctx, is_poison = _digits_badnet(patch=6, seed=seed)
        abl = ABL(preset="backdoorbench")
        isolated, losses = abl.isolate(ctx, abl.isolation_model(ctx))
        assert len(isolated) == int(0.01 * len(is_poison))
        aurocs.append(roc_auc_score(is_poison.numpy(), -losses.numpy()))
    threshold("median AUROC of 5 draws", sorted(aurocs)[2], ">=", 0.7)


@pytest.mark.slow
def test_dbr_fct_separates_poison_with_the_reference_schedule(threshold):
    """The reference schedule (2 no-augmentation epochs at lr 0.01, 10 intra-class epochs, tau =
    rotation + translation) on digits with a 6x6 checker patch that the SD model learns in its
    42 steps: the FCT ranks poison high (the 2x2 patch is not learned in 42 steps and gives AUROC
    0.42, chance).  Measured over seeds 0-2 at 1 and 2 threads: AUROC 0.82-0.92, TPR 0.66-0.78 at
    the alpha_p = 5 % split, poison share of the clean split 0.0-0.022; bounds 0.75, 0.5, 0.05."""
    ctx, is_poison = _digits_badnet(patch=6, seed=TEST_SEED)
    dbr = DBR()
    delta = dbr.fct(ctx, dbr.sd_model(ctx))
    threshold("AUROC", roc_auc_score(is_poison.numpy(), delta.numpy()), ">=", 0.75)
    clean, poison = dbr.split(delta)
    threshold("TPR of the poison split", is_poison[poison].float().sum() / is_poison.sum(), ">=", 0.5)
    threshold("poison share of the clean split", is_poison[clean].float().mean(), "<=", 0.05)
