"""Data errors are not cell failures; failures keep their cause; environmental ones are retried."""
import json

import numpy as np
import yaml
from conftest import matrix_dict

from bench.cli import main
from bench.matrix import parse_matrix
from bench.runner import Runner
from bench.execution.failures import Failure, failure_cause, failure_path, record_failure
from bench.execution.plan import plan
from bench.store import Store

RECIPE = {"epochs": 2, "batch_size": 64, "crop_padding": 1, "flip": False}


def test_missing_data_then_a_corrected_rerun_runs_the_cells(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict(datasets=["mnist"], seeds=[0, 1], recipe=RECIPE,
                                            defenses=["undefended", "clp"])))
    args = ["run", str(m), "--output", str(tmp_path / "runs"), "--report-dir", str(tmp_path / "rep"),
            "--threads", "1"]
    code = main(args + ["--data-root", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2
    [line] = err.strip().splitlines()  # once, not once per cell, and no traceback
    assert line.startswith("error: dataset 'mnist' not found (looked in: ")
    assert str(tmp_path / "nowhere" / "mnist.npz") in line and "download=True" in line and "--data-root" in line
    assert not (tmp_path / "runs" / "failures").exists() and not (tmp_path / "runs" / "results").exists()
    rng = np.random.default_rng(0)  # the user provides the data
    np.savez(data / "mnist.npz", x_train=rng.integers(0, 255, (200, 28, 28), dtype=np.uint8),
             y_train=np.arange(200) % 10, x_test=rng.integers(0, 255, (50, 28, 28), dtype=np.uint8),
             y_test=np.arange(50) % 10)
    assert main(args + ["--data-root", str(data)]) == 0
    assert "4 computed, 0 cached, 0 failed" in capsys.readouterr().err


def test_failures_keep_their_cause_and_environmental_ones_are_retried(tmp_path):
    cells = parse_matrix(matrix_dict(seeds=[0, 1, 2, 3], recipe=RECIPE)).cells
    runner = Runner(Store(tmp_path))
    record_failure(runner.store, cells[0], Failure("OSError(28, 'No space left on device')", "environment"), "tb")
    record_failure(runner.store, cells[1], Failure("ZeroDivisionError('division by zero')"), "tb")
    record_failure(runner.store, cells[2], Failure("worker died: BrokenProcessPool()", "environment"), "tb")
    # a record written before causes existed: the cause is read from the error text
    failure_path(runner.store, cells[3]).write_text(json.dumps(
        {"cell": "x", "error": "DataNotFoundError(\"dataset 'mnist' not found\")", "traceback": ""}))
    p = plan(cells, runner, retry_failed=False)
    assert p.failed_before == [cells[1]]  # only the cell's own failure waits for --retry-failed
    assert p.todo == [cells[0], cells[2], cells[3]]
    assert plan(cells, runner, retry_failed=True).todo == cells


def test_failure_cause_from_the_exception():
    import zipfile

    from bench.core.data import DataError

    assert failure_cause(OSError(30, "Read-only file system")) == "environment"
    assert failure_cause(zipfile.BadZipFile("bad")) == "environment"
    assert failure_cause(DataError("bad")) == "environment"
    assert failure_cause(MemoryError()) == "environment"
    assert failure_cause(ValueError("x")) == "cell"
    assert failure_cause(KeyError("acc")) == "cell"
    import pickle

    f = pickle.loads(pickle.dumps(Failure("boom", "environment")))
    assert f == "boom" and f.cause == "environment"
