"""Bad input fails before any work with one line; numbers are read as people write them."""
import re

import pytest
from conftest import REPO, matrix_dict

from bench.core.params import ConfigError
from bench.matrix import load_matrix, parse_matrix, parse_yaml


def _readme_matrix_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Matrices"):]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def test_readme_matrix_example_loads(tmp_path):
    path = tmp_path / "example.yaml"
    path.write_text(_readme_matrix_example())
    m = load_matrix(path)
    assert m.cells, "the README's example expands to no cell"
    assert {c.recipe.weight_decay for c in m.cells} == {1e-4}


@pytest.mark.parametrize("written,value", [("1e-4", 1e-4), ("1E-4", 1e-4), ("5e3", 5000.0), ("+2.5e-1", 0.25),
                                           (".5e-2", 0.005), ("0.0005", 5e-4), ("3", 3.0)])
def test_numbers_as_people_write_them(tmp_path, written, value):
    path = tmp_path / "m.yaml"
    ratio = written if value <= 1 else 0.1
    path.write_text(f"datasets: [digits]\nrecipe: {{weight_decay: {written}}}\nreserve_ratio: {ratio}\n"
                    f"attacks: [{{name: blend, alpha: {ratio}}}]\ndefenses: [undefended]\n")
    cell = load_matrix(path).cells[0]
    assert cell.recipe.weight_decay == value and isinstance(cell.recipe.weight_decay, float)
    if value <= 1:
        assert cell.attack.alpha == value and cell.reserve_ratio == value
    else:
        assert cell.attack.alpha == 0.1


def test_quoted_scientific_number_in_a_python_dict():
    # a matrix built in Python from YAML 1.1 output still has the string
    cell = parse_matrix(matrix_dict(recipe={"weight_decay": "1e-4"}, reserve_ratio="2e-2")).cells[0]
    assert cell.recipe.weight_decay == 1e-4 and cell.reserve_ratio == 0.02


def test_integers_stay_integers():
    assert parse_yaml("a: 10\nb: 1_000")["a"] == 10
    with pytest.raises(ConfigError, match=r"^recipe\.epochs: expected an integer"):
        parse_matrix(matrix_dict(recipe={"epochs": "1e1"}))


# --- validation before any work ----------------------------------------------------------------

@pytest.mark.parametrize("over,field,allowed", [
    ({"recipe": {"epochs": 0}}, "recipe.epochs", "allowed: >= 1"),
    ({"recipe": {"epochs": -3}}, "recipe.epochs", "allowed: >= 1"),
    ({"recipe": {"batch_size": 0}}, "recipe.batch_size", "allowed: >= 1"),
    ({"recipe": {"lr": 0}}, "recipe.lr", "allowed: > 0"),
    ({"recipe": {"lr": float("nan")}}, "recipe.lr", "not a finite number"),
    ({"recipe": {"milestones": [0.5, 1.5]}}, "recipe.milestones[1]", "allowed: [0, 1]"),
    ({"recipe": {"weight_decay": -1e-4}}, "recipe.weight_decay", "allowed: >= 0"),
    ({"attacks": [{"name": "badnet", "patch_size": 100}]}, "attacks[0].patch_size", "allowed: 1..16"),
    ({"attacks": [{"name": "blend", "alpha": 1.2}]}, "attacks[0].alpha", "allowed: [0, 1]"),
    ({"attacks": [{"name": "tact", "cover_classes": [1, 5]}]}, "attacks[0].cover_classes", "must be distinct"),
    ({"attacks": [{"name": "tact", "cover_classes": [5, 5]}]}, "attacks[0].cover_classes", "listed twice"),
    ({"attacks": [{"name": "tact", "source": 12}]}, "attacks[0].source", "allowed: 0..9"),
    ({"defenses": [{"name": "finetuning", "epochs": 0}]}, "defenses[0].epochs", "allowed: >= 1"),
    ({"defenses": [{"name": "abl", "isolation_ratio": -0.1}]}, "defenses[0].isolation_ratio", "allowed: (0, 1)"),
    ({"attacks": []}, "attacks", "empty list"),
    ({"seeds": []}, "seeds", "empty list"),
    ({"seeds": [-1]}, "seeds[0]", "out of range"),
    ({"seeds": [0, 0]}, "seeds[1]", "listed twice"),
    ({"models": [["tiny_cnn"]]}, "models[0]", "expected a model name"),
])
def test_out_of_range_names_field_value_and_range(over, field, allowed):
    with pytest.raises(ConfigError) as e:
        parse_matrix(matrix_dict(**over))
    msg = str(e.value)
    assert msg.startswith(field + ":"), msg
    assert allowed in msg and "\n" not in msg, msg


def test_literal_types_are_checked():
    import typing
    from dataclasses import dataclass

    from bench.core.params import build

    @dataclass
    class Thing:
        mode: typing.Literal["a", "b"] = "a"

    assert build(Thing, {"mode": "b"}, "x").mode == "b"
    with pytest.raises(ConfigError, match=r"^x\.mode: 'c' is not one of 'a', 'b'$"):
        build(Thing, {"mode": "c"}, "x")


