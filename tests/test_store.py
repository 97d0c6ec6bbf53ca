import torch

from bench.models import build_model
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
