"""AdvrBD on a small backdoored model (digits 16x16, BadNet 5%, small_cnn).

Digits are 8x8 images upscaled to 16x16: smooth, high-margin inputs on which PGD with the CIFAR
default eps = 16/255 flips almost no prediction (~2%), so the ranking degenerates (eps must be
calibrated per dataset).  ``DIGITS`` holds that calibration (flip rate ~55-80%), and one test
checks that :func:`calibrate_eps` finds it.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score

from advrbd import (
    AdvrBD,
    Observer,
    calibrate_eps,
    enhance,
    patch_masks,
    pgd_patch,
    robustness_scores,
    unlearn_phase,
)
from advrbd.identify import rule
from bench.core import metrics
from bench.core.data import load_dataset
from bench.core.defense import DefenseContext
from bench.core.models import build_model
from bench.core.registry import ATTACKS, DEFENSES
from bench.core.trainer import Recipe, Trainer
from bench.matrix import load_matrix, parse_matrix
from bench.runner import Runner
from bench.store import Store
from conftest import TEST_SEED

REPO = Path(__file__).resolve().parents[1]
#: no random crop: the 2x2 corner trigger is then learned within a few epochs, which keeps the file fast
RECIPE = Recipe(epochs=10, batch_size=64, lr=0.05, crop_padding=0)
#: eps/radius calibrated for 16x16 digits; 3 PGD steps keep the file fast
DIGITS = dict(eps=64 / 255, radius=4, pgd_steps=3)
DIGITS_SCORE = AdvrBD(**DIGITS).score_config()


@pytest.fixture(scope="module")
def backdoored():
    ds = load_dataset("digits")
    poisoned = ATTACKS.get("badnet")(poison_ratio=0.05).poison(ds.train, seed=TEST_SEED)
    trainer = Trainer(recipe=RECIPE)
    torch.manual_seed(TEST_SEED)
    model = build_model("small_cnn", ds.channels, ds.num_classes, ds.mean, ds.std, ds.size)
    model = trainer.fit(model, poisoned.train, seed=TEST_SEED)
    return ds, poisoned, trainer, model


def test_pgd_respects_eps_and_mask():
    torch.manual_seed(0)
    model = build_model("small_cnn", 3, 10, (0.5,) * 3, (0.25,) * 3, 16).eval()
    x = torch.rand(8, 3, 16, 16)
    mask = patch_masks(8, 16, 16, 2, torch.Generator().manual_seed(1))
    assert mask.shape == (8, 1, 16, 16)
    assert torch.all(mask.sum((1, 2, 3)) == 16)  # a 4x4 square per sample
    cfg = AdvrBD(eps=8 / 255, pgd_steps=5).score_config()
    x_adv, kl, _ = pgd_patch(model, x, mask, cfg, torch.Generator().manual_seed(2))
    diff = x_adv - x
    assert diff.abs().max() <= cfg.eps + 1e-6
    assert torch.all(diff[(mask == 0).expand_as(diff)] == 0)
    assert diff.abs().sum() > 0 and torch.all(kl >= -1e-6) and kl.mean() > 0
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # positions differ between samples (per-sample masks)
    assert len({tuple(m.nonzero()[0].tolist()) for m in mask}) > 1
    # "replace" mode keeps the outside of the patch too
    x_rep, _, _ = pgd_patch(model, x, mask, AdvrBD(patch_mode="replace", pgd_steps=2).score_config(), torch.Generator().manual_seed(2))
    assert torch.all((x_rep - x)[(mask == 0).expand_as(x)] == 0)


@pytest.mark.slow
def test_score_ranks_poison_as_robust(backdoored, threshold):
    """Measured over seeds 0-2 at 1 and 2 threads: AUROC 0.83-0.97; bound 0.75."""
    ds, poisoned, trainer, model = backdoored
    scores = robustness_scores(model, poisoned.train.x, DIGITS_SCORE, trainer, torch.Generator().manual_seed(0))
    assert scores.shape == (len(poisoned.train),)
    # low score = robust = poisoned
    auroc = roc_auc_score(poisoned.is_poison.numpy(), (-scores).numpy())
    threshold("AUROC", auroc, ">=", 0.75)


def _enhanced(backdoored, draw=1, **over):
    ds, poisoned, trainer, model = backdoored
    import copy

    d = AdvrBD(**{**DIGITS, "rounds": 3, "partition_rate": 0.04, **over})
    seen = []
    obs = Observer(model=lambda t, m: seen.append(t), flags=lambda t, idx: seen.append(t),
                   scores=lambda t, idx, s: seen.append(t))
    out = enhance(copy.deepcopy(model), poisoned.train, trainer, ds.num_classes, d.score_config(),
                  d.enhance_config(), torch.Generator().manual_seed(draw), observer=obs,
                  identify_rule=lambda logits, y: rule(logits, y))
    return (*out, seen)


@pytest.mark.slow
def test_enhancement_keeps_backdoor_and_collapses_clean_accuracy(backdoored, threshold):
    """The paper's rounds (relearn D_p, then plain ascent on D_c): f_e keeps the backdoor while it
    misclassifies the clean samples it was never asked to unlearn, so its mistakes identify them.

    Over three draws of the enhancement, medians.  Measured with one draw (seeds 0-2 x 1-2
    threads): f_e ASR 1.0, ACC on clean D_p 0.12-0.18, TPR 1.0, FPR 0.12-0.17; D_c's poison share
    0.0 in four runs, 0.006, 0.025 and 0.049 in the others: one draw's partition can sit at the
    5 % base rate, so every statistic is asserted for the median draw.  The medians of three
    draws (seeds 0-2 x 1-2 threads): ASR 1.0, ACC on clean D_p 0.13-0.25, TPR 1.0, FPR 0.12-0.23,
    poison share 0.0-0.006.  Bounds: ASR 0.9, ACC 0.35, TPR 0.9, FPR 0.3, share 0.05."""
    ds, poisoned, trainer, _ = backdoored
    atk = ATTACKS.get("badnet")(poison_ratio=0.05)
    trig = atk.test_set(ds.test)
    stats = []
    for draw in (1, 2, 3):
        f_e, d_c, d_p, hist, seen = _enhanced(backdoored, draw=draw)
        assert len(hist) == 3 and hist[-1]["size_dc"] == len(d_c)
        assert len(d_c) + len(d_p) == len(poisoned.train) and not set(d_c.tolist()) & set(d_p.tolist())
        # the harness saw a round-0 point and every round's model, identification, D_c and scores
        assert {"round0", "identify0", "round3", "identify3", "dc1", "dc3", "score1", "score3"} <= set(seen)
        asr = (trainer.predict(f_e, trig.x)[trig.counts] == trig.target).float().mean()
        clean_dp = d_p[~poisoned.is_poison[d_p]]
        acc_clean_dp = (trainer.predict(f_e, poisoned.train.x[clean_dp]) == poisoned.train.y[clean_dp]).float().mean()
        flagged = rule(trainer.logits(f_e, poisoned.train.x), poisoned.train.y).nonzero().squeeze(1)
        det = metrics.detection(flagged, poisoned.is_poison)
        stats.append({"asr": float(asr), "acc": float(acc_clean_dp), "tpr": det["tpr"], "fpr": det["fpr"],
                      "share": float(poisoned.is_poison[d_c].float().mean())})
    median = {k: sorted(s[k] for s in stats)[1] for k in stats[0]}
    threshold("median f_e ASR", median["asr"], ">=", 0.9)
    threshold("median f_e ACC on clean D_p", median["acc"], "<", 0.35)
    threshold("median TPR", median["tpr"], ">=", 0.9)
    threshold("median FPR", median["fpr"], "<=", 0.3)
    # D_c is mostly clean: partition precision beats the 5 % base rate
    threshold("median poison share of D_c", median["share"], "<", 0.05)


@pytest.mark.slow
def test_joint_enhancement_keeps_clean_accuracy(backdoored, threshold):
    """The earlier joint reading, kept as an option: its capped, switching-off ascent leaves most
    clean samples correctly classified, which is why the paper's rule then flags most clean data."""
    ds, poisoned, trainer, _ = backdoored
    f_e, d_c, d_p, hist, _ = _enhanced(backdoored, enhancement="joint")
    clean_dp = d_p[~poisoned.is_poison[d_p]]
    acc_clean_dp = (trainer.predict(f_e, poisoned.train.x[clean_dp]) == poisoned.train.y[clean_dp]).float().mean()
    threshold("f_e ACC on clean D_p", acc_clean_dp, ">", 0.5)
    assert all("ascent_active" in r for r in hist)


