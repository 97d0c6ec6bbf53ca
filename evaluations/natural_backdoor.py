"""Natural backdoors: what benign training already plants.

A natural backdoor is a small input-agnostic patch that flips images of most classes to one label
in a model trained only on benign data.  :class:`NaturalBackdoor` measures it with a
Neural-Cleanse-style trigger inversion (Wang et al., "Neural Cleanse", S&P 2019; reference code:
backdoor-toolbox's NC) under hard area budgets, the protocol NONE's paper uses to show natural
backdoors:

1. **Splits** of the clean test set (seeded): an *inversion* split of ``per_class`` images per
   class, and a *disjoint* held-out *evaluation* split of up to ``eval_size`` other images.
2. **Inversion**, for every label t and budget a: minimise
   ``CE(f((1 - m) * x + m * p), t) + penalty * ReLU(|m|_1 - a*H*W)`` over the inversion images
   whose label is not t, with ``m = tanh(M)/2 + 1/2`` (H x W, shared by the channels) and
   ``p = tanh(P)/2 + 1/2`` (C x H x W), Adam.  The budget is **hard**: every forward pass uses the
   projected mask ``m * min(1, a*H*W / |m|_1)``, whose L1 never exceeds the budget; the penalty
   keeps the raw mask near the budget so the projection shrinks it little.  All labels, budgets
   and restarts are one batch of triggers optimised together (a trigger dimension in front of the
   image batch); each step draws ``batch_size`` inversion images shared by every trigger, and a
   trigger's loss ignores the images of its own label.
3. **Keep the best restart** per (budget, label): highest attack success on the inversion split
   (images of other labels predicted t).
4. **Natural-backdoor ASR(a, t)**: the best trigger stamped on the evaluation split's images of
   other labels, fraction predicted t; reported per label and as the max over labels.
5. **Minimal mask L1** per label: the projected mask's L1 at the smallest budget whose inversion
   success reaches ``success``; a label that reaches it at no budget is censored at its L1 under
   the largest budget (a lower bound of its true norm; ``min_l1_reached`` says which).
6. **Neural Cleanse MAD anomaly index**: ``|l1 - median| / (1.4826 * MAD)`` per label; labels
   below the median with index > ``anomaly_threshold`` are flagged.  The MAD is floored at
   ``mad_floor * H * W`` pixels so that a flat profile (e.g. all labels censored alike) gives a
   finite index and the L1's jitter below a budget (a fraction of a pixel to a pixel) is no
   outlier.

Deviations from Neural Cleanse, and why: the per-step image batch is shared by every trigger (one
forward over ``triggers x batch`` images instead of one per trigger); the hard budget is enforced
by the projection above (a penalty alone, as in Neural Cleanse, lets the L1 exceed the budget).  Adam's betas
default to backdoor-toolbox's NC reference (0.5, 0.9).

Cost is counted in image passes: ``forward`` (every image through the model) and ``backward``
(images whose loss is back-propagated; to the inputs only, the model's weights are frozen).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.core.data import ImageSet
from bench.core.evaluation import INVERTED_TRIGGERS, Evaluation
from bench.core.registry import register_evaluation
from bench.core.tensors import rank_within_class, stream
from bench.core.trainer import Trainer

#: the consistency constant of the MAD for normal data (Neural Cleanse)
MAD_CONSISTENCY = 1.4826


def split_indices(y: torch.Tensor, num_classes: int, per_class: int, eval_size: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, disjoint (inversion, evaluation) index sets of a labelled set.

    Inversion: the first ``per_class`` images of each class in one seeded permutation; evaluation:
    the first ``eval_size`` of the remaining images in the same permutation."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=gen)
    rank = rank_within_class(y[perm])  # permutation order within a class
    inv = perm[rank < per_class]
    ev = perm[rank >= per_class][:eval_size]
    return inv, ev


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(1 - m) * x + m * p`` for T triggers on n images: x n x C x H x W, mask T x 1 x H x W,
    pattern T x C x H x W -> (T*n) x C x H x W."""
    out = (1 - mask[:, None]) * x[None] + (mask * pattern)[:, None]
    return out.flatten(0, 1)


