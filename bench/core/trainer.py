"""The one training loop every attack and defense shares.

The training set stays a ``uint8`` tensor on the device; a batch is an index tensor.  Random
crop (with zero padding) and horizontal flip run batched on the device, on ``uint8`` before the
float conversion, so there is no per-sample Python and no PIL in the hot path.  What defenses
need is an argument rather than a copy of this loop:

* ``weights``: per-sample loss weights; a negative weight is gradient ascent (unlearning);
* ``loss_fn(model, x, y, idx)``: a custom loss (CutMix, LGA), per-sample or scalar;
* ``freeze_bn``: BatchNorm layers stay in eval mode (running statistics frozen);
* ``extra_augment(x, generator)``: more batched augmentation on floats in [0, 1]
  (PhysicalBA's transforms), applied before crop/flip;
* ``on_epoch(epoch, model)``: a callback after each epoch.

Lower-level pieces (:meth:`Trainer.load_batch`, :meth:`Trainer.optimizer`, :meth:`Trainer.step`)
serve defenses with their own loop (e.g. AdvrBD pairs a learn batch with an unlearn batch).
On CUDA the loop runs under bf16 autocast with channels_last; both are switches.

Work is counted in samples through forward+backward (``train_samples``) and forward only
(``eval_samples``), from which the runner reports training epoch-equivalents.
"""
from __future__ import annotations

import logging
import math
import os
import time
import typing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageSet
from .registry import check_choices

log = logging.getLogger("bench.train")

#: a named training's epochs are logged to the cell's log file; the console shows them once an
#: epoch takes this long (long trainings show progress, a quick matrix's second-long epochs stay quiet)
PROGRESS_EPOCH_S = 10.0


@dataclass
class Checkpoint:
    """Where :meth:`Trainer.fit` keeps its state during a long training, so that a training killed at
    epoch 99 of 100 resumes at epoch 100 instead of 0.  The state is the model, the optimizer, the lr
    schedule's position, the data-order generator and the epoch; a resumed training gives the same
    weights as an uninterrupted one.  The file is written atomically, at most every ``every_s``
    seconds (and never in the last epoch), and removed when the training ends.  ``tag`` (e.g. the
    numerics) must match for a saved state to be used: a state from another device or thread count
    is discarded and the training starts over."""

    path: Path
    #: seconds between two writes; 0 writes after every epoch
    every_s: float = 60.0
    tag: str = ""
    #: also write after every this many epochs, however little time passed (None: by time only)
    every_epochs: int | None = None
    _last: float = field(default=0.0, repr=False)

    def load(self) -> dict | None:
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 (a truncated or foreign file: start over)
            log.warning("ignoring unreadable training checkpoint %s (%s)", self.path, e)
            return None
        if not isinstance(state, dict) or state.get("tag") != self.tag:
            log.warning("ignoring training checkpoint %s from other numerics (%s)", self.path,
                        state.get("tag") if isinstance(state, dict) else "?")
            return None
        return state

    def due(self, epoch: int | None = None) -> bool:
        """Whether to write after ``epoch`` (0-based): ``every_s`` seconds have passed since the last
        write, or ``epoch + 1`` is a multiple of ``every_epochs``."""
        if self.every_epochs and epoch is not None and (epoch + 1) % self.every_epochs == 0:
            return True
        return time.monotonic() - self._last >= self.every_s

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            torch.save({**state, "tag": self.tag}, tmp)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self._last = time.monotonic()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


#: the learning-rate schedules of :class:`Recipe` (and of defenses' own phases)
Schedule = typing.Literal["onecycle", "cosine", "step", "constant"]


@dataclass(frozen=True)
class Recipe:
    """A training recipe.  Defaults suit the small CNN on CPU; matrices set the paper's."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    #: "onecycle" (linear warm-up, then cosine) | "cosine" | "step" | "constant"
    schedule: Schedule = "onecycle"
    #: for "onecycle": fraction of the steps spent warming up
    warmup: float = 0.25
    #: for "step": epochs (as fractions of ``epochs``) where lr is multiplied by ``gamma``
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    #: zero padding of the random crop in px; 0 disables cropping.  ``None``: the dataset's
    #: default (a matrix fills it in per dataset; used directly, :func:`default_crop_padding`)
    crop_padding: int | None = None
    #: random horizontal flips.  ``None``: the dataset's default (off for digits, MNIST and GTSRB,
    #: whose classes are not mirror-symmetric; used directly, on)
    flip: bool | None = None

    SCHEDULES = typing.get_args(Schedule)

    def __post_init__(self):
        check_choices(self, "recipe.")
        object.__setattr__(self, "milestones", tuple(self.milestones))

    def with_(self, **kw) -> "Recipe":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def filled(self, **defaults) -> "Recipe":
        """The recipe with each field that is ``None`` here taken from ``defaults``."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def as_dict(self) -> dict:
        return asdict(self)


