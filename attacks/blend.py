"""Blend (Chen, Liu, Li, Lu, Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning", 2017): a full-frame image blended over the whole input, dirty label.

``x' = (1 - alpha) x + alpha t`` with the trigger image ``t`` over the whole frame, at ``alpha``
0.2 (AdvrBD, backdoor-toolbox and BackdoorBench); ``alpha_test`` sets the test opacity
separately.  Follows backdoor-toolbox's ``blend`` poisoner (static poisoning).

Deviation: the trigger image is this project's procedural "abstract sticker" (a flat-shaded
cartoon drawn from ``trigger_seed``, checked to have a HelloKitty-like brightness, contrast and
edge density) instead of the HelloKitty picture, whose licence does not allow redistribution.
It is rendered natively at the input size, in luminance for 1-channel data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.core.attack import Attack
from bench.core.registry import register_attack

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

    def trigger(self, channels: int, size: int):
        return sticker(size, channels, self.trigger_seed)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        pattern, mask = self.trigger(x.shape[1], x.shape[-1])
        return masked_blend(x, pattern, mask, self.alpha if self.alpha_test is None else self.alpha_test)

    def poison_images(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        pattern, mask = self.trigger(x.shape[1], x.shape[-1])
        return masked_blend(x, pattern, mask, self.alpha)
