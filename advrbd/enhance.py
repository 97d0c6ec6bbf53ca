"""Algorithm 2 of AdvrBD: iterative backdoor enhancement.

Starting from a model f that has learned the poisoned set D (the start model, see
:class:`advrbd.AdvrBD`), with D_c = {} and D_p = D, every round t = 1..T does three things in
this order (``enhancement="rounds"``, the default, as the paper describes the rounds):

a. **partition** (Algorithm 1): the ``ceil(partition_rate * N)`` least consistent samples of D_p
   move into D_c; D_c accumulates over the rounds;
b. **relearn D_p**: ``relearn_passes`` passes of ordinary training over D_p alone at a constant
   ``enhance_relearn_lr`` (augmentation per ``relearn_augment``), which keeps the backdoor, carried
   by the poison that stays in D_p, and the clean task alive;
c. **unlearn D_c**: ``unlearn_passes`` passes of plain gradient ascent (the negated mean
   cross-entropy) over D_c alone at a constant ``unlearn_lr``, without augmentation, uncapped and
   without any per-sample switch-off, as ABL unlearns.  Because D_c is clean, the ascent destroys
   the clean task (the clean features are shared by all clean samples) while the backdoor, a
   separate shortcut, survives.

The round ends on the unlearning phase, so the model identification sees is one that has just
unlearned: it misclassifies most clean samples and still maps the poison to the target.

Unbounded ascent diverges eventually, and ascent past the point where D_c is forgotten starts to
erase the backdoor too.  A **divergence guard** therefore checks f on a random probe of D_c
(``guard_probe`` samples) every ``guard_every`` ascent steps and ends the round's unlearning once
its accuracy there is at most ``guard_acc`` (None = chance, 1/K: D_c is forgotten) or its mean
cross-entropy exceeds ``guard_loss`` (the logits are blowing up).  Checking by steps rather than
by passes keeps the ascent's strength from growing with |D_c| (a pass over 3,200 samples is 25
steps, over 54 samples one).  The round record says when the guard fired (``guard``) and why.

Three choices of the rounds are named fields, each with the earlier behaviour as its default
until the paper-grade measurements choose (see :class:`advrbd.AdvrBD`): ``ascent_stop``
("chance", the guard's accuracy floor ends the ascent; "budget", ``unlearn_passes`` passes with
only the CE guard, so f degrades gradually over the rounds as the paper's Fig. 6 shows),
``round_order`` ("relearn_unlearn"; "unlearn_relearn", the order the paper names) and
``score_model`` ("round_end"; "after_relearn", a snapshot of f taken after the relearn phase
scores the next partition, since an unlearned f that predicts one class no longer ranks poison).
With ``score_limit``, ``score_limit_selects="share"`` takes the top ``partition_rate`` share of the
scored samples instead of ``ceil(partition_rate * N)`` of them.

``enhancement="joint"`` keeps the earlier reading as an option for comparison: one loss
``CE(D_p batch) - lam * mean(min(CE, ascent_cap) * [p_y > 1/K])`` on a D_c batch paired with every D_p
batch, ``joint_epochs`` passes over D_p per round.  Its ascent switches off as soon as a D_c sample
falls to chance confidence while a full equal-weight pass over D_p relearns exactly the clean
samples identification needs misclassified, so f's accuracy on D_p hardly falls (on CIFAR-10 it
stayed at 0.74-0.76) and the paper's identification rule flags most of the clean data.

Each round's record holds |D_c|, f's accuracy on D_c and D_p after the round, the prediction
histogram, the partition statistics, the phase statistics and the guard.  When an ``observer``
is given, the harness also evaluates (with the ground truth it keeps to itself) a round-0 point
and, per round, f's ACC/ASR, the identification TPR/FPR if the enhancement stopped there, D_c's
poison share and the score distribution of the scored samples; nothing comes back to the defense.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from bench.core.data import ImageSet
from bench.core.params import check_choices
from bench.core.trainer import Checkpoint, Trainer

from .partition import partition
from .score import ScoreConfig

#: the enhancement's two readings of Algorithm 2
Enhancement = Literal["rounds", "joint"]


@dataclass(frozen=True)
class EnhanceConfig:
    """The enhancement's settings.  No defaults here: :class:`advrbd.AdvrBD` holds each default once
    (with its source) and builds this object from its fields of the same names."""

    enhancement: Enhancement
    partition_rate: float
    rounds: int
    relearn_passes: float
    enhance_relearn_lr: float
    relearn_augment: bool
    unlearn_passes: int
    unlearn_lr: float
    unlearn_momentum: float
    guard_acc: float | None
    guard_loss: float
    guard_every: int
    guard_probe: int
    lam: float
    joint_epochs: float
    joint_lr: float
    ascent_cap: float
    stop_margin: float
    stop_tol: float
    score_limit: int | None
    enhance_batch_size: int | None
    ascent_stop: Literal["chance", "budget"]
    round_order: Literal["relearn_unlearn", "unlearn_relearn"]
    score_model: Literal["round_end", "after_relearn"]
    score_limit_selects: Literal["count", "share"]

    def __post_init__(self):
        check_choices(self)


def _sgd(model, trainer: Trainer, lr: float, momentum: float):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=trainer.recipe.for_tuning().weight_decay)


def _batches(pool: torch.Tensor, bs: int, gen: torch.Generator, fraction: float = 1.0):
    order = pool[torch.randperm(len(pool), generator=gen)]
    steps = math.ceil(math.ceil(len(order) / bs) * fraction)
    return [order[b * bs:(b + 1) * bs] for b in range(steps)]


def relearn_phase(model, trainer: Trainer, data: ImageSet, d_p: torch.Tensor, cfg: EnhanceConfig,
                  gen: torch.Generator) -> dict:
    """``cfg.relearn_passes`` passes of plain training over ``d_p`` (a fraction runs that share of
    one pass's batches)."""
    bs = cfg.enhance_batch_size or trainer.recipe.for_tuning().batch_size
    opt = _sgd(model, trainer, cfg.enhance_relearn_lr, cfg.unlearn_momentum)
    model.train()
    total = n = 0.0
    left = cfg.relearn_passes
    while left > 0:
        for idx in _batches(d_p, bs, gen, min(left, 1.0)):
            x, y = trainer.load_batch(data, idx, gen, augment=cfg.relearn_augment)
            with trainer.autocast():
                loss = F.cross_entropy(model(x).float(), y)
            trainer.step(model, opt, loss, len(idx))
            total += loss.item()
            n += 1
        left -= 1.0
    model.eval()
    return {"relearn_ce": total / max(n, 1)}


@torch.no_grad()
def _fit_stats(model, trainer: Trainer, data: ImageSet, idx: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``data[idx]``, eval mode."""
    logits = trainer.logits(model, data.x[idx])
    y = data.y[idx]
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def unlearn_phase(model, trainer: Trainer, data: ImageSet, d_c: torch.Tensor, cfg: EnhanceConfig,
                  gen: torch.Generator, num_classes: int) -> dict:
    """Gradient ascent on ``d_c`` alone, at most ``cfg.unlearn_passes`` passes, no augmentation, with
    the divergence guard checked every ``cfg.guard_every`` steps on a random probe of D_c (with
    ``cfg.ascent_stop == "budget"`` only its CE test: the accuracy floor does not end the ascent)."""
    bs = cfg.enhance_batch_size or trainer.recipe.for_tuning().batch_size
    opt = _sgd(model, trainer, cfg.unlearn_lr, cfg.unlearn_momentum)
    floor = cfg.guard_acc if cfg.guard_acc is not None else 1.0 / num_classes
    probe = d_c[torch.randperm(len(d_c), generator=gen)[:cfg.guard_probe]]
    stats = {"unlearn_steps": 0, "guard": None}
    for p in range(cfg.unlearn_passes):
        for idx in _batches(d_c, bs, gen):
            model.train()
            x, y = trainer.load_batch(data, idx, gen, augment=False)
            with trainer.autocast():
                loss = F.cross_entropy(model(x).float(), y)
            trainer.step(model, opt, -loss, len(idx))
            stats["unlearn_steps"] += 1
            if stats["unlearn_steps"] % cfg.guard_every:
                continue
            model.eval()
            acc, ce = _fit_stats(model, trainer, data, probe)
            stats.update(unlearn_acc_dc=acc, unlearn_ce_dc=ce)
            at_floor = acc <= floor and cfg.ascent_stop == "chance"
            if at_floor or not ce <= cfg.guard_loss:  # `not <=` also catches NaN
                stats["guard"] = (f"acc(D_c) {acc:.3f} <= {floor:.3g} after {stats['unlearn_steps']} steps"
                                  if at_floor else f"CE(D_c) {ce:.3g} > {cfg.guard_loss} after "
                                                       f"{stats['unlearn_steps']} steps")
                return stats
    model.eval()
    return stats


def joint_epoch(model, trainer: Trainer, data: ImageSet, learn_idx: torch.Tensor, unlearn_idx: torch.Tensor,
                cfg: EnhanceConfig, num_classes: int, gen: torch.Generator, opt=None, fraction: float = 1.0) -> dict:
    """``enhancement="joint"``: one pass (or ``fraction`` of one) of paired learn/unlearn batches."""
    bs = cfg.enhance_batch_size or trainer.recipe.for_tuning().batch_size
    learn_idx = torch.as_tensor(learn_idx, dtype=torch.long)
    unlearn_idx = torch.as_tensor(unlearn_idx, dtype=torch.long)
    opt = opt or _sgd(model, trainer, cfg.joint_lr, cfg.unlearn_momentum)
    model.train()
    batches = _batches(learn_idx, bs, gen, fraction)
    sum_learn = sum_unlearn = active = 0.0
    for ip in batches:
        ic = unlearn_idx[torch.randint(0, len(unlearn_idx), (len(ip),), generator=gen)]
        xp, yp = trainer.load_batch(data, ip, gen)
        xc, yc = trainer.load_batch(data, ic, gen)
        with trainer.autocast():
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
    steps = max(len(batches), 1)
    return {"ce_learn": sum_learn / steps, "ce_unlearn": sum_unlearn / steps, "ascent_active": active / steps}


class Observer:
    """What the enhancement shows the harness (all optional; the defense gets nothing back).
    ``save() -> state`` and ``restore(state)`` carry what was shown so far through a checkpoint."""

    def __init__(self, model: Callable | None = None, flags: Callable | None = None, scores: Callable | None = None,
                 save: Callable | None = None, restore: Callable | None = None):
        self.model, self.flags, self.scores = model, flags, scores
        self.save, self.restore = save, restore


def enhance(model, data: ImageSet, trainer: Trainer, num_classes: int, score_cfg: ScoreConfig,
            cfg: EnhanceConfig, gen: torch.Generator, observer: Observer | None = None,
            identify_rule: Callable | None = None, log=None,
            checkpoint: Checkpoint | None = None) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, list[dict]]:
    """Run Algorithm 2 on ``model`` (in place).  Returns (f_e, D_c indices, D_p indices, rounds).

    ``identify_rule(logits, labels) -> bool mask of declared-poisoned samples`` is applied to f's
    logits on D after every round (and at round 0) only to show the harness what identification
    would flag if the enhancement stopped there; the logits are computed for the round's record
    anyway, so this costs nothing extra.

    With a ``checkpoint``, the state after a round (f, the scoring model, D_c, D_p, the records,
    the generator and what the observer was shown) is written when the checkpoint is due and
    always after the last round; a rerun with the same checkpoint continues after the last saved
    round and gives what an uninterrupted run gives.  The file is left in place (the harness
    removes a cell's checkpoints once its result is saved), so a cell killed in a later phase does
    not run the enhancement again."""
    obs = observer or Observer()
    n_total = len(data)
    n_round = math.ceil(cfg.partition_rate * n_total)
    d_c = torch.empty(0, dtype=torch.long)
    d_p = torch.arange(n_total)
    history: list[dict] = []
    prev_acc_p = None
    scorer = model  # the model that scores the next partition (cfg.score_model)

    def show(t: int, logits: torch.Tensor):
        if obs.model is not None:
            obs.model(f"round{t}", model)
        if identify_rule is None:
            return None
        flagged = identify_rule(logits, data.y)
        if obs.flags is not None:
            obs.flags(f"identify{t}", flagged.nonzero().squeeze(1))
        return torch.bincount(data.y[flagged], minlength=num_classes).tolist()

    first = 1
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        scorer = model
        if state["scorer"] is not None:
            scorer = copy.deepcopy(model)
            scorer.load_state_dict(state["scorer"])
        d_c, d_p, history, prev_acc_p = state["d_c"], state["d_p"], state["history"], state["prev_acc_p"]
        gen.set_state(state["gen"])
        if obs.restore is not None:
            obs.restore(state["observed"])
        first = cfg.rounds + 1 if state["done"] else state["round"] + 1
        if log is not None:
            log.info("enhancement resumed after round %d of %d", state["round"], cfg.rounds)
    elif obs.model is not None or obs.flags is not None:
        show(0, trainer.logits(model, data.x))
    for t in range(first, cfg.rounds + 1):
        if len(d_p) == 0:
            break
        t0 = time.time()
        n_select = n_round
        if cfg.score_limit is not None and cfg.score_limit_selects == "share":
            n_select = math.ceil(cfg.partition_rate * min(cfg.score_limit, len(d_p)))
        selected, d_p, pstats, (scored, scores) = partition(scorer, data.x, d_p, n_select, score_cfg, trainer, gen,
                                                           cfg.score_limit, return_scores=True)
        d_c = torch.cat([d_c, selected]).sort().values
        if obs.scores is not None:
            obs.scores(f"score{t}", scored, scores)
        if obs.flags is not None:
            obs.flags(f"dc{t}", d_c)
        phase = {}
        if len(d_c) and len(d_p):
            if cfg.enhancement == "rounds" and cfg.round_order == "unlearn_relearn":
                phase.update(unlearn_phase(model, trainer, data, d_c, cfg, gen, num_classes))
                phase.update(relearn_phase(model, trainer, data, d_p, cfg, gen))
                scorer = model  # the round ends on its relearn
            elif cfg.enhancement == "rounds":
                phase.update(relearn_phase(model, trainer, data, d_p, cfg, gen))
                scorer = copy.deepcopy(model) if cfg.score_model == "after_relearn" else model
                phase.update(unlearn_phase(model, trainer, data, d_c, cfg, gen, num_classes))
            else:
                opt = _sgd(model, trainer, cfg.joint_lr, cfg.unlearn_momentum)
                left = cfg.joint_epochs
                while left > 0:
                    phase = joint_epoch(model, trainer, data, d_p, d_c, cfg, num_classes, gen, opt, min(left, 1.0))
                    left -= 1.0
        logits = trainer.logits(model, data.x)
        pred = logits.argmax(1)
        correct = pred == data.y
        hist = torch.bincount(pred, minlength=num_classes)
        acc_c = float(correct[d_c].float().mean()) if len(d_c) else float("nan")
        acc_p = float(correct[d_p].float().mean()) if len(d_p) else float("nan")
        rec = {"round": t, "size_dc": int(len(d_c)), "size_dp": int(len(d_p)), "acc_dc": acc_c, "acc_dp": acc_p,
               "pred_hist": hist.tolist(), "max_pred_share": float(hist.max()) / n_total,
               **pstats, **phase, "seconds": time.time() - t0}
        history.append(rec)
        if log is not None:
            log.info("round %d: |D_c|=%d acc(D_c)=%.3f acc(D_p)=%.3f max class share=%.2f%s", t, len(d_c), acc_c,
                     acc_p, rec["max_pred_share"], f"; guard fired: {rec['guard']}" if rec.get("guard") else "")
        per_class = show(t, logits)
        if per_class is not None:
            rec["flagged_per_class"] = per_class
        stop = False
        if cfg.enhancement == "joint":  # the joint variant's early stop (the rounds variant runs T rounds)
            if (acc_c < 1.0 / num_classes + cfg.stop_margin and prev_acc_p is not None
                    and abs(acc_p - prev_acc_p) < cfg.stop_tol):
                rec["early_stop"] = stop = True
        prev_acc_p = acc_p
        last = stop or t == cfg.rounds or len(d_p) == 0
        if checkpoint is not None and (last or checkpoint.due()):
            checkpoint.save({"round": t, "done": last, "model": model.state_dict(),
                             "scorer": None if scorer is model else scorer.state_dict(),
                             "d_c": d_c, "d_p": d_p, "history": history, "prev_acc_p": prev_acc_p,
                             "gen": gen.get_state(), "observed": obs.save() if obs.save is not None else None})
        if stop:
            break
    return model, d_c, d_p, history
