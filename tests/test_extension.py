"""A researcher's own dataset (a plain .npz) and model (``module:Name``) run a cell from a matrix,
as the README's "Your own dataset and model" shows."""
import json
import subprocess
import textwrap

import numpy as np
import pytest

from bench.core.data import load_dataset
from bench.core.params import ConfigError
from bench.core.registry import DATASETS

MODEL_MODULE = '''
import torch.nn as nn

from bench.core.models import Classifier, conv_bn


def wide_cnn(in_channels, num_classes, mean, std, image_size):
    """Two wide conv stages."""
    body = nn.Sequential(nn.Sequential(conv_bn(in_channels, 48), nn.MaxPool2d(2)), nn.Sequential(conv_bn(48, 96)))
    return Classifier(body, 96, num_classes, mean, std)
'''


@pytest.fixture
def own_data(tmp_path):
    """Eight classes of the digits as a 3-channel 16x16 .npz, as a researcher would save their own."""
    ds = load_dataset("digits")
    keep = lambda s: (s.y < 8).numpy()  # noqa: E731
    tr, te = keep(ds.train), keep(ds.test)
    rgb = lambda x: np.repeat(x.numpy().transpose(0, 2, 3, 1), 3, axis=3)  # noqa: E731  N H W 3
    np.savez(tmp_path / "eight.npz", x_train=rgb(ds.train.x[tr]), y_train=ds.train.y[tr].numpy(),
             x_test=rgb(ds.test.x[te]), y_test=ds.test.y[te].numpy())
    (tmp_path / "mymodels.py").write_text(textwrap.dedent(MODEL_MODULE))
    return tmp_path


def test_a_plain_npz_is_a_dataset_with_its_classes_and_shape_read_from_the_file(own_data):
    source = DATASETS.get(str(own_data / "eight.npz"))
    assert (source.num_classes, source.channels, source.size) == (8, 3, 16)
    with pytest.raises(ConfigError, match="does not exist"):
        DATASETS.get(str(own_data / "missing.npz"), "datasets[0]")


@pytest.mark.slow
def test_own_dataset_and_model_run_a_cell_from_a_matrix(own_data, python_env):
    env, python = python_env
    env = {**env, "PYTHONPATH": f"{own_data}:{env['PYTHONPATH']}"}
    (own_data / "m.yaml").write_text(textwrap.dedent(f"""
        name: own
        datasets: [{own_data / 'eight.npz'}]
        models: ["mymodels:wide_cnn"]
        recipe: {{epochs: 6, batch_size: 64, lr: 0.05}}
        attacks: [badnet]
        defenses: [undefended]
        """))
    out = subprocess.run([python, "-m", "bench", "run", str(own_data / "m.yaml"), "--output", str(own_data / "runs"),
                          "--report-dir", str(own_data / "reports"), "--devices", "cpu", "--threads", "1"],
                         env=env, capture_output=True, text=True, cwd=own_data, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (result,) = [json.loads(p.read_text()) for p in (own_data / "runs" / "results").glob("*.json")]
    assert result["dataset"] == "eight" and result["model"] == "mymodels:wide_cnn"
    assert result["n_train"] == int((load_dataset("digits").train.y < 8).sum())  # the file's training set
    assert result["acc"] > 0.5  # it learned the eight classes
    assert "eight" in (own_data / "reports" / "own" / "tables.md").read_text()
