"""Result files are verified: a corrupt, edited or malformed one is named in one line and recomputed,
and ``report`` lists it and goes on."""
import json

import pytest
import yaml
from conftest import matrix_dict

from bench.cli import main


@pytest.fixture
def finished(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict(recipe={"epochs": 2, "batch_size": 64, "crop_padding": 1, "flip": False},
                                            seeds=[0, 1, 2, 3])))
    args = [str(m), "--output", str(tmp_path / "runs"), "--report-dir", str(tmp_path / "rep"), "--threads", "1"]
    assert main(["run", *args]) == 0
    return args, sorted((tmp_path / "runs" / "results").glob("*.json"))


@pytest.mark.slow
def test_bad_results_are_listed_by_report_and_recomputed_by_run(finished, capsys, caplog):
    args, paths = finished
    assert len(paths) == 4
    capsys.readouterr()
    data = bytearray(paths[0].read_bytes())
    data[5] = 0xFF
    paths[0].write_bytes(bytes(data))                      # corrupt
    edited = json.loads(paths[1].read_text())
    original = edited["acc"]
    assert original != 0.5
    edited["acc"] = 0.5
    paths[1].write_text(json.dumps(edited))                # edited by hand
    paths[2].write_text("{}")                              # malformed
    paths[3].write_text("[]")                              # malformed
    caplog.clear()
    assert main(["report", *args[:-2]]) == 0                    # does not crash
    bad = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "recomputed" in r.getMessage()]
    assert sorted(bad) == sorted([
        f"{paths[0]}: corrupt: not UTF-8 text (byte 5 is 0xFF); it will be recomputed",
        f"{paths[1]}: edited or corrupt: the checksum does not match the content; it will be recomputed",
        f"{paths[2]}: malformed: no 'acc'; it will be recomputed",
        f"{paths[3]}: malformed: a JSON list, not a result; it will be recomputed"])
    assert "50.0" not in capsys.readouterr().out           # the edited number is not reported
    caplog.clear()
    assert main(["run", *args]) == 0
    err = capsys.readouterr().err
    assert "4 computed, 0 cached, 0 failed" in err
    assert len([r for r in caplog.records if "recomputed" in r.getMessage()]) == 4  # each named once
    assert json.loads(paths[1].read_text())["acc"] == original  # recomputed (same seed, same numerics)
    assert main(["run", *args]) == 0
    assert "0 computed, 4 cached" in capsys.readouterr().err


@pytest.mark.slow
def test_report_refuses_to_mix_thread_counts(tmp_path, capsys):
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(matrix_dict(recipe={"epochs": 2, "batch_size": 64, "crop_padding": 1, "flip": False},
                                            seeds=[0, 1])))
    common = [str(m), "--output", str(tmp_path / "runs"), "--report-dir", str(tmp_path / "rep")]
    assert main(["run", *common, "--threads", "1", "--only", "seed=0"]) == 0
    assert main(["report", *common]) == 0
    [row] = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "results").glob("*.json")][:1]
    assert row["numerics"]["threads"] == 1 and row["numerics"]["dtype"] == "fp32"
    assert row["backdoor"]["numerics"]["device"] == "cpu" and row["numerics"]["torch"]
    capsys.readouterr()
    assert main(["run", *common, "--threads", "2", "--only", "seed=1"]) == 2  # computed, but no mixed table
    err = capsys.readouterr().err
    assert ("no report: the digits/tiny_cnn table would mix numerics: threads 1 (1 cell) vs threads 2 "
            "(1 cell); results agree only at equal device, dtype and thread count") in err
    assert main(["report", *common]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: report: the digits/tiny_cnn table would mix numerics: threads 1")
    assert main(["report", *common, "--allow-mixed-numerics"]) == 0
    assert capsys.readouterr().err.startswith("warning: the digits/tiny_cnn table would mix numerics")
