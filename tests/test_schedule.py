import pytest
from conftest import matrix_dict

from bench.core.params import ConfigError
from bench.matrix import parse_matrix
from bench.runner import Runner
from bench.execution.loop import execute
from bench.execution.plan import parse_devices, plan, select
from bench.store import Store


def test_parse_devices_divides_threads():
    slots = parse_devices("cpu", 2)
    assert [s.device for s in slots] == ["cpu", "cpu"]
    assert all(s.threads >= 1 for s in slots)
    assert len(parse_devices("cuda:0,cuda:1", 3)) == 6
    with pytest.raises(ValueError, match="'tpu'"):
        parse_devices("tpu")


def test_only_filters_cells():
    m = parse_matrix(matrix_dict(seeds=[0, 1], defenses=["undefended", "test_runner:Spy"]))
    assert len(select(m.cells, ["seed=1"])) == 2
    assert [c.defense.key for c in select(m.cells, ["defense=undefended", "seed=0"])] == ["undefended"]
    with pytest.raises(ConfigError, match="--only"):
        select(m.cells, ["colour=red"])


def test_only_matches_matrix_labels():
    m = parse_matrix(matrix_dict(defenses=["undefended", {"name": "finetuning", "label": "FT-short", "epochs": 1},
                                           {"name": "finetuning", "label": "FT-long", "epochs": 3}]))
    assert [c.defense_name for c in select(m.cells, ["defense=FT-long"])] == ["FT-long"]
    assert len(select(m.cells, ["defense=finetuning"])) == 2  # the key still matches every entry


def test_plan_counts_shared_backdoor_once(tmp_path):
    m = parse_matrix(matrix_dict(seeds=[0, 1], defenses=["undefended", "test_runner:Spy", "test_runner:Broken"]))
    p = plan(m.cells, Runner(Store(tmp_path)))
    assert len(p.todo) == 6 and len(p.backdoors) == 2  # one per seed, shared by two defenses each
    actual, naive = p.trainings()
    # naive: every repairing cell trains its own backdoored model, plus the defense's own training
    # (per seed: undefended 1 + 0, Spy 1 + 1, Broken 0 + 1)
    assert naive == 2 * (1 + 2 + 1)
    assert actual == 2 + 2 * 2  # two shared backdoored models, Spy and Broken per seed


def test_two_workers_finish_everything(tmp_path):
    m = parse_matrix(matrix_dict(seeds=[0, 1], recipe={**matrix_dict()["recipe"], "epochs": 2},
                                 defenses=["undefended", "test_runner:Broken"]))
    runner = Runner(Store(tmp_path))
    outcomes = execute(plan(m.cells, runner), runner, parse_devices("cpu", 2), progress=None)
    assert sorted(o.status for o in outcomes) == ["done", "done", "failed", "failed"]
    assert len(list((tmp_path / "results").glob("*.json"))) == 2
    assert len(list((tmp_path / "logs").glob("*.log"))) >= 2
    # a failed cell is skipped (not retried) unless asked
    p = plan(m.cells, runner, retry_failed=False)
    assert len(p.failed_before) == 2 and not p.todo


@pytest.mark.slow
def test_ray_executor_on_a_local_instance(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    m = parse_matrix(matrix_dict(recipe={**matrix_dict()["recipe"], "epochs": 2},
                                 defenses=["undefended", "test_runner:Spy"]))
    runner = Runner(Store(tmp_path))
    from bench.execution.ray_executor import ray_slots

    try:
        slots = ray_slots("auto", 2, 1)  # the cluster's resources decide: this one has no GPU
        with pytest.raises(ValueError, match="the Ray cluster has no GPU"):
            ray_slots("cuda", 1, 1)
        outcomes = execute(plan(m.cells, runner), runner, slots, progress=None, executor="ray")
    finally:
        ray.shutdown()
    assert [s.device for s in slots] == ["cpu", "cpu"]
    assert [o.status for o in outcomes] == ["done", "done"]
    assert len(list((tmp_path / "backdoor").iterdir())) == 1  # shared by both cells


@pytest.mark.slow
def test_cells_keep_their_cache_keys_in_a_spawned_interpreter(python_env):
    """CUDA and Ray workers are fresh interpreters that unpickle cells: a defense registered outside
    its own module (AdvrBD) or given as ``module:Class`` must keep its key, or results land under
    another cache key than the parent looks for."""
    import ast
    import os
    import pickle
    import subprocess

    from conftest import REPO, matrix_dict

    from bench.matrix import parse_matrix

    m = parse_matrix(matrix_dict(defenses=["advrbd", "nonlinearity", "test_runner:Spy"]))
    env, python = python_env
    env["PYTHONPATH"] = str(REPO / "tests") + os.pathsep + env["PYTHONPATH"]
    code = ("import pickle, sys; from bench.store import digest; cells = pickle.load(sys.stdin.buffer); "
            "print(repr([(c.defense.key, c.key) for c in cells]))")
    out = subprocess.run([python, "-c", code], input=pickle.dumps(m.cells), capture_output=True, env=env,
                         check=True).stdout.decode()
    assert ast.literal_eval(out) == [(c.defense.key, c.key) for c in m.cells]
    assert [c.defense.key for c in m.cells] == ["advrbd", "nonlinearity", "test_runner:Spy"]
