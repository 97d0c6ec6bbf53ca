"""The CUDA code paths: bf16 autocast, channels_last, device-resident data, every defense and the
natural-backdoor measurement on a GPU, and worker processes sharing one GPU (spawned, since CUDA
cannot be forked).  Skipped where no CUDA device is present; run them on a GPU machine with
``python -m pytest tests/test_cuda.py``."""
import pytest
import torch
from conftest import TINY_RECIPE, matrix_dict

from bench.execution.loop import run_matrix
from bench.core.models import build_model
from bench.core.trainer import Recipe, Trainer
from bench.matrix import parse_matrix
from bench.runner import Runner
from bench.execution.loop import execute
from bench.execution.plan import parse_devices, plan
from bench.store import Store

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_trainer_defaults_on_cuda_and_learns(digits):
    tr = Trainer(device="cuda", recipe=Recipe(**TINY_RECIPE))
    assert tr.bf16 and tr.channels_last
    torch.manual_seed(0)
    model = build_model("tiny_cnn", digits.channels, digits.num_classes, digits.mean, digits.std, digits.size)
    model = tr.fit(model, digits.train, seed=0)
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == torch.float32  # autocast, not a bf16 copy of the weights
    pred = tr.predict(model, digits.test.x)
    assert (pred.cpu() == digits.test.y).float().mean() > 0.85


def test_every_defense_and_the_natural_backdoor_evaluation_run_on_cuda(tmp_path):
    import yaml
    from conftest import REPO

    quick = yaml.safe_load((REPO / "matrices" / "quick.yaml").read_text())
    ev = {"name": "natural_backdoor", "budgets": [0.02, 0.06], "steps": 10, "restarts": 1, "per_class": 5,
          "eval_size": 100}
    m = parse_matrix(matrix_dict(attacks=["badnet", "wanet"], defenses=quick["defenses"], evaluate=[ev],
                                 recipe=quick["recipe"]))
    outcomes = run_matrix(m, Runner(Store(tmp_path), device="cuda"), progress=None)
    failed = [(o.cell.label, o.error) for o in outcomes if o.status != "done"]
    assert not failed, failed
    base = next(o.result for o in outcomes if o.cell.attack.key == "badnet" and o.cell.defense.key == "undefended")
    assert base["acc"] > 0.85 and base["asr"] > 0.85
    assert all("natural_backdoor" in o.result for o in outcomes)


def test_two_workers_share_one_gpu(tmp_path):
    m = parse_matrix(matrix_dict(attacks=["badnet", "blend"], defenses=["undefended", "finetuning"]))
    runner = Runner(Store(tmp_path), device="cuda")
    outcomes = execute(plan(m.cells, runner), runner, parse_devices("cuda", 2), progress=None)
    assert [o.status for o in outcomes] == ["done"] * 4, [o.error for o in outcomes]
    assert all(o.result["acc"] > 0.85 for o in outcomes)