@pytest.mark.slow
def test_divergence_guard_fires_on_a_constructed_collapse(backdoored):
    ds, poisoned, trainer, model = backdoored
    import copy

    d_c = torch.arange(64)
    # an absurd ascent lr blows the logits up in one pass: the loss bound stops the phase
    cfg = AdvrBD(**DIGITS, unlearn_lr=50.0, unlearn_passes=5, guard_loss=50.0, guard_acc=-1.0,
                 guard_every=1).enhance_config()
    stats = unlearn_phase(copy.deepcopy(model), trainer, poisoned.train, d_c, cfg, torch.Generator().manual_seed(0), 10)
    assert stats["guard"] and stats["guard"].startswith("CE(D_c)") and stats["unlearn_steps"] < 5, stats
    # a moderate ascent until D_c is unlearned: the accuracy bound stops it (the model collapses onto
    # one class, so D_c's accuracy bottoms out near that class's share of D_c, about 1/10 here)
    cfg = AdvrBD(**DIGITS, unlearn_lr=0.05, unlearn_passes=50, guard_acc=0.2, guard_loss=1e30,
                 guard_every=1).enhance_config()
    stats = unlearn_phase(copy.deepcopy(model), trainer, poisoned.train, d_c, cfg, torch.Generator().manual_seed(0), 10)
    assert stats["guard"] and stats["guard"].startswith("acc(D_c)") and stats["unlearn_acc_dc"] <= 0.2, stats
    assert stats["unlearn_steps"] < 50
    # the default floor is chance, 1/K
    cfg = AdvrBD(**DIGITS, unlearn_lr=0.05, unlearn_passes=50, guard_every=1).enhance_config()
    stats = unlearn_phase(copy.deepcopy(model), trainer, poisoned.train, d_c, cfg, torch.Generator().manual_seed(0), 10)
    assert stats["guard"] and (stats["unlearn_acc_dc"] <= 0.1 or stats["guard"].startswith("CE")), stats
    # a weak ascent: every pass runs (one 64-sample batch each), the guard never fires
    cfg = AdvrBD(**DIGITS, unlearn_lr=1e-5, unlearn_passes=2, guard_every=1).enhance_config()
    stats = unlearn_phase(copy.deepcopy(model), trainer, poisoned.train, d_c, cfg, torch.Generator().manual_seed(0), 10)
    assert stats["guard"] is None and stats["unlearn_steps"] == 2


