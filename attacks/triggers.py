"""Procedural triggers and the masked blend every patch/blend attack uses.

All triggers are made by this project (no third-party artwork), deterministically, natively at
the resolution they are applied to.
"""
from __future__ import annotations

import torch

from bench.core.attack import to_float, to_uint8


def proportional(side_at_32: int, size: int) -> int:
    """A patch side scaled with the image: ``round(side * R / 32)``, at least 1 pixel."""
    return max(1, round(side_at_32 * size / 32))


def masked_blend(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``x + alpha * m * (t - x)`` on uint8 images; ``pattern`` C x H x W in [0,1], ``mask`` H x W
    (or B x H x W for per-sample masks)."""
    xf = to_float(x)
    m = mask.to(xf.dtype)
    m = m[:, None] if m.dim() == 3 else m[None, None]
    return to_uint8(xf + alpha * m * (pattern.to(xf.dtype) - xf))


def corner_square(channels: int, size: int, side: int, value: float = 1.0):
    """A ``side`` x ``side`` square flush in the bottom-right corner: (pattern, mask)."""
    pattern = torch.zeros(channels, size, size)
    mask = torch.zeros(size, size)
    pattern[:, size - side:, size - side:] = value
    mask[size - side:, size - side:] = 1
    return pattern, mask


def corner_checker(channels: int, size: int, side: int):
    """backdoor-toolbox's 3x3 checker (white anti-diagonal plus corner), scaled to ``side``."""
    cell = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.float32)
    block = torch.nn.functional.interpolate(cell[None, None], size=(side, side), mode="nearest")[0, 0]
    pattern = torch.zeros(channels, size, size)
    mask = torch.zeros(size, size)
    pattern[:, size - side:, size - side:] = block
    mask[size - side:, size - side:] = 1
    return pattern, mask
