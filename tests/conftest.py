import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

#: the suite's torch threads: 2 (or the cores there are); BENCH_TEST_THREADS=1 reruns it at one thread,
#: which every threshold on a trained model must also pass.  Every test runs at this count: a test
#: that changes it has it restored afterwards (the autouse fixture below), so no test's thread count
#: depends on which tests ran before it.
SUITE_THREADS = int(os.environ.get("BENCH_TEST_THREADS", max(1, min(2, os.cpu_count() or 1))))
torch.set_num_threads(SUITE_THREADS)
# runs started by tests (in process or as subprocesses) use that thread count in one process, not
# the CLI's CPU default of one worker process per core; tests of that default unset it
os.environ["BENCH_THREADS"] = str(torch.get_num_threads())

# "auto" precision means fp32 in the suite on every CPU, with or without native bf16 (also in the
# subprocesses tests start), so that a threshold measured on one machine holds on another; the
# bf16 paths are tested by asking for bf16 explicitly (tests/test_fastnet.py)
os.environ["BENCH_CPU_BF16"] = "0"

#: the recipe the end-to-end tests use: tiny, but enough for BadNet on digits
TINY_RECIPE = {"epochs": 12, "batch_size": 64, "lr": 0.05, "crop_padding": 1, "flip": False}


@pytest.fixture(autouse=True)
def _suite_threads():
    torch.set_num_threads(SUITE_THREADS)
    yield
    torch.set_num_threads(SUITE_THREADS)


_COMPARE = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}


@pytest.fixture
def threshold(record_property):
    """``threshold("ASR", asr, ">=", 0.9)`` asserts a trained model's statistic against its bound
    and records it (as the junit property "ASR >= 0.9"), so that ``benchmarks/test_margins.py`` can
    sweep the suite over seeds and thread counts and print each bound's measured margin."""
    def check(name, value, op, bound):
        value = float(value)
        record_property(f"{name} {op} {bound}", value)
        assert _COMPARE[op](value, float(bound)), f"{name} {value:.4g} is not {op} {bound}"
    return check


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
