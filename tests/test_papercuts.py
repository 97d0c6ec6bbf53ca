"""Small things a new user runs into: each fails (or failed) in a way that leaves them stuck."""
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, matrix_dict

from bench.cli import main


def _cli(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1"])
def test_threads_below_one_is_refused(tmp_path, capsys, value):
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict()))
    code, err = _cli(["run", m, "--output", tmp_path / "runs", "--threads", value, "--dry-run"], capsys)
    assert code == 2
    assert err.strip() == (f"error: --threads: {value} is out of range; allowed: >= 1 (leave it out for the CPU's "
                           f"cores divided among workers)")


def test_zero_shards_names_what_is_allowed(tmp_path, capsys):
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict()))
    code, err = _cli(["run", m, "--output", tmp_path / "runs", "--shard", "0/0", "--dry-run"], capsys)
    assert code == 2 and err.strip() == "error: --shard: 0 shards is out of range; allowed: N >= 1 (--shard)"


def test_a_closed_pipe_ends_quietly():
    proc = subprocess.run(f"{sys.executable} -m bench list | head -1", shell=True, cwd=REPO, capture_output=True,
                          text=True)
    assert proc.stdout.strip() == "attacks:"
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr


def test_results_load_of_a_folder_without_results_says_so(tmp_path):
    from bench.results import load

    with pytest.raises(FileNotFoundError, match="no results/ folder in it"):
        load(tmp_path)


def test_report_of_a_store_with_nothing_finished_is_an_error(tmp_path, capsys):
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict()))
    code, err = _cli(["report", m, "--output", tmp_path / "runs", "--report-dir", tmp_path / "rep"], capsys)
    assert code == 2
    assert err.strip().startswith(f"error: report: no cell of matrix 't' has finished in {tmp_path / 'runs'}; run it "
                                  f"first (python -m bench run {m})")
    assert not (tmp_path / "rep").exists()


def test_bad_data_root_leaves_no_empty_folders(tmp_path, capsys):
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict(datasets=["cifar10"])))
    code, err = _cli(["run", m, "--data-root", tmp_path / "nothing-here", "--output", tmp_path / "out" / "runs",
                      "--report-dir", tmp_path / "rep", "--threads", 1], capsys)
    assert code == 2 and "cifar10" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "rep").exists()


def test_bad_report_dir_leaves_no_empty_output(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict()))
    code, err = _cli(["run", m, "--output", tmp_path / "runs", "--report-dir", tmp_path / "afile" / "rep",
                      "--threads", 1], capsys)
    assert code == 2 and "--report-dir" in err
    assert not (tmp_path / "runs").exists()


def test_the_readme_override_example_is_valid(tmp_path, capsys):
    line = next(ln for ln in (REPO / "README.md").read_text().splitlines()
                if ln.startswith("python -m bench run --set"))
    sets = re.findall(r"--set (\S+)", line.split("#")[0])
    assert sets
    code, err = _cli(["run", *[a for s in sets for a in ("--set", s)], "--output", tmp_path / "runs", "--dry-run"],
                     capsys)
    assert code == 0, err


@pytest.mark.slow
def test_a_numerics_conflict_names_the_cells_and_the_command_that_resolves_it(tmp_path, capsys):
    import shlex

    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict(recipe={"epochs": 2, "batch_size": 64, "crop_padding": 1, "flip": False},
                                            seeds=[0, 1, 2])))
    common = [str(m), "--output", str(tmp_path / "runs"), "--report-dir", str(tmp_path / "rep")]
    assert _cli(["run", *common, "--threads", "2", "--only", "seed=0,1"], capsys)[0] == 0
    code, err = _cli(["run", *common, "--threads", "1", "--only", "seed=2"], capsys)
    assert code == 2
    assert "The odd ones: digits/tiny_cnn/BadNet/No Defense/seed2." in err
    fix = err.split("Recompute them with the majority's numerics: ")[1].split("  (or render")[0]
    assert fix.endswith("--threads 2 --recompute-mismatched") and "--threads 1" not in fix
    argv = shlex.split(fix)[3:]  # without "python -m bench"
    code, err = _cli(argv, capsys)
    assert code == 0, err
    assert "1 finished cell(s) and 1 backdoored model(s) computed with other numerics" in err
    assert _cli(["report", *common], capsys)[0] == 0


