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
Precision is chosen per device (:func:`resolve_precision`): bf16 autocast on CUDA and on CPUs
with native bf16 arithmetic (AMX or AVX512-BF16), fp32 elsewhere, where bf16 autocast is much
slower than fp32.  channels_last is on by default (measured faster for convolutions on both).

Work is counted in samples through forward+backward (``train_samples``) and forward only
(``eval_samples``), from which the runner reports training epoch-equivalents.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import platform
import time
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageSet, default_crop_padding
from .params import ConfigError, Range, check_choices
from .tensors import stream

log = logging.getLogger("bench.train")

#: a named training's epochs are logged to the cell's log file; the console shows them once an
#: epoch takes this long (long trainings show progress, a quick matrix's second-long epochs stay quiet)
PROGRESS_EPOCH_S = 10.0


#: the key under which a checkpoint keeps its cell's stopwatch reading
ELAPSED_KEY = "cell_elapsed_s"


@dataclass
class Stopwatch:
    """A cell's compute time across interruptions.  A killed cell resumes a phase from a
    :class:`Checkpoint`, which records the stopwatch's reading when it was written; loading it
    sets the reading back to that value (the time this attempt spent before the resume re-did work
    the state already holds), so a resumed cell reports about the time an uninterrupted run takes,
    not only its last attempt's."""

    _start: float = field(default_factory=time.monotonic, repr=False)
    _credit: float = field(default=0.0, repr=False)

    def elapsed(self) -> float:
        return time.monotonic() - self._start + self._credit

    def resumed_at(self, saved_elapsed: float) -> None:
        """A state written when the cell had run ``saved_elapsed`` seconds was loaded."""
        self._credit = max(self._credit, saved_elapsed - (time.monotonic() - self._start))


@dataclass
class Checkpoint:
    """Where :meth:`Trainer.fit` keeps its state during a long training, so that a training killed at
    epoch 99 of 100 resumes at epoch 100 instead of 0.  The state is the model, the optimizer, the lr
    schedule's position, the data-order generator, a stateful loss hook's state and the epoch; a resumed training gives the same
    weights as an uninterrupted one.  The file is written atomically, at most every ``every_s``
    seconds (and never in the last epoch), and removed when the training ends.  ``tag`` (e.g. the
    numerics) must match for a saved state to be used: a state from another device or thread count
    is discarded and the training starts over.  With a ``clock`` (the cell's :class:`Stopwatch`),
    each write records its reading and a load gives it back."""

    path: Path
    #: seconds between two writes; 0 writes after every epoch
    every_s: float = 60.0
    tag: str = ""
    #: also write after every this many epochs, however little time passed (None: by time only)
    every_epochs: int | None = None
    clock: Stopwatch | None = field(default=None, repr=False, compare=False)
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
        if self.clock is not None and isinstance(state.get(ELAPSED_KEY), float):
            self.clock.resumed_at(state[ELAPSED_KEY])
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
            clock = {ELAPSED_KEY: self.clock.elapsed()} if self.clock is not None else {}
            torch.save({**state, **clock, "tag": self.tag}, tmp)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self._last = time.monotonic()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


#: the learning-rate schedules of :class:`Recipe` (and of defenses' own phases)
Schedule = typing.Literal["onecycle", "linear", "cosine", "step", "constant"]
#: how every training and forward pass of a cell computes; "auto" decides per device
Precision = typing.Literal["auto", "fp32", "bf16"]

#: CPU feature flags (``/proc/cpuinfo``) that mean native bf16 arithmetic
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: environment variable that overrides the detection: "1" (this CPU has native bf16) or "0" (it has
#: not), e.g. in a VM whose ``/proc/cpuinfo`` hides the flags, or to make "auto" mean fp32 everywhere
CPU_BF16_ENV = "BENCH_CPU_BF16"


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16): ``$BENCH_CPU_BF16`` when set,
    else read from ``/proc/cpuinfo``.  Elsewhere (no such flags, or not Linux) False: bf16
    autocast is then emulated and runs far slower than fp32."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ConfigError(f"${CPU_BF16_ENV}: {forced!r} is not one of 0, 1")
    return _cpuinfo_native_bf16()


