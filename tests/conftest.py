import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# the suite's torch threads: 2 (or the cores there are); BENCH_TEST_THREADS=1 reruns it at one thread,
# which every threshold on a trained model must also pass
torch.set_num_threads(int(os.environ.get("BENCH_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))
# runs started by tests (in process or as subprocesses) use that thread count in one process, not
# the CLI's CPU default of one worker process per core; tests of that default unset it
os.environ["BENCH_THREADS"] = str(torch.get_num_threads())

# "auto" precision means fp32 in the suite on every CPU, with or without native bf16 (also in the
# subprocesses tests start), so that a threshold measured on one machine holds on another; the
# bf16 paths are tested by asking for bf16 explicitly (tests/test_fastnet.py)
os.environ["BENCH_CPU_BF16"] = "0"

#: the recipe the end-to-end tests use: tiny, but enough for BadNet on digits
TINY_RECIPE = {"epochs": 12, "batch_size": 64, "lr": 0.05, "crop_padding": 1, "flip": False}


@pytest.fixture(scope="session")
def digits():
    from bench.core.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def cifar_npz():
    path = SHARED_DATA / "cifar10.npz"
    if not path.exists():
        pytest.skip("../shared/data/cifar10.npz not available")
    return path


#: the seed of the end-to-end tests' matrices; BENCH_TEST_SEED=1 (2, ...) reruns them on other draws,
#: which every threshold on a trained model must also pass (labels that name "seed0" will differ)
TEST_SEED = int(os.environ.get("BENCH_TEST_SEED", "0"))


def matrix_dict(**over):
    raw = {"name": "t", "datasets": ["digits"], "models": ["tiny_cnn"], "seeds": [TEST_SEED], "recipe": dict(TINY_RECIPE),
           "attacks": ["badnet"], "defenses": ["undefended"]}
    raw.update(over)
    return raw


@pytest.fixture
def python_env():
    """Environment for subprocesses that run the CLI from the repository."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env, sys.executable