def test_field_metadata_range_wins_over_the_table():
    from dataclasses import dataclass, field

    from bench.core.params import build, Range

    @dataclass
    class Thing:
        lr: float = field(default=0.5, metadata={"range": Range(0.1, 1)})

    with pytest.raises(ConfigError, match=r"allowed: \[0\.1, 1\]"):
        build(Thing, {"lr": 0.05}, "x")


def _cli(argv, capsys):
    from bench.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _write_npz(path, n_per_class, classes, size, channels=3, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    x = rng.integers(0, 255, (len(y), size, size, channels), dtype=np.uint8)
    np.savez(path, x_train=x, y_train=y, x_test=x[: classes * 2], y_test=y[: classes * 2])


def test_tact_poison_must_fit_the_source_class(tmp_path, capsys):
    import yaml

    data = tmp_path / "data"
    data.mkdir()
    _write_npz(data / "gtsrb.npz", n_per_class=10, classes=43, size=32)  # 430 images; 5 % = 21 > 10
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict(datasets=["gtsrb"], attacks=["tact"])))
    code, err = _cli(["run", m, "--data-root", data, "--output", tmp_path / "runs", "--threads", 1,
                      "--report-dir", tmp_path / "rep"], capsys)
    assert code == 2, err
    assert err.strip().splitlines() == [
        "error: attacks[0].poison_ratio: 0.05 asks for 21 poisoned images of 430, but source class 0 has 10 "
        "training images; allowed: at most 0.0209, which leaves one of them clean [dataset 'gtsrb']"]
    assert not (tmp_path / "runs" / "backdoor").exists() and not (tmp_path / "runs" / "results").exists()


def test_corrupt_npz_is_one_message_with_the_path(tmp_path, capsys):
    import yaml

    data = tmp_path / "data"
    data.mkdir()
    _write_npz(data / "cifar10.npz", n_per_class=3, classes=10, size=32)
    blob = (data / "cifar10.npz").read_bytes()
    (data / "cifar10.npz").write_bytes(blob[: len(blob) // 2])  # a truncated copy
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict(datasets=["cifar10"], seeds=[0, 1], defenses=["undefended", "clp"])))
    code, err = _cli(["run", m, "--data-root", data, "--output", tmp_path / "runs", "--threads", 1,
                      "--report-dir", tmp_path / "rep"], capsys)
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: dataset 'cifar10': '{data / 'cifar10.npz'}' is unreadable (BadZipFile")
    assert "Rebuild it" in line and "download=True" in line
    assert not (tmp_path / "runs" / "failures").exists()  # not four cell failures


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root can write to read-only folders")
def test_read_only_output_is_reported_before_work(tmp_path, capsys):
    import yaml

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict()))
    try:
        code, err = _cli(["run", m, "--output", ro / "runs", "--threads", 1, "--report-dir", tmp_path / "rep"],
                         capsys)
    finally:
        ro.chmod(0o700)
    assert code == 2
    assert err.strip().splitlines() == [f"error: --output: cannot write to '{ro / 'runs'}' (Permission denied); "
                                        f"choose a writable folder with --output"]


def test_only_that_matches_nothing_is_an_error(tmp_path, capsys):
    import yaml

    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict()))
    code, err = _cli(["run", m, "--output", tmp_path / "runs", "--only", "attack=blend"], capsys)
    assert code == 2 and err.strip() == "error: --only: no cell of matrix 't' matches attack=blend"


def test_output_under_a_file_is_reported_before_work(tmp_path, capsys):
    import yaml

    (tmp_path / "afile").write_text("x")
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict()))
    code, err = _cli(["run", m, "--output", tmp_path / "afile" / "runs", "--threads", 1,
                      "--report-dir", tmp_path / "rep"], capsys)
    assert code == 2
    assert err.strip().splitlines() == [f"error: --output: cannot write to '{tmp_path / 'afile' / 'runs'}' "
                                        f"(Not a directory); choose a writable folder with --output"]


def test_unreadable_image_in_a_folder_dataset_is_one_message(tmp_path, capsys):
    import yaml
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / "data" / "imagenette" / split / c
            d.mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(d / "0.png")
    bad = tmp_path / "data" / "imagenette" / "train" / "b" / "1.png"
    bad.write_bytes(b"not a png at all")
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict(datasets=["imagenette"])))
    code, err = _cli(["run", m, "--data-root", tmp_path / "data", "--output", tmp_path / "runs", "--threads", 1,
                      "--report-dir", tmp_path / "rep"], capsys)
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: dataset 'imagenette': the folder '{tmp_path / 'data' / 'imagenette'}' cannot "
                           f"be converted (UnidentifiedImageError") and str(bad) in line
    assert not (tmp_path / "data" / "imagenette.npz").exists()
