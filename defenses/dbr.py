"""D-BR (Chen, Wu, Wang, NeurIPS 2022), specs/defenses.md §5.

Post-training repair of the backdoored model that uses the poisoned training set, no clean data:

1. SD model: a fresh network trained ``sd_epochs`` on D **without augmentation** (cosine lr);
2. intra-class fine-tuning for ``intra_epochs``: per batch, the class centres of the penultimate
   features are L2-normalised and the mean of their cosine-similarity matrix (diagonal zeroed)
   is minimised;
3. FCT: ``delta(x) = mean_d (g(x) - g(tau(x)))^2`` with ``g`` the SD model's penultimate
   features (eval mode) and ``tau`` one random rotation (``rotate_degrees``) followed by a random
   translation (``translate``, fraction of the side), drawn once per sample and applied batched
   with ``affine_grid``/``grid_sample`` (nearest, zero fill: torchvision's defaults);
4. thresholds: in ascending order of ``delta`` the first ``floor(clean_ratio * N)`` samples are
   the clean set, the last ``floor(poison_ratio * N)`` the poison set (``flagged``);
5. from the backdoored model, per epoch one ascent pass over the poison set and one descent pass
   over the clean set (``repair_lr``, crop + flip); the **last** epoch is returned (the official
   script selects on test ACC - ASR, which we never do).

Epoch fields accept ``None`` (see :mod:`defenses._common`), as fractions of a 100-epoch run:
SD 0.02, intra-class 0.1, repair 0.2 (minimum 1 each).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from . import register_defense
from ._common import epochs_or_derived, unlearn_relearn
from .base import Defense, DefenseContext, Outcome


def random_affine(x: torch.Tensor, gen: torch.Generator, degrees: float, translate: float,
                  rotate: bool = True, shift: bool = True) -> torch.Tensor:
    """Per-sample random rotation in [-degrees, degrees] then translation up to ``translate`` of
    the side, batched; float images in [0, 1], zero fill, nearest sampling."""
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, dtype=torch.float32)
    ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(degrees) if rotate else torch.zeros(b)
    cos, sin = ang.cos(), ang.sin()
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    if shift:  # normalised coordinates span 2 per side
        theta[:, :, 2] = (torch.rand(b, 2, generator=gen) * 2 - 1) * translate * 2
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid.to(x.dtype if x.is_floating_point() else torch.float32),
                         mode="nearest", padding_mode="zeros", align_corners=False)


def intra_class_loss(features: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean of the cosine-similarity matrix of the batch's class centres (diagonal zeroed)."""
    onehot = F.one_hot(y, num_classes).to(features.dtype)            # B x K
    counts = onehot.sum(0)
    present = counts > 0
    centres = (onehot.T @ features)[present] / counts[present, None]  # K' x D
    centres = F.normalize(centres, dim=1)
    sim = centres @ centres.T
    sim = sim - torch.diag(torch.diag(sim))
    return sim.mean()