@pytest.mark.slow
def test_export_of_an_unsaved_model_says_the_command_that_saves_it(tmp_path, capsys):
    import shlex

    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict(recipe={"epochs": 2, "batch_size": 64, "crop_padding": 1, "flip": False},
                                            defenses=["undefended", {"name": "finetuning", "epochs": 1}])))
    common = [str(m), "--output", str(tmp_path / "runs")]
    assert _cli(["run", *common, "--report-dir", str(tmp_path / "rep"), "--threads", "1"], capsys)[0] == 0
    # positional arguments first: an optional matrix before two positionals cannot be split by options
    export_ft = ["export", str(m), "FineTuning", str(tmp_path / "ft.pt"), "--output", str(tmp_path / "runs")]
    code, err = _cli(export_ft, capsys)
    assert code == 2 and "no defended model for digits/tiny_cnn/BadNet/FineTuning(epochs=1)/seed0" in err
    save = err.split("save it with: ")[1].split(" (the cell is recomputed")[0]
    code, err = _cli(shlex.split(save)[3:] + ["--report-dir", str(tmp_path / "rep"), "--threads", "1"], capsys)
    assert code == 0 and "1 computed" in err  # the cached cell was recomputed to save its model
    assert _cli(export_ft, capsys)[0] == 0
    assert (tmp_path / "ft.pt").exists()
    # the baseline's defended model is the backdoored one: the message says how to export that
    code, err = _cli(["export", str(m), "No Defense", str(tmp_path / "u.pt"), *common[1:]], capsys)
    assert code == 2 and err.rstrip().endswith("--backdoored")
    export = err.split("which exports with: ")[1].strip()
    assert _cli(shlex.split(export)[3:], capsys)[0] == 0 and (tmp_path / "u.pt").exists()


USER_DEFENSE = '''
from dataclasses import dataclass

from bench.core.defense import Defense, Needs, Outcome


@dataclass
class Shrink(Defense):
    """Scales the backdoored model's head."""

    def needs(self):
        return Needs(backdoored_model=True, training=False)

    def run(self, ctx):
        model = ctx.backdoored_model()
        model.head.weight.data *= FACTOR
        return Outcome(model)
'''


@pytest.mark.slow
def test_editing_your_own_component_recomputes_its_results(tmp_path, python_env):
    env, python = python_env
    env = {**env, "PYTHONPATH": f"{tmp_path}:{env['PYTHONPATH']}"}
    (tmp_path / "mydef.py").write_text("FACTOR = 1.0\n" + USER_DEFENSE)
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict(recipe={"epochs": 1, "batch_size": 64, "crop_padding": 1, "flip": False},
                                            defenses=["undefended", "mydef:Shrink"])))

    def run():
        out = subprocess.run([python, "-m", "bench", "run", str(m), "--output", str(tmp_path / "runs"),
                              "--report-dir", str(tmp_path / "rep"), "--threads", "1"], env=env, capture_output=True,
                             text=True, cwd=tmp_path, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stderr

    assert "2 computed, 0 cached" in run()
    assert "0 computed, 2 cached" in run()
    (tmp_path / "mydef.py").write_text("FACTOR = 0.5\n" + USER_DEFENSE)  # an edit that changes results
    assert "1 computed, 1 cached" in run()
    (tmp_path / "mydef.py").write_text("FACTOR = 0.5\n# a comment changes nothing\n" + USER_DEFENSE)
    assert "0 computed, 2 cached" in run()


def test_a_cpu_run_that_names_no_threads_gets_one_single_threaded_worker_per_core(tmp_path, monkeypatch, capsys):
    from bench.execution.plan import DEFAULT_CPU_WORKERS_MAX, default_cpu_workers

    assert default_cpu_workers(2) == 2 and default_cpu_workers(1) == 1
    assert default_cpu_workers(64) == DEFAULT_CPU_WORKERS_MAX
    monkeypatch.delenv("BENCH_THREADS", raising=False)
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict(recipe={"epochs": 1, "batch_size": 64, "crop_padding": 1, "flip": False})))
    common = ["run", m, "--report-dir", tmp_path / "rep", "--device", "cpu"]
    code, err = _cli([*common, "--output", tmp_path / "runs"], capsys)
    workers = default_cpu_workers()
    assert code == 0 and f"CPU threads per worker: {max(1, (os.cpu_count() or 1) // workers)} (the default on a CPU: " \
        f"one single-threaded worker per core, {workers} of {os.cpu_count()} cores" in err
    code, err = _cli([*common, "--output", tmp_path / "runs2", "--threads", "2"], capsys)  # one process
    assert code == 0 and "CPU threads per worker: 2 (--threads" in err
