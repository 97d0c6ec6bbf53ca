"""ABL: Anti-Backdoor Learning (Li et al., "Anti-Backdoor Learning: Training Clean Models on
Poisoned Data", NeurIPS 2021).

Training-time, no clean data, trains from scratch (``ctx.make_model()``):

1. isolation: ``isolation_epochs`` of training on D **without augmentation** at a constant
   ``isolation_lr`` with the LGA loss ``sign(l - gamma) * l`` (gradient ascent once the loss
   falls below ``gamma``).  Poisoned samples are learned first; LGA holds the clean samples' loss
   near ``gamma`` while the poison's keeps falling;
2. isolate: the ``floor(isolation_ratio * N)`` samples with the lowest CE (eval mode, no
   augmentation) are the suspected poison ``D_b``; ``flagged`` = these indices;
3. re-train the same model on ``D \\ D_b`` (crop + flip) for ``retrain_epochs`` at
   ``retrain_lr``, multiplied by ``retrain_lr_drop`` after ``retrain_milestone`` of them;
4. unlearn: gradient ascent on ``D_b`` (no augmentation, BN in train mode) for
   ``unlearn_epochs`` at a constant ``unlearn_lr``, **continuing the re-training optimizer**
   (its momentum buffers), as both reference codes do.

Defaults (``preset="authors"``) follow the authors' code, bboylyg/ABL (config.py,
backdoor_isolation.py, backdoor_unlearning.py), because it is the method's own implementation:
10 isolation epochs at lr 0.1, weight decay 1e-4, Nesterov momentum 0.9; 60 re-training epochs at
lr 0.1 dropping to 0.01 at epoch 40; 5 configured unlearning epochs at lr 5e-4 of which the first
only evaluates, i.e. 4 ascent passes.  ``preset="backdoorbench"`` switches to BackdoorBench's
schedule (SCLBD/BackdoorBench, defense/abl.py and config/defense/abl/config.yaml): 20 isolation
epochs (also the paper's turning epoch T_te = 20 and backdoor-toolbox's value) at lr 0.01,
re-training at lr 0.01 (0.001 from epoch 40), 20 unlearning epochs at lr 1e-4.  A preset only
replaces fields still at the authors' default; any other explicit value wins.

LGA: ``lga="batch"`` applies the sign to the batch-mean loss (the authors' code, LGA branch);
``lga="sample"`` per example (the paper's formula); ``lga="flooding"`` is ``|l - gamma| + gamma``
on the batch mean, the authors' config default, whose gradient equals ``"batch"``'s.

Every phase runs with the matrix recipe's defense-phase settings (``recipe.for_tuning()``: batch
128, momentum 0.9 by default) and ABL's weight decay.  ``retrain_schedule="recipe"`` re-trains as
the matrix recipe trains a model instead of ABL's 60 epochs (see the field), for a recipe much
shorter than the references' 100 epochs.

Deviations: the batches of the isolation phase are shuffled (the authors' isolation loader is
not); re-training uses crop + flip without the authors' 3-pixel Cutout; re-training uses the
dropped lr from the same fraction (``retrain_milestone``) of a shortened schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from bench.core.defense import DefenseContext, Detection, DetectThenRepair
from bench.core.params import Range
from bench.core.registry import register_defense


@register_defense("abl")
@dataclass
class ABL(DetectThenRepair):
    """Anti-Backdoor Learning: LGA isolation of low-loss samples, re-training, unlearning."""

    #: "authors" (bboylyg/ABL config.py) or "backdoorbench" (SCLBD/BackdoorBench abl config.yaml);
    #: a preset replaces only the fields still at the authors' default (see the module docstring)
    preset: Literal["authors", "backdoorbench"] = "authors"
    #: fraction of the training set isolated (paper p = 0.01; bboylyg/ABL config.py isolation_ratio)
    isolation_ratio: float = field(default=0.01, metadata={"range": Range(0, 1, low_open=True, high_open=True)})
    #: LGA loss floor gamma (paper Sec. 4, 0.5; bboylyg/ABL config.py gamma and flooding)
    gamma: float = 0.5
    #: "batch" (bboylyg/ABL backdoor_isolation.py LGA branch), "sample" (paper Eq. 3) or "flooding"
    #: (bboylyg/ABL config.py default gradient_ascent_type)
    lga: Literal["batch", "sample", "flooding"] = "batch"
    #: isolation epochs (bboylyg/ABL config.py tuning_epochs 10; BackdoorBench and the paper: 20)
    isolation_epochs: int = field(default=10, metadata={"range": Range(1)})
    #: constant lr of the isolation phase (bboylyg/ABL config.py lr 0.1; BackdoorBench: 0.01)
    isolation_lr: float = 0.1
    #: augmentation while isolating: none in bboylyg/ABL (data_loader.py get_backdoor_loader,
    #: ToTensor only), BackdoorBench (defense/abl.py, train=False) and backdoor-toolbox
    isolation_augment: bool = False
    #: SGD weight decay of every phase (bboylyg/ABL config.py and BackdoorBench abl config: 1e-4)
    weight_decay: float = 1e-4
    #: re-training epochs on the non-isolated samples (bboylyg/ABL config.py finetuning_epochs
    #: 60, BackdoorBench 60); 0 skips re-training
    retrain_epochs: int = 60
    #: initial re-training lr (bboylyg/ABL config.py lr_finetuning_init 0.1; BackdoorBench: 0.01)
    retrain_lr: float = 0.1
    #: fraction of the re-training epochs after which its lr is multiplied by 0.1 (both codes:
    #: epoch 40 of 60, learning_rate_finetuning)
    retrain_milestone: float = 40 / 60
    #: factor applied to the re-training lr at the milestone (both codes: 0.1 -> 0.01, 0.01 -> 0.001)
    retrain_lr_drop: float = 0.1
    #: augmentation while re-training (bboylyg/ABL backdoor_unlearning.py: crop + flip (+ Cutout))
    retrain_augment: bool = True
    #: "abl": re-train at ABL's own schedule (the four ``retrain_*`` fields above, with the matrix
    #: recipe's defense-phase settings); "recipe": re-train as the matrix recipe trains a model
    #: (its epochs, lr, schedule and optimizer), for a regime whose full training is not the
    #: references' 100-epoch schedule (e.g. the fast preset's 10 epochs, where 60 epochs at lr 0.1
    #: would be a six-fold longer training than the model's own).  Unlearning then continues that
    #: optimizer with one lr for all parameters and ABL's weight decay
    retrain_schedule: Literal["abl", "recipe"] = "abl"
    #: unlearning epochs (bboylyg/ABL: 5 configured, the first only evaluates -> 4 ascent passes;
    #: BackdoorBench: 20)
    unlearn_epochs: int = 4
    #: constant unlearning lr (bboylyg/ABL config.py lr_unlearning_init 5e-4; BackdoorBench: 1e-4)
    unlearn_lr: float = 5e-4
    #: augmentation while unlearning: none in both codes (ToTensor only)
    unlearn_augment: bool = False

    PRESETS: ClassVar = {
        "authors": {},
        "backdoorbench": {"isolation_epochs": 20, "isolation_lr": 0.01, "retrain_lr": 0.01,
                          "unlearn_epochs": 20, "unlearn_lr": 1e-4},
    }
    version: ClassVar[int] = 3
    display_name = "ABL"
    LATER_FIELDS: ClassVar = {"retrain_schedule": "abl"}

    def __post_init__(self):
        super().__post_init__()
        defaults = {f.name: f.default for f in fields(self)}
        for key, value in self.PRESETS[self.preset].items():
            if getattr(self, key) == defaults[key]:
                setattr(self, key, value)

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
        """Indices of the lowest-loss ``floor(ratio * N)`` samples (the authors' isolate_data; at
        least one), and all losses."""
        losses = ctx.trainer.per_sample_loss(model, ctx.train)
        n = max(1, int(self.isolation_ratio * len(losses)))
        return losses.argsort()[:n].sort().values, losses

    def recipe(self, ctx: DefenseContext):
        """The settings of ABL's phases: the matrix recipe's defense-phase settings, ABL's weight decay."""
        return ctx.trainer.recipe.for_tuning().with_(weight_decay=self.weight_decay)

    def isolation_model(self, ctx: DefenseContext, on_epoch=None):
        model = ctx.make_model()
        return ctx.trainer.fit(model, ctx.train, loss_fn=self.lga_loss, epochs=self.isolation_epochs,
                               lr=self.isolation_lr, schedule="constant", augment=self.isolation_augment,
                               recipe=self.recipe(ctx), seed=ctx.seed_for("isolation"), on_epoch=on_epoch)

    # --- the defense -----------------------------------------------------------------------------
    def detect(self, ctx: DefenseContext) -> Detection:
        """Train the isolation model with the LGA loss and isolate its lowest-loss samples."""
        model = self.isolation_model(ctx)
        ctx.observe("isolation", model)
        isolated, losses = self.isolate(ctx, model)
        ctx.log.info("ABL isolated %d samples (loss max %.4f)", len(isolated), float(losses[isolated].max()))
        info = {"n_isolated": len(isolated), "isolated_loss_max": float(losses[isolated].max()),
                "loss_median": float(losses.median())}
        return Detection(isolated, model, info=info)

    def repair_model(self, ctx: DefenseContext, detection: Detection):
        """Retrain the isolation model on the rest, then unlearn the isolated samples with the same
        optimizer (its momentum carried over, as the authors' code does)."""
        trainer, data, isolated = ctx.trainer, ctx.train, detection.flagged
        keep = torch.ones(len(data), dtype=torch.bool)
        keep[isolated] = False
        recipe = self.recipe(ctx).with_(milestones=(self.retrain_milestone,), gamma=self.retrain_lr_drop)
        model = trainer.prepare(detection.model)
        if self.retrain_schedule == "recipe":
            opt = trainer.optimizer(model)  # the matrix recipe's, carried into unlearning
            model = trainer.fit(model, data, indices=keep.nonzero().squeeze(1), augment=self.retrain_augment,
                                optimizer=opt, seed=ctx.seed_for("retrain"), checkpoint=ctx.checkpoint("retrain"))
            for g in opt.param_groups:  # unlearning: one lr for all parameters, ABL's weight decay
                g["lr_scale"], g["weight_decay"] = 1.0, self.weight_decay
            ctx.observe("retrain", model)
        else:
            opt = trainer.optimizer(model, recipe, lr=self.retrain_lr)  # carried into unlearning
        if self.retrain_schedule == "abl" and self.retrain_epochs > 0:
            model = trainer.fit(model, data, indices=keep.nonzero().squeeze(1), epochs=self.retrain_epochs,
                                lr=self.retrain_lr, schedule="step", augment=self.retrain_augment,
                                recipe=recipe, optimizer=opt, seed=ctx.seed_for("retrain"),
                                checkpoint=ctx.checkpoint("retrain"))
            ctx.observe("retrain", model)
        weights = torch.full((len(data),), -1.0)
        return trainer.fit(model, data, indices=isolated, weights=weights, augment=self.unlearn_augment,
                           epochs=self.unlearn_epochs, lr=self.unlearn_lr, schedule="constant",
                           recipe=recipe, optimizer=opt, seed=ctx.seed_for("unlearn"),
                           on_epoch=lambda e, m: ctx.observe(f"unlearn{e + 1}", m))
