"""Algorithm 2 (iterative backdoor enhancement), specs/defenses.md §1.3 and the lessons of §11.

Starting from a (backdoored) warm-up model f and D_c = {}, D_p = D, each round

a. moves the ceil(rho * N) least consistent samples of D_p into D_c (Algorithm 1);
b. trains f for ``unlearn_epochs`` epochs on Eq. 4: every D_p mini-batch is paired with an
   equally large D_c mini-batch drawn with replacement, and the loss is

       mean CE(D_p batch) - lambda * mean_i [ min(CE_i, cap) * 1(p_y,i > 1/K) ]  over the D_c batch

   The ascent term is capped and switched off per sample once p_y <= 1/K, because raw gradient
   ascent diverges.  Balanced pairing matters (§11): mixing a -1 weight into ordinary batches
   weighs the ascent by |D_c|/N and barely moves the model.

The loop stops early when f's accuracy on D_c is below 1/K + ``stop_margin`` and the share of
D_p that f classifies correctly changed by less than ``stop_tol`` since the previous round.
Per-round diagnostics (|D_c|, accuracy on D_c and D_p, prediction histogram) are returned.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from bench.data import ImageSet
from bench.trainer import Trainer

from .partition import partition
from .score import ScoreConfig


@dataclass(frozen=True)
class EnhanceConfig:
    #: partition rate: ceil(rho * N) samples move into D_c per round [proposal: 0.02]
    rho: float = 0.02
    #: rounds T [proposal: 10]
    rounds: int = 10
    #: weight of the unlearning (ascent) term [proposal: 1]
    lam: float = 1.0
    #: epochs over D_p per round, E_u [proposal: 1]; a fraction runs that share of one epoch's
    #: batches (a cost lever for CPU runs)
    unlearn_epochs: float = 1.0
    #: SGD learning rate of the enhancement updates [proposal: 0.01]
    lr: float = 0.01
    #: SGD momentum [proposal: 0.9]
    momentum: float = 0.9
    #: per-sample cap of the ascent CE [proposal: 10]
    ascent_cap: float = 10.0
    #: early stop once acc(f, D_c) < 1/K + stop_margin ... [proposal: 0.05]
    stop_margin: float = 0.05
    #: ... and acc(f, D_p) moved by less than this since the previous round [proposal: 0.005]
    stop_tol: float = 0.005
    #: score at most this many random D_p samples per round (None = all; a cost lever)
    score_limit: int | None = None
    #: mini-batch size of each half of a paired batch; None = the recipe's batch size
    batch_size: int | None = None


def _predictions(trainer: Trainer, model, data: ImageSet) -> torch.Tensor:
    return trainer.predict(model, data.x)


def unlearn_epoch(model, trainer: Trainer, data: ImageSet, learn_idx: torch.Tensor, unlearn_idx: torch.Tensor,
                  cfg: EnhanceConfig, num_classes: int, gen: torch.Generator, opt=None,
                  fraction: float = 1.0) -> dict:
    """One epoch (or ``fraction`` of one) of paired learn/unlearn batches (Eq. 4).

    Returns simple loss statistics."""
    bs = cfg.batch_size or trainer.recipe.batch_size
    learn_idx = torch.as_tensor(learn_idx, dtype=torch.long)
    unlearn_idx = torch.as_tensor(unlearn_idx, dtype=torch.long)
    if opt is None:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=trainer.recipe.weight_decay)
    model.train()
    order = learn_idx[torch.randperm(len(learn_idx), generator=gen)]
    steps = math.ceil(math.ceil(len(order) / bs) * fraction)
    sum_learn = sum_unlearn = active = 0.0
    for b in range(steps):
        ip = order[b * bs:(b + 1) * bs]
        ic = unlearn_idx[torch.randint(0, len(unlearn_idx), (len(ip),), generator=gen)]
        xp, yp = trainer.load_batch(data, ip, gen)
        xc, yc = trainer.load_batch(data, ic, gen)
        with trainer._autocast():
            logits = model(torch.cat([xp, xc])).float()
        lp, lc = logits[:len(ip)], logits[len(ip):]
        ce_p = F.cross_entropy(lp, yp)
        ce_c = F.cross_entropy(lc, yc, reduction="none")
        with torch.no_grad():
            still_right = lc.softmax(1).gather(1, yc[:, None]).squeeze(1) > 1.0 / num_classes
        ascent = (ce_c.clamp(max=cfg.ascent_cap) * still_right).mean()
        trainer.step(model, opt, ce_p - cfg.lam * ascent, len(ip) + len(ic))
        sum_learn += ce_p.item()
        sum_unlearn += ce_c.detach().mean().item()
        active += still_right.float().mean().item()
    model.eval()
    return {"ce_learn": sum_learn / max(steps, 1), "ce_unlearn": sum_unlearn / max(steps, 1),
            "ascent_active": active / max(steps, 1)}


def enhance(model, data: ImageSet, trainer: Trainer, num_classes: int, score_cfg: ScoreConfig,
            cfg: EnhanceConfig, gen: torch.Generator, observe: Callable | None = None,
            log=None) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, list[dict]]:
    """Run Algorithm 2 on ``model`` (in place).  Returns (f_e, D_c indices, D_p indices, rounds)."""
    n_total = len(data)
    n_round = math.ceil(cfg.rho * n_total)
    d_c = torch.empty(0, dtype=torch.long)
    d_p = torch.arange(n_total)
    history: list[dict] = []
    prev_acc_p = None
    for t in range(1, cfg.rounds + 1):
        if len(d_p) == 0:
            break
        t0 = time.time()
        selected, d_p, pstats = partition(model, data.x, d_p, n_round, score_cfg, trainer, gen, cfg.score_limit)
        d_c = torch.cat([d_c, selected]).sort().values
        lstats = {}
        if len(d_c) and len(d_p):
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                  weight_decay=trainer.recipe.weight_decay)
            left = cfg.unlearn_epochs
            while left > 0:
                lstats = unlearn_epoch(model, trainer, data, d_p, d_c, cfg, num_classes, gen, opt, min(left, 1.0))
                left -= 1.0
        pred = _predictions(trainer, model, data)
        correct = pred == data.y
        hist = torch.bincount(pred, minlength=num_classes)
        acc_c = float(correct[d_c].float().mean()) if len(d_c) else float("nan")
        acc_p = float(correct[d_p].float().mean()) if len(d_p) else float("nan")
        rec = {"round": t, "size_dc": int(len(d_c)), "size_dp": int(len(d_p)), "acc_dc": acc_c, "acc_dp": acc_p,
               "pred_hist": hist.tolist(), "max_pred_share": float(hist.max()) / n_total,
               **pstats, **lstats, "seconds": time.time() - t0}
        history.append(rec)
        if log is not None:
            log.info("round %d: |D_c|=%d acc(D_c)=%.3f acc(D_p)=%.3f max class share=%.2f",
                     t, len(d_c), acc_c, acc_p, rec["max_pred_share"])
        if observe is not None:
            observe(f"round{t}", model)
        if (acc_c < 1.0 / num_classes + cfg.stop_margin and prev_acc_p is not None
                and abs(acc_p - prev_acc_p) < cfg.stop_tol):
            rec["early_stop"] = True
            break
        prev_acc_p = acc_p
    return model, d_c, d_p, history
