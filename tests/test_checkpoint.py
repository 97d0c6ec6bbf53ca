"""In-training checkpoints: a training stopped mid-way resumes where it was and ends identical."""
import time
from dataclasses import dataclass

import pytest
import torch

from bench.core.data import load_dataset
from bench.core.defense import Defense, Needs, Outcome
from bench.core.models import build_model
from bench.core.trainer import Checkpoint, Recipe, Trainer


class Stop(Exception):
    pass


def _setup():
    ds = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("tiny_cnn", ds.channels, ds.num_classes, ds.mean, ds.std, ds.size)
    return ds, model, Trainer(recipe=Recipe(epochs=4, batch_size=64, lr=0.05, crop_padding=1, flip=False))


@pytest.mark.slow
def test_a_resumed_training_equals_an_uninterrupted_one(tmp_path):
    ds, ref, tr = _setup()
    history = []
    tr.fit(ref, ds.train, seed=3, history=history)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["train_acc"] > history[0]["train_acc"]

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


@pytest.mark.slow
def test_sigkill_mid_training_then_rerun_resumes_with_the_same_final_metrics(tmp_path, python_env):
    import json
    import signal
    import subprocess
    import time

    import yaml
    from conftest import TINY_RECIPE, matrix_dict

    env, py = python_env
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(matrix_dict(recipe={**TINY_RECIPE, "epochs": 30})))

    def cmd(out):
        return [py, "-m", "bench", "run", str(path), "--output", str(out), "--report-dir", str(tmp_path / "rep"),
                "--threads", "1", "--checkpoint-every", "0"]

    proc = subprocess.Popen(cmd(tmp_path / "runs"), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    partial = tmp_path / "runs" / "partial"
    deadline = time.time() + 120
    while not (partial.exists() and any(partial.glob("*.pt"))) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)  # a few more epochs
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(partial.glob("*.pt")), "no checkpoint was written before the kill"
    resumed = subprocess.run(cmd(tmp_path / "runs"), env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at epoch" in resumed.stderr and not any(partial.glob("*.pt"))
    straight = subprocess.run(cmd(tmp_path / "ref"), env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr

    def metrics(out):
        [row] = [json.loads(p.read_text()) for p in (out / "results").glob("*.json")]
        return row["acc"], row["asr"]

    assert metrics(tmp_path / "runs") == metrics(tmp_path / "ref")


def test_a_defense_phase_gets_its_own_checkpoint_from_the_context(tmp_path):
    from bench.core.defense import DefenseContext

    ctx = DefenseContext(train=None, num_classes=10, make_model=None, trainer=None,
                         _checkpoints=Checkpoint(tmp_path / "cell-abc.pt", every_s=7.0, tag="n"))
    ck = ctx.checkpoint("retrain")
    assert (ck.path, ck.every_s, ck.tag) == (tmp_path / "cell-abc-retrain.pt", 7.0, "n")
    assert DefenseContext(train=None, num_classes=10, make_model=None, trainer=None).checkpoint("x") is None


def test_checkpoint_every_k_epochs_and_tensorboard_records(tmp_path):
    ck = Checkpoint(tmp_path / "c.pt", every_s=1e9, every_epochs=3)
    ck.save({"epoch": 0})  # starts the clock
    assert [ck.due(e) for e in range(6)] == [False, False, True, False, False, True]

    pytest.importorskip("tensorboard")
    from conftest import TINY_RECIPE, matrix_dict

    from bench.matrix import parse_matrix
    from bench.runner import Runner
    from bench.store import Store

    cell = parse_matrix(matrix_dict(recipe={**TINY_RECIPE, "epochs": 2})).cells[0]
    Runner(Store(tmp_path / "runs"), tensorboard=True).backdoored(cell)
    events = list((tmp_path / "runs" / "tensorboard").glob("backdoor-*/events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_a_checkpoint_carries_its_cells_stopwatch_reading(tmp_path):
    from bench.core.trainer import Stopwatch

    first = Stopwatch(_credit=100.0)  # a cell that had run 100 s when it wrote the state
    Checkpoint(tmp_path / "c.pt", every_s=0, clock=first).save({"epoch": 1})
    second = Stopwatch()  # the rerun, in a new process
    assert second.elapsed() < 50
    assert Checkpoint(tmp_path / "c.pt", clock=second).load()["epoch"] == 1
    assert 100 <= second.elapsed() < 150
    # a checkpoint without a clock (or written before clocks) leaves the reading alone
    Checkpoint(tmp_path / "d.pt").save({"epoch": 1})
    third = Stopwatch()
    Checkpoint(tmp_path / "d.pt", clock=third).load()
    assert third.elapsed() < 50


@dataclass
class SlowThenKilled(Defense):
    """Test defense: its one phase takes ``phase_s`` and checkpoints; the first attempt is killed
    right after the checkpoint, the rerun resumes from it and returns at once."""

    phase_s: float = 0.5

    def needs(self):
        return Needs(backdoored_model=True)

    def run(self, ctx):
        ckpt = ctx.checkpoint("phase")
        if ckpt.load() is None:
            time.sleep(self.phase_s)
            ckpt.save({"done": True})
            raise Stop
        return Outcome(ctx.backdoored_model())


@pytest.mark.slow
def test_a_resumed_cell_reports_the_time_of_the_work_it_kept(tmp_path):
    from conftest import TINY_RECIPE, matrix_dict

    from bench.matrix import parse_matrix
    from bench.runner import Runner
    from bench.store import Store

    m = parse_matrix(matrix_dict(recipe={**TINY_RECIPE, "epochs": 1}, defenses=["test_checkpoint:SlowThenKilled"]))
    runner = Runner(Store(tmp_path / "runs"))
    runner.backdoored(m.cells[0])
    with pytest.raises(Stop):
        runner.compute(m.cells[0])
    row, computed = Runner(Store(tmp_path / "runs")).compute(m.cells[0])
    assert computed and row["wall_time_s"] >= SlowThenKilled.phase_s  # not only the rerun's few ms


@pytest.mark.slow
def test_a_resumed_backdoored_training_reports_the_time_of_the_epochs_it_kept(tmp_path, monkeypatch):
    """The first attempt's epochs take ``epoch_s`` each and it is killed after the second; the rerun
    resumes at epoch 3 with fast epochs, and the model's wall time still counts the two kept ones."""
    from conftest import TINY_RECIPE, matrix_dict

    from bench.matrix import parse_matrix
    from bench.runner import Runner
    from bench.store import Store

    epoch_s, fit = 1.0, Trainer.fit

    def slow_then_killed(self, model, data, **kw):
        def on_epoch(epoch, m):
            time.sleep(epoch_s)
            if epoch == 1:
                raise Stop
        return fit(self, model, data, **kw, on_epoch=on_epoch)

    cell = parse_matrix(matrix_dict(recipe={**TINY_RECIPE, "epochs": 4})).cells[0]
    monkeypatch.setattr(Trainer, "fit", slow_then_killed)
    with pytest.raises(Stop):
        Runner(Store(tmp_path / "runs"), checkpoint_every_s=0).backdoored(cell)
    monkeypatch.setattr(Trainer, "fit", fit)
    runner = Runner(Store(tmp_path / "runs"), checkpoint_every_s=0)
    t0 = time.monotonic()
    runner.backdoored(cell)
    rerun_s = time.monotonic() - t0
    meta = runner.store.load_json(runner.store.dir("backdoor", cell.backdoor_key) / "meta.json")
    assert meta["wall_time_s"] > rerun_s + epoch_s  # more than the rerun alone could have measured
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3, 4]