@dataclass
class NaturalResult:
    """Everything one measurement produced (tensors for inspection, :meth:`summary` for the store)."""

    budgets: list[float]
    masks: torch.Tensor          # B x K x H x W, projected, best restart
    patterns: torch.Tensor       # B x K x C x H x W
    inversion_success: torch.Tensor  # B x K
    asr: torch.Tensor            # B x K, on the evaluation split
    mask_l1: torch.Tensor        # B x K
    min_l1: torch.Tensor         # K
    min_l1_reached: torch.Tensor  # K bool
    anomaly: torch.Tensor        # K
    flagged: list[int]
    inversion_idx: torch.Tensor
    eval_idx: torch.Tensor
    cost: dict

    def summary(self) -> dict:
        asr_max, asr_label = self.asr.max(1)
        below = self.min_l1 < self.min_l1.median()
        return {
            "budgets": self.budgets,
            "asr_max": asr_max.tolist(), "asr_max_label": asr_label.tolist(),
            "asr": self.asr.tolist(), "inversion_success": self.inversion_success.tolist(),
            "mask_l1": self.mask_l1.tolist(),
            "min_l1": self.min_l1.tolist(), "min_l1_reached": self.min_l1_reached.tolist(),
            "anomaly_index": self.anomaly.tolist(),
            "anomaly_max": float(self.anomaly[below].max()) if bool(below.any()) else 0.0,
            "anomaly_label": int(self.min_l1.argmin()),
            "flagged": self.flagged,
            "n_inversion": len(self.inversion_idx), "n_eval": len(self.eval_idx),
            "cost": self.cost,
        }


