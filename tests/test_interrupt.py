import pytest
"""Ctrl-C and SIGTERM: workers stop, nothing half-written stays, one line says what finished and how to
resume, and the exit status is 128 + the signal (130 for SIGINT, 143 for SIGTERM)."""
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import REPO

ONLY = ["--only", "attack=badnet", "--only", "defense=undefended,finetuning,clp"]


def _start(tmp_path, python_env, extra=()):
    env, py = python_env
    env = {**env, "OMP_NUM_THREADS": "1"}
    cmd = [py, "-m", "bench", "run", str(REPO / "matrices" / "quick.yaml"), "--output", str(tmp_path / "runs"),
           "--report-dir", str(tmp_path / "rep"), "--threads", "1", *ONLY, *extra]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's job is
    deadline = time.time() + 50
    while time.time() < deadline and not list((tmp_path / "runs" / "results").glob("*.json")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    return proc, cmd, env


def _session_processes(sid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # session id; zombies hold nothing
                out.append(int(d.name))
    return out


def _check_stopped(proc, tmp_path, signame, code):
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted by {signame}: ") and "resume with: python -m bench run " in last, err
    assert "nothing half-written was kept" in last
    assert not list((tmp_path / "runs").rglob("*.tmp")), "a temporary file was left behind"
    assert not (tmp_path / "runs" / "failures").exists(), "an interruption is not a cell failure"
    deadline = time.time() + 10
    while _session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _session_processes(proc.pid), "a worker outlived the run"
    return last


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_rerun_resumes(tmp_path, python_env):
    proc, cmd, env = _start(tmp_path, python_env)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    last = _check_stopped(proc, tmp_path, "SIGINT", 130)
    finished = int(last.split(": ")[1].split(" of ")[0])
    assert finished >= 1
    results = list((tmp_path / "runs" / "results").glob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in results}
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{3 - len(results)} computed, {len(results)} cached, 0 failed" in r.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished work kept, not redone


@pytest.mark.slow
def test_sigterm_stops_the_workers(tmp_path, python_env):
    proc, _, _ = _start(tmp_path, python_env, ["--jobs-per-device", "2"])
    assert len(_session_processes(proc.pid)) >= 3  # the run and its two workers
    os.kill(proc.pid, signal.SIGTERM)  # a cluster's scheduler: only the main process
    _check_stopped(proc, tmp_path, "SIGTERM", 143)
