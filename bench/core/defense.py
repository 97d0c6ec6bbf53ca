"""The :class:`Defense` base class and what a defense is given.

A defense is a dataclass whose fields are its hyperparameters, with one method::

    def run(self, ctx: DefenseContext) -> Outcome

and, when it needs more than a fresh model and the poisoned set, one declaration::

    def needs(self) -> Needs   # e.g. Needs(backdoored_model=True, clean_data=self.repair_epochs > 0)

``ctx`` holds the poisoned training set as a defender sees it (images and given labels, no
ground truth), a model factory, the shared :class:`~bench.core.trainer.Trainer`, the cached
backdoored model (built lazily, a fresh prepared copy each call), the clean reserve (only for
defenses that declare ``Needs(clean_data=True)``), named random streams (``ctx.rng("isolation")``,
``ctx.seed_for("retrain")``) and a logger.  A defense needs no paths, no device code and no
argparse: one file of the method's own logic.  Its forward passes go through the trainer
(``trainer.fit``, ``trainer.map``, ``trainer.step``, or ``trainer.autocast()`` around a custom
loss), which counts the work the report shows as the defense's cost.

Defenses that first flag suspicious training samples and then repair (ABL, DBR, SCAnFT) subclass
:class:`DetectThenRepair`: ``detect`` returns a :class:`Detection`, ``repair_model`` the model.

``ctx.observe(tag, model)`` lets a defense hand intermediate models to the harness, which
evaluates them with the ground truth it keeps to itself (ACC/ASR per round, for plots);
``ctx.observe_flags(tag, indices)`` does the same for an intermediate set of flagged training
samples (TPR/FPR/precision) and ``ctx.observe_scores(tag, indices, scores)`` for a per-sample
score (AUROC for "lower score = poison" and the clean/poison histograms).  The defense gets
nothing back, so it cannot select on test data or ground truth.

Isolation.  The context is built from plain data, so nothing reachable from it (attributes,
closures, a factory's fields) leads to the ground truth, the test set or the runner:

* ``train`` is the cell's own copy: a defense may change it in place without touching any
  other cell or the cache;
* ``make_model`` and the backdoored model come from a :class:`ModelFactory` holding only the
  architecture's name, its input statistics, a seed and (for the backdoored model) weights;
* observations go into an :class:`Observations` record (copies of the models, indices and
  scores) that the harness evaluates after ``run`` returns, which is why per-round ACC/ASR
  reaches the log when the defense has finished rather than while it runs.

This guards against mistakes and against looking where a defense should not, within what
Python allows: code that searches the whole interpreter (``gc.get_objects()``) is not stopped.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from .data import ImageSet
from .registry import Registered
from .tensors import stream, stream_seed
from .trainer import Checkpoint, Trainer


@dataclass
class Outcome:
    model: nn.Module
    #: indices of the training samples the defense believes are poisoned (for TPR/FPR)
    flagged: torch.Tensor | None = None
    #: diagnostics (JSON-able) stored with the result
    info: dict[str, Any] = field(default_factory=dict)
    #: further models to evaluate and report, e.g. {"relearn": model}
    extra_models: dict[str, nn.Module] = field(default_factory=dict)


@dataclass
class Observations:
    """What a defense handed to the harness while it ran, in order: ``(kind, tag, payload)`` with
    kind ``"model"`` (a CPU copy of the model), ``"flags"`` (indices) or ``"scores"`` (indices, scores).
    Copies, so a defense that keeps training an observed model does not change the record."""

    items: list = field(default_factory=list)

    def model(self, tag: str, model: nn.Module) -> None:
        self.items.append(("model", tag, copy.deepcopy(model).cpu()))

    def flags(self, tag: str, indices) -> None:
        self.items.append(("flags", tag, torch.as_tensor(indices, dtype=torch.long).detach().cpu().clone()))

    def scores(self, tag: str, indices, scores) -> None:
        self.items.append(("scores", tag, (torch.as_tensor(indices, dtype=torch.long).detach().cpu().clone(),
                                           torch.as_tensor(scores).detach().float().cpu().clone())))

    def state(self) -> list:
        """The record as tensors and plain values (a model as its state dict), for a checkpoint."""
        return [[kind, tag, payload.state_dict() if kind == "model" else payload] for kind, tag, payload in self.items]

    def restore(self, state: list, make_model: Callable[[], nn.Module]) -> None:
        """Replace the record by one :meth:`state` wrote; models are rebuilt with ``make_model``."""
        self.items = []
        for kind, tag, payload in state:
            if kind == "model":
                model = make_model().cpu()
                model.load_state_dict(payload)
                payload = model.eval()
            self.items.append((kind, tag, tuple(payload) if kind == "scores" else payload))


@dataclass(frozen=True)
class Needs:
    """What a defense needs from the harness, declared by :meth:`Defense.needs` (it may depend on
    the defense's parameters)."""

    #: starts from the cached backdoored model (post-training repair); ``ctx.backdoored_model()``
    backdoored_model: bool = False
    #: the clean reserve, ``ctx.clean_reserve`` (breaks the no-clean-data threat model; the report says so)
    clean_data: bool = False
    #: running the defense trains (the planner counts trainings with it)
    training: bool = True


@dataclass
class DefenseContext:
    train: ImageSet
    num_classes: int
    make_model: Callable[[], nn.Module]
    trainer: Trainer
    seed: int = 0
    clean_reserve: ImageSet | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("bench.defense"))
    _backdoored: Callable[[], nn.Module] | None = None
    _observations: Observations | None = None
    #: where this cell's in-training checkpoints go (None: a context outside the harness keeps none)
    _checkpoints: Checkpoint | None = None

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    def rng(self, name: str) -> torch.Generator:
        """A new CPU generator for the random stream ``name`` of this cell (``"isolation"``,
        ``"masks"``, ...).  The same name gives the same stream on every call; different names are
        independent, and adding a stream never shifts another."""
        return stream(self.seed, name)

    def seed_for(self, name: str) -> int:
        """The integer seed of the stream ``name``, for APIs that take a seed (``trainer.fit(seed=...)``)."""
        return stream_seed(self.seed, name)

    def backdoored_model(self) -> nn.Module:
        """A fresh copy of the model trained undefended on the poisoned set (cached), prepared for
        the trainer (on its device, in its memory format), like :attr:`make_model`'s models."""
        if self._backdoored is None:
            raise RuntimeError("this defense did not declare Needs(backdoored_model=True) in needs()")
        return self.trainer.prepare(self._backdoored())

    def checkpoint(self, phase: str) -> Checkpoint | None:
        """A :class:`~bench.core.trainer.Checkpoint` for one long ``trainer.fit`` of this defense (pass it as
        ``checkpoint=``): a killed run resumes that phase where it was.  The phases before it run
        again on the rerun; they are deterministic, so the resumed phase continues from the same
        state.  ``None`` outside the harness."""
        if self._checkpoints is None:
            return None
        base = self._checkpoints
        return Checkpoint(base.path.with_name(f"{base.path.stem}-{phase}.pt"), every_s=base.every_s, tag=base.tag,
                          clock=base.clock)

    def observe(self, tag: str, model: nn.Module) -> None:
        """Record ACC/ASR of an intermediate model (evaluated by the harness, not returned)."""
        if self._observations is not None:
            self._observations.model(tag, model)

    def observe_flags(self, tag: str, indices: torch.Tensor) -> None:
        """Record detection metrics of an intermediate flagged set (evaluated by the harness)."""
        if self._observations is not None:
            self._observations.flags(tag, indices)

    def observe_scores(self, tag: str, indices: torch.Tensor, scores: torch.Tensor) -> None:
        """Record how well a per-sample score separates poison (low) from clean (high) samples."""
        if self._observations is not None:
            self._observations.scores(tag, indices, scores)

    def observations_state(self) -> list | None:
        """What was observed so far, for a defense's own checkpoint of a phase that observes (restore
        it with :meth:`restore_observations` when that phase resumes)."""
        return None if self._observations is None else self._observations.state()

    def restore_observations(self, state: list | None) -> None:
        if self._observations is not None and state is not None:
            self._observations.restore(state, self.make_model)


