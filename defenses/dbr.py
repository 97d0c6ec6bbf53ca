"""D-BR (Chen, Wu, Wang, "Effective Backdoor Defense by Exploiting Sensitivity of Poisoned
Samples", NeurIPS 2022).

Post-training repair of the backdoored model that uses the poisoned training set, no clean data.
Defaults follow the authors' code, SCLBD/Effective_backdoor_defense (utils/args.py,
train_attack_noTrans.py, finetune_attack_noTrans.py, calculate_gamma.py, separate_samples.py,
unlearn_relearn.py; BackdoorBench's d-br, config/defense/d-br/config.yaml, uses the same values):

1. SD model: a fresh network trained ``sd_epochs`` (2) on D **without augmentation**, SGD lr
   ``sd_lr`` (0.01), plain momentum 0.9, weight decay 5e-4, with cosine annealing of period
   ``sd_cosine_epochs`` (100) **stepped once per epoch**, so the lr stays about 0.01 throughout;
2. intra-class fine-tuning for ``intra_epochs`` (10), no augmentation, **continuing the SD
   optimizer and its per-epoch cosine schedule** (epochs 2-11 of the 100-epoch period): per
   batch, the class centres of the penultimate features are L2-normalised and the mean of their
   cosine-similarity matrix (diagonal zeroed) is minimised;
3. FCT: ``delta(x) = mean_d (g(x) - g(tau(x)))^2`` with ``g`` the SD model's penultimate
   features (eval mode) and ``tau`` one random rotation (``rotate_degrees``) followed by a random
   translation (``translate``, fraction of the side), drawn once per sample and applied batched
   with ``affine_grid``/``grid_sample`` (nearest, zero fill: torchvision's defaults);
4. thresholds as in the authors' code: with ``s`` the ascending ``delta``,
   ``gamma_c = s[floor(clean_ratio * N)]`` and ``gamma_p = s[N - floor(poison_ratio * N)]``;
   ``delta <= gamma_c`` is clean, otherwise ``delta >= gamma_p`` is poison (``flagged``);
5. from the backdoored model, per epoch one ascent pass over the poison set and one descent pass
   over the clean set, ``repair_epochs`` (20) at ``repair_lr`` (1e-4) with one SGD optimizer
   (plain momentum 0.9, weight decay 5e-4), crop + flip on both sets; the **last** epoch is
   returned.

Deviations: the authors' script keeps the repair epoch with the best test ACC - ASR (an oracle
on test data, which we never use); tau is one resampling of the composed rotation + translation
instead of two successive nearest-neighbour resamplings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.core.defense import DefenseContext, Detection, DetectThenRepair, Needs
from bench.core.registry import register_defense

from ._common import unlearn_relearn


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
class DBR(DetectThenRepair):
    """D-BR: FCT on a no-augmentation model splits D; unlearn the poison part, relearn the clean part."""

    #: fraction of D taken as clean, alpha_c (utils/args.py clean_ratio 0.20)
    clean_ratio: float = 0.20
    #: fraction of D taken as poisoned, alpha_p (utils/args.py poison_ratio 0.05)
    poison_ratio: float = 0.05
    #: epochs of the no-augmentation SD model (the authors' README: train_attack_noTrans.py for
    #: 2 epochs; BackdoorBench d-br config.yaml epochs 2)
    sd_epochs: int = 2
    #: initial lr of the SD model, carried into the intra-class fine-tuning (utils/args.py lr 0.01)
    sd_lr: float = 0.01
    #: period in epochs of the cosine annealing stepped per epoch (train_attack_noTrans.py
    #: CosineAnnealingLR T_max=100, scheduler.step() once per epoch)
    sd_cosine_epochs: int = 100
    #: SGD momentum of the SD model and of the repair, without Nesterov (train_attack_noTrans.py,
    #: unlearn_relearn.py: momentum=0.9)
    momentum: float = 0.9
    #: SGD weight decay of the SD model and of the repair (both scripts: weight_decay=5e-4)
    weight_decay: float = 5e-4
    #: epochs of intra-class-loss fine-tuning (the authors' README: finetune_attack_noTrans.py,
    #: 10 epochs)
    intra_epochs: int = 10
    #: the transforms composed into tau, in order: "rotate" and/or "affine" (translation)
    #: (utils/args.py trans1 rotate, trans2 affine)
    transforms: tuple[str, ...] = ("rotate", "affine")
    #: RandomRotation range in degrees (utils/dataloader_bd.py RandomRotation(180))
    rotate_degrees: float = 180.0
    #: RandomAffine translation, fraction of the image side (RandomAffine translate=(0.2, 0.2))
    translate: float = 0.2
    #: independent tau draws averaged into delta (1 = the authors' code)
    fct_draws: int = 1
    #: unlearn/relearn epochs from the backdoored model (the authors' README: unlearn_relearn.py,
    #: 20 epochs)
    repair_epochs: int = 20
    #: repair learning rate, constant (unlearn_relearn.py learning_rate_unlearning: 1e-4)
    repair_lr: float = 1e-4
    #: crop + flip on both repair sets (unlearn_relearn.py, CIFAR-10 transforms)
    repair_augment: bool = True

    version: ClassVar[int] = 3
    display_name = "DBR"
    TRANSFORMS: ClassVar = ("rotate", "affine")

    def __post_init__(self):
        super().__post_init__()
        self.transforms = tuple(self.transforms)
        bad = [t for t in self.transforms if t not in self.TRANSFORMS]
        if bad or not self.transforms:
            raise ValueError(f"transforms: {list(self.transforms)} must be a non-empty subset of {list(self.TRANSFORMS)}")
        if self.clean_ratio + self.poison_ratio > 1:
            raise ValueError("clean_ratio + poison_ratio must be at most 1")

    def needs(self) -> Needs:
        return Needs(backdoored_model=True)

    # --- pieces ----------------------------------------------------------------------------------
    def sd_lr_at(self, epoch: int) -> float:
        """The lr of ``epoch`` (0-based, counted from the SD model's first epoch): cosine annealing
        with period ``sd_cosine_epochs`` evaluated once per epoch."""
        return self.sd_lr * 0.5 * (1 + math.cos(math.pi * epoch / self.sd_cosine_epochs))

    def sd_model(self, ctx: DefenseContext):
        """The no-augmentation model, after intra-class fine-tuning with the same optimizer."""
        trainer = ctx.trainer
        recipe = trainer.recipe.for_tuning().with_(momentum=self.momentum, weight_decay=self.weight_decay, nesterov=False)
        model = trainer.prepare(ctx.make_model())
        opt = trainer.optimizer(model, recipe, lr=self.sd_lr)
        model = trainer.fit(model, ctx.train, augment=False, epochs=self.sd_epochs, recipe=recipe,
                            optimizer=opt, lr_at_epoch=self.sd_lr_at, seed=ctx.seed_for("sd"))

        def loss(m, x, y, idx):
            return intra_class_loss(m.features(x).float(), y, ctx.num_classes)

        return trainer.fit(model, ctx.train, augment=False, loss_fn=loss, epochs=self.intra_epochs,
                           recipe=recipe, optimizer=opt, seed=ctx.seed_for("intra"),
                           lr_at_epoch=lambda e: self.sd_lr_at(self.sd_epochs + e))

    def tau(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One random draw of the FCT transformation per image."""
        return random_affine(x, gen, self.rotate_degrees, self.translate,
                             rotate="rotate" in self.transforms, shift="affine" in self.transforms)

    @torch.no_grad()
    def fct(self, ctx: DefenseContext, model, transform=None) -> torch.Tensor:
        """Feature consistency towards transformations, one value per training sample.

        ``transform(x, generator)`` maps a float batch to its transformed batch; default: tau."""
        trainer = ctx.trainer
        gen = ctx.rng("fct")

        def fct(x):
            g = model.features(x)
            acc = torch.zeros(len(x), dtype=torch.float64, device=x.device)
            for _ in range(self.fct_draws):
                xt = self.tau(x, gen) if transform is None else transform(x, gen)
                if trainer.channels_last:
                    xt = xt.contiguous(memory_format=torch.channels_last)
                acc += ((g.float() - model.features(xt).float()) ** 2).flatten(1).mean(1).double()
            return acc / self.fct_draws

        return trainer.map(fct, ctx.train.x, model=model, passes=1 + self.fct_draws)

    def split(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean, poison) indices by the authors' thresholds (see the module docstring)."""
        n = len(delta)
        s = delta.sort().values
        n_c, n_p = int(self.clean_ratio * n), int(self.poison_ratio * n)
        clean = delta <= s[n_c] if n_c < n else torch.ones(n, dtype=torch.bool)
        poison = ~clean & (delta >= s[n - n_p]) if n_p > 0 else torch.zeros(n, dtype=torch.bool)
        return clean.nonzero().squeeze(1), poison.nonzero().squeeze(1)

    # --- the defense -----------------------------------------------------------------------------
    def detect(self, ctx: DefenseContext) -> Detection:
        """Train the SD model, score every sample by FCT, split into clean and poison sets."""
        sd = self.sd_model(ctx)
        delta = self.fct(ctx, sd)
        clean, poison = self.split(delta)
        info = {"n_clean": len(clean), "n_poison": len(poison),
                "gamma_c": float(delta[clean].max()) if len(clean) else None,
                "gamma_p": float(delta[poison].min()) if len(poison) else None}
        return Detection(poison, state={"clean": clean}, info=info)

    def repair_model(self, ctx: DefenseContext, detection: Detection):
        """Unlearn the poison set and relearn the clean set, from the backdoored model."""
        recipe = ctx.trainer.recipe.for_tuning().with_(momentum=self.momentum, weight_decay=self.weight_decay, nesterov=False)
        return unlearn_relearn(ctx, ctx.backdoored_model(), ctx.train, detection.flagged, detection.state["clean"],
                               epochs=self.repair_epochs, lr=self.repair_lr, augment=self.repair_augment,
                               seed=ctx.seed_for("repair"), tag="repair", recipe=recipe)