@functools.lru_cache(maxsize=1)
def _cpuinfo_native_bf16() -> bool:
    if platform.system() != "Linux":
        return False
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def resolve_precision(precision: str, device) -> tuple[str, str]:
    """``(dtype, why)``: "fp32" or "bf16" for ``precision`` ("auto" | "fp32" | "bf16") on ``device``."""
    kind = torch.device(device).type
    if precision not in typing.get_args(Precision):
        raise ConfigError(f"precision: {precision!r} is not one of {', '.join(typing.get_args(Precision))}")
    if precision != "auto":
        return precision, "asked for"
    if kind == "cuda":
        return "bf16", "auto: CUDA"
    if kind == "cpu":
        said = f"${CPU_BF16_ENV}" if os.environ.get(CPU_BF16_ENV, "").strip() else "/".join(NATIVE_BF16_FLAGS)
        if cpu_native_bf16():
            return "bf16", f"auto: this CPU has native bf16 ({said})"
        return "fp32", f"auto: this CPU has no native bf16 ({said}), where bf16 autocast is slower than fp32"
    return "fp32", f"auto: {kind}"


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
    #: "auto" (bf16 autocast on CUDA and on CPUs with native bf16, fp32 elsewhere) | "fp32" | "bf16";
    #: the matrix runner keys results by the dtype it resolves to (see :func:`resolve_precision`)
    precision: Precision = "auto"
    #: for "onecycle" and "linear": the lr at the first step, as a fraction of ``lr``
    warmup_from: float = 1 / 25
    #: for "linear": the lr at the last step, as a fraction of ``lr``
    lr_end: float = field(default=0.0, metadata={"range": Range(0, 1)})
    #: lr multiplier of BatchNorm biases; their weight decay is divided by it, so that the decay
    #: per step stays ``lr * weight_decay`` (airbench's decoupling); 1 = one group for all parameters
    bn_bias_lr_scale: float = field(default=1.0, metadata={"range": Range(0, low_open=True)})
    #: label smoothing of the cross-entropy; 0 (off) by default: ABL, DBR and AdvrBD read
    #: per-sample losses and confidences, which smoothing changes
    label_smoothing: float = field(default=0.0, metadata={"range": Range(0, 1, high_open=True)})
    #: padding of the random crop: "zeros" | "reflect"
    pad_mode: typing.Literal["zeros", "reflect"] = "zeros"
    #: "random" (each image flipped with p = 1/2 every epoch) | "alternate" (each image flipped in
    #: every other epoch, starting from a random side: airbench's scheme, more views in few epochs)
    flip_mode: typing.Literal["random", "alternate"] = "random"
    #: lookahead: every ``lookahead_every`` steps the weights move to an exponential moving average
    #: of themselves, with decay ``0.95**lookahead_every * progress**3`` (airbench's); at the end
    #: the average is the model
    lookahead: bool = False
    lookahead_every: int = field(default=5, metadata={"range": Range(1)})
    #: epochs in which a model's whitening-stem bias trains (``model.stem_bias()``), after which it is
    #: frozen; ``None``: all epochs.  Models without a stem ignore it
    whiten_bias_epochs: int | None = None
    #: the settings a defense's own phases run with (a fine-tuning, an unlearning, an isolation or
    #: repair at the defense's lr and schedule), as overrides of this recipe's fields; ``None``: the
    #: same as this recipe.  A recipe written for fast from-scratch training (the ``fast`` preset's
    #: large batch, BN biases at 64x the lr, lookahead) sets the references' fine-tuning conventions
    #: here, so that a 20-epoch fine-tuning at lr 0.01 means what the defense's paper means.  See
    #: :meth:`for_tuning`
    tuning: typing.Any = None

    SCHEDULES = typing.get_args(Schedule)
    #: fields added after results were first keyed, with the value that reproduces the earlier
    #: behaviour: :meth:`ident` leaves a field out of the cache key at that value, so adding the field
    #: did not invalidate stored results
    LATER_FIELDS: typing.ClassVar[dict] = {
        "precision": "fp32", "warmup_from": 1 / 25, "lr_end": 0.0, "bn_bias_lr_scale": 1.0,
        "label_smoothing": 0.0, "pad_mode": "zeros", "flip_mode": "random", "lookahead": False,
        "lookahead_every": 5, "whiten_bias_epochs": None, "tuning": None}

    def __post_init__(self):
        check_choices(self, "recipe.")
        object.__setattr__(self, "milestones", tuple(self.milestones))
        if self.tuning is not None:
            items = dict(self.tuning).items() if not isinstance(self.tuning, tuple) else self.tuning
            allowed = sorted(f.name for f in fields(self) if f.name != "tuning")
            bad = [k for k, _ in items if k not in allowed]
            if bad:
                raise ConfigError(f"recipe.tuning: {', '.join(map(str, bad))} is not a recipe field; allowed: "
                                  f"{', '.join(allowed)}")
            pairs = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in items))
            object.__setattr__(self, "tuning", pairs or None)
            replace(self, tuning=None, **dict(pairs))  # each value is checked as the field it overrides

    def for_tuning(self) -> "Recipe":
        """The recipe of a defense's own phases: this recipe with :attr:`tuning`'s overrides (itself
        when there are none).  A defense still passes its own lr, schedule and epochs to ``fit``."""
        if not self.tuning:
            return self
        return replace(self, tuning=None, **dict(self.tuning))

    @classmethod
    def preset(cls, name: str, **overrides) -> "Recipe":
        """The recipe of a named preset (:data:`RECIPE_PRESETS`) with ``overrides`` on top."""
        if name not in RECIPE_PRESETS:
            raise ConfigError(f"recipe.preset: {name!r} is not one of {', '.join(RECIPE_PRESETS)}")
        return cls(**{**RECIPE_PRESETS[name], **overrides})

    def with_(self, **kw) -> "Recipe":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def ident(self) -> dict:
        """The recipe as it enters cache keys: every field, less those of :data:`LATER_FIELDS` that
        hold their earlier value."""
        return {k: v for k, v in asdict(self).items()
                if not (k in self.LATER_FIELDS and v == self.LATER_FIELDS[k])}

    def filled(self, **defaults) -> "Recipe":
        """The recipe with each field that is ``None`` here taken from ``defaults``."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def as_dict(self) -> dict:
        return asdict(self)


#: Named recipes (``recipe: {preset: fast}`` in a matrix; fields given beside it override it).
#:
#: ``fast``: airbench94's training (Jordan 2024) in this trainer's terms, for :mod:`~bench.core.fastnet`.
#: The reference states lr and weight decay per 1,024 examples of a summed loss with momentum
#: 0.85 (lr 11.5, decay 0.0153); with a mean loss over a batch of 1,024 that is lr 11.5 / (1 + 1 /
#: (1 - 0.85)) = 1.5 and weight decay 0.0153 / 11.5 = 1.33e-3 (decay per step ``lr * weight_decay``
#: = 2.0e-3 as in the reference).  Nesterov, BN biases at 64x the lr, warm-up from 0.2 x lr over
#: 23 % of the steps then linear decay to 0.07 x lr, lookahead every 5 steps, the whitening bias
#: trained for 3 epochs, flip alternating per epoch (where the dataset flips at all), 2-px
#: reflect-padded translation.  10 epochs
#: (the reference's 9.9, rounded up to whole epochs).  Not taken: label smoothing 0.2 (loss-based
#: defenses read losses) and test-time augmentation (a defense against static triggers).
#:
#: A defense's own phases (``Recipe.tuning``) run at the conventions the defenses' reference code
#: fine-tunes with, which are this trainer's defaults: batch 128, SGD with Nesterov momentum 0.9,
#: weight decay 5e-4, one lr for every parameter, no lookahead, the whitening bias trainable.
#: The fast preset's augmentation (2-px reflect translation, flips) is kept.
FAST_TUNING: dict = dict(batch_size=128, momentum=0.9, nesterov=True, weight_decay=5e-4, bn_bias_lr_scale=1.0,
                         lookahead=False, whiten_bias_epochs=None, flip_mode="random")
RECIPE_PRESETS: dict[str, dict] = {
    "fast": dict(epochs=10, batch_size=1024, lr=1.5, momentum=0.85, weight_decay=0.0153 / 11.5, nesterov=True,
                 schedule="linear", warmup=0.23, warmup_from=0.2, lr_end=0.07, bn_bias_lr_scale=64.0,
                 label_smoothing=0.0, crop_padding=2, pad_mode="reflect", flip_mode="alternate",
                 lookahead=True, lookahead_every=5, whiten_bias_epochs=3,
                 tuning=FAST_TUNING),
}


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator, mode: str = "zeros") -> torch.Tensor:
    """Batched random crop with zero (or reflect) padding: each image is shifted by up to ``padding`` px."""
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    if mode == "reflect":  # reflect padding is not implemented for integer tensors: pad as float, exactly
        xp = F.pad(x.float(), (padding,) * 4, mode="reflect").to(x.dtype)
    else:
        xp = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(b, c, h, w + 2 * padding)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(b, c, h, w)
    return xp.gather(2, rows).gather(3, cols)


def random_flip(x: torch.Tensor, gen: torch.Generator, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Each image mirrored with p = 1/2, or where the boolean ``flip`` says."""
    if flip is None:
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)


