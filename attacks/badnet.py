"""BadNet (Gu, Dolan-Gavitt, Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning
Model Supply Chain", 2017): a small patch in the corner, dirty label.

``poison_ratio`` of the training set (any class, target included) gets the patch and the target
label; every non-target test image with the patch counts for ASR.  Follows backdoor-toolbox's
``badnet`` poisoner, which AdvrBD uses: static poisoning (the patch is stamped once on the stored
uint8 image, then the ordinary augmentation runs), a white 3x3 square at the bottom-right corner
of a 32-px image.

Deviations: the patch is scaled with the image (``round(3 * side / 32)`` px: 2 at 16 px, 21 at
224) so that one setting means the same on every dataset; ``patch_size`` fixes it in pixels.
``style: checker`` draws a black/white checker instead of the white square (a patch the network
learns faster; used by the toy-scale tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from bench.core.attack import Attack
from bench.core.registry import register_attack

from .triggers import corner_checker, corner_square, masked_blend, proportional


@register_attack("badnet")
@dataclass
class BadNet(Attack):
    """Corner patch (AdvrBD: 3x3 white square, scaled with the image), any class -> target."""

    #: patch side in pixels; None = proportional, round(3 * R / 32) (3 at 32 px, 2 at 16, 21 at 224)
    patch_size: int | None = None
    #: "white" (AdvrBD, BackdoorBox) or "checker" (backdoor-toolbox's 3x3 checker)
    style: Literal["white", "checker"] = "white"


    display_name = "BadNet"

    def trigger(self, channels: int, size: int):
        side = self.patch_size or proportional(3, size)
        if self.style == "checker":
            return corner_checker(channels, size, side)
        return corner_square(channels, size, side)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        pattern, mask = self.trigger(x.shape[1], x.shape[-1])
        return masked_blend(x, pattern, mask)