@register_defense("dbr")
@dataclass
class DBR(Defense):
    """D-BR: FCT on a no-augmentation model splits D; unlearn the poison part, relearn the clean part."""

    #: fraction of D taken as clean (lowest FCT), alpha_c
    clean_ratio: float = 0.20
    #: fraction of D taken as poisoned (highest FCT), alpha_p
    poison_ratio: float = 0.05
    #: epochs of the no-augmentation SD model (spec 2); None = 0.02 x recipe epochs (min 1)
    sd_epochs: int | None = 2
    #: lr of the SD model and of the intra-class fine-tuning (cosine schedule)
    sd_lr: float = 0.01
    #: epochs of intra-class-loss fine-tuning (spec 10); None = 0.1 x recipe epochs
    intra_epochs: int | None = 10
    #: the transforms composed into tau, in order: "rotate" and/or "affine" (translation)
    transforms: tuple[str, ...] = ("rotate", "affine")
    #: RandomRotation range in degrees
    rotate_degrees: float = 180.0
    #: RandomAffine translation, fraction of the image side
    translate: float = 0.2
    #: independent tau draws averaged into delta (1 = the reference code)
    fct_draws: int = 1
    #: unlearn/relearn epochs from the backdoored model (spec 20); None = 0.2 x recipe epochs
    repair_epochs: int | None = 20
    #: repair learning rate (constant)
    repair_lr: float = 1e-4

    needs_backdoored_model = True
    display_name = "DBR"
    TRANSFORMS: ClassVar = ("rotate", "affine")

    def __post_init__(self):
        self.transforms = tuple(self.transforms)
        bad = [t for t in self.transforms if t not in self.TRANSFORMS]
        if bad or not self.transforms:
            raise ValueError(f"transforms: {list(self.transforms)} must be a non-empty subset of {list(self.TRANSFORMS)}")
        if self.clean_ratio + self.poison_ratio > 1:
            raise ValueError("clean_ratio + poison_ratio must be at most 1")

    # --- pieces ----------------------------------------------------------------------------------
    def sd_model(self, ctx: DefenseContext):
        """The no-augmentation model, after intra-class fine-tuning."""
        trainer = ctx.trainer
        model = trainer.fit(ctx.make_model(), ctx.train, augment=False, lr=self.sd_lr, schedule="cosine",
                            epochs=epochs_or_derived(self.sd_epochs, ctx, 0.02), seed=ctx.seed + 11)

        def loss(m, x, y, idx):
            return intra_class_loss(m.features(x).float(), y, ctx.num_classes)

        return trainer.fit(model, ctx.train, augment=False, loss_fn=loss, lr=self.sd_lr, schedule="cosine",
                           epochs=epochs_or_derived(self.intra_epochs, ctx, 0.1), seed=ctx.seed + 12)

    @torch.no_grad()
    def fct(self, ctx: DefenseContext, model) -> torch.Tensor:
        """Feature consistency towards transformations, one value per training sample."""
        trainer = ctx.trainer
        model.eval()
        gen = torch.Generator().manual_seed(ctx.seed + 13)
        x_all = ctx.train.x
        out = torch.zeros(len(x_all), dtype=torch.float64)
        for i in range(0, len(x_all), trainer.eval_batch_size):
            x = trainer.to_float(x_all[i:i + trainer.eval_batch_size])
            with trainer._autocast():
                g = model.features(x).float()
            acc = torch.zeros(len(x), dtype=torch.float64, device=x.device)
            for _ in range(self.fct_draws):
                xt = random_affine(x, gen, self.rotate_degrees, self.translate,
                                   rotate="rotate" in self.transforms, shift="affine" in self.transforms)
                if trainer.channels_last:
                    xt = xt.contiguous(memory_format=torch.channels_last)
                with trainer._autocast():
                    gt = model.features(xt).float()
                acc += ((g - gt) ** 2).mean(1).double()
            out[i:i + len(x)] = (acc / self.fct_draws).cpu()
            trainer.eval_samples += len(x) * (1 + self.fct_draws)
        return out

    def split(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(delta)
        order = delta.argsort()
        n_c, n_p = int(self.clean_ratio * n), int(self.poison_ratio * n)
        return order[:n_c].sort().values, order[n - n_p:].sort().values

    # --- the defense -----------------------------------------------------------------------------
    def run(self, ctx: DefenseContext) -> Outcome:
        sd = self.sd_model(ctx)
        delta = self.fct(ctx, sd)
        clean, poison = self.split(delta)
        del sd
        model = ctx.backdoored_model()
        model = unlearn_relearn(ctx, model, ctx.train, poison, clean,
                                epochs=epochs_or_derived(self.repair_epochs, ctx, 0.2), lr=self.repair_lr,
                                seed=ctx.seed + 14, tag="repair")
        info = {"n_clean": len(clean), "n_poison": len(poison),
                "gamma_c": float(delta[clean].max()) if len(clean) else None,
                "gamma_p": float(delta[poison].min()) if len(poison) else None}
        return Outcome(model, flagged=poison, info=info)
