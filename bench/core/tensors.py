"""Small tensor helpers shared by the harness and its components: pixel conversions, ranking
within class, and named random streams."""
from __future__ import annotations

import hashlib

import torch


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]."""
    return x.float() / 255


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 (clamped, rounded)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def rank_within_class(y: torch.Tensor) -> torch.Tensor:
    """Each element's position among the elements of its own class, in order of appearance
    (``y = [3, 1, 3, 3, 1]`` -> ``[0, 0, 1, 2, 1]``)."""
    y = torch.as_tensor(y, dtype=torch.long)
    if len(y) == 0:
        return y.clone()
    order = torch.argsort(y, stable=True)
    counts = torch.bincount(y)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(y)
    rank[order] = torch.arange(len(y)) - starts[y[order]]
    return rank


def round_robin(y: torch.Tensor) -> torch.Tensor:
    """The order that takes one element of each class in turn: every class's first element (by
    class index), then every class's second, ...; a prefix of it is as class-balanced as the
    classes' sizes allow."""
    y = torch.as_tensor(y, dtype=torch.long)
    if len(y) == 0:
        return y.clone()
    return torch.argsort(rank_within_class(y) * (int(y.max()) + 1) + y, stable=True)


def stream_seed(seed: int, name: str) -> int:
    """The seed of the random stream ``name`` of a cell with seed ``seed``.  Streams with different
    names are independent draws, and adding a stream never shifts another (unlike seed offsets)."""
    digest = hashlib.sha256(f"{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def stream(seed: int, name: str) -> torch.Generator:
    """A CPU generator for the random stream ``name`` (see :func:`stream_seed`)."""
    return torch.Generator().manual_seed(stream_seed(seed, name))
