import pytest
"""--save-models, bench models and bench export: a defended model can be found and taken out."""
import torch
import yaml
from conftest import TEST_SEED, TINY_RECIPE, matrix_dict
from safetensors.torch import load_file

from bench.cli import main
from bench.core.data import load_dataset
from bench.core.models import build_model
from bench.core.trainer import Trainer


@pytest.mark.slow
def test_saved_defended_model_exports_and_reproduces_its_accuracy(tmp_path, capsys):
    raw = matrix_dict(defenses=["undefended", {"name": "finetuning", "epochs": 1}], recipe={**TINY_RECIPE, "epochs": 2})
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(raw))
    opts = ["--output", str(tmp_path / "runs"), "--report-dir", str(tmp_path / "rep")]
    common = [str(path), *opts]
    assert main(["run", *common, "--save-models", "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["models", *common]) == 0
    listed = capsys.readouterr().out
    assert listed.count("defended:   " + str(tmp_path / "runs" / "models")) == 2

    assert main(["export", str(path), "FineTuning", str(tmp_path / "ft.safetensors"), *opts]) == 0
    assert main(["export", str(path), f"seed{TEST_SEED}", str(tmp_path / "x.pt"), *opts]) == 2  # two cells match
    assert "matches 2 cells" in capsys.readouterr().err

    ds = load_dataset("digits")
    model = build_model("tiny_cnn", ds.channels, ds.num_classes, ds.mean, ds.std, ds.size)
    model.load_state_dict(load_file(str(tmp_path / "ft.safetensors")))
    acc = Trainer().accuracy(model, ds.test)
    from bench.results import load

    row = load(path, output=tmp_path / "runs").set_index("defense").loc["finetuning"]
    assert abs(acc - row["acc"]) < 1e-6
    # the .pt form is the same state dict
    assert main(["export", str(path), "FineTuning", str(tmp_path / "ft.pt"), *opts]) == 0
    pt = torch.load(tmp_path / "ft.pt")
    assert all(torch.equal(pt[k], v) for k, v in load_file(str(tmp_path / "ft.safetensors")).items())
