"""The robustness (consistency) score of AdvrBD (the paper's Eq. 3, whose constants its text does not give).

For a sample x and model f (eval mode, BN statistics frozen):

1. a square mask m of half-width r (side 2r) at a uniformly random position, drawn per sample
   and per call from a seeded generator, shared by all channels;
2. delta* ~ argmax_{||delta||_inf <= eps} KL(p(x) || p(clip01(x + m * delta))) by PGD: uniform
   random start in [-eps, eps] (the KL gradient vanishes at delta = 0), ``steps`` signed-gradient
   steps of ``step_size``, projection onto the eps-ball and the mask after each step, p(x) held
   fixed (detached) as the reference;
3. s(x) = KL(p(x) || p(x + m * delta*)) from float32 log-softmax of the final logits.

High s = sensitive = likely clean; low s = robust = likely poisoned.

``patch_mode="replace"`` is the classic adversarial patch reading: the patch pixels are replaced by
content in [0, 1] (x * (1 - m) + m * patch), random uniform start, same step size; eps bounds
nothing there.  ``additive`` is the default.

Everything is batched: whole batches with per-sample masks, no per-sample Python.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from bench.core.params import check_choices
from bench.core.trainer import Trainer

#: how the adversarial patch perturbs an image: "additive" (bounded) or "replace" (patch content)
PatchMode = Literal["additive", "replace"]


@dataclass(frozen=True)
class ScoreConfig:
    """The score's settings.  No defaults here: :class:`advrbd.AdvrBD` holds each default once (with
    its source) and builds this object from its fields of the same names."""

    #: patch half-width in pixels; None = image side / 8
    radius: int | None
    #: L_inf bound of the additive perturbation
    eps: float
    #: PGD steps
    pgd_steps: int
    #: PGD step size; None = eps / 4
    pgd_step_size: float | None
    #: "additive" (L_inf-bounded perturbation inside the patch) or "replace" (patch content)
    patch_mode: PatchMode
    #: samples per PGD batch
    score_batch_size: int

    def __post_init__(self):
        check_choices(self)

    def radius_for(self, size: int) -> int:
        return self.radius if self.radius is not None else max(1, size // 8)

    @property
    def alpha(self) -> float:
        return self.pgd_step_size if self.pgd_step_size is not None else self.eps / 4


def patch_masks(n: int, height: int, width: int, radius: int, gen: torch.Generator,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """``n x 1 x H x W`` float masks, each a (2r x 2r) square at a uniformly random position."""
    side_h, side_w = min(2 * radius, height), min(2 * radius, width)
    top = torch.randint(0, height - side_h + 1, (n,), generator=gen).to(device)
    left = torch.randint(0, width - side_w + 1, (n,), generator=gen).to(device)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + side_h)
    in_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + side_w)
    return (in_rows[:, :, None] & in_cols[:, None, :]).float()[:, None]


def _kl(log_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p || q) with p given as float32 log-probabilities."""
    log_q = F.log_softmax(logits_q.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def pgd_patch(model, x: torch.Tensor, mask: torch.Tensor, cfg: ScoreConfig, gen: torch.Generator,
              autocast=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PGD on KL(p(x) || p(x_adv)) inside ``mask``.

    Returns (x_adv, per-sample final KL, per-sample bool "the predicted label flipped").

    ``x`` is float in [0, 1], ``mask`` is ``B x 1 x H x W``.  The model must be in eval mode.
    Parameters receive no gradient (only the perturbation is differentiated).
    """
    ctx = autocast if autocast is not None else torch.autocast(x.device.type, enabled=False)
    with torch.no_grad(), ctx:
        log_p = F.log_softmax(model(x).float(), dim=1)
    u = torch.rand(x.shape, generator=gen).to(x.device)
    if cfg.patch_mode == "additive":
        delta = (u * 2 - 1) * cfg.eps * mask
    else:
        delta = u * mask  # patch content in [0, 1]

    def apply(d):
        if cfg.patch_mode == "additive":
            return (x + d).clamp(0, 1)
        return x * (1 - mask) + d

    for _ in range(cfg.pgd_steps):
        delta.requires_grad_(True)
        with ctx:
            logits = model(apply(delta))
        loss = _kl(log_p, logits).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta + cfg.alpha * grad.sign()
            if cfg.patch_mode == "additive":
                # project onto the eps-ball, onto the image range and onto the mask
                delta = ((x + delta.clamp(-cfg.eps, cfg.eps)).clamp(0, 1) - x) * mask
            else:
                delta = delta.clamp(0, 1) * mask
    delta = delta.detach()
    x_adv = apply(delta)
    with torch.no_grad(), ctx:
        logits_adv = model(x_adv)
        score = _kl(log_p, logits_adv)
    return x_adv, score, logits_adv.argmax(1) != log_p.argmax(1)


def robustness_scores(model, x_uint8: torch.Tensor, cfg: ScoreConfig, trainer: Trainer,
                      gen: torch.Generator, return_flips: bool = False):
    """s(x) for every image of ``x_uint8`` (N x C x H x W uint8), batched, eval mode, no augmentation.

    Returns a float32 CPU tensor of N scores (and, with ``return_flips``, a bool tensor marking the
    samples whose predicted label the perturbation flipped: the calibration statistic,
    which should be roughly 30-70%; near 0 or 1 the ranking degenerates and eps needs adjusting).  Work is counted on ``trainer``: one forward+backward
    per PGD step (``train_samples``) and two forwards (``eval_samples``).
    """
    was_training = model.training
    model.eval()
    n, _, h, w = x_uint8.shape
    r = cfg.radius_for(min(h, w))
    out, flips = [], []
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        for i in range(0, n, cfg.score_batch_size):
            x = trainer.to_float(x_uint8[i:i + cfg.score_batch_size])
            mask = patch_masks(len(x), h, w, r, gen, x.device)
            _, s, flipped = pgd_patch(model, x, mask, cfg, gen, trainer.autocast())
            out.append(s.float().cpu())
            flips.append(flipped.cpu())
            trainer.train_samples += len(x) * cfg.pgd_steps
            trainer.eval_samples += 2 * len(x)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    scores = torch.cat(out) if out else torch.empty(0)
    if return_flips:
        return scores, (torch.cat(flips) if flips else torch.empty(0, dtype=torch.bool))
    return scores


def calibrate_eps(model, x_uint8: torch.Tensor, cfg: ScoreConfig, trainer: Trainer, gen: torch.Generator,
                  candidates: tuple[float, ...], target: tuple[float, float] = (0.3, 0.7)) -> tuple[float, list]:
    """Pick eps so that PGD flips the prediction of a ``target`` share of ``x_uint8``.

    Candidates are tried in increasing order; the one whose flip rate is closest to the middle of
    ``target`` wins, and the search stops at the first candidate above the range.  Returns
    (eps, [(eps, flip rate), ...]).  The step size follows eps when ``cfg.pgd_step_size`` is None.
    """
    mid = (target[0] + target[1]) / 2
    table, best = [], None
    for eps in sorted(candidates):
        _, flips = robustness_scores(model, x_uint8, replace(cfg, eps=eps), trainer, gen, return_flips=True)
        rate = float(flips.float().mean()) if len(flips) else float("nan")
        table.append((eps, rate))
        if best is None or abs(rate - mid) < abs(best[1] - mid):
            best = (eps, rate)
        if rate > target[1]:
            break
    return best[0], table
