"""Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018), specs/defenses.md §7.

Two presets:

* ``"original"`` (default): the paper's algorithm on the last block (``model.last_block``,
  whose output channels are the head's input channels).  The clean reserve is split 80/20,
  class-balanced.  Channels are ranked by their mean activation (over samples and positions) on
  the 80% part and masked in increasing order (dormant first).  After each step the accuracy on
  the 20% part is measured; pruning stops *before* the absolute drop from the unpruned accuracy
  exceeds ``acc_drop`` (4%), keeping the last mask within tolerance.  Then the masked model is
  fine-tuned on the 80% part (20 epochs, lr 0.01, cosine), masks fixed.  Nothing here looks at the
  test set.
* ``"advrbd"``: what the AdvrBD paper apparently ran ([BBox] ``Pruning``): mask the fraction
  ``0.2`` of the *second layer's* output channels with the lowest mean activation, no accuracy
  stop, no fine-tuning.

"Second layer": for ResNets (and MobileNetV2) ``model.body[0]`` is the stem, so layer2 is
``model.body[2]``, BackdoorBox's ``layer2``.  The small CNN has no stem: its three stages play
the part of a ResNet's residual stages, so its second layer is ``model.body[1]`` (the 64-channel
stage).  The rule used: if ``body[0]`` holds exactly one convolution it is a stem and the second
layer is ``body[2]``, otherwise ``body[1]``.  ``layer`` overrides it with an explicit index.

Masking is a :class:`ChannelMask` module appended to the pruned stage (a buffer, not a
parameter), so it survives fine-tuning, ``deepcopy`` and ``state_dict``, and the model stays a
:class:`~bench.models.Classifier`.  The mask sits on the stage's output, i.e. after BN/ReLU (and
after the residual add), as the spec's pitfall note asks.  The mask adds one buffer to the
state dict (``body.<layer>.<n>.mask``): to reload a pruned checkpoint, call :func:`attach_mask` on
a fresh model first.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.data import ImageSet
from bench.trainer import Recipe, Trainer

from . import register_defense
from .base import Defense, DefenseContext, Outcome
from .finetuning import require_reserve


class ChannelMask(nn.Module):
    """Multiplies channel ``c`` of an ``N x C x H x W`` map by ``mask[c]`` (0 = pruned)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mask", torch.ones(channels))

    def forward(self, x):
        return x * self.mask.to(x.dtype).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"channels={self.mask.numel()}, pruned={int((self.mask == 0).sum())}"


def second_layer_index(model) -> int:
    """Index in ``model.body`` of the "second layer" (see the module docstring)."""
    stem_convs = sum(isinstance(m, nn.Conv2d) for m in model.body[0].modules())
    return 2 if stem_convs == 1 and len(model.body) > 2 else 1


def attach_mask(model, layer: int, channels: int) -> ChannelMask:
    """The :class:`ChannelMask` at the end of ``model.body[layer]`` (appended if absent)."""
    stage = model.body[layer]
    if isinstance(stage, nn.Sequential) and len(stage) and isinstance(stage[-1], ChannelMask):
        return stage[-1]
    mask = ChannelMask(channels).to(next(model.parameters()).device)
    if isinstance(stage, nn.Sequential):
        stage.append(mask)
    else:
        model.body[layer] = nn.Sequential(stage, mask)
    return mask


def class_balanced_split(y: torch.Tensor, holdout_fraction: float, gen: torch.Generator):
    """Indices (main, holdout): ``round(holdout_fraction * n_c)`` of each class ``c`` held out."""
    perm = torch.randperm(len(y), generator=gen)
    ys = y[perm]
    order = torch.argsort(ys, stable=True)          # grouped by class, random within class
    perm, ys = perm[order], ys[order]
    counts = torch.bincount(ys)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(ys)) - starts[ys]        # rank within class
    n_hold = torch.round(counts.float() * holdout_fraction).long()
    hold = rank < n_hold[ys]
    return perm[~hold].sort().values, perm[hold].sort().values


@torch.no_grad()
def stage_outputs(trainer: Trainer, model, x_uint8: torch.Tensor, layer: int) -> torch.Tensor:
    """``model.body[:layer + 1]`` applied to the images, batched, in eval mode, kept on the device."""
    model.eval()
    prefix = model.body[:layer + 1]
    outs = []
    for i in range(0, len(x_uint8), trainer.eval_batch_size):
        xb = trainer.to_float(x_uint8[i:i + trainer.eval_batch_size])
        with trainer._autocast():
            outs.append(prefix(model.normalize(xb)).float())
        trainer.eval_samples += len(xb)
    return torch.cat(outs)


@torch.no_grad()
def tail_logits(trainer: Trainer, model, acts: torch.Tensor, layer: int) -> torch.Tensor:
    """Logits from stage outputs: the remaining stages, global average pooling and the head."""
    outs = []
    for i in range(0, len(acts), trainer.eval_batch_size):
        h = acts[i:i + trainer.eval_batch_size]
        with trainer._autocast():
            for stage in model.body[layer + 1:]:
                h = stage(h)
            outs.append(model.head(F.adaptive_avg_pool2d(h, 1).flatten(1)).float())
    return torch.cat(outs)


