"""ABL: Anti-Backdoor Learning (Li et al., NeurIPS 2021), specs/defenses.md §3.

Training-time, no clean data, trains from scratch (``ctx.make_model()``):

1. isolation: ``isolation_epochs`` of training on D with the LGA loss ``sign(l - gamma) * l``
   (gradient ascent once the loss falls below ``gamma``);
2. isolate: the ``ceil(isolation_ratio * N)`` samples with the lowest CE (eval mode, no
   augmentation) are the suspected poison ``D_b``; ``flagged`` = these indices;
3. re-train the same model on ``D \\ D_b`` with the recipe's schedule and augmentation;
4. unlearn: gradient ascent on ``D_b`` (no augmentation) at ``unlearn_lr``.

``lga="batch"`` applies the sign to the batch-mean loss (official code); ``lga="sample"`` applies it
per example (the paper's formula).  ``lga="flooding"`` is the official config's default,
``|l - gamma| + gamma`` on the batch mean.

Epoch fields accept ``None`` (see :mod:`defenses._common`): fractions of the recipe's epochs are
0.2 (isolation), 0.6 (re-train) and 0.2 (unlearning), i.e. the spec's 20/60/20 of a 100-epoch run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from . import register_defense
from ._common import epochs_or_derived
from .base import Defense, DefenseContext, Outcome


@register_defense("abl")
@dataclass
class ABL(Defense):
    """Anti-Backdoor Learning: LGA isolation of low-loss samples, re-training, unlearning."""

    #: fraction of the training set isolated as suspected poison (paper p = 0.01)
    isolation_ratio: float = 0.01
    #: LGA loss floor gamma (paper 0.5); the flooding level for lga="flooding"
    gamma: float = 0.5
    #: "batch" (sign on the batch-mean loss, official code), "sample" (per example, paper) or "flooding"
    lga: str = "batch"
    #: isolation-phase epochs (spec 20); None = 0.2 x recipe epochs
    isolation_epochs: int | None = 20
    #: lr schedule of the isolation phase (official code: constant lr); lr = the recipe's lr
    isolation_schedule: str = "constant"
    #: re-training epochs on the non-isolated samples (spec 60); None = 0.6 x recipe epochs; 0 skips
    retrain_epochs: int | None = 60
    #: unlearning epochs on the isolated samples (spec 20, [BB]); None = 0.2 x recipe epochs
    unlearn_epochs: int | None = 20
    #: unlearning learning rate (constant)
    unlearn_lr: float = 5e-4

    LGA_MODES: ClassVar = ("batch", "sample", "flooding")
    display_name = "ABL"

    def __post_init__(self):
        if self.lga not in self.LGA_MODES:
            raise ValueError(f"lga: '{self.lga}' is not one of {list(self.LGA_MODES)}")
        if not 0.0 < self.isolation_ratio < 1.0:
            raise ValueError(f"isolation_ratio: {self.isolation_ratio} must be in (0, 1)")

    # --- pieces ----------------------------------------------------------------------------------
    def lga_loss(self, model, x, y, idx):
        per = F.cross_entropy(model(x).float(), y, reduction="none")
        if self.lga == "sample":
            return torch.sign(per - self.gamma) * per
        loss = per.mean()
        if self.lga == "flooding":
            return (loss - self.gamma).abs() + self.gamma
        return torch.sign(loss - self.gamma) * loss

    def isolate(self, ctx: DefenseContext, model) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the lowest-loss ``ceil(ratio * N)`` samples, and all losses."""
        losses = ctx.trainer.per_sample_loss(model, ctx.train)
        n = math.ceil(self.isolation_ratio * len(losses))
        return losses.argsort()[:n].sort().values, losses

    def isolation_model(self, ctx: DefenseContext):
        model = ctx.make_model()
        epochs = epochs_or_derived(self.isolation_epochs, ctx, 0.2)
        return ctx.trainer.fit(model, ctx.train, loss_fn=self.lga_loss, epochs=epochs,
                               schedule=self.isolation_schedule, seed=ctx.seed)

    # --- the defense -----------------------------------------------------------------------------
    def run(self, ctx: DefenseContext) -> Outcome:
        trainer, data = ctx.trainer, ctx.train
        model = self.isolation_model(ctx)
        ctx.observe("isolation", model)
        isolated, losses = self.isolate(ctx, model)
        keep = torch.ones(len(data), dtype=torch.bool)
        keep[isolated] = False
        ctx.log.info("ABL isolated %d samples (loss max %.4f)", len(isolated), float(losses[isolated].max()))

        retrain = epochs_or_derived(self.retrain_epochs, ctx, 0.6)
        if retrain > 0:
            model = trainer.fit(model, data, indices=keep.nonzero().squeeze(1), epochs=retrain, seed=ctx.seed + 1)
            ctx.observe("retrain", model)

        weights = torch.full((len(data),), -1.0)
        model = trainer.fit(model, data, indices=isolated, weights=weights, augment=False,
                            epochs=epochs_or_derived(self.unlearn_epochs, ctx, 0.2), lr=self.unlearn_lr,
                            schedule="constant", seed=ctx.seed + 2,
                            on_epoch=lambda e, m: ctx.observe(f"unlearn{e + 1}", m))
        info = {"n_isolated": len(isolated), "isolated_loss_max": float(losses[isolated].max()),
                "loss_median": float(losses.median())}
        return Outcome(model, flagged=isolated, info=info)