@dataclass
class PassStats:
    """What one pass over the data measured: the loss summed over samples (a device tensor), the
    samples seen, the correct predictions per batch (plain CE only) and the pass's first lr."""

    loss_sum: torch.Tensor
    seen: int = 0
    hits: list = field(default_factory=list)
    lr: float = 0.0


@dataclass
class _Run:
    """The state of one :meth:`Trainer.fit` that a checkpoint saves and restores."""

    model: nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator
    loss_fn: Callable | None = None
    sched: object = None
    lookahead: "Lookahead | None" = None

    def after_step(self, offset: int) -> Callable[[int], None]:
        """After step ``b`` of an epoch that starts at global step ``offset``: lookahead, then the
        lr schedule."""
        def hook(b: int) -> None:
            if self.lookahead is not None:
                self.lookahead.update(self.model, offset + b + 1)
            if self.sched is not None:
                self.sched.step()
        return hook

    def finish(self, total_steps: int, stem_bias: list, checkpoint: "Checkpoint | None") -> None:
        """The last lookahead average, the stem's bias trainable again, the checkpoint removed, eval mode."""
        if self.lookahead is not None:
            self.lookahead.update(self.model, total_steps, final=True)
        for p in stem_bias:  # frozen only within this training
            p.requires_grad_(True)
        if checkpoint is not None:
            checkpoint.clear()
        self.model.eval()

    def state(self, epoch: int, train_samples: int, records: list) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched is not None else None,
                "generator": self.gen.get_state(), "epoch": epoch,
                "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
                "loss_fn": self.loss_fn.state_dict() if hasattr(self.loss_fn, "state_dict") else None,
                "train_samples": train_samples, "history": records}

    def load(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["optimizer"])
        if self.sched is not None:
            self.sched.load_state_dict(saved["scheduler"])
        self.gen.set_state(saved["generator"])
        if self.lookahead is not None and saved.get("lookahead") is not None:
            self.lookahead.load_state_dict(saved["lookahead"])
        if hasattr(self.loss_fn, "load_state_dict") and saved.get("loss_fn") is not None:
            self.loss_fn.load_state_dict(saved["loss_fn"])


