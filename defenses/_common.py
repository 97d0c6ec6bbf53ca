"""Pieces shared by the detection defenses (ABL, DBR, SCAnFT, NONE): the unlearn/relearn repair
pattern and the two-class Jenks break.  Every epoch count of these defenses is an absolute
number (the reference implementation's value by default); none is derived from the recipe."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.core.data import ImageSet
from bench.core.defense import DefenseContext
from bench.core.trainer import Recipe


def unlearn_relearn(ctx: DefenseContext, model: nn.Module, data: ImageSet, unlearn_idx: torch.Tensor,
                    learn_idx: torch.Tensor, epochs: int, lr: float, augment: bool = True,
                    seed: int = 0, tag: str | None = None, recipe: Recipe | None = None) -> nn.Module:
    """The D-BR repair pattern: per epoch, one pass of gradient ascent on ``unlearn_idx``, then one
    pass of ordinary descent on ``learn_idx``, with one SGD optimizer (momentum, weight decay and
    batch size of ``recipe``, by default the trainer recipe's ``for_tuning()``) at a constant ``lr``.  Returns the
    last epoch's model (no selection)."""
    trainer = ctx.trainer
    model = trainer.prepare(model)
    gen = torch.Generator().manual_seed(seed)
    recipe = recipe or trainer.recipe.for_tuning()
    opt = trainer.optimizer(model, recipe, lr=lr)
    unlearn_idx = torch.as_tensor(unlearn_idx, dtype=torch.long)
    learn_idx = torch.as_tensor(learn_idx, dtype=torch.long)
    for epoch in range(epochs):
        model.train()
        for pool, sign in ((unlearn_idx, -1.0), (learn_idx, 1.0)):
            trainer.train_pass(model, data, pool, opt, gen, recipe, augment=augment, loss_fn=_mean_ce, sign=sign)
        if tag is not None:
            ctx.observe(f"{tag}{epoch + 1}", model)
    model.eval()
    return model


def _mean_ce(model, x, y, idx) -> torch.Tensor:
    """The batch's mean cross-entropy (one scalar, as the reference repairs compute it)."""
    return F.cross_entropy(model(x).float(), y)


def jenks_two_class(values: torch.Tensor) -> float:
    """The exact two-class Jenks natural break of 1-D ``values``.

    Sort, then for each split of the sorted values into a lower part ``v[:i]`` and an upper part
    ``v[i:]`` (1 <= i < n) compute the total within-group sum of squared deviations from prefix
    sums, ``SSE = sum(v^2) - (sum v)^2 / n`` per group, in O(n) after the O(n log n) sort.  The
    break is the smallest value of the upper group of the best split (values >= break form the
    upper class).  Computed in float64.
    """
    v = values.detach().double().flatten().sort().values
    n = len(v)
    if n < 2:
        return float(v[0]) if n else math.nan
    c1 = v.cumsum(0)
    c2 = (v * v).cumsum(0)
    i = torch.arange(1, n, dtype=torch.float64)       # size of the lower group
    s_lo, q_lo = c1[:-1], c2[:-1]
    s_hi, q_hi = c1[-1] - s_lo, c2[-1] - q_lo
    sse = (q_lo - s_lo ** 2 / i) + (q_hi - s_hi ** 2 / (n - i))
    best = int(torch.argmin(sse))
    return float(v[best + 1])
