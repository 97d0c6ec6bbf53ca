import pytest
from conftest import REPO, matrix_dict

from bench.core.params import ConfigError
from bench.matrix import load_matrix, parse_matrix


def test_quick_matrix_expands():
    m = load_matrix(REPO / "matrices" / "quick.yaml")
    assert m.name == "quick" and len(m.cells) >= 1
    assert all(c.dataset.name == "digits" for c in m.cells)


def test_sweep_expands_to_one_cell_per_value():
    m = parse_matrix(matrix_dict(attacks=[{"name": "badnet", "sweep": {"poison_ratio": [0.0, 0.1, 0.2]}}],
                                 seeds=[0, 1]))
    assert sorted({c.attack.poison_ratio for c in m.cells}) == [0.0, 0.1, 0.2]
    assert len(m.cells) == 6


@pytest.mark.parametrize("over,field,allowed", [
    ({"attacks": ["badnett"]}, "attacks[0]", "did you mean 'badnet'"),
    ({"defenses": ["undefend"]}, "defenses[0]", "did you mean 'undefended'"),
    ({"datasets": ["cifar1O"]}, "datasets[0]", "did you mean 'cifar10'"),
    ({"models": ["resnet-18"]}, "models[0]", "did you mean 'resnet18'"),
    ({"attacks": [{"name": "badnet", "poison_ratio": "high"}]}, "attacks[0].poison_ratio", "expected a number"),
    ({"attacks": [{"name": "badnet", "poison_ratio": 1.5}]}, "attacks[0].poison_ratio", "allowed: [0, 1]"),
    ({"attacks": [{"name": "badnet", "target": 10}]}, "attacks[0].target", "allowed: 0..9"),
    ({"attacks": [{"name": "badnet", "patch_sise": 3}]}, "attacks[0].patch_sise", "did you mean 'patch_size'"),
    ({"attacks": [{"poison_ratio": 0.1}]}, "attacks[0].name", "missing"),
    ({"recipe": {"epochs": "ten"}}, "recipe.epochs", "expected an integer"),
    ({"recipe": {"epoch": 3}}, "recipe.epoch", "did you mean 'epochs'"),
    ({"recipe": {"schedule": "exponential"}}, "recipe", "not one of"),
    ({"reserve_ratio": 2}, "reserve_ratio", "[0, 1]"),
    ({"seeds": ["a"]}, "seeds[0]", "integer"),
    ({"datasets": [{"name": "digits", "train_limit": -5}]}, "datasets[0].train_limit", "positive integer"),
    ({"atacks": ["badnet"]}, "atacks", "did you mean 'attacks'"),
])
def test_bad_input_names_the_field(over, field, allowed):
    with pytest.raises(ConfigError) as e:
        parse_matrix(matrix_dict(**over))
    msg = str(e.value)
    assert msg.startswith(field + ":") or msg.startswith(field + "."), msg
    assert allowed in msg, msg


def test_missing_required_field():
    raw = matrix_dict()
    del raw["defenses"]
    with pytest.raises(ConfigError, match="^defenses: missing"):
        parse_matrix(raw)


@pytest.mark.slow
def test_cli_exits_nonzero_with_one_line(tmp_path, python_env):
    import subprocess

    env, py = python_env
    bad = tmp_path / "bad.yaml"
    bad.write_text("attacks: [badnet]\ndefenses: [undefended]\nrecipe: {lr: fast}\n")
    r = subprocess.run([py, "-m", "bench", "run", str(bad), "--output", str(tmp_path / "runs")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: recipe.lr: expected a number, got str 'fast'"]
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_entry_label_names_the_column_but_not_the_cache_key():
    plain = parse_matrix(matrix_dict(defenses=[{"name": "finetuning", "lr": 0.02}])).cells[0]
    named = parse_matrix(matrix_dict(defenses=[{"name": "finetuning", "lr": 0.02, "label": "FT"}])).cells[0]
    assert "FineTuning(lr=0.02)" in plain.label and "/FT/" in named.label
    assert named.row()["defense_name"] == "FT"
    assert named.result_ident() == plain.result_ident()
    swept = parse_matrix(matrix_dict(defenses=[{"name": "finetuning", "label": "FT", "sweep": {"lr": [0.1, 0.2]}}]))
    assert [c.row()["defense_name"] for c in swept.cells] == ["FT(lr=0.1)", "FT(lr=0.2)"]
    with pytest.raises(ConfigError, match=r"^defenses\[0\]\.label: expected a string"):
        parse_matrix(matrix_dict(defenses=[{"name": "finetuning", "label": 3}]))


def test_augmentation_defaults_come_from_the_dataset_unless_the_recipe_sets_them():
    from bench.matrix import parse_matrix

    raw = {"datasets": ["digits", "cifar10", "gtsrb", "tinyimagenet",
                        {"name": "mnist", "recipe": {"flip": True, "crop_padding": 0}}],
           "attacks": ["badnet"], "defenses": ["undefended"]}
    got = {c.dataset.name: (c.recipe.flip, c.recipe.crop_padding) for c in parse_matrix(raw).cells}
    # traffic signs and digits are not mirror-symmetric; the crop pads an eighth of the side
    assert got == {"digits": (False, 1), "cifar10": (True, 4), "gtsrb": (False, 4), "tinyimagenet": (True, 8),
                   "mnist": (True, 0)}
    # a top-level recipe value overrides every dataset's default; a dataset's own recipe overrides both
    raw = {**raw, "recipe": {"flip": False}}
    assert {c.dataset.name for c in parse_matrix(raw).cells if c.recipe.flip} == {"mnist"}


def test_trainer_flips_only_when_the_recipe_says_so():
    import torch

    from bench.core.data import ImageSet
    from bench.core.trainer import Recipe, Trainer

    x = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    x[:, :, :, 0] = 255  # a bright left column: a flip moves it to the right
    data = ImageSet(x, torch.zeros(64, dtype=torch.long))
    idx = torch.arange(64)
    for flip, expect_flipped in ((False, False), (True, True)):
        tr = Trainer(recipe=Recipe(crop_padding=0, flip=flip))
        xb, _ = tr.load_batch(data, idx, torch.Generator().manual_seed(0))
        assert bool((xb[:, :, :, -1] > 0.5).any()) is expect_flipped
