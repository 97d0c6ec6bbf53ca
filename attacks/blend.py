"""Blend (Chen et al. 2017): a full-frame image blended over the whole input."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register_attack
from .base import Attack
from .procedural import sticker
from .triggers import masked_blend


@register_attack("blend")
@dataclass
class Blend(Attack):
    """Full-frame procedural sticker blended at opacity alpha, any class -> target.

    The trigger image is the project's "abstract sticker" instead of backdoor-toolbox's
    HelloKitty picture, rendered natively at the input size (luminance for 1-channel data).
    """

    #: blend opacity at training time (AdvrBD / backdoor-toolbox / BackdoorBench: 0.2)
    alpha: float = 0.2
    #: blend opacity at test time; None = the training alpha
    alpha_test: float | None = None
    #: base seed of the sticker (the first accepted seed from here on is used)
    trigger_seed: int = 0

    display_name = "Blend"

    def __post_init__(self):
        super().__post_init__()
        for name in ("alpha", "alpha_test"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}: {v} is outside [0, 1]")

    def trigger(self, channels: int, size: int):
        return sticker(size, channels, self.trigger_seed)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        pattern, mask = self.trigger(x.shape[1], x.shape[-1])
        return masked_blend(x, pattern, mask, self.alpha if self.alpha_test is None else self.alpha_test)

    def poison_images(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        pattern, mask = self.trigger(x.shape[1], x.shape[-1])
        return masked_blend(x, pattern, mask, self.alpha)