@dataclass
class Defense(Registered):
    """Base class of all defenses."""

    key: ClassVar[str] = ""
    kind: ClassVar[str] = "defense"
    #: bump when the defense's output changes, so cached results are recomputed (a test checks it
    #: against ``bench/versions.json``; see the README)
    version: ClassVar[int] = 1
    #: the name shown in reports (defaults to the key)
    display_name: ClassVar[str] = ""
    # --- roles in the report (declared here, so that the report names no component) ---------------
    #: True for the undefended baseline, whose model is the backdoored model itself: every defense
    #: is compared with it, and its ASR says whether an attack implanted
    is_baseline: ClassVar[bool] = False
    #: True for the method the benchmark studies: the report compares every other defense with it too
    is_reference_method: ClassVar[bool] = False
    #: further models the defense returns (``Outcome.extra_models``) that the report shows beside the
    #: defended one: name -> (table caption, note)
    extra_model_tables: ClassVar[dict[str, tuple[str, str]]] = {}

    def needs(self) -> Needs:
        """What this defense needs from the harness, given its parameters (default: a fresh model
        and the poisoned set, trained from scratch)."""
        return Needs()

    def run(self, ctx: DefenseContext) -> Outcome:
        raise NotImplementedError


@dataclass
class Detection:
    """What the detection step of a :class:`DetectThenRepair` defense hands to its repair step."""

    #: indices of ``ctx.train`` flagged as poisoned (scored as TPR/FPR against the ground truth)
    flagged: torch.Tensor
    #: the model the detection trained or used, when the repair continues from it
    model: nn.Module | None = None
    #: anything else the repair needs (tensors allowed; not stored)
    state: dict = field(default_factory=dict)
    #: JSON-able diagnostics, stored with the result
    info: dict = field(default_factory=dict)


@dataclass
class DetectThenRepair(Defense):
    """A defense that flags suspicious training samples, then repairs a model with the flags
    (unlearns them, retrains without them, ...).

    Subclasses implement :meth:`detect` and :meth:`repair_model`; ``run`` joins them and returns the
    flagged indices with the model, so every such defense reports TPR/FPR the same way.  NONE
    alternates the two steps for several rounds and is a plain :class:`Defense`."""

    def detect(self, ctx: DefenseContext) -> Detection:
        raise NotImplementedError

    def repair_model(self, ctx: DefenseContext, detection: Detection) -> nn.Module:
        raise NotImplementedError

    def run(self, ctx: DefenseContext) -> Outcome:
        detection = self.detect(ctx)
        detection.flagged = torch.as_tensor(detection.flagged, dtype=torch.long)
        model = self.repair_model(ctx, detection)
        return Outcome(model, flagged=detection.flagged, info=detection.info)
