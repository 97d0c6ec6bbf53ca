import json

import torch

from bench.core.models import build_model
from bench.store import Store, digest


def _m(seed):
    torch.manual_seed(seed)
    return build_model("tiny_cnn", 1, 10, [0.5], [0.25], 16)


def test_digest_is_order_independent_and_sensitive():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


def test_model_roundtrip(tmp_path):
    s = Store(tmp_path)
    a = _m(0)
    s.save_model("backdoor", "k", a, {"acc": 0.5})
    b = _m(1)
    meta = s.load_model("backdoor", "k", b)
    assert meta["acc"] == 0.5
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_truncated_or_tampered_checkpoint_is_rejected(tmp_path):
    s = Store(tmp_path)
    s.save_model("backdoor", "k", _m(0), {})
    w = s.dir("backdoor", "k") / "weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    assert s.load_model("backdoor", "k", _m(1)) is None
    w.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert s.load_model("backdoor", "k", _m(1)) is None
    w.write_bytes(data)
    assert s.load_model("backdoor", "k", _m(1)) is not None


def test_missing_meta_means_incomplete(tmp_path):
    s = Store(tmp_path)
    s.save_model("backdoor", "k", _m(0), {})
    (s.dir("backdoor", "k") / "meta.json").unlink()
    assert s.load_model("backdoor", "k", _m(1)) is None


# --- verified results ------------------------------------------------------------------------------

def _saved(tmp_path):
    s = Store(tmp_path)
    path = tmp_path / "results" / "k.json"
    s.save_result(path, {"acc": 0.97, "asr": 0.12, "wall_time_s": 1.5, "epoch_equivalents": 3.0, "key": "k",
                         "info": {"t": (1, 2)}})
    return s, path


def test_result_roundtrip_carries_a_checksum(tmp_path):
    s, path = _saved(tmp_path)
    result, problem = s.load_result(path, "k")
    assert problem is None and result.acc == 0.97 and result.row["info"] == {"t": [1, 2]}
    assert len(result.row["checksum"]) == 64 and result.to_json() == json.loads(path.read_text()) | {"warnings": []}
    assert s.load_result(tmp_path / "results" / "none.json") == (None, None)


def test_a_result_from_before_the_warnings_list_is_upgraded_on_reading(tmp_path):
    """The one upgrade of older files: their defense's guards, kept in ``info.warnings``, become the
    result's warnings; a current file's own list is kept as it is."""
    s = Store(tmp_path)
    old = {"acc": 0.9, "asr": 0.1, "wall_time_s": 1.0, "epoch_equivalents": 1.0, "key": "o",
           "info": {"warnings": ["collapse"]}}
    (tmp_path / "results").mkdir(exist_ok=True)
    (tmp_path / "results" / "o.json").write_text(json.dumps(old))  # no checksum: written before them
    result = s.read_result("o")
    assert result.warnings == ["collapse"] and result.numerics is None and result.backdoor is None
    s.save_result(s.result_path("n"), {**old, "key": "n", "warnings": ["chance"]})
    assert s.read_result("n").warnings == ["chance"]


def test_result_with_a_bad_byte_is_named_not_raised(tmp_path):
    s, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[10] = 0xFF
    path.write_bytes(bytes(data))
    row, problem = s.load_result(path, "k")
    assert row is None and problem == "corrupt: not UTF-8 text (byte 10 is 0xFF)"


def test_result_edited_by_hand_is_detected(tmp_path):
    import json

    s, path = _saved(tmp_path)
    row = json.loads(path.read_text())
    row["acc"] = 0.5
    path.write_text(json.dumps(row))
    assert s.load_result(path, "k") == (None, "edited or corrupt: the checksum does not match the content")


def test_malformed_results_are_named(tmp_path):
    s, path = _saved(tmp_path)
    for text, problem in [("{}", "malformed: no 'acc'"), ("[]", "malformed: a JSON list, not a result"),
                          ("nul", "corrupt: not JSON"), ('{"acc": "high"}', "malformed: 'acc' is str"),
                          (path.read_text()[:40], "corrupt: not JSON")]:
        path.write_text(text)
        row, got = s.load_result(path, "k")
        assert row is None and got.startswith(problem), (text, got)


def test_result_of_another_cell_and_results_without_checksum(tmp_path):
    import json

    s, path = _saved(tmp_path)
    assert s.load_result(path, "other")[1] == "belongs to another cell (key 'k')"
    row = json.loads(path.read_text())
    del row["checksum"]  # written before checksums existed: accepted when well formed
    path.write_text(json.dumps(row))
    assert s.load_result(path, "k")[0].acc == 0.97
    row["acc"] = 1.5
    path.write_text(json.dumps(row))
    assert s.load_result(path, "k")[1] == "malformed: 'acc' is 1.5, outside [0, 1]"


def test_malformed_model_meta_means_incomplete(tmp_path):
    s = Store(tmp_path)
    s.save_model("backdoor", "k", _m(0), {})
    (s.dir("backdoor", "k") / "meta.json").write_text("[]")
    assert s.load_model("backdoor", "k", _m(1)) is None