@pytest.mark.slow
def test_calibration_finds_digits_eps(backdoored, threshold):
    ds, poisoned, trainer, model = backdoored
    eps, table = calibrate_eps(model, poisoned.train.x[:300], DIGITS_SCORE, trainer,
                               torch.Generator().manual_seed(0), (16 / 255, 64 / 255))
    assert eps == 64 / 255
    threshold("flip rate at 16/255", table[0][1], "<", 0.2)  # 16/255 flips almost nothing on digits
    threshold("flip rate at 64/255", table[1][1], ">", 0.2)


def _run(tmp_path, poison_ratio, train_limit=None, epochs=10, rounds=3):
    raw = {"datasets": [{"name": "digits", "train_limit": train_limit}], "models": ["small_cnn"],
           "recipe": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "crop_padding": 0},
           "attacks": [{"name": "badnet", "poison_ratio": poison_ratio}],
           "defenses": [{"name": "advrbd", "eps": 64 / 255, "radius": 4, "rounds": rounds, "partition_rate": 0.04,
                         "pgd_steps": 3, "relearn_epochs": 1}]}
    matrix = parse_matrix(raw)
    runner = Runner(Store(tmp_path / "runs"))
    return runner.run_cell(matrix.cells[0])


@pytest.mark.slow
def test_end_to_end_no_poison(tmp_path, threshold):
    row = _run(tmp_path, 0.0)
    assert row["n_poison"] == 0 and row["defense_name"].startswith("AdvrBD")
    threshold("ACC", row["acc"], ">", 0.3)  # a working classifier (chance is 0.1), trained on what was kept
    models = [o["tag"] for o in row["observations"] if "kind" not in o]
    assert models[:2] == ["round0", "round1"] and len(models) == 4
    assert 0 < row["info"]["n_clean"] < row["n_train"] and row["detection"]["flagged"] == row["info"]["n_flagged"]
    assert "relearn" in row["extra"] and isinstance(row["info"]["warnings"], list)


