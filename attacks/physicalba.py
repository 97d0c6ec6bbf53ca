"""PhysicalBA (Li, Zhai, Wu, Jiang, Li, Xia, "Backdoor Attack in the Physical World", ICLR 2021
workshop): a corner logo that survives physical-world transformations.

A logo pasted at the top-right corner (opacity 1, target label), and random flips, brightness
and contrast jitter and affine transformations applied during training so that the backdoor
generalises to transformed triggers.  Follows BackdoorBox's ``PhysicalBA``: the transformations
run on every training sample, clean and poisoned, after the static paste and before the standard
crop/flip, batched on the device (``train_augment``).  The test trigger is the plain paste.

Deviations: the logo is this project's procedural "orb badge" instead of a third-party picture;
brightness is applied before contrast in a fixed order (torchvision's ``ColorJitter`` permutes
them), and the contrast mean is the image's mean luminance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from bench.core.attack import Attack
from bench.core.params import Range
from bench.core.registry import register_attack

from .procedural import badge
from .triggers import masked_blend


@register_attack("physicalba")
@dataclass
class PhysicalBA(Attack):
    """Orb-badge logo pasted top-right (opacity 1), any class -> target; random flip, brightness/
    contrast jitter and affine transforms on every training sample.

    As in BackdoorBox, the physical transformations run on the fly on **every** training sample,
    clean and poisoned (our choice, as BackdoorBox), after the trigger was pasted (static poisoning) and before
    the standard crop/flip.  They are batched on the device (:meth:`train_augment`).  Deviations
    from torchvision's ``ColorJitter``: brightness is applied before contrast in a fixed order (not
    a random permutation), and the contrast mean is the per-image mean over all channels' pixels
    in luminance.  The test trigger is the canonical paste with no transformations.
    """

    #: seed of the badge (0 = the canonical orientation)
    trigger_seed: int = 0
    #: badge diameter as a fraction of the image side (0.41)
    logo_diameter: float = 0.41
    #: badge top margin as a fraction of the image side
    logo_top: float = 0.03
    #: badge right margin as a fraction of the image side
    logo_right: float = 0.04
    #: probability of a horizontal flip
    flip_p: float = 0.5
    #: brightness factor drawn from U(1 - b, 1 + b)
    brightness: float = field(default=0.2, metadata={"range": Range(0, 1)})
    #: contrast factor drawn from U(1 - c, 1 + c)
    contrast: float = field(default=0.2, metadata={"range": Range(0, 1)})
    #: rotation drawn from U(-degrees, degrees)
    degrees: float = 10.0
    #: translation drawn from U(-t, t) times the image side, per axis
    translate: float = 0.1
    #: scale drawn from U(scale_min, scale_max)
    scale_min: float = 0.8
    scale_max: float = 0.9

    display_name = "PhysicalBA"

    def __post_init__(self):
        super().__post_init__()
        if not (0 < self.logo_diameter <= 1 and self.logo_top >= 0 and self.logo_right >= 0
                and self.logo_diameter + max(self.logo_top, self.logo_right) <= 1):
            raise ValueError("logo_diameter/logo_top/logo_right: the badge must fit inside the image")
        if self.scale_min > self.scale_max:
            raise ValueError(f"scale_min/scale_max: need {self.scale_min} <= {self.scale_max}")

    @property
    def logo_geometry(self) -> dict:
        return {"diameter": self.logo_diameter, "top": self.logo_top, "right": self.logo_right}

    def trigger(self, channels: int, size: int):
        return badge(size, channels, self.trigger_seed, **self.logo_geometry)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        pattern, mask = self.trigger(x.shape[1], x.shape[-1])
        return masked_blend(x, pattern, mask)

    def train_augment(self) -> Callable:
        return self.physical_transform

    def physical_transform(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Batched flip, brightness, contrast and random affine on floats in [0,1] (B x C x H x W);
        random numbers from ``gen`` (CPU), the work on ``x``'s device."""
        b, dev = x.shape[0], x.device
        u = torch.rand(b, 7, generator=gen).to(dev)
        flip = u[:, 0] < self.flip_p
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        bright = 1 + self.brightness * (2 * u[:, 1] - 1)
        x = (x * bright[:, None, None, None]).clamp(0, 1)
        contrast = 1 + self.contrast * (2 * u[:, 2] - 1)
        gray = x.mean(1, keepdim=True) if x.shape[1] == 1 else \
            (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        m = gray.mean(dim=(2, 3), keepdim=True)
        x = ((x - m) * contrast[:, None, None, None] + m).clamp(0, 1)
        angle = math.radians(self.degrees) * (2 * u[:, 3] - 1)
        tx, ty = ((2 * self.translate) * (2 * u[:, 4:6] - 1)).unbind(1)  # normalised units (side = 2)
        scale = self.scale_min + (self.scale_max - self.scale_min) * u[:, 6]
        # output p_out = s R p_in + t  =>  sampling grid p_in = R^T (p_out - t) / s
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        a = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # R^T / s
        bvec = -(a @ torch.stack([tx, ty], 1)[:, :, None])
        theta = torch.cat([a, bvec], 2)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
