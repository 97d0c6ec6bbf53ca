"""Adaptive-Blend (Qi, Xie, Li, Wang, Mittal, "Revisiting the Assumption of Latent Separability for
Backdoor Defenses", ICLR 2023): a partial blend trigger with cover samples.

The Blend sticker is cut into a grid of ``pieces``; each poison sample (target label) and each
cover sample (label kept) shows a random half of the pieces at opacity ``alpha_train``, and the
test trigger is the whole sticker at ``alpha_test``.  Training on partial triggers with covers
keeps poisoned and clean features from separating, which is what latent-separation defenses
rely on.  Follows backdoor-toolbox's ``adaptive_blend`` poisoner (16 pieces, half masked, 0.2 /
0.2 opacity as AdvrBD sets them; the paper recommends 0.15 for training).

Deviations: the sticker is this project's procedural one (see Blend); the image side must be
divisible by ``sqrt(pieces)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench.core.attack import Attack
from bench.core.registry import register_attack

from .procedural import sticker
from .triggers import masked_blend


@register_attack("adaptive_blend")
@dataclass
class AdaptiveBlend(Attack):
    """The Blend sticker cut into a grid of pieces; each training sample shows a random half.

    Poison (any class -> target) and cover samples (labels kept, non-overlapping) each get an
    independent random piece mask (``round(pieces * mask_rate)`` pieces switched off), blended at
    ``alpha_train``; the test trigger is the full sticker at ``alpha_test``.  The piece masks come
    from the poisoning seed, the sticker from ``trigger_seed``.  Requires H and W divisible by
    ``sqrt(pieces)``.
    """

    #: opacity of the training poison/cover (AdvrBD: 0.2; the paper recommends 0.15)
    alpha_train: float = 0.2
    #: opacity of the full test trigger
    alpha_test: float = 0.2
    #: number of square pieces (a perfect square: 16 = a 4x4 grid)
    pieces: int = 16
    #: fraction of pieces switched off per training sample
    mask_rate: float = 0.5
    #: fraction of the training set used as cover samples (backdoor-toolbox: 0.01)
    cover_ratio: float = 0.01
    #: base seed of the sticker
    trigger_seed: int = 0

    display_name = "AdaptiveBlend"

    def __post_init__(self):
        super().__post_init__()
        g = math.isqrt(self.pieces)
        if self.pieces < 1 or g * g != self.pieces:
            raise ValueError(f"pieces: {self.pieces} must be a perfect square (e.g. 16)")

    @property
    def grid(self) -> int:
        return math.isqrt(self.pieces)

    def trigger(self, channels: int, size: int):
        return sticker(size, channels, self.trigger_seed)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        pattern, mask = self.trigger(x.shape[1], x.shape[-1])
        return masked_blend(x, pattern, mask, self.alpha_test)

    def piece_masks(self, n: int, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
        """n x H x W masks, each with ``round(pieces * mask_rate)`` random pieces switched off."""
        g = self.grid
        if height % g or width % g:
            raise ValueError(f"AdaptiveBlend needs H and W divisible by {g}; got {height}x{width}")
        n_off = round(self.pieces * self.mask_rate)
        rank = torch.rand(n, self.pieces, generator=gen).argsort(1).argsort(1)
        keep = (rank >= n_off).float().view(n, g, g)
        return keep.repeat_interleave(height // g, 1).repeat_interleave(width // g, 2)

    def poison_images(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        pattern, _ = self.trigger(x.shape[1], x.shape[-1])
        return masked_blend(x, pattern, self.piece_masks(x.shape[0], *x.shape[-2:], gen), self.alpha_train)

    cover_images = poison_images