@register_evaluation("natural_backdoor")
@dataclass(frozen=True)
class NaturalBackdoor(Evaluation):
    """Natural-backdoor ASR by hard-budget trigger inversion for every label."""

    version: ClassVar[int] = 2
    summary_kind: ClassVar[str] = INVERTED_TRIGGERS

    #: hard mask-area budgets as fractions of H*W (NONE's 2..12 %)
    budgets: tuple[float, ...] = (0.02, 0.04, 0.06, 0.08, 0.10, 0.12)
    #: optimisation steps per trigger (all triggers step together)
    steps: int = 300
    #: random restarts per (budget, label); the best on the inversion split is kept
    restarts: int = 3
    #: Adam learning rate (Neural Cleanse: 0.1)
    lr: float = 0.1
    #: Adam betas (backdoor-toolbox's Neural Cleanse: 0.5, 0.9)
    betas: tuple[float, float] = (0.5, 0.9)
    #: inversion images per step, shared by every trigger
    batch_size: int = 16
    #: weight lambda of ReLU(|m|_1 - budget) (per pixel over the budget)
    penalty: float = 1.0
    #: std of the random initial mask/pattern logits (restarts differ by these draws)
    init_std: float = 1.0
    #: inversion images per class (held-out part of the test set)
    per_class: int = 20
    #: size of the disjoint evaluation split (other test images); fewer if the test set is small
    eval_size: int = 1000
    #: inversion success that defines a label's minimal mask L1 (backdoor-toolbox NC: 0.99)
    success: float = 0.99
    #: MAD anomaly index above which a below-median label is flagged (Neural Cleanse: 2)
    anomaly_threshold: float = 2.0
    #: lower bound of the MAD as a fraction of H*W (half the default 2 % budget step): keeps the
    #: index finite on flat profiles and ignores sub-step jitter of the mask L1
    mad_floor: float = 0.01
    #: triggers per forward/backward chunk (bounds memory); 0 = all at once
    trigger_chunk: int = 0
    #: images per forward chunk when evaluating
    eval_batch: int = 512

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "budgets", tuple(float(b) for b in self.budgets))
        object.__setattr__(self, "betas", tuple(self.betas))
        if not self.budgets or not all(0 < b <= 1 for b in self.budgets):
            raise ValueError(f"budgets: {list(self.budgets)} must be non-empty fractions in (0, 1]")
        if list(self.budgets) != sorted(set(self.budgets)):
            raise ValueError(f"budgets: {list(self.budgets)} must be strictly increasing")
        for f in ("steps", "restarts", "batch_size", "per_class", "eval_size", "eval_batch"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}: {getattr(self, f)} must be >= 1")
        if self.trigger_chunk < 0:
            raise ValueError(f"trigger_chunk: {self.trigger_chunk} must be >= 0")
        if self.mad_floor <= 0:
            raise ValueError(f"mad_floor: {self.mad_floor} must be > 0")
        if not 0 < self.success <= 1:
            raise ValueError(f"success: {self.success} must be in (0, 1]")

    # --- the measurement -------------------------------------------------------------------
    def evaluate(self, model, test: ImageSet, num_classes: int, trainer: Trainer | None = None,
                 seed: int = 0) -> NaturalResult:
        t0 = time.time()
        autocast = (trainer or Trainer(device=next(model.parameters()).device)).autocast
        device = next(model.parameters()).device
        inv_idx, ev_idx = split_indices(test.y, num_classes, self.per_class, self.eval_size, seed)
        x_inv = test.x[inv_idx].to(device).float().div_(255)
        y_inv = test.y[inv_idx].to(device)
        x_ev = test.x[ev_idx].to(device).float().div_(255)
        y_ev = test.y[ev_idx].to(device)
        gen = stream(seed, "natural_backdoor")
        was_training = model.training
        grads = [p.requires_grad for p in model.parameters()]
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        passes = {"forward": 0, "backward": 0}
        try:
            R, B, K = self.restarts, len(self.budgets), num_classes
            C, H, W = x_inv.shape[1:]
            labels = torch.arange(K, device=device).repeat(R * B)                     # T, layout R x B x K
            area = torch.tensor(self.budgets, device=device).repeat_interleave(K).repeat(R)
            budget_px = area * H * W
            mask, pattern = self._optimise(model, x_inv, y_inv, labels, area, budget_px, (C, H, W), gen, passes,
                                           autocast)
            succ = self._success(model, x_inv, y_inv, mask, pattern, labels, passes, autocast).view(R, B, K)
            best = succ.argmax(0)                                                     # B x K
            best_dev = best.to(device)
            pick = lambda t: t.view(R, B, K, *t.shape[1:]).gather(  # noqa: E731
                0, best_dev.view(1, B, K, *([1] * (t.dim() - 1))).expand(1, B, K, *t.shape[1:]))[0]
            mask_b, pattern_b = pick(mask), pick(pattern)                             # B x K x 1 x H x W
            succ_b = succ.gather(0, best[None])[0]
            labels_b = torch.arange(K, device=device).repeat(B)
            asr = self._success(model, x_ev, y_ev, mask_b.flatten(0, 1), pattern_b.flatten(0, 1),
                                labels_b, passes, autocast).view(B, K)
        finally:
            for p, g in zip(model.parameters(), grads):
                p.requires_grad_(g)
            model.train(was_training)
        l1 = mask_b.sum((2, 3, 4)).float().cpu()  # B x K; the bookkeeping below is on the host
        reached = succ_b >= self.success
        first = reached.float().argmax(0)  # smallest budget reaching success (0 if none)
        any_r = reached.any(0)
        first = torch.where(any_r, first, torch.full_like(first, B - 1))
        min_l1 = l1.gather(0, first[None])[0]
        med = min_l1.median()
        mad = max(float((min_l1 - med).abs().median()) * MAD_CONSISTENCY, self.mad_floor * H * W)
        anomaly = (min_l1 - med).abs() / mad
        flagged = ((min_l1 < med) & (anomaly > self.anomaly_threshold)).nonzero().squeeze(1).tolist()
        cost = {"wall_time_s": time.time() - t0, **passes, "steps": self.steps,
                "triggers": R * B * K}
        return NaturalResult(list(self.budgets), mask_b[:, :, 0].cpu(), pattern_b.cpu(), succ_b.cpu(),
                             asr.cpu(), l1.cpu(), min_l1.cpu(), any_r.cpu(), anomaly.cpu(), flagged,
                             inv_idx, ev_idx, cost)

    def _chunks(self, n: int):
        size = self.trigger_chunk or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def _optimise(self, model, x, y, labels, area, budget_px, shape, gen, passes, autocast):
        T, (C, H, W), device = len(labels), shape, x.device
        # mask logits start near the budget (m ~ a), plus noise; pattern logits are noise
        m0 = torch.atanh((2 * area - 1).clamp(-0.999, 0.999)).cpu()
        M = (m0[:, None, None, None] + self.init_std * torch.randn(T, 1, H, W, generator=gen)).to(device)
        P = (self.init_std * torch.randn(T, C, H, W, generator=gen)).to(device)
        M.requires_grad_(True)
        P.requires_grad_(True)
        opt = torch.optim.Adam([M, P], lr=self.lr, betas=self.betas)
        n = len(x)
        for _ in range(self.steps):
            idx = torch.randint(n, (min(self.batch_size, n),), generator=gen).to(device)
            xb, yb = x[idx], y[idx]
            opt.zero_grad(set_to_none=True)
            for s in self._chunks(T):
                m, p = self.masks(M[s], budget_px[s]), torch.tanh(P[s]) / 2 + 0.5
                with autocast():
                    logits = model(stamp(xb, m, p)).float().view(len(m), len(xb), -1)
                lab = labels[s]
                ce = F.cross_entropy(logits.transpose(1, 2), lab[:, None].expand(-1, len(xb)), reduction="none")
                w = (yb[None] != lab[:, None]).float()
                loss = ((ce * w).sum(1) / w.sum(1).clamp(min=1)).sum()
                raw = (torch.tanh(M[s]) / 2 + 0.5).sum((1, 2, 3))
                loss = loss + self.penalty * F.relu(raw - budget_px[s]).sum()
                loss.backward()
                passes["forward"] += len(m) * len(xb)
                passes["backward"] += len(m) * len(xb)
            opt.step()
        with torch.no_grad():
            return self.masks(M, budget_px).detach(), (torch.tanh(P) / 2 + 0.5).detach()

    @staticmethod
    def masks(M: torch.Tensor, budget_px: torch.Tensor) -> torch.Tensor:
        """The hard-budget projection: ``m * min(1, budget / |m|_1)`` of ``m = tanh(M)/2 + 1/2``."""
        m = torch.tanh(M) / 2 + 0.5
        scale = (budget_px / m.sum((1, 2, 3)).clamp(min=1e-12)).clamp(max=1)
        return m * scale[:, None, None, None]

    @torch.no_grad()
    def _success(self, model, x, y, mask, pattern, labels, passes, autocast) -> torch.Tensor:
        """Per trigger: fraction of the images of other labels classified as the trigger's label."""
        T, n = len(labels), len(x)
        hits = torch.zeros(T, device=x.device)
        per = max(1, self.eval_batch // max(1, n)) if n <= self.eval_batch else 1
        step_img = min(n, self.eval_batch)
        for t0 in range(0, T, per):
            ts = slice(t0, min(t0 + per, T))
            for i0 in range(0, n, step_img):
                xb, yb = x[i0:i0 + step_img], y[i0:i0 + step_img]
                with autocast():
                    pred = model(stamp(xb, mask[ts], pattern[ts])).argmax(1).view(-1, len(xb))
                passes["forward"] += pred.numel()
                lab = labels[ts][:, None]
                hits[ts] += ((pred == lab) & (yb[None] != lab)).sum(1).float()
        others = (y[None] != labels[:, None]).sum(1).float()
        return (hits / others.clamp(min=1)).cpu()

