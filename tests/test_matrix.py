import pytest

from bench.matrix import load_matrix, parse_matrix
from bench.registry import ConfigError
from conftest import REPO, matrix_dict


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
    ({"recipe": {"schedule": "linear"}}, "recipe", "not one of"),
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
