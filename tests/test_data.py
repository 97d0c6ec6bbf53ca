from pathlib import Path

import numpy as np
import pytest
import torch

from bench.core.data import (
    DATA_ROOT_ENV,
    DIGITS_SIZE,
    DataNotFoundError,
    load_dataset,
    resolve_data_root,
)


def test_digits_shapes_and_split(digits):
    assert digits.train.x.dtype == torch.uint8
    assert digits.train.x.shape[1:] == (1, DIGITS_SIZE, DIGITS_SIZE)
    assert len(digits.train) + len(digits.test) == 1797
    assert digits.num_classes == 10
    # stratified: every class present in both splits
    assert set(digits.train.y.tolist()) == set(range(10)) == set(digits.test.y.tolist())
    assert digits.train.x.max() > 200  # scaled to the full uint8 range


def test_digits_deterministic():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)


def test_npz_loader_hwc_and_nhw(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cifar10.npz", x_train=rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8),
             y_train=np.arange(20) % 10, x_test=rng.integers(0, 255, (10, 8, 8, 3), dtype=np.uint8),
             y_test=np.arange(10))
    ds = load_dataset("cifar10", tmp_path)
    assert ds.train.x.shape == (20, 3, 8, 8) and ds.num_classes == 10
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((5, 28, 28), np.uint8), y_train=np.arange(5),
             x_test=np.zeros((3, 28, 28), np.uint8), y_test=np.arange(3))
    assert load_dataset("mnist", tmp_path).train.x.shape == (5, 1, 28, 28)


def test_missing_data_message_says_where_and_how(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("cifar10", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "cifar10.npz") in msg and "download=True" in msg and DATA_ROOT_ENV in msg
    with pytest.raises(DataNotFoundError, match="imagenette"):
        load_dataset("imagenette", tmp_path)


def test_image_folder_converted_once(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / "imagenette" / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (100 * i, 50, 200)).save(d / f"{i}.png")
    ds = load_dataset("imagenette", tmp_path)
    assert ds.train.x.shape == (4, 3, 224, 224) and ds.classes == ["a", "b"]
    assert (tmp_path / "imagenette.npz").exists()  # later runs read the npz


def test_data_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    assert resolve_data_root(None) == tmp_path
    assert resolve_data_root("/x") == Path("/x")  # an explicit root wins over the variable
    assert resolve_data_root("~/d") == Path.home() / "d"
    monkeypatch.delenv(DATA_ROOT_ENV)
    assert resolve_data_root(None) == Path("data")


def test_train_limit_is_class_balanced(cifar_npz):
    ds = load_dataset("cifar10", cifar_npz.parent, train_limit=1000, test_limit=200)
    assert len(ds.train) == 1000 and len(ds.test) == 200
    counts = torch.bincount(ds.train.y, minlength=10)
    assert counts.min() == counts.max() == 100
