"""In-training checkpoints: a training stopped mid-way resumes where it was and ends identical."""
import pytest
import torch

from bench.data import load_dataset
from bench.models import build_model
from bench.trainer import Checkpoint, Recipe, Trainer


class Stop(Exception):
    pass


def _setup():
    ds = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("tiny_cnn", ds.channels, ds.num_classes, ds.mean, ds.std, ds.size)
    return ds, model, Trainer(recipe=Recipe(epochs=4, batch_size=64, lr=0.05, crop_padding=1, flip=False))


def test_a_resumed_training_equals_an_uninterrupted_one(tmp_path):
    ds, ref, tr = _setup()
    history = []
    tr.fit(ref, ds.train, seed=3, history=history)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and history[-1]["loss"] < history[0]["loss"]

    ds, model, tr = _setup()
    ckpt = Checkpoint(tmp_path / "c.pt", every_s=0)

    def killed_after_epoch_2(epoch, m):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        tr.fit(model, ds.train, seed=3, checkpoint=ckpt, on_epoch=killed_after_epoch_2)
    assert (tmp_path / "c.pt").exists()

    ds, fresh, tr2 = _setup()  # a new process: fresh model and trainer
    resumed = []
    tr2.fit(fresh, ds.train, seed=3, checkpoint=ckpt, history=resumed)
    assert [h["epoch"] for h in resumed] == [1, 2, 3, 4]  # the saved epochs' records come back
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), fresh.state_dict().values()))
    assert not (tmp_path / "c.pt").exists()  # removed when the training ended
    assert tr2.train_samples == len(ds.train) * 4  # the restored epochs count too


def test_a_checkpoint_from_other_numerics_is_ignored(tmp_path):
    ds, model, tr = _setup()
    Checkpoint(tmp_path / "c.pt", tag="threads 2").save({"epoch": 1})
    assert Checkpoint(tmp_path / "c.pt", tag="threads 1").load() is None
    (tmp_path / "c.pt").write_bytes(b"not a checkpoint")
    assert Checkpoint(tmp_path / "c.pt", tag="").load() is None