def default_crop_padding(size: int) -> int:
    """Crop padding scaled with the image: an eighth of the side (4 px at 32 px, 8 at 64, 28 at 224),
    the 4-px-at-32 convention of the CIFAR literature carried to other sizes."""
    return max(1, size // 8)


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Batched random crop with zero padding: each image is shifted by up to ``padding`` px."""
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(b, c, h, w + 2 * padding)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(b, c, h, w)
    return xp.gather(2, rows).gather(3, cols)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


@dataclass
class Trainer:
    """Trains and evaluates :class:`~bench.core.models.Classifier` models on uint8 image sets."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    recipe: Recipe = field(default_factory=Recipe)
    #: channels_last memory format; None = on for CUDA and CPU (measured faster for convs on both)
    channels_last: bool | None = None
    #: bf16 autocast; None = on for CUDA only
    bf16: bool | None = None
    #: wrap models with torch.compile (CUDA mostly; off by default)
    compile: bool = False
    eval_batch_size: int = 512
    train_samples: int = 0
    eval_samples: int = 0

    def __post_init__(self):
        self.device = torch.device(self.device)
        cuda = self.device.type == "cuda"
        if self.channels_last is None:
            self.channels_last = True
        if self.bf16 is None:
            self.bf16 = cuda
        self._device_copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- placement ---------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def on_device(self, t: torch.Tensor) -> torch.Tensor:
        """The device copy of a host tensor, made once and reused."""
        if t.device == self.device:
            return t
        key = id(t)
        hit = self._device_copies.get(key)
        if hit is None or hit[0] is not t:
            hit = (t, t.to(self.device, non_blocking=True))
            self._device_copies[key] = hit
        return hit[1]

    def autocast(self):
        """The mixed-precision context every forward pass of a defense runs in: bf16 autocast when
        ``bf16`` is on (CUDA by default), a no-op otherwise.  Use it for any forward pass outside
        :meth:`fit`, :meth:`map` and :meth:`loss`, so that a whole cell computes in one precision."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.bf16))

    def to_float(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = x_uint8.to(self.device, non_blocking=True).float().div_(255)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # --- training ----------------------------------------------------------------------------
    def load_batch(self, data: ImageSet, idx: torch.Tensor, gen: torch.Generator, augment: bool = True,
                   extra_augment: Callable | None = None, recipe: Recipe | None = None):
        """Gather a batch by index and augment it on the device: returns float x in [0,1], labels."""
        r = recipe or self.recipe
        xs, ys = self.on_device(data.x), self.on_device(data.y)
        idx = idx.to(self.device)
        x, y = xs[idx], ys[idx]
        if extra_augment is not None and augment:
            x = (extra_augment(x.float().div(255), gen).clamp(0, 1) * 255).round().to(torch.uint8)
        if augment:
            pad = r.crop_padding if r.crop_padding is not None else default_crop_padding(x.shape[-1])
            x = random_crop(x, pad, gen)
            if r.flip is None or r.flip:
                x = random_flip(x, gen)
        return self.to_float(x), y

    def optimizer(self, model: nn.Module, recipe: Recipe | None = None, lr: float | None = None):
        r = recipe or self.recipe
        return torch.optim.SGD(model.parameters(), lr=lr if lr is not None else r.lr, momentum=r.momentum,
                               weight_decay=r.weight_decay, nesterov=r.nesterov and r.momentum > 0)

    @staticmethod
    def scheduler(opt, recipe: Recipe, steps_per_epoch: int):
        total = max(1, recipe.epochs * steps_per_epoch)
        if recipe.schedule == "onecycle":  # linear warm-up from lr/25, then cosine to zero
            warm = max(1, int(recipe.warmup * total))
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (
                1 / 25 + (1 - 1 / 25) * s / warm if s < warm
                else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))))
        if recipe.schedule == "cosine":
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        if recipe.schedule == "step":
            marks = [round(m * recipe.epochs) * steps_per_epoch for m in recipe.milestones]
            return torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: recipe.gamma ** sum(s >= m for m in marks))
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def step(self, model, opt, loss: torch.Tensor, n: int) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.train_samples += n

    def loss(self, model, x, y, idx, weights=None, loss_fn=None, hits: list | None = None) -> torch.Tensor:
        """Mean over the batch of ``weight * per-sample loss`` (plain CE by default).  ``hits``: with
        plain CE, receives the batch's count of correct predictions (a device tensor, no sync)."""
        with self.autocast():
            if loss_fn is not None:
                per = loss_fn(model, x, y, idx)
            else:
                logits = model(x).float()
                per = F.cross_entropy(logits, y, reduction="none")
                if hits is not None:
                    hits.append((logits.detach().argmax(1) == y).sum())
        if per.dim() == 0:
            return per
        if weights is not None:
            per = per * weights
        return per.mean()

    def fit(self, model: nn.Module, data: ImageSet, *, indices=None, weights=None, loss_fn=None,
            epochs: int | None = None, lr: float | None = None, schedule: str | None = None,
            augment: bool = True, extra_augment: Callable | None = None, freeze_bn: bool = False,
            on_epoch: Callable | None = None, seed: int = 0, recipe: Recipe | None = None,
            optimizer: torch.optim.Optimizer | None = None,
            lr_at_epoch: Callable[[int], float] | None = None, checkpoint: Checkpoint | None = None,
            name: str | None = None, history: list | None = None,
            on_record: Callable[[dict], None] | None = None) -> nn.Module:
        """Train ``model`` in place on ``data[indices]`` (default: all) and return it.

        ``optimizer``: continue with this optimizer (its momentum buffers are kept) instead of a
        new one; build it on the prepared model, e.g. ``trainer.optimizer(trainer.prepare(m))``.
        ``lr_at_epoch``: the lr of each epoch (0-based) as an absolute value, set at the start of
        the epoch and held for all its steps (a per-epoch schedule); it replaces ``schedule``.
        ``checkpoint``: resume from and save to a :class:`Checkpoint` (a training of the harness's
        own, not a defense's inner loop).  ``name``: log one line per epoch (mean training loss, accuracy
        on the training batches, the epoch's first lr, seconds) under this name at INFO; the console
        shows it when epochs take :data:`PROGRESS_EPOCH_S` or more.  ``history``: a list
        that receives those per-epoch records; ``on_record``: called with each as it is made.
        """
        r = (recipe or self.recipe).with_(epochs=epochs, lr=lr, schedule=schedule)
        model = self.prepare(model)
        gen = torch.Generator().manual_seed(seed)
        pool = torch.arange(len(data)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        w_all = None if weights is None else self.on_device(torch.as_tensor(weights, dtype=torch.float32))
        if len(pool) == 0 or r.epochs <= 0:
            return model
        steps = math.ceil(len(pool) / r.batch_size)
        opt = optimizer if optimizer is not None else self.optimizer(model, r)
        sched = None
        if lr_at_epoch is None:
            if optimizer is not None:  # the schedule scales from this call's lr, not a stale one
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] = r.lr
            sched = self.scheduler(opt, r, steps)
        start = 0
        saved = checkpoint.load() if checkpoint is not None else None
        if saved is not None:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            if sched is not None:
                sched.load_state_dict(saved["scheduler"])
            gen.set_state(saved["generator"])
            start, self.train_samples = saved["epoch"] + 1, self.train_samples + saved["train_samples"]
            if history is not None:
                history.extend(saved.get("history", []))
            log.info("%s: resumed at epoch %d of %d from %s", name or "training", start + 1, r.epochs,
                     checkpoint.path)
        records = list(history) if history is not None else []
        samples_before = self.train_samples - (saved["train_samples"] if saved else 0)
        for epoch in range(start, r.epochs):
            t0, loss_sum, seen, hits = time.monotonic(), torch.zeros((), device=self.device), 0, []
            lr_now = opt.param_groups[0]["lr"]
            if lr_at_epoch is not None:
                for g in opt.param_groups:
                    g["lr"] = float(lr_at_epoch(epoch))
            model.train()
            if freeze_bn:
                for m in model.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
            order = pool[torch.randperm(len(pool), generator=gen)]
            for b in range(steps):
                idx = order[b * r.batch_size:(b + 1) * r.batch_size]
                x, y = self.load_batch(data, idx, gen, augment, extra_augment, r)
                w = None if w_all is None else w_all[idx.to(self.device)]
                if b == 0:
                    lr_now = opt.param_groups[0]["lr"]
                loss = self.loss(model, x, y, idx, w, loss_fn, hits)
                self.step(model, opt, loss, len(idx))
                loss_sum += loss.detach().float() * len(idx)  # summed on the device: no sync per step
                seen += len(idx)
                if sched is not None:
                    sched.step()
            record = {"epoch": epoch + 1, "loss": float(loss_sum) / max(1, seen), "lr": lr_now,
                      # accuracy on the (augmented) training batches as they were trained on; None with a custom loss
                      "train_acc": float(sum(hits)) / max(1, seen) if hits else None,
                      "seconds": time.monotonic() - t0}
            records.append(record)
            if history is not None:
                history.append(record)
            acc = f" train acc {100 * record['train_acc']:.1f}%" if record["train_acc"] is not None else ""
            # every named epoch reaches the cell's log file; the console shows it only for long epochs
            log.log(logging.INFO if name else logging.DEBUG, "%s: epoch %d/%d loss %.4f%s lr %.4g (%.1fs)",
                    name or "fit", epoch + 1, r.epochs, record["loss"], acc, lr_now, record["seconds"],
                    extra={"console": record["seconds"] >= PROGRESS_EPOCH_S})
            if on_epoch is not None:
                on_epoch(epoch, model)
            if on_record is not None:
                on_record(record)
            if checkpoint is not None and epoch + 1 < r.epochs and checkpoint.due(epoch):
                checkpoint.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "scheduler": sched.state_dict() if sched is not None else None,
                                 "generator": gen.get_state(), "epoch": epoch,
                                 "train_samples": self.train_samples - samples_before, "history": records})
        if checkpoint is not None:
            checkpoint.clear()
        model.eval()
        return model

    # --- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, *, model: nn.Module | None = None,
            images: bool = True, on_device: bool = False, passes: int = 1) -> torch.Tensor:
        """``fn`` applied to ``inputs`` in batches of ``eval_batch_size``, without gradients, under
        :meth:`autocast`, concatenated (floats as float32, or float64 where ``fn`` returns that).  Every input counts ``passes`` times in
        ``eval_samples`` (``fn`` runs the model that many times per input).

        ``images``: ``inputs`` are uint8 images (converted to floats in [0, 1] on the device, in the
        trainer's memory format); otherwise they are moved to the device as they are (e.g. a stage's
        activations).  ``model``: put into eval mode first.  ``on_device``: keep the result on the
        device (default: on the host)."""
        if model is not None:
            model.eval()
        out = []
        for i in range(0, len(inputs), self.eval_batch_size):
            chunk = inputs[i:i + self.eval_batch_size]
            xb = self.to_float(chunk) if images else chunk.to(self.device, non_blocking=True)
            with self.autocast():
                y = fn(xb)
            if y.is_floating_point() and y.dtype != torch.float64:
                y = y.float()  # bf16 under autocast -> float32; float64 results keep their precision
            out.append(y if on_device else y.cpu())
            self.eval_samples += len(chunk) * passes
        return torch.cat(out) if out else torch.empty(0)

    def logits(self, model, x_uint8: torch.Tensor) -> torch.Tensor:
        return self.map(model, x_uint8, model=model)

    def predict(self, model, x_uint8: torch.Tensor) -> torch.Tensor:
        return self.logits(model, x_uint8).argmax(1)

    def features(self, model, x_uint8: torch.Tensor) -> torch.Tensor:
        return self.map(model.features, x_uint8, model=model)

    def per_sample_loss(self, model, data: ImageSet) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, data.x), data.y, reduction="none")

    def accuracy(self, model, data: ImageSet) -> float:
        if len(data) == 0:
            return float("nan")
        return (self.predict(model, data.x) == data.y).float().mean().item()
