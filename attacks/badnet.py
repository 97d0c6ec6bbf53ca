"""BadNet (Gu et al. 2017): a small patch in the corner, dirty label."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import register_attack
from .base import Attack
from .triggers import corner_checker, corner_square, masked_blend, proportional


@register_attack("badnet")
@dataclass
class BadNet(Attack):
    """Corner patch (AdvrBD: 3x3 white square, scaled with the image), any class -> target."""

    #: patch side in pixels; None = proportional, round(3 * R / 32) (3 at 32 px, 2 at 16, 21 at 224)
    patch_size: int | None = None
    #: "white" (AdvrBD, BackdoorBox) or "checker" (backdoor-toolbox's 3x3 checker)
    style: str = "white"

    STYLES: ClassVar = ("white", "checker")
    display_name = "BadNet"

    def __post_init__(self):
        super().__post_init__()
        if self.style not in self.STYLES:
            raise ValueError(f"style: '{self.style}' is not one of {list(self.STYLES)}")
        if self.patch_size is not None and self.patch_size < 1:
            raise ValueError(f"patch_size: {self.patch_size} must be >= 1")

    def trigger(self, channels: int, size: int):
        side = self.patch_size or proportional(3, size)
        if self.style == "checker":
            return corner_checker(channels, size, side)
        return corner_square(channels, size, side)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        pattern, mask = self.trigger(x.shape[1], x.shape[-1])
        return masked_blend(x, pattern, mask)
