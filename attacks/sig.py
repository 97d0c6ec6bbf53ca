"""SIG (Barni, Kallas, Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without
Label Poisoning", ICIP 2019): a sinusoidal signal on target-class images, clean label.

Vertical stripes ``delta * sin(2 pi j f / W)`` are added to ``min(int(N * poison_ratio),
|target class|)`` images of the target class, whose labels stay; the same signal (added, then
clamped to [0, 1]) on non-target test images is the trigger.  Follows backdoor-toolbox's ``SIG``
poisoner: amplitude 30/255 (BackdoorBench uses 40/255), 6 periods over the width.  No deviation
beyond rendering the signal at the dataset's width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench.core.attack import Attack, to_float, to_uint8
from bench.core.registry import register_attack


@register_attack("sig")
@dataclass
class SIG(Attack):
    """Vertical stripes ``delta * sin(2 pi j f / W)`` added to target-class images, labels kept.

    ``n = min(int(N * poison_ratio), |target class|)`` target-class training images are poisoned;
    the same signal (added in [0,1] space, then clamped) is the test trigger.
    """

    #: amplitude in [0,1] intensity units (backdoor-toolbox: 30/255; BackdoorBench: 40/255)
    delta: float = 30 / 255
    #: number of stripe periods across the width (all toolboxes: 6)
    frequency: float = 6.0

    display_name = "SIG"
    clean_label = True

    def signal(self, width: int) -> torch.Tensor:
        """The 1 x W signal (broadcast over channels and rows)."""
        j = torch.arange(width, dtype=torch.float32)
        return self.delta * torch.sin(2 * math.pi * j * self.frequency / width)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return to_uint8(to_float(x) + self.signal(x.shape[-1]))

    def eligible_poison(self, y: torch.Tensor) -> torch.Tensor:
        return y == self.target

    def eligible_cover(self, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(y, dtype=torch.bool)