def _epoch_start(opt, epoch: int, lr_at_epoch: Callable | None, stem_bias: list, whiten_bias_epochs: int | None):
    """An epoch's settings: its lr where a per-epoch lr is given, and whether the whitening stem's
    bias trains."""
    if lr_at_epoch is not None:
        for g in opt.param_groups:
            g["lr"] = float(lr_at_epoch(epoch)) * g.get("lr_scale", 1.0)
    for p in stem_bias:
        p.requires_grad_(whiten_bias_epochs is None or epoch < whiten_bias_epochs)


def _train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """Training mode; with ``freeze_bn`` the BatchNorm layers stay in eval mode (running statistics frozen)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


class Lookahead:
    """airbench's lookahead: every ``every`` steps the weights become an exponential moving average
    of themselves with decay ``0.95**every * (step / total)**3`` (close to 0 early, so the average
    follows the weights, about 0.77 at the end); after the last step the average is the model."""

    def __init__(self, model: nn.Module, every: int, total_steps: int):
        self.every, self.total = every, max(1, total_steps)
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, final: bool = False) -> None:
        if not final and step % self.every:
            return
        decay = 1.0 if final else 0.95 ** self.every * (min(step, self.total) / self.total) ** 3
        state = model.state_dict()
        for k, avg in self.ema.items():
            avg.lerp_(state[k], 1 - decay)
            state[k].copy_(avg)

    def state_dict(self) -> dict:
        return self.ema

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.ema[k].copy_(v)


def init_pick(pool: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """The sorted ``min(n, len(pool))`` samples of ``pool`` a data-dependent initialisation sees,
    drawn from the ``"init-from-data"`` stream of ``seed`` (see :meth:`Trainer.fit`)."""
    return pool[torch.randperm(len(pool), generator=stream(seed, "init-from-data"))[:n]].sort().values


@dataclass
class Trainer:
    """Trains and evaluates :class:`~bench.core.models.Classifier` models on uint8 image sets."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    recipe: Recipe = field(default_factory=Recipe)
    #: channels_last memory format; None = on for CUDA and CPU (measured faster for convs on both)
    channels_last: bool | None = None
    #: bf16 autocast; None = as the recipe's ``precision`` resolves on this device
    #: (:func:`resolve_precision`: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere)
    bf16: bool | None = None
    #: wrap models with torch.compile (CUDA mostly; off by default)
    compile: bool = False
    eval_batch_size: int = 512
    train_samples: int = 0
    eval_samples: int = 0

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.channels_last is None:
            self.channels_last = True
        self.precision_reason = "asked for"
        if self.bf16 is None:
            dtype, self.precision_reason = resolve_precision(self.recipe.precision, self.device)
            self.bf16 = dtype == "bf16"
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
                   extra_augment: Callable | None = None, recipe: Recipe | None = None,
                   flip: torch.Tensor | None = None):
        """Gather a batch by index and augment it on the device: returns float x in [0,1], labels.
        ``flip``: which images to mirror (a boolean per image; default: drawn with p = 1/2)."""
        r = recipe or self.recipe
        xs, ys = self.on_device(data.x), self.on_device(data.y)
        idx = idx.to(self.device)
        x, y = xs[idx], ys[idx]
        if extra_augment is not None and augment:
            x = (extra_augment(x.float().div(255), gen).clamp(0, 1) * 255).round().to(torch.uint8)
        if augment:
            pad = r.crop_padding if r.crop_padding is not None else default_crop_padding(x.shape[-1])
            x = random_crop(x, pad, gen, r.pad_mode)
            if r.flip is None or r.flip:
                x = random_flip(x, gen, flip)
        return self.to_float(x), y

    def optimizer(self, model: nn.Module, recipe: Recipe | None = None, lr: float | None = None):
        """SGD over the parameters that require gradients.  With ``recipe.bn_bias_lr_scale`` != 1, the
        BatchNorm biases form a second group at that multiple of the lr and the weight decay divided
        by it (each group remembers its ``lr_scale``, which :meth:`fit` keeps when it sets the lr)."""
        r = recipe or self.recipe
        lr = lr if lr is not None else r.lr
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": params, "lr_scale": 1.0}]
        if r.bn_bias_lr_scale != 1:
            bn = {id(m.bias) for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None}
            groups = [{"params": [p for p in params if id(p) in bn], "lr_scale": r.bn_bias_lr_scale,
                       "weight_decay": r.weight_decay / r.bn_bias_lr_scale},
                      {"params": [p for p in params if id(p) not in bn], "lr_scale": 1.0}]
        groups = [g for g in groups if g["params"]] or groups[-1:]
        for g in groups:
            g["lr"] = lr * g["lr_scale"]
        return torch.optim.SGD(groups, lr=lr, momentum=r.momentum, weight_decay=r.weight_decay,
                               nesterov=r.nesterov and r.momentum > 0)

    @staticmethod
    def scheduler(opt, recipe: Recipe, steps_per_epoch: int):
        total = max(1, recipe.epochs * steps_per_epoch)
        warm = max(1, int(recipe.warmup * total))
        w0 = recipe.warmup_from
        if recipe.schedule == "onecycle":  # linear warm-up from warmup_from x lr, then cosine to zero
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (
                w0 + (1 - w0) * s / warm if s < warm
                else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))))
        if recipe.schedule == "linear":  # linear warm-up, then linear decay to lr_end x lr
            end = recipe.lr_end
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (
                w0 + (1 - w0) * s / warm if s < warm
                else 1 + (end - 1) * min(1.0, (s - warm) / max(1, total - warm))))
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

    def loss(self, model, x, y, idx, weights=None, loss_fn=None, hits: list | None = None,
             label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean over the batch of ``weight * per-sample loss`` (plain CE by default, with
        ``label_smoothing``).  ``hits``: with plain CE, receives the batch's count of correct
        predictions (a device tensor, no sync)."""
        with self.autocast():
            if loss_fn is not None:
                per = loss_fn(model, x, y, idx)
            else:
                logits = model(x).float()
                per = F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
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
        """Train ``model`` in place on ``data[indices]`` (default: all) and return it: per epoch one
        :meth:`train_pass`.  ``optimizer``: continue with this one (momentum kept), built on the
        prepared model; ``lr_at_epoch``: each epoch's lr, replacing ``schedule``; ``checkpoint``: resume
        from and save to a :class:`Checkpoint` (a stateful ``loss_fn`` with ``state_dict()`` and
        ``load_state_dict()`` travels with it); ``name``: log each epoch's record (mean loss, training
        accuracy, first lr, seconds) at INFO, on the console when epochs take
        :data:`PROGRESS_EPOCH_S` or more; ``history`` receives the records, ``on_record`` is called
        with each.  A model with ``init_from_data`` (the fast network's whitening stem) is first
        initialised from up to ``model.init_samples`` of the images it is about to train on.
        ``seed`` names the training's random streams (data order, augmentation, initialisation
        draw), each derived from it by name, so that no training replays a draw another part of the
        harness makes from the same seed: the attacks draw their poison from ``randperm(N)`` under
        the plain cell seed, and a training under that generator visited the poisoned samples
        first and whitened fastnet's stem on them.
        """
        r = (recipe or self.recipe).with_(epochs=epochs, lr=lr, schedule=schedule)
        model = self.prepare(model)
        gen = stream(seed, "fit")
        pool = torch.arange(len(data)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        w_all = None if weights is None else self.on_device(torch.as_tensor(weights, dtype=torch.float32))
        if len(pool) == 0 or r.epochs <= 0:
            return model
        self.init_from_data(model, data, pool, seed)
        steps = math.ceil(len(pool) / r.batch_size)
        run = _Run(model, optimizer if optimizer is not None else self.optimizer(model, r), gen, loss_fn)
        if lr_at_epoch is None:
            run.sched = self._schedule(run.opt, r, steps, carried=optimizer is not None)
        # alternate flipping: each sample's first side, drawn before any checkpoint is read (a
        # resumed training draws the same sides)
        first_side = torch.rand(len(data), generator=gen) < 0.5 if r.flip_mode == "alternate" else None
        stem_bias = model.stem_bias() if hasattr(model, "stem_bias") else []
        run.lookahead = Lookahead(model, r.lookahead_every, r.epochs * steps) if r.lookahead else None
        start, records, samples_before = self._resume(run, checkpoint, history, name, r.epochs)
        for epoch in range(start, r.epochs):
            t0 = time.monotonic()
            _epoch_start(run.opt, epoch, lr_at_epoch, stem_bias, r.whiten_bias_epochs)
            _train_mode(model, freeze_bn)
            stats = self.train_pass(model, data, pool, run.opt, gen, r, augment=augment, extra_augment=extra_augment,
                                    weights=w_all, loss_fn=loss_fn, first_side=first_side, odd=bool(epoch % 2),
                                    after_step=run.after_step(epoch * steps))
            record = self._record(epoch, stats, time.monotonic() - t0, r.epochs, name)
            records.append(record)
            if history is not None:
                history.append(record)
            if on_epoch is not None:
                on_epoch(epoch, model)
            if on_record is not None:
                on_record(record)
            if checkpoint is not None and epoch + 1 < r.epochs and checkpoint.due(epoch):
                checkpoint.save(run.state(epoch, self.train_samples - samples_before, records))
        run.finish(r.epochs * steps, stem_bias, checkpoint)
        return model

    def _schedule(self, opt, r: Recipe, steps: int, carried: bool):
        if carried:  # a carried optimizer: the schedule scales from this call's lr, not a stale one
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] = r.lr * g.get("lr_scale", 1.0)
        return self.scheduler(opt, r, steps)

    def _resume(self, run: "_Run", checkpoint: Checkpoint | None, history: list | None, name: str | None,
                epochs: int) -> tuple[int, list, int]:
        """Restore a saved state when ``checkpoint`` has one: ``(first epoch to run, the records so
        far, train_samples before this training)``."""
        saved = checkpoint.load() if checkpoint is not None else None
        if saved is None:
            return 0, list(history) if history is not None else [], self.train_samples
        run.load(saved)
        self.train_samples += saved["train_samples"]
        if history is not None:
            history.extend(saved.get("history", []))
        log.info("%s: resumed at epoch %d of %d from %s", name or "training", saved["epoch"] + 2, epochs,
                 checkpoint.path)
        records = list(history) if history is not None else []
        return saved["epoch"] + 1, records, self.train_samples - saved["train_samples"]

    def train_pass(self, model: nn.Module, data: ImageSet, pool: torch.Tensor, opt, gen: torch.Generator,
                   recipe: Recipe, *, augment: bool = True, extra_augment: Callable | None = None, weights=None,
                   loss_fn=None, sign: float = 1.0, first_side: torch.Tensor | None = None, odd: bool = False,
                   after_step: Callable[[int], None] | None = None) -> "PassStats":
        """One pass over ``pool`` in a random order drawn from ``gen``, a step per batch of
        ``recipe.batch_size``: the loop every training shares.  ``sign`` -1 ascends the loss
        (unlearning); ``first_side``/``odd``: alternate flipping (each sample's side this pass);
        ``after_step(b)``: called after step ``b`` of the pass (lookahead, lr schedule).  The model's
        train/eval mode is the caller's."""
        stats = PassStats(torch.zeros((), device=self.device))
        order = pool[torch.randperm(len(pool), generator=gen)]
        for b in range(math.ceil(len(pool) / recipe.batch_size)):
            idx = order[b * recipe.batch_size:(b + 1) * recipe.batch_size]
            flip = {} if first_side is None else {"flip": first_side[idx] ^ odd}
            x, y = self.load_batch(data, idx, gen, augment, extra_augment, recipe, **flip)
            w = None if weights is None else weights[idx.to(self.device)]
            if b == 0:
                stats.lr = opt.param_groups[-1]["lr"]
            loss = self.loss(model, x, y, idx, w, loss_fn, stats.hits, recipe.label_smoothing)
            self.step(model, opt, sign * loss if sign != 1.0 else loss, len(idx))
            if after_step is not None:
                after_step(b)
            stats.loss_sum += loss.detach().float() * len(idx)  # summed on the device: no sync per step
            stats.seen += len(idx)
        return stats

    @staticmethod
    def _record(epoch: int, stats: "PassStats", seconds: float, epochs: int, name: str | None) -> dict:
        """The epoch's record (mean training loss, accuracy on the training batches, first lr,
        seconds), logged under ``name``."""
        record = {"epoch": epoch + 1, "loss": float(stats.loss_sum) / max(1, stats.seen), "lr": stats.lr,
                  # accuracy on the (augmented) training batches as they were trained on; None with a custom loss
                  "train_acc": float(sum(stats.hits)) / max(1, stats.seen) if stats.hits else None,
                  "seconds": seconds}
        acc = f" train acc {100 * record['train_acc']:.1f}%" if record["train_acc"] is not None else ""
        # every named epoch reaches the cell's log file; the console shows it only for long epochs
        log.log(logging.INFO if name else logging.DEBUG, "%s: epoch %d/%d loss %.4f%s lr %.4g (%.1fs)",
                name or "fit", epoch + 1, epochs, record["loss"], acc, stats.lr, seconds,
                extra={"console": seconds >= PROGRESS_EPOCH_S})
        return record

    @torch.no_grad()
    def init_from_data(self, model: nn.Module, data: ImageSet, pool: torch.Tensor, seed: int) -> None:
        """Call ``model.init_from_data`` (when it has one and has not been initialised) with up to
        ``model.init_samples`` un-augmented images of ``data[pool]`` (:func:`init_pick`)."""
        init = getattr(model, "init_from_data", None)
        done = getattr(model, "data_initialized", None)
        if init is None or (done is not None and bool(done)):
            return
        init(self.to_float(data.x[init_pick(pool, int(getattr(model, "init_samples", len(pool))), seed)]))

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