@register_defense("fineprune")
@dataclass
class FinePruning(Defense):
    """Prune dormant channels on clean data, then fine-tune (original) or prune layer2 only (advrbd)."""

    #: "original" (last block, accuracy-drop stop, fine-tuning) or "advrbd" (layer2, rate 0.2, no fine-tuning)
    preset: str = "original"
    #: index into model.body of the stage whose output channels are pruned; None = the preset's
    #: (original: the last block; advrbd: the second layer, see the module docstring)
    layer: int | None = None
    #: fixed fraction of channels to prune (no accuracy stop); None = the preset's (original: None, advrbd: 0.2)
    prune_rate: float | None = None
    #: absolute accuracy drop on the held-out part of the reserve at which pruning stops (original: 0.04)
    acc_drop: float = 0.04
    #: class-balanced fraction of the reserve held out for the accuracy check (80/20 split)
    holdout_fraction: float = 0.2
    #: channels masked per pruning step (the original prunes one at a time)
    prune_step: int = 1
    #: fine-tuning epochs on the 80% part with masks fixed; None = the preset's (original: 20, advrbd: 0)
    finetune_epochs: int | None = None
    #: fine-tuning learning rate
    lr: float = 0.01
    #: fine-tuning lr schedule (one of Recipe.SCHEDULES)
    schedule: str = "cosine"
    #: random crop + flip during fine-tuning
    augment: bool = True

    PRESETS: ClassVar = {"original": {"prune_rate": None, "finetune_epochs": 20},
                         "advrbd": {"prune_rate": 0.2, "finetune_epochs": 0}}
    needs_backdoored_model = True
    uses_clean_data = True
    display_name = "FinePruning"

    def __post_init__(self):
        if self.preset not in self.PRESETS:
            raise ValueError(f"preset: '{self.preset}' is not one of {list(self.PRESETS)}")
        if self.prune_rate is not None and not 0 <= self.prune_rate < 1:
            raise ValueError(f"prune_rate: {self.prune_rate} must be in [0, 1)")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction: {self.holdout_fraction} must be in (0, 1)")
        if self.prune_step < 1:
            raise ValueError("prune_step must be >= 1")
        if self.schedule not in Recipe.SCHEDULES:
            raise ValueError(f"schedule: '{self.schedule}' is not one of {list(Recipe.SCHEDULES)}")

    # --- resolved settings ----------------------------------------------------------------------
    def resolved(self, model) -> dict:
        p = self.PRESETS[self.preset]
        if self.layer is not None:
            layer = self.layer
        elif self.preset == "advrbd":
            layer = second_layer_index(model)
        else:
            layer = len(model.body) - 1
        if not -len(model.body) <= layer < len(model.body):
            raise ValueError(f"layer: {layer} is outside model.body (0..{len(model.body) - 1})")
        return {"layer": layer % len(model.body),
                "prune_rate": self.prune_rate if self.prune_rate is not None else p["prune_rate"],
                "finetune_epochs": self.finetune_epochs if self.finetune_epochs is not None else p["finetune_epochs"]}

    # --- the pruning step -----------------------------------------------------------------------
    def prune(self, trainer: Trainer, model, act_set: ImageSet, holdout: ImageSet, layer: int,
              prune_rate: float | None) -> tuple[torch.Tensor, dict]:
        """Mask channels of ``model.body[layer]`` in place; return the pruned channel indices and a log."""
        acts = stage_outputs(trainer, model, act_set.x, layer)
        mean_act = acts.mean(dim=(0, 2, 3))
        del acts
        channels = mean_act.numel()
        order = torch.argsort(mean_act.cpu(), stable=True)  # dormant first
        info = {"layer": layer, "channels": channels}
        if prune_rate is not None:
            n = int(math.floor(prune_rate * channels))
        else:
            if len(holdout) == 0:
                raise ValueError("FinePruning: the held-out part of the reserve is empty; enlarge the reserve")
            h = stage_outputs(trainer, model, holdout.x, layer)
            y = holdout.y.to(h.device)
            base = (tail_logits(trainer, model, h, layer).argmax(1) == y).float().mean().item()
            keep = torch.ones(channels, device=h.device)
            n, curve = 0, []
            for k in range(self.prune_step, channels, self.prune_step):
                keep[order[:k].to(h.device)] = 0
                acc = (tail_logits(trainer, model, h * keep.view(1, -1, 1, 1), layer).argmax(1) == y
                       ).float().mean().item()
                curve.append(acc)
                if base - acc > self.acc_drop:
                    break
                n = k
            info.update({"holdout_acc_unpruned": base, "holdout_acc_curve": curve,
                         "holdout_acc_pruned": curve[n // self.prune_step - 1] if n else base})
        pruned = order[:n]
        mask = attach_mask(model, layer, channels)
        mask.mask.fill_(1)
        mask.mask[pruned.to(mask.mask.device)] = 0
        info.update({"pruned": n, "pruned_fraction": n / channels})
        return pruned, info

    def run(self, ctx: DefenseContext) -> Outcome:
        reserve = require_reserve(ctx, "FinePruning")
        model = ctx.backdoored_model()
        cfg = self.resolved(model)
        main_idx, hold_idx = class_balanced_split(reserve.y, self.holdout_fraction, ctx.generator)
        act_set, holdout = reserve.subset(main_idx), reserve.subset(hold_idx)
        pruned, info = self.prune(ctx.trainer, model, act_set, holdout, cfg["layer"], cfg["prune_rate"])
        ctx.log.info("FinePruning: masked %d of %d channels of body[%d]", len(pruned), info["channels"], cfg["layer"])
        extra = {}
        if cfg["finetune_epochs"] > 0:
            ctx.observe("pruned", model)
            extra["pruned_only"] = copy.deepcopy(model)
            model = ctx.trainer.fit(model, act_set, epochs=cfg["finetune_epochs"], lr=self.lr,
                                    schedule=self.schedule, augment=self.augment, seed=ctx.seed)
        info.update({"preset": self.preset, "finetune_epochs": cfg["finetune_epochs"],
                     "pruned_channels": pruned.tolist(), "reserve_size": len(reserve),
                     "holdout_size": len(holdout)})
        return Outcome(model, info=info, extra_models=extra)