@pytest.mark.slow
def test_end_to_end_badnet(tmp_path, threshold):
    """The whole pipeline through the runner: the result's structure and its diagnostics agree."""
    row = _run(tmp_path, 0.05, rounds=1)
    assert not list((tmp_path / "runs" / "partial").glob("cell-*"))  # the enhancement's checkpoint went with the cell
    threshold("undefended ASR", row["backdoor"]["asr"], ">", 0.5)  # the attack worked on the undefended model
    assert len(row["recall"]) == 10 and row["target_recall"] == row["recall"][1]
    rounds = row["info"]["rounds"]
    assert rounds and all({"size_dc", "acc_dc", "acc_dp", "pred_hist", "flagged_per_class"} <= set(r) for r in rounds)
    obs = {o["tag"]: o for o in row["observations"]}
    assert obs["identify1"]["flagged"] == row["detection"]["flagged"]  # the last round is what was identified
    assert row["info"]["n_flagged"] == row["detection"]["flagged"] == sum(row["info"]["flagged_per_class"])
    assert 0.0 <= obs["score1"]["auroc"] <= 1.0 and sum(obs["score1"]["poison_hist"]) == obs["score1"]["n_poison"]


@pytest.mark.slow
def test_one_round_removes_badnet_for_most_draws_of_the_enhancement(backdoored, threshold):
    """AdvrBD's outcome on digits depends on the enhancement's random draw (patch masks, PGD
    starts, batch order).  Measured on the runner's digits cell (BadNet 5 %, small CNN, eps 64/255,
    partition 4 %), over draws of the enhancement's stream: with one round, identification TPR
    0.955-1.0 and ASR 0.0-0.027 in five of seven draws, and TPR 0.42 / ASR 0.97 and TPR > 0.8 /
    ASR 0.21 in the other two; with three rounds, five of nine draws removed the backdoor (TPR
    0.09-1.0, ASR 0.0-0.99).  So this test asks for the median over three draws."""
    from bench.runner import evaluate

    ds, poisoned, trainer, model = backdoored
    trig = ATTACKS.get("badnet")(poison_ratio=0.05).test_set(ds.test)
    defense = AdvrBD(**DIGITS, rounds=1, partition_rate=0.04, relearn_epochs=1)
    tprs, asrs = [], []
    for seed in (0, 1, 2):
        def make(seed=seed):
            torch.manual_seed(seed)
            return trainer.prepare(build_model("small_cnn", ds.channels, ds.num_classes, ds.mean, ds.std, ds.size))
        ctx = DefenseContext(train=poisoned.train, num_classes=10, make_model=make, trainer=trainer, seed=seed,
                             _backdoored=lambda: copy.deepcopy(model))
        out = defense.run(ctx)
        flagged = torch.zeros(len(poisoned.train), dtype=torch.bool)
        flagged[out.flagged] = True
        tprs.append(float(flagged[poisoned.is_poison].float().mean()))
        asrs.append(evaluate(trainer, out.model, ds.test, trig, 10)["asr"])
    threshold("median TPR of 3 draws", sorted(tprs)[1], ">=", 0.8)
    threshold("median ASR of 3 draws", sorted(asrs)[1], "<=", 0.1)


@pytest.mark.parametrize("name", ["advrbd-partition-rate", "advrbd-poison-ratio", "advrbd-architectures",
                                  "advrbd-cpu"])
def test_matrices_load(name):
    m = load_matrix(REPO / "matrices" / f"{name}.yaml")
    assert m.cells and all(c.defense.key in ("advrbd", "undefended") for c in m.cells)
    assert any(c.defense.key == "advrbd" for c in m.cells)


