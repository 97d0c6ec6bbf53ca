"""Algorithm 1 of AdvrBD (dataset partition).

Score every sample of the pool (or a random subset of it, a cost lever), sort by score in
descending order, and return the ``n`` least consistent samples as the new "assumed clean" set
together with the rest of the pool.  The step only needs a *small*, precise clean set: the score
distributions of clean and poisoned samples overlap, so it does not try to find all poison.
"""
from __future__ import annotations

import torch

from bench.core.trainer import Trainer

from .score import ScoreConfig, robustness_scores


def partition(model, x_uint8: torch.Tensor, pool: torch.Tensor, n: int, cfg: ScoreConfig, trainer: Trainer,
              gen: torch.Generator, score_limit: int | None = None, return_scores: bool = False):
    """Split ``pool`` (indices into ``x_uint8``) into (selected, rest, stats).

    ``selected`` holds the ``n`` highest-score (least robust) samples; with ``score_limit`` only
    that many random pool samples are scored and the selection is made among them.  With
    ``return_scores`` a fourth item ``(scored indices, their scores)`` follows.
    """
    pool = torch.as_tensor(pool, dtype=torch.long)
    n = min(n, len(pool))
    scored = pool
    if score_limit is not None and score_limit < len(pool):
        scored = pool[torch.randperm(len(pool), generator=gen)[:max(score_limit, n)]]
    scores, flips = robustness_scores(model, x_uint8[scored], cfg, trainer, gen, return_flips=True)
    order = torch.argsort(scores, descending=True, stable=True)
    selected = scored[order[:n]].sort().values
    keep = torch.ones(len(x_uint8), dtype=torch.bool)
    keep[selected] = False
    rest = pool[keep[pool]]
    stats = {"scored": len(scored), "flip_rate": float(flips.float().mean()) if len(flips) else float("nan"),
             "score_mean": float(scores.mean()) if len(scores) else float("nan"),
             "score_threshold": float(scores[order[n - 1]]) if n > 0 else float("nan")}
    if return_scores:
        return selected, rest, stats, (scored, scores)
    return selected, rest, stats
