"""No attack: clean training, the reference for natural backdoors and for the clean accuracy a
defense should keep.  Poisons nothing; no test image counts for ASR (ASR is NaN).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.core.attack import Attack
from bench.core.registry import register_attack


@register_attack("none")
@dataclass
class NoAttack(Attack):
    """Clean training, no poisoning: poisons nothing; no test image counts for ASR (ASR is NaN)."""

    #: must stay 0: this attack poisons nothing
    poison_ratio: float = 0.0

    display_name = "Clean"

    def __post_init__(self):
        super().__post_init__()
        if self.poison_ratio != 0.0:
            raise ValueError(f"poison_ratio: {self.poison_ratio} must be 0 (clean training)")

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def asr_mask(self, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(y, dtype=torch.bool)