def test_registered():
    cls = DEFENSES.get("advrbd")
    assert cls.display_name == "AdvrBD"
    assert cls().needs().backdoored_model and not cls(warmup_epochs=5).needs().backdoored_model


def test_parameter_docs_are_generated_from_the_class():
    """docs/methods/advrbd.md is generated by ``python -m bench docs`` (see tests/test_docs.py)."""
    from bench.methods_docs import page

    text = page("defense", "advrbd", DEFENSES.get("advrbd"))
    assert "| `unlearn_passes` | int | 20 | > 0 |" in text  # defaults and ranges come from the dataclass
    assert (REPO / "docs" / "methods" / "advrbd.md").read_text() == text


def test_configs_take_every_field_from_the_defense():
    import dataclasses

    from advrbd import EnhanceConfig, ScoreConfig

    d = AdvrBD(rounds=7, eps=0.1, unlearn_lr=1e-3)
    names = {f.name for f in dataclasses.fields(AdvrBD)}
    for cls in (ScoreConfig, EnhanceConfig):
        assert {f.name for f in dataclasses.fields(cls)} <= names  # no renamed mirror of a field
    assert d.enhance_config().rounds == 7 and d.score_config().eps == 0.1 and d.enhance_config().unlearn_lr == 1e-3
    with pytest.raises(ValueError, match="enhancement"):
        AdvrBD(enhancement="sideways")


# --- the enhancement's named choices (issue: Fig. 6's gradual shape) --------------------------------

def test_budget_ascent_runs_its_passes_where_chance_stops_early(backdoored):
    """ascent_stop="budget": the accuracy floor does not end the ascent; every pass runs unless
    the logits diverge (the CE guard still applies)."""
    ds, poisoned, trainer, model = backdoored
    d_c = torch.arange(64)
    common = dict(**DIGITS, unlearn_lr=0.05, unlearn_passes=30, guard_every=1, guard_acc=0.2,
                  guard_loss=1e30)
    chance = unlearn_phase(copy.deepcopy(model), trainer, poisoned.train, d_c,
                           AdvrBD(**common).enhance_config(), torch.Generator().manual_seed(0), 10)
    budget = unlearn_phase(copy.deepcopy(model), trainer, poisoned.train, d_c,
                           AdvrBD(**common, ascent_stop="budget").enhance_config(), torch.Generator().manual_seed(0), 10)
    assert chance["guard"] and chance["unlearn_steps"] < 30
    assert budget["guard"] is None and budget["unlearn_steps"] == 30


def test_round_order_and_scoring_model_are_what_they_say(backdoored, monkeypatch):
    import importlib

    enh = importlib.import_module("advrbd.enhance")  # the module (the package exports a function of that name)

    ds, poisoned, trainer, model = backdoored
    calls = []
    real_relearn, real_unlearn, real_partition = enh.relearn_phase, enh.unlearn_phase, enh.partition

    def relearn(m, *a, **k):
        calls.append(("relearn", id(m)))
        return real_relearn(m, *a, **k)

    def unlearn(m, *a, **k):
        calls.append(("unlearn", id(m)))
        return real_unlearn(m, *a, **k)

    def part(m, *a, **k):
        calls.append(("score", id(m)))
        return real_partition(m, *a, **k)

    monkeypatch.setattr(enh, "relearn_phase", relearn)
    monkeypatch.setattr(enh, "unlearn_phase", unlearn)
    monkeypatch.setattr(enh, "partition", part)
    fast = dict(rounds=2, unlearn_passes=1, pgd_steps=1)
    for over, phases in (({}, ["relearn", "unlearn"]), ({"round_order": "unlearn_relearn"}, ["unlearn", "relearn"])):
        calls.clear()
        f_e = _enhanced(backdoored, **fast, **over)[0]
        assert [c for c, _ in calls if c != "score"] == phases * 2
        assert {m for c, m in calls} == {id(f_e)}  # one model throughout: each round scores f as it ends
    calls.clear()
    f_e = _enhanced(backdoored, **fast, score_model="after_relearn")[0]
    scorers = [m for c, m in calls if c == "score"]
    assert scorers[0] == id(f_e) and scorers[1] != id(f_e)  # round 2 is scored by the snapshot after relearn


