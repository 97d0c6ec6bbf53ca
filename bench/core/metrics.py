"""Metric definitions (one place, used by every cell).

* ACC: accuracy on the full clean test set.
* ACC (non-target), ``acc_nontarget``: accuracy on the clean test images whose true label is not
  the attack's target.  A defense that stops predicting the target class loses that class's
  recall in ACC but not here; the AdvrBD paper's defended numbers are very likely on such a subset
  (they are multiples of 1/910 on CIFAR-10 where its undefended ones are multiples of 1/1000).
* Per-class recall (``recall``, a list over classes) and the target class's recall
  (``target_recall``).
* ASR: among triggered test images that count (true label != target; for TaCT only the source
  class), the fraction predicted as the target.  Clean-misclassified samples are not dropped.
* RA (robust accuracy): among the same images, the fraction predicted as their true label.
* Detection, when a defense flags training samples: TPR = flagged poison / all poison,
  FPR = flagged non-poison / all non-poison, precision = flagged poison / flagged.
  Cover samples (trigger-like, label kept) count as non-poison.
* DER and RIR (the ratings BackdoorBench's leaderboard reports; DER from Zhu et al., ICCV 2023,
  "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization"), in [0, 1],
  against the undefended model of the same poisoned set:
  DER = [max(0, ASR_undef - ASR) - max(0, ACC_undef - ACC) + 1] / 2,
  RIR = [max(0, RA - RA_undef) - max(0, ACC_undef - ACC) + 1] / 2.
  1 means the backdoor (DER) or the robust accuracy's whole gap (RIR) is gone at no cost in ACC,
  0.5 that nothing changed.  RIR follows BackdoorBench's written formula; its code adds the ACC
  drop where the formula subtracts it, and we follow the formula.
"""
from __future__ import annotations

import math

import torch


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return (pred == y).float().mean().item() if len(y) else math.nan


def der(acc_undef: float, asr_undef: float, acc: float, asr: float) -> float:
    """Defense effectiveness rating (see the module docstring); fractions in, a fraction out."""
    return (max(0.0, asr_undef - asr) - max(0.0, acc_undef - acc) + 1) / 2


def rir(acc_undef: float, ra_undef: float, acc: float, ra: float) -> float:
    """Robust improvement rate (see the module docstring)."""
    return (max(0.0, ra - ra_undef) - max(0.0, acc_undef - acc) + 1) / 2


def per_class_recall(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float]:
    """Recall of every class (NaN for a class absent from ``y``)."""
    hit = torch.bincount(y[pred == y], minlength=num_classes).float()
    total = torch.bincount(y, minlength=num_classes).float()
    return [float(h / t) if t else math.nan for h, t in zip(hit, total)]


def score_separation(scores: torch.Tensor, is_poison: torch.Tensor, bins: int = 20) -> dict:
    """How well a per-sample score separates poison (expected low) from clean samples.

    ``auroc`` is the probability that a random poisoned sample scores lower than a random clean
    one (ties count half), from the ranks (Mann-Whitney U).  ``edges`` are ``bins`` equal-width bins
    over the 1st-99th percentile of the scores (values outside fall into the end bins), with the
    clean and poison counts per bin: enough to draw the two histograms.
    """
    s = scores.double().flatten()
    p = is_poison.bool().flatten()
    n_p, n_c = int(p.sum()), int((~p).sum())
    out: dict = {"n_poison": n_p, "n_clean": n_c, "auroc": math.nan}
    if len(s) == 0:
        return out
    if n_p and n_c:
        order = torch.argsort(s, stable=True)
        ranks = torch.empty_like(s)
        ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
        sorted_s = s[order]  # average the ranks of ties
        uniq, inv, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
        first = torch.cumsum(counts, 0) - counts + 1
        avg = (first + (counts - 1) / 2.0).double()
        ranks[order] = avg[inv]
        # U for "clean scores higher than poison": sum of clean ranks minus its minimum
        u = float(ranks[~p].sum()) - n_c * (n_c + 1) / 2
        out["auroc"] = u / (n_p * n_c)
    lo, hi = torch.quantile(s, 0.01).item(), torch.quantile(s, 0.99).item()
    if hi <= lo:
        hi = lo + 1e-12
    idx = ((s - lo) / (hi - lo) * bins).floor().clamp(0, bins - 1).long()
    out["edges"] = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    out["clean_hist"] = torch.bincount(idx[~p], minlength=bins).tolist()
    out["poison_hist"] = torch.bincount(idx[p], minlength=bins).tolist()
    return out


def attack_success_rate(pred_triggered: torch.Tensor, counts: torch.Tensor, target: int) -> float:
    if not bool(counts.any()):
        return math.nan
    return (pred_triggered[counts] == target).float().mean().item()


def robust_accuracy(pred_triggered: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> float:
    if not bool(counts.any()):
        return math.nan
    return (pred_triggered[counts] == y[counts]).float().mean().item()


def detection(flagged: torch.Tensor, is_poison: torch.Tensor) -> dict[str, float]:
    n = len(is_poison)
    f = torch.zeros(n, dtype=torch.bool)
    f[torch.as_tensor(flagged, dtype=torch.long)] = True
    tp = int((f & is_poison).sum())
    fp = int((f & ~is_poison).sum())
    pos, neg = int(is_poison.sum()), int((~is_poison).sum())
    return {
        "tpr": tp / pos if pos else math.nan,
        "fpr": fp / neg if neg else math.nan,
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "flagged": int(f.sum()),
    }
