"""The fast regime: the whitening network, the ``fast`` recipe preset, and precision per device."""
import dataclasses
import subprocess
import sys

import pytest
import torch

from bench.execution.loop import run_matrix
from bench.core import trainer as trainer_mod
from bench.core.data import ImageSet
from bench.core.fastnet import FastNet, whitening_weights
from bench.core.models import build_model, interface_problems
from bench.core.params import ConfigError
from bench.core.trainer import RECIPE_PRESETS, Checkpoint, Recipe, Trainer, resolve_precision
from bench.matrix import parse_matrix
from conftest import REPO, TEST_SEED, matrix_dict


def _images(n=400, size=16, seed=0):
    """Images with strongly correlated neighbouring pixels and channels (like natural images)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, size // 4, size // 4, generator=g)
    smooth = torch.nn.functional.interpolate(base, size=size, mode="bilinear", align_corners=False)
    x = smooth.expand(n, 3, size, size) * torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1)
    x = x + 0.05 * torch.rand(n, 3, size, size, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _patch_cov(z):
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    return flat.T @ flat / len(flat)


def test_whitening_stem_whitens_its_fitting_patches():
    x = _images().float() / 255
    w = whitening_weights(x, eps=1e-9)
    assert w.shape == (24, 3, 2, 2)
    z = torch.nn.functional.conv2d(x, w[:12])  # the first half; the second is its negative
    cov = _patch_cov(z)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=1e-3)
    assert torch.equal(w[12:], -w[:12])
    # the raw patches are far from white: the test can tell whitened from not
    raw = _patch_cov(x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 1, 4, 5, 2, 3).reshape(len(x), 12, 15, 15))
    assert not torch.allclose(raw, torch.eye(12, dtype=torch.float64), atol=0.1)


def test_fastnet_stem_is_computed_from_the_training_data_it_is_given():
    x = _images()
    y = torch.arange(len(x)) % 10
    torch.manual_seed(0)
    model = build_model("fastnet", 3, 10, (0.5,) * 3, (0.25,) * 3, 16)
    assert isinstance(model, FastNet) and not interface_problems(model)
    assert not bool(model.data_initialized)
    tr = Trainer(recipe=Recipe(epochs=1, batch_size=64, precision="fp32", crop_padding=0, flip=False,
                               whiten_bias_epochs=0))
    before_bias = model.whiten.bias.detach().clone()
    tr.fit(model, ImageSet(x, y), seed=0)
    assert bool(model.data_initialized)
    # decorrelated (with the default eps the small directions are shrunk, not blown up to 1)
    z = torch.nn.functional.conv2d(model.normalize(x.float() / 255), model.whiten.weight[:12])
    cov = _patch_cov(z)
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 1e-3 and torch.diag(cov).max() < 1.0 + 1e-6
    # whitening weights never train; the bias did not either with whiten_bias_epochs=0
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad
    assert torch.equal(model.whiten.bias.detach(), before_bias)
    # a second training does not recompute it (it is the model's state now)
    w = model.whiten.weight.detach().clone()
    tr.fit(model, ImageSet(_images(seed=1), y), seed=0)
    assert torch.equal(model.whiten.weight, w)


def test_fastnet_state_round_trips_with_its_stem():
    torch.manual_seed(0)
    a = build_model("fastnet", 3, 10, (0.5,) * 3, (0.25,) * 3, 32)
    a.init_from_data(_images(size=32).float() / 255)
    b = build_model("fastnet", 3, 10, (0.5,) * 3, (0.25,) * 3, 32)
    b.load_state_dict(a.state_dict())
    assert bool(b.data_initialized) and torch.equal(a.whiten.weight, b.whiten.weight)
    x = torch.rand(4, 3, 32, 32)
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))
    assert torch.allclose(a(x), a.head(a.pool(a.feature_map(x))))  # the interface's pieces compose


def test_fast_preset_expands_and_fields_beside_it_win():
    m = parse_matrix(matrix_dict(recipe={"preset": "fast", "epochs": 3, "lr": 0.5}))
    r = m.cells[0].recipe
    for k, v in RECIPE_PRESETS["fast"].items():
        if k == "tuning":
            assert dict(r.tuning) == v
        elif k not in ("epochs", "lr"):
            assert getattr(r, k) == v, k
    assert (r.epochs, r.lr) == (3, 0.5)
    assert r.label_smoothing == 0.0  # loss-based defenses read losses: off in the preset
    assert Recipe.preset("fast", epochs=3) == dataclasses.replace(Recipe(**RECIPE_PRESETS["fast"]), epochs=3)
    with pytest.raises(ConfigError, match=r"recipe.preset: 'fastest' is not a recipe preset; allowed: fast"):
        parse_matrix(matrix_dict(recipe={"preset": "fastest"}))
    with pytest.raises(ConfigError, match=r"datasets\[0\].recipe.precision: 'fp16' is not one of"):
        parse_matrix(matrix_dict(datasets=[{"name": "digits", "recipe": {"precision": "fp16"}}]))


def test_new_recipe_fields_leave_earlier_cache_keys_alone():
    earlier = {"epochs", "batch_size", "lr", "momentum", "weight_decay", "nesterov", "schedule", "warmup",
               "milestones", "gamma", "crop_padding", "flip"}
    assert set(Recipe(precision="fp32").ident()) == earlier
    assert Recipe(precision="bf16").ident()["precision"] == "bf16"
    assert "lookahead" in Recipe.preset("fast").ident()


def test_auto_precision_per_device(monkeypatch):
    monkeypatch.setattr(trainer_mod, "cpu_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu")[0] == "fp32"
    assert not Trainer(recipe=Recipe(precision="auto")).bf16
    monkeypatch.setattr(trainer_mod, "cpu_native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu")[0] == "bf16"
    assert Trainer(recipe=Recipe(precision="auto")).bf16
    assert resolve_precision("auto", "cuda")[0] == "bf16"
    assert resolve_precision("fp32", "cuda") == ("fp32", "asked for")
    with pytest.raises(ConfigError, match="precision: 'fp16' is not one of auto, fp32, bf16"):
        resolve_precision("fp16", "cpu")


def test_cpu_flags_are_read_from_cpuinfo_unless_the_environment_says(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open
    monkeypatch.delenv("BENCH_CPU_BF16", raising=False)
    monkeypatch.setattr(trainer_mod.platform, "system", lambda: "Linux")
    for flags, expected in (("fpu avx512f amx_tile amx_bf16", True), ("fpu avx2 avx512f", False)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor : 0\nflags : {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k))
        trainer_mod._cpuinfo_native_bf16.cache_clear()
        assert trainer_mod.cpu_native_bf16() is expected
        monkeypatch.setenv("BENCH_CPU_BF16", "0" if expected else "1")  # the override wins
        assert trainer_mod.cpu_native_bf16() is not expected
        assert "$BENCH_CPU_BF16" in resolve_precision("auto", "cpu")[1]
        monkeypatch.delenv("BENCH_CPU_BF16")
    trainer_mod._cpuinfo_native_bf16.cache_clear()
    monkeypatch.setenv("BENCH_CPU_BF16", "yes")
    with pytest.raises(ConfigError, match=r"\$BENCH_CPU_BF16: 'yes' is not one of 0, 1"):
        trainer_mod.cpu_native_bf16()


def test_precision_enters_the_key_as_the_resolved_dtype(monkeypatch):
    m = parse_matrix(matrix_dict(recipe={"epochs": 1}))
    fp32, bf16 = m.for_device("cpu", "fp32"), m.for_device("cpu", "bf16")
    assert fp32.cells[0].dtype == "fp32" and bf16.cells[0].dtype == "bf16"
    assert fp32.cells[0].backdoor_ident() != bf16.cells[0].backdoor_ident()
    assert "precision" not in fp32.cells[0].backdoor_ident()["recipe"]
    monkeypatch.setattr(trainer_mod, "cpu_native_bf16", lambda: True)
    assert m.for_device("cpu").cells[0].backdoor_ident() == bf16.cells[0].backdoor_ident()
    monkeypatch.setattr(trainer_mod, "cpu_native_bf16", lambda: False)
    assert m.for_device("cpu").cells[0].backdoor_ident() == fp32.cells[0].backdoor_ident()


def test_precision_flag_is_validated_and_recorded(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "bench", "run", "--precision", "fp16", "--dry-run"], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--precision: invalid choice: 'fp16'" in bad.stderr
    from bench.runner import Runner
    from bench.store import Store

    m = parse_matrix(matrix_dict(recipe={"epochs": 1, "batch_size": 64, "crop_padding": 1, "flip": False},
                                 attacks=["badnet"], defenses=["undefended"])).for_device("cpu", "bf16")
    row = Runner(Store(tmp_path / "runs"), device="cpu").run_cell(m.cells[0])
    assert row["numerics"]["dtype"] == "bf16" and row["recipe"]["precision"] == "bf16"


def test_optimizer_groups_bn_biases_with_their_own_lr():
    torch.manual_seed(0)
    model = build_model("fastnet", 3, 10, (0.5,) * 3, (0.25,) * 3, 32)
    r = Recipe.preset("fast")
    opt = Trainer(recipe=r).optimizer(model)
    bn, other = opt.param_groups
    assert bn["lr"] == pytest.approx(r.lr * 64) and bn["weight_decay"] == pytest.approx(r.weight_decay / 64)
    assert other["lr"] == pytest.approx(r.lr) and other["weight_decay"] == pytest.approx(r.weight_decay)
    n_bn = sum(1 for mod in model.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    assert len(bn["params"]) == n_bn
    # frozen tensors (whitening weights, BN scales) are in no group
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.whiten.weight) not in trained
    # the plain recipe keeps one group
    assert len(Trainer(recipe=Recipe()).optimizer(model).param_groups) == 1


def test_linear_schedule_warms_up_then_decays_to_lr_end():
    m = torch.nn.Linear(1, 1)
    r = Recipe(epochs=10, lr=1.0, schedule="linear", warmup=0.2, warmup_from=0.2, lr_end=0.07)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    s = Trainer.scheduler(opt, r, steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs[0] == pytest.approx(0.2) and max(lrs) == pytest.approx(1.0) and lrs.index(1.0) == 20
    assert opt.param_groups[0]["lr"] == pytest.approx(0.07)
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:]))


def test_alternate_flip_changes_side_every_epoch():
    x = torch.zeros(8, 1, 4, 4, dtype=torch.uint8)
    x[:, :, :, 0] = 255  # a bright left column shows the side
    data = ImageSet(x, torch.zeros(8, dtype=torch.long))
    tr = Trainer(recipe=Recipe(crop_padding=0, flip=True, precision="fp32"))
    first = torch.tensor([True, False] * 4)
    sides = []
    for epoch in range(3):
        xb, _ = tr.load_batch(data, torch.arange(8), torch.Generator(), flip=first ^ bool(epoch % 2))
        sides.append(xb[:, 0, 0, -1] > 0.5)  # True: mirrored
    assert torch.equal(sides[0], first) and torch.equal(sides[1], ~first) and torch.equal(sides[2], first)


def test_reflect_padding_crop_is_a_window_of_the_reflected_image():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    out = trainer_mod.random_crop(x, 2, torch.Generator().manual_seed(1), "reflect")
    xp = torch.nn.functional.pad(x.float(), (2,) * 4, mode="reflect").to(torch.uint8)
    for b in range(2):
        assert any(torch.equal(out[b], xp[b, :, i:i + 6, j:j + 6]) for i in range(5) for j in range(5))


def test_fast_recipe_trains_and_a_killed_training_resumes_to_the_same_weights(tmp_path, threshold):
    """Lookahead, alternate flips, the stem bias freeze and BN-bias groups survive a checkpoint.
    The uninterrupted training learns the toy task: training ACC 0.82-0.86 over seeds 0-2 at 1 and
    2 threads; bound 0.75."""
    x = _images(n=256)
    y = (x.float().mean(dim=(1, 2, 3)) > x.float().mean()).long()
    data = ImageSet(x, y)
    recipe = Recipe.preset("fast", epochs=4, batch_size=64, lr=0.4, precision="fp32")

    def train(stop_after=None, path=None):
        torch.manual_seed(TEST_SEED)
        model = build_model("fastnet", 3, 2, (0.5,) * 3, (0.25,) * 3, 16)
        ckpt = Checkpoint(path, every_s=0) if path else None

        def on_epoch(epoch, _):
            if stop_after is not None and epoch == stop_after:
                raise KeyboardInterrupt

        return Trainer(recipe=recipe).fit(model, data, seed=TEST_SEED, checkpoint=ckpt, on_epoch=on_epoch)

    ref = train()
    threshold("ACC", Trainer(recipe=recipe).accuracy(ref, data), ">", 0.75)
    assert ref.whiten.bias.requires_grad  # frozen only within the training
    path = tmp_path / "partial.pt"
    with pytest.raises(KeyboardInterrupt):
        train(stop_after=2, path=path)
    assert path.exists()
    resumed = train(path=path)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.slow
def every_defense_shrunk() -> list[dict]:
    """One matrix entry per registered defense at its shrunk test settings.  SCAnFT repairs only
    when it flags a class, and whether the shrunk scan on a 2-epoch model flags one depends on the
    CPU's arithmetic; threshold 0 flags every class whose J is off the median, so it always repairs."""
    from test_contracts import shrunk

    from bench.core.registry import DEFENSES

    always = {"scanft": {"threshold": 0.0}}
    return [{"name": key, **shrunk(DEFENSES.get(key)), **always.get(key, {})} for key in DEFENSES.names()]


