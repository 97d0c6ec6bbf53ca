"""Adaptive-Patch (Qi, Xie, Li, Wang, Mittal, "Revisiting the Assumption of Latent Separability for
Backdoor Defenses", ICLR 2023): several partial patch triggers with cover samples.

k training triggers, each on its own share of the poison (target label) and cover samples (labels
kept); the test trigger combines them.  Follows backdoor-toolbox's ``adaptive_patch`` poisoner,
with AdvrBD's "Firefox*4" setting as the default preset: the four quadrants of a badge as the
training triggers, the whole badge as the test trigger.  ``preset: toolbox_default`` gives
backdoor-toolbox's CIFAR-10 trigger set; ``assignment: round_robin`` assigns samples to triggers
as BackdoorBox does instead of in contiguous blocks.

Deviation: the badge and patches are this project's procedural artwork (the Firefox logo and
the toolbox's pictures are not redistributable).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from bench.core.attack import Attack
from bench.core.registry import register_attack

from .procedural import (
    badge,
    badge_quadrants,
    corner_checker4,
    phoenix_patch,
    trojan_square,
)
from .triggers import masked_blend


@register_attack("adaptive_patch")
@dataclass
class AdaptivePatch(Attack):
    """k training triggers, each on its own share of the poison/cover samples; a combined test trigger.

    Presets:

    * ``firefox4`` (AdvrBD's "Firefox*4", the design default): the four quadrants of the orb badge
      as training triggers at opacity 1 each; the test trigger is all four, i.e. the whole badge.
    * ``toolbox_default`` (backdoor-toolbox CIFAR-10): phoenix corner (0.5), orb badge (0.2),
      four-corner checker (0.5), trojan square (0.3); test = phoenix at both bottom corners, then
      the four-corner checker, at opacity 1.

    Poison samples (any class -> target) and cover samples (labels kept) are assigned to the k
    triggers in contiguous blocks of their sorted indices (backdoor-toolbox), or round-robin
    (BackdoorBox) with ``assignment: round_robin``.
    """

    #: "firefox4" or "toolbox_default"
    preset: Literal["firefox4", "toolbox_default"] = "firefox4"
    #: per-trigger training opacities; None = the preset's
    train_alphas: tuple[float, ...] | None = None
    #: opacity of every test trigger
    test_alpha: float = 1.0
    #: "block" (backdoor-toolbox) or "round_robin" (BackdoorBox)
    assignment: Literal["block", "round_robin"] = "block"
    #: fraction of the training set used as cover samples (backdoor-toolbox: 0.01)
    cover_ratio: float = 0.01
    #: seed of the procedural triggers (badge orientation, phoenix and trojan textures)
    trigger_seed: int = 0
    #: badge diameter as a fraction of the image side (0.41)
    logo_diameter: float = 0.41
    #: badge top margin as a fraction of the image side
    logo_top: float = 0.03
    #: badge right margin as a fraction of the image side
    logo_right: float = 0.04

    PRESET_ALPHAS: ClassVar = {"firefox4": (1.0, 1.0, 1.0, 1.0), "toolbox_default": (0.5, 0.2, 0.5, 0.3)}
    display_name = "AdaptivePatch"

    def __post_init__(self):
        super().__post_init__()
        if not (0 < self.logo_diameter <= 1 and self.logo_top >= 0 and self.logo_right >= 0
                and self.logo_diameter + max(self.logo_top, self.logo_right) <= 1):
            raise ValueError("logo_diameter/logo_top/logo_right: the badge must fit inside the image")
        if self.train_alphas is not None:
            self.train_alphas = tuple(self.train_alphas)
            if len(self.train_alphas) != len(self.PRESET_ALPHAS[self.preset]):
                raise ValueError(f"train_alphas: preset '{self.preset}' has "
                                 f"{len(self.PRESET_ALPHAS[self.preset])} triggers, got {len(self.train_alphas)} values")

    @property
    def logo_geometry(self) -> dict:
        return {"diameter": self.logo_diameter, "top": self.logo_top, "right": self.logo_right}

    @property
    def alphas(self) -> tuple[float, ...]:
        return self.train_alphas if self.train_alphas is not None else self.PRESET_ALPHAS[self.preset]

    def train_triggers(self, channels: int, size: int) -> list:
        if self.preset == "firefox4":
            return badge_quadrants(size, channels, self.trigger_seed, **self.logo_geometry)
        return [phoenix_patch(channels, size, self.trigger_seed),
                badge(size, channels, self.trigger_seed, **self.logo_geometry),
                corner_checker4(channels, size), trojan_square(channels, size, self.trigger_seed)]

    def test_triggers(self, channels: int, size: int) -> list:
        if self.preset == "firefox4":
            return badge_quadrants(size, channels, self.trigger_seed, **self.logo_geometry)
        return [phoenix_patch(channels, size, self.trigger_seed, both_corners=True), corner_checker4(channels, size)]

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        for pattern, mask in self.test_triggers(x.shape[1], x.shape[-1]):
            x = masked_blend(x, pattern, mask, self.test_alpha)
        return x

    def trigger_of(self, n: int) -> torch.Tensor:
        """Which training trigger each of ``n`` samples (in sorted index order) gets."""
        k = len(self.alphas)
        pos = torch.arange(n)
        return pos % k if self.assignment == "round_robin" else pos * k // max(n, 1)

    def poison_images(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        which = self.trigger_of(x.shape[0])
        out = x.clone()
        for j, ((pattern, mask), a) in enumerate(zip(self.train_triggers(x.shape[1], x.shape[-1]), self.alphas)):
            sel = which == j
            if bool(sel.any()):
                out[sel] = masked_blend(x[sel], pattern, mask, a)
        return out

    cover_images = poison_images
