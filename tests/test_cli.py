import pytest
"""The command line as a user runs it: crash safety, extension by a user's own module, report."""
import json
import os
import signal
import subprocess
import textwrap
import time

import yaml
from conftest import matrix_dict


def _write(tmp_path, raw):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(py, env, args, cwd):
    return subprocess.run([py, "-m", "bench", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path, python_env):
    env, py = python_env
    # two poisoned sets (two seeds), so a kill can land between and inside trainings
    raw = matrix_dict(seeds=[0, 1], recipe={**matrix_dict()["recipe"], "epochs": 6})
    path = _write(tmp_path, raw)
    runs = tmp_path / "runs"
    proc = subprocess.Popen([py, "-m", "bench", "run", str(path), "--output", str(runs), "--threads", "1"],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((runs / "results").glob("*.json")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = list((runs / "results").glob("*.json"))
    assert len(first) == 1, "the first cell should have finished before the kill"
    stamp = first[0].stat().st_mtime_ns
    r = _run(py, env, ["run", str(path), "--output", str(runs), "--threads", "1"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1 computed, 1 cached, 0 failed" in r.stderr
    assert first[0].stat().st_mtime_ns == stamp  # finished work not redone
    results = [json.loads(p.read_text()) for p in (runs / "results").glob("*.json")]
    assert len(results) == 2 and all(0 <= x["acc"] <= 1 for x in results)
    assert not list(runs.rglob("*.tmp"))  # no half-written files left behind


@pytest.mark.slow
def test_users_own_defense_from_their_module(tmp_path, python_env):
    env, py = python_env
    (tmp_path / "mydefs.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass

        from bench.core.defense import Defense, Outcome


        @dataclass
        class RetrainWithoutLowLoss(Defense):
            """Drop the lowest-loss fraction of the training set and retrain from scratch."""

            drop: float = 0.1

            def run(self, ctx):
                probe = ctx.trainer.fit(ctx.make_model(), ctx.train, epochs=2)
                loss = ctx.trainer.per_sample_loss(probe, ctx.train)
                k = int(self.drop * len(loss))
                flagged = loss.argsort()[:k]
                keep = loss.argsort()[k:]
                return Outcome(ctx.trainer.fit(ctx.make_model(), ctx.train, indices=keep), flagged=flagged)
    '''))
    raw = matrix_dict(defenses=[{"name": "mydefs:RetrainWithoutLowLoss", "drop": 0.2}],
                      recipe={**matrix_dict()["recipe"], "epochs": 3})
    path = _write(tmp_path, raw)
    env = {**env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"}
    r = _run(py, env, ["run", str(path), "--output", str(tmp_path / "runs"), "--report-dir", str(tmp_path / "rep")],
             tmp_path)
    assert r.returncode == 0, r.stderr
    [res] = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "results").glob("*.json")]
    assert res["defense_params"] == {"drop": 0.2}
    assert res["detection"]["flagged"] == int(0.2 * res["n_train"])
    table = (tmp_path / "rep" / "t" / "tables.md").read_text()
    assert "mydefs:RetrainWithoutLowLoss(drop=0.2) ACC" in table
    # unknown parameter of the user's class is caught before any work
    raw["defenses"] = [{"name": "mydefs:RetrainWithoutLowLoss", "dorp": 0.2}]
    r = _run(py, env, ["run", str(_write(tmp_path, raw)), "--output", str(tmp_path / "runs2")], tmp_path)
    assert r.returncode == 2 and "defenses[0].dorp" in r.stderr and "did you mean 'drop'" in r.stderr


@pytest.mark.slow
def test_list_names_every_component(python_env, tmp_path):
    env, py = python_env
    r = _run(py, env, ["list"], tmp_path)
    assert r.returncode == 0
    for name in ("badnet", "undefended", "digits", "cifar10", "tiny_cnn", "resnet18", "mobilenet_v2"):
        assert f"  {name} " in r.stdout


@pytest.mark.slow
def test_two_runs_of_one_matrix_at_once(tmp_path, python_env):
    env, py = python_env
    raw = matrix_dict(recipe={**matrix_dict()["recipe"], "epochs": 4}, defenses=["undefended", "test_runner:Spy"])
    path = _write(tmp_path, raw)
    env = {**env, "PYTHONPATH": f"{os.path.dirname(__file__)}{os.pathsep}{env['PYTHONPATH']}"}
    cmd = [py, "-m", "bench", "run", str(path), "--output", str(tmp_path / "runs"), "--threads", "1"]
    procs = [subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    logs = "".join(err for _, err in outs)
    assert logs.count("training backdoored model") == 1  # the other process waited and reused it
    results = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "results").glob("*.json")]
    assert len(results) == 2