def test_every_defense_runs_on_fastnet(tmp_path):
    """fastnet under every defense (shrunk, digits, the fast preset at 2 epochs): each cell
    finishes, CLP pairs each group's first conv with its BN through the max pool, and NONE and
    FinePruning find their units."""
    from bench.runner import Runner
    from bench.store import Store

    defenses = every_defense_shrunk()
    m = parse_matrix(matrix_dict(models=["fastnet"], defenses=defenses, reserve_ratio=0.05,
                                 recipe={"preset": "fast", "epochs": 2, "batch_size": 128, "lr": 0.5}))
    outcomes = {o.cell.defense.key: o for o in run_matrix(m, Runner(Store(tmp_path / "runs")), progress=None)}
    failed = {k: o.error for k, o in outcomes.items() if o.status != "done"}
    assert not failed
    clp = outcomes["clp"].result["info"]
    assert clp["pairs"] == 6 and clp["unpaired_bn"] == []


# --- the defense phases' settings (recipe.tuning) --------------------------------------------------

def test_tuning_overrides_are_recipe_fields_checked_as_such():
    fast = Recipe.preset("fast")
    tuned = fast.for_tuning()
    assert (tuned.batch_size, tuned.momentum, tuned.bn_bias_lr_scale, tuned.lookahead) == (128, 0.9, 1.0, False)
    assert (tuned.crop_padding, tuned.pad_mode, tuned.epochs, tuned.lr) == (2, "reflect", 10, 1.5)  # kept
    assert tuned.tuning is None and Recipe().for_tuning() == Recipe()
    m = parse_matrix(matrix_dict(recipe={"preset": "fast", "tuning": {"batch_size": 256}}))
    assert m.cells[0].recipe.for_tuning().batch_size == 256 and m.cells[0].recipe.for_tuning().lookahead  # replaced
    with pytest.raises(ConfigError, match=r"recipe.tuning.batchsize: unknown recipe field.*batch_size"):
        parse_matrix(matrix_dict(recipe={"tuning": {"batchsize": 64}}))
    with pytest.raises(ConfigError, match=r"recipe.tuning.momentum: expected a number"):
        parse_matrix(matrix_dict(recipe={"tuning": {"momentum": "high"}}))
    with pytest.raises(ConfigError, match=r"recipe.tuning: expected a mapping"):
        parse_matrix(matrix_dict(recipe={"tuning": 128}))


