"""Metric definitions (one place, used by every cell).

* ACC: accuracy on the full clean test set.
* ASR: among triggered test images that count (true label != target; for TaCT only the source
  class), the fraction predicted as the target.  Clean-misclassified samples are not dropped.
* RA (robust accuracy): among the same images, the fraction predicted as their true label.
* Detection, when a defense flags training samples: TPR = flagged poison / all poison,
  FPR = flagged non-poison / all non-poison, precision = flagged poison / flagged.
  Cover samples (trigger-like, label kept) count as non-poison.
"""
from __future__ import annotations

import math

import torch


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return (pred == y).float().mean().item() if len(y) else math.nan


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
