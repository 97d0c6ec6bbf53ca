"""WaNet (Nguyen, Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021): a fixed
smooth warp as the trigger, dirty label, with noise-warped cover samples.

A random k x k control grid, upsampled to a smooth flow field of strength ``s``, warps poisoned
images (label set to the target); cover samples ("noise mode") get the same warp plus a small
random jitter and keep their labels, so that the network learns the exact warp rather than any
warp.  Follows backdoor-toolbox's static ``WaNet`` poisoner, which AdvrBD uses (the original
attack re-poisons every batch during training).

Deviation: each cover sample gets its own jitter field by default (closer to the original's fresh
jitter per batch); ``shared_jitter: true`` reuses one field for all covers, as backdoor-toolbox
does.  The warp comes from ``trigger_seed``, so training and test use the same field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

from bench.core.attack import Attack, to_float, to_uint8
from bench.core.params import Range
from bench.core.registry import register_attack


@lru_cache(maxsize=32)
def _warp_field(height: int, width: int, k: int, s: float, grid_rescale: float, seed: int) -> torch.Tensor:
    """The backdoor warp grid (1 x H x W x 2, grid_sample convention, x first), from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    ins = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    rows, cols = torch.linspace(-1, 1, height), torch.linspace(-1, 1, width)
    xg, yg = torch.meshgrid(rows, cols, indexing="ij")
    identity = torch.stack((yg, xg), -1)[None]  # channel 0: column (x), channel 1: row (y)
    return ((identity + s * noise / height) * grid_rescale).clamp(-1, 1)


@register_attack("wanet")
@dataclass
class WaNet(Attack):
    """Fixed smooth warp (k x k control grid, strength s), any class -> target; noise-warped covers.

    Static poisoning as in backdoor-toolbox/AdvrBD.  Cover ("noise mode") samples are warped with
    the backdoor warp plus a uniform per-pixel jitter of up to about half a pixel and keep their
    labels.  By default each cover sample gets its own jitter field (our choice; closer to the
    original's fresh jitter); ``shared_jitter`` reuses one field for all, as backdoor-toolbox does.
    The warp is drawn from ``trigger_seed``, so training and test use the same field.
    """

    #: control-grid size of the warp
    k: int = field(default=4, metadata={"range": Range(2)})
    #: warp strength
    s: float = 0.5
    #: scale of the warped grid (1 = no rescaling)
    grid_rescale: float = 1.0
    #: fraction of the training set that gets the noise warp and keeps its label (AdvrBD: 0.05)
    cover_ratio: float = 0.05
    #: one jitter field shared by all cover samples (backdoor-toolbox) instead of one per sample
    shared_jitter: bool = False
    #: seed of the warp field
    trigger_seed: int = 0

    display_name = "WaNet"

    def __post_init__(self):
        super().__post_init__()
        if self.poison_ratio + self.cover_ratio > 1.0:
            raise ValueError("poison_ratio + cover_ratio must not exceed 1")

    def warp(self, height: int, width: int) -> torch.Tensor:
        return _warp_field(height, width, self.k, float(self.s), float(self.grid_rescale), self.trigger_seed).clone()

    @staticmethod
    def _sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        xf = to_float(x)
        grid = grid.expand(xf.shape[0], -1, -1, -1).to(xf.device)
        return to_uint8(F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros", align_corners=True))

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self._sample(x, self.warp(*x.shape[-2:]))

    def jitter_grid(self, n: int, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
        """Backdoor warp plus uniform jitter U(-1, 1) / H: n x H x W x 2 (one field if shared)."""
        m = 1 if self.shared_jitter else n
        jitter = (torch.rand(m, height, width, 2, generator=gen) * 2 - 1) / height
        return (self.warp(height, width) + jitter).clamp(-1, 1)

    def cover_images(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self._sample(x, self.jitter_grid(x.shape[0], *x.shape[-2:], gen))
