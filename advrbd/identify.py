"""Identification: the enhanced model's mistakes are the clean samples.

Run the enhanced model f_e on every training sample (D_c included).  Samples it misclassifies
(argmax != given label) are declared clean; the rest are declared poisoned.  ``min_confidence``
is an optional stricter rule: a correctly classified sample counts as poisoned only when
p_y >= min_confidence (0 = the paper's argmax rule), a lever to lower the false-positive rate.
"""
from __future__ import annotations

import torch

from bench.core.data import ImageSet
from bench.core.trainer import Trainer


def rule(logits: torch.Tensor, y: torch.Tensor, min_confidence: float = 0.0) -> torch.Tensor:
    """Bool mask of the samples declared poisoned: classified as their given label (argmax), with
    ``p_y >= min_confidence`` (0 = the paper's rule)."""
    p_y = logits.float().softmax(1).gather(1, y[:, None]).squeeze(1)
    return (logits.argmax(1) == y) & (p_y >= min_confidence)


def identify(model, data: ImageSet, trainer: Trainer, min_confidence: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (clean indices, poisoned indices, predictions of f_e on ``data``)."""
    logits = trainer.logits(model, data.x)
    poisoned = rule(logits, data.y, min_confidence)
    return (~poisoned).nonzero().squeeze(1), poisoned.nonzero().squeeze(1), logits.argmax(1)