def test_tuning_keys_results_but_not_the_backdoored_model():
    plain, tuned = (parse_matrix(matrix_dict(recipe={"preset": "fast", **extra})).cells[0]
                    for extra in ({}, {"tuning": {"batch_size": 64}}))
    assert plain.backdoor_ident() == tuned.backdoor_ident()
    assert plain.result_ident() != tuned.result_ident()
    default = parse_matrix(matrix_dict()).cells[0]
    assert "tuning" not in default.result_ident() and "tuning" not in default.backdoor_ident()["recipe"]


def test_a_later_defense_parameter_at_its_earlier_value_leaves_the_key_alone():
    from bench.core.params import params_of
    from defenses.abl import ABL

    assert "retrain_schedule" not in params_of(ABL())
    assert params_of(ABL(retrain_schedule="recipe"))["retrain_schedule"] == "recipe"


def test_every_defense_phase_at_its_own_lr_runs_with_the_tuning_settings(tmp_path, monkeypatch):
    """Every training a defense runs at its own lr (fine-tuning, unlearning, isolation, repair)
    uses ``recipe.tuning``'s batch size and no lookahead; every training at the recipe's lr (a
    from-scratch re-training) uses the cell's.  Batch sizes 64 (cell) and 16 (tuning) tell them
    apart; the spies see the recipe of each training, and of each optimizer a defense builds at
    its own lr (``fit`` builds its own from the recipe it is given)."""
    from test_contracts import shrunk

    from bench.core.registry import DEFENSES
    from bench.runner import Runner
    from bench.store import Store

    calls = []
    fit, optimizer = Trainer.fit, Trainer.optimizer

    def spy_fit(self, model, data, **kw):
        r = kw.get("recipe") or self.recipe
        own = kw.get("lr") is not None or kw.get("lr_at_epoch") is not None
        calls.append(("fit", own, r.batch_size, r.lookahead))
        return fit(self, model, data, **kw)

    def spy_optimizer(self, model, recipe=None, lr=None):  # built by a defense at its own lr
        r = recipe or self.recipe
        if lr is not None:
            calls.append(("optimizer", True, r.batch_size, r.lookahead))
        return optimizer(self, model, recipe, lr)

    monkeypatch.setattr(Trainer, "fit", spy_fit)
    monkeypatch.setattr(Trainer, "optimizer", spy_optimizer)
    defenses = every_defense_shrunk()
    defenses.append({"name": "abl", "retrain_schedule": "recipe", "label": "ABL-recipe", **shrunk(DEFENSES.get("abl"))})
    m = parse_matrix(matrix_dict(defenses=defenses, reserve_ratio=0.1, recipe={
        "preset": "fast", "epochs": 2, "batch_size": 64, "lr": 0.2, "lookahead": True,
        "tuning": {"batch_size": 16, "lookahead": False, "bn_bias_lr_scale": 1.0}}))
    runner = Runner(Store(tmp_path / "runs"))
    seen = {}
    for cell in m.cells:
        calls.clear()
        outcome = runner.run_cell(cell)
        assert outcome is not None
        seen[cell.label] = list(calls)
    own = [(label, c) for label, cs in seen.items() for c in cs if c[1]]
    recipe_lr = [(label, c) for label, cs in seen.items() for c in cs if not c[1]]
    assert {c[2:] for _, c in own} == {(16, False)}, [x for x in own if x[1][2:] != (16, False)]
    assert {c[2:] for _, c in recipe_lr} == {(64, True)}, [x for x in recipe_lr if x[1][2:] != (64, True)]
    trained_own = {label.split("/")[3].split("(")[0] for label, _ in own}
    assert {"FineTuning", "FinePruning", "NONE", "DBR", "SCAnFT", "ABL", "ABL-recipe", "CutMix", "AdvrBD"} <= trained_own
