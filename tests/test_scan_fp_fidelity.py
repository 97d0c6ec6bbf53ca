"""SCAn and Fine-Pruning against their reference implementations, plus SCAn's mechanism on digits.

The expected numbers below were produced once by running the reference code on the same inputs
(outside this repository); each block names the repository, commit and function it came from.
"""
from __future__ import annotations

import math

import pytest
import torch

from defenses.scan import SCAnFT, anomaly_index, numpy_median, scan_detect

torch.set_num_threads(1)


# --- fixed small synthetic features ---------------------------------------------------------------

K, M = 6, 4          # an even class count, so the median is the mean of two middle values
TARGET = 1


def synthetic_features(spread: float):
    """D: 6 classes x 40 samples in 4 dims, unit within-class noise, class means drawn with
    standard deviation ``spread``; class 1 also holds 20 poison samples shifted by 5 along one
    axis.  Clean split: 6 x 12 samples from the clean modes.  Returned as float64
    (D features, D labels, poison mask, clean features, clean labels)."""
    g = torch.Generator().manual_seed(2024)
    means = torch.randn(K, M, generator=g, dtype=torch.float64) * spread
    shift = torch.tensor([5.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    xs, ys = [], []
    for c in range(K):
        xs.append(means[c] + torch.randn(40, M, generator=g, dtype=torch.float64))
        ys.append(torch.full((40,), c))
    xs.append(means[TARGET] + shift + torch.randn(20, M, generator=g, dtype=torch.float64))
    ys.append(torch.full((20,), TARGET))
    x, y = torch.cat(xs), torch.cat(ys)
    is_poison = torch.cat([torch.zeros(K * 40, dtype=torch.bool), torch.ones(20, dtype=torch.bool)])
    rx = torch.cat([means[c] + torch.randn(12, M, generator=g, dtype=torch.float64) for c in range(K)])
    ry = torch.arange(K).repeat_interleave(12)
    return x, y, is_poison, rx, ry


def split_start(c: int, n: int) -> torch.Tensor:
    """The deterministic start of class c's split (both runs use it instead of a random draw)."""
    return ((torch.arange(n) * 7 + 3 * c) % 5) < 2
