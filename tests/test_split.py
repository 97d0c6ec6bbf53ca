"""Several processes on one store split a matrix: non-blocking claims, --shard, SLURM arrays."""
import re
import subprocess

import pytest
import yaml
from conftest import TINY_RECIPE, matrix_dict

from bench.core.params import ConfigError
from bench.matrix import parse_matrix
from bench.runner import Runner
from bench.execution.plan import parse_shard, shard
from bench.execution.tasks import run_task
from bench.store import Store


def _matrix(seeds=(0, 1, 2), epochs=3):
    return matrix_dict(seeds=list(seeds), recipe={**TINY_RECIPE, "epochs": epochs},
                       defenses=["undefended", {"name": "finetuning", "epochs": 1}])


def test_parse_shard_from_the_flag_and_from_a_slurm_array():
    assert parse_shard("1/4", {}) == (1, 4)
    assert parse_shard(None, {}) is None
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert parse_shard(None, env) == (2, 4)
    assert parse_shard("0/2", env) == (0, 2)  # the flag wins
    for bad, msg in (("4/4", "out of range; allowed: 0..3"), ("a/b", "is not I/N"), ("1", "is not I/N")):
        with pytest.raises(ConfigError, match=msg):
            parse_shard(bad, {})


def test_shards_partition_the_cells_by_poisoned_set():
    cells = parse_matrix(_matrix(seeds=range(5))).cells
    parts = [shard(cells, i, 3) for i in range(3)]
    assert sorted(id(c) for p in parts for c in p) == sorted(id(c) for c in cells)
    owners = {}
    for i, p in enumerate(parts):
        for c in p:
            assert owners.setdefault(c.backdoor_key, i) == i  # one shard per backdoored model
    assert all(parts)


@pytest.mark.slow
def test_a_held_cell_is_skipped_then_waited_for(tmp_path):
    cell = next(c for c in parse_matrix(_matrix(seeds=[0], epochs=2)).cells if c.defense.key == "undefended")
    store = Store(tmp_path)
    runner = Runner(store)
    with store.lock("backdoor", cell.backdoor_key):  # "another process" trains it
        assert run_task(runner, "backdoor", cell).status == "held"
    assert run_task(runner, "backdoor", cell).status == "done"
    with store.lock("result", cell.key):
        assert run_task(runner, "cell", cell).status == "held"
    r = run_task(runner, "cell", cell, wait=True)
    assert r.status == "done" and r.row["acc"] > 0
    assert run_task(Runner(store), "cell", cell).status == "elsewhere"  # a second runner finds it finished


def _counts(err):
    m = re.search(r"(\d+) computed, (?:(\d+) computed by another process, )?(\d+) cached, (\d+) failed", err)
    assert m, err
    return [int(g or 0) for g in m.groups()]


@pytest.mark.slow
def test_two_processes_compute_each_cell_exactly_once(tmp_path, python_env):
    env, py = python_env
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(_matrix(seeds=range(4), epochs=6)))
    cmd = [py, "-m", "bench", "run", str(path), "--output", str(tmp_path / "runs"), "--threads", "1"]
    procs = [subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    counts = [_counts(err) for _, err in outs]
    assert all(sum(c) == 8 and c[3] == 0 for c in counts)  # each process accounts for all 8 cells
    assert counts[0][0] + counts[1][0] == 8  # and every cell was computed once, by one of them
    logs = "".join(err for _, err in outs)
    assert logs.count("training backdoored model") == 4


@pytest.mark.slow
def test_shard_flag_runs_its_part_only(tmp_path, python_env):
    env, py = python_env
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(_matrix(seeds=range(2), epochs=2)))
    out = subprocess.run([py, "-m", "bench", "run", str(path), "--output", str(tmp_path / "runs"), "--threads", "1",
                          "--shard", "1/2"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "shard 1 of 2: 2 cells" in out.stderr and _counts(out.stderr)[0] == 2
    assert len(list((tmp_path / "runs" / "results").glob("*.json"))) == 2