def test_score_limit_share_keeps_the_partition_rate_of_what_was_scored(backdoored):
    ds, poisoned, trainer, model = backdoored
    n = len(poisoned.train)
    rate, limit = 0.04, 200
    count = _enhanced(backdoored, rounds=1, partition_rate=rate, score_limit=limit, pgd_steps=1, unlearn_passes=1)
    share = _enhanced(backdoored, rounds=1, partition_rate=rate, score_limit=limit, pgd_steps=1, unlearn_passes=1,
                      score_limit_selects="share")
    assert len(count[1]) == math.ceil(rate * n)          # the earlier rule: the top 27 % of the scored
    assert len(share[1]) == math.ceil(rate * limit)      # the top 4 % of the scored
    assert count[3][0]["scored"] == share[3][0]["scored"] == limit


def test_later_enhancement_choices_keep_earlier_cache_keys():
    from bench.core.params import params_of

    keys = set(params_of(AdvrBD()))
    assert not keys & {"ascent_stop", "round_order", "score_model", "score_limit_selects"}
    assert params_of(AdvrBD(ascent_stop="budget"))["ascent_stop"] == "budget"


@pytest.mark.slow
def test_enhancement_killed_after_a_round_resumes_to_the_same_result(backdoored, tmp_path):
    """A cell killed during round 3 of 3 continues from round 2's checkpoint: the same f_e, D_c,
    round records (but their timings) and observations as an uninterrupted run, and the rounds
    before the kill are not run again.  The checkpoint stays after the enhancement (a kill in a
    later phase does not repeat it) and the harness removes it with the cell's other phases."""
    from bench.core.defense import Observations
    from bench.core.trainer import Checkpoint

    ds, poisoned, _, model = backdoored
    trainer = Trainer(recipe=Recipe(epochs=1, batch_size=64, lr=0.05, crop_padding=0))  # a short clean model
    # scoring after the relearn: the checkpoint carries a second model
    defense = AdvrBD(**DIGITS, rounds=3, partition_rate=0.04, relearn=False, score_model="after_relearn")

    class Killed(Exception):
        pass

    def run(ckpt_dir=None, kill_at=None):
        seen, shown = Observations(), []

        def make():
            torch.manual_seed(TEST_SEED)
            return trainer.prepare(build_model("small_cnn", ds.channels, ds.num_classes, ds.mean, ds.std, ds.size))

        ctx = DefenseContext(train=poisoned.train, num_classes=10, make_model=make, trainer=trainer, seed=TEST_SEED,
                             _backdoored=lambda: copy.deepcopy(model), _observations=seen,
                             _checkpoints=Checkpoint(ckpt_dir / "cell.pt", every_s=0) if ckpt_dir else None)
        def model_seen(tag, m, record=seen.model):
            if tag == kill_at:
                raise Killed
            shown.append(tag)
            record(tag, m)

        seen.model = model_seen
        return defense.run(ctx), seen, shown

    ref, ref_seen, _ = run()
    with pytest.raises(Killed):
        run(tmp_path, kill_at="round3")
    assert (tmp_path / "cell-enhance.pt").exists()
    out, seen, shown = run(tmp_path)
    assert shown == ["round3"]  # rounds 1 and 2 were not run again
    rounds = lambda o: [{k: v for k, v in r.items() if k != "seconds"} for r in o.info["rounds"]]
    assert rounds(out) == rounds(ref) and len(rounds(out)) == 3
    assert torch.equal(out.flagged, ref.flagged)
    assert [(kind, tag) for kind, tag, _ in seen.items] == [(kind, tag) for kind, tag, _ in ref_seen.items]
    for (kind, tag, a), (_, _, b) in zip(seen.items, ref_seen.items):
        if kind == "model":
            assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())), tag
        elif kind == "flags":
            assert torch.equal(a, b), tag
    for a, b in zip(out.model.state_dict().values(), ref.model.state_dict().values()):
        assert torch.equal(a, b)
    assert (tmp_path / "cell-enhance.pt").exists()
    again, _, shown = run(tmp_path)  # a kill after the enhancement: it is not run again
    assert shown == [] and torch.equal(again.flagged, ref.flagged)
