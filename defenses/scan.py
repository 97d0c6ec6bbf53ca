"""SCAn (Tang et al., USENIX Security 2021) with AdvrBD's repair, "SCAnFT": specs/defenses.md §6.

Post-training detection on the backdoored model's penultimate features (eval mode, no
augmentation), following backdoor-toolbox's ``cleansers_tool_box/scan.py``, fully vectorised:

1. features centred by their global mean;
2. global model (EM): ``r = mu_class + eps`` with between-class covariance ``S_u`` and
   within-class covariance ``S_e``; posterior-mean class means with ``F = pinv(S_e)`` and
   ``pinv(n_k S_u + S_e)``, until ``|dS_u| + |dS_e| < tol`` or ``em_iters``;
3. local model per class: untangle the class into two subgroups from a seeded random start
   (assign x to group 1 iff ``mu1'F mu1 - mu2'F mu2 - 2 x'F(mu1 - mu2) < 0``);
4. per class the log-likelihood ratio of the two-subgroup model against the one-mean model,
   divided by the maximum over classes; ``J_k = |a_k - median(a)| / (1.4826 MAD(a))``;
5. class k is contaminated if ``J_k > threshold`` (default e^2 as in several reimplementations;
   backdoor-toolbox's cleanser uses e = 2.718); in a flagged class the poison subgroup is the
   smaller one (no clean data), or with ``trusted_reserve`` the one holding fewer reserve samples;
6. repair: ``repair="unlearn"`` (default, our proposal for AdvrBD's stripped values): from the
   backdoored model, ``repair_epochs`` of one ascent pass over the flagged samples and one descent
   pass over the rest at ``repair_lr``; ``repair="retrain"``: a fresh model trained with the
   recipe on D without the flagged samples.

Clean data: none by default (the global model is fitted on D, relying on poison being a
minority).  ``trusted_reserve: true`` fits the global model on the harness's clean reserve, as
the reference design does, and the run is then reported as using clean data
(``uses_clean_data`` is a per-instance property).

A ridge ``ridge * I`` is added before every pseudo-inverse (spec pitfall: small classes).
Epoch fields accept ``None``: repair 0.1 x recipe epochs, retrain 1.0 x recipe epochs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from . import register_defense
from ._common import epochs_or_derived, unlearn_relearn
from .base import Defense, DefenseContext, Outcome


def _pinv(a: torch.Tensor, ridge: float) -> torch.Tensor:
    return torch.linalg.pinv(a + ridge * torch.eye(a.shape[0], dtype=a.dtype, device=a.device), hermitian=True)


def _class_sums(x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, y, x)
    counts = torch.bincount(y, minlength=k).to(x.dtype)
    return sums, counts


def global_model(x: torch.Tensor, y: torch.Tensor, k: int, iters: int = 100, tol: float = 1e-5,
                 ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """EM estimate of (S_u, S_e) for centred features ``x`` (float64) with labels ``y``."""
    sums, counts = _class_sums(x, y, k)
    means = sums / counts.clamp(min=1)[:, None]
    su = torch.cov(means[y].T)
    se = torch.cov((x - means[y]).T)
    for _ in range(iters):
        f = _pinv(se, ridge)
        suf = su @ f
        # G_k = -pinv(n_k S_u + S_e) S_u F ; u_k = -S_e G_k sum_{i in k} x_i
        a = counts[:, None, None] * su[None] + se[None]                        # K x M x M
        ginv = torch.linalg.pinv(a + ridge * torch.eye(a.shape[1], dtype=a.dtype), hermitian=True)
        g = -ginv @ suf                                                         # K x M x M
        u_m = -(se[None] @ g @ sums[:, :, None]).squeeze(2)                     # K x M
        u_m = torch.where(counts[:, None] > 0, u_m, torch.zeros_like(u_m))
        su_new = torch.cov(u_m[y].T)
        se_new = torch.cov((x - u_m[y]).T)
        dist = torch.linalg.norm(su_new - su) + torch.linalg.norm(se_new - se)
        su, se = su_new, se_new
        if dist < tol:
            break
    return su, se


def find_split(x: torch.Tensor, f: torch.Tensor, gen: torch.Generator, iters: int = 100):
    """Two-subgroup untangling of one class's centred features ``x``: bool group-1 mask, mu1, mu2."""
    n = x.shape[0]
    if n < 2:
        return torch.zeros(n, dtype=torch.bool), x.mean(0), x.mean(0)
    z = torch.rand(n, generator=gen, dtype=torch.float64) >= 0.5
    if not z.any():
        z[0] = True
    if z.all():
        z[0] = False
    mu1, mu2 = x[z].mean(0), x[~z].mean(0)
    for _ in range(iters):
        if not z.any() or z.all():
            break
        mu1, mu2 = x[z].mean(0), x[~z].mean(0)
        bias = mu1 @ f @ mu1 - mu2 @ f @ mu2
        delta = x @ (f @ (mu1 - mu2))
        new = (bias - 2 * delta) < 0
        if torch.equal(new, z) or torch.equal(new, ~z):
            z = new
            break
        z = new
    if z.any() and not z.all():
        mu1, mu2 = x[z].mean(0), x[~z].mean(0)
    return z, mu1, mu2


def split_statistic(x: torch.Tensor, su: torch.Tensor, se: torch.Tensor, f: torch.Tensor, z: torch.Tensor,
                    mu1: torch.Tensor, mu2: torch.Tensor, ridge: float = 1e-6) -> float:
    """Log-likelihood ratio (per sample) of the two-subgroup model against the one-mean model."""
    n = x.shape[0]
    # the global model's shrinkage (posterior-mean) estimate of the class mean, as in its E-step:
    # S_e pinv(n S_u + S_e) S_u F sum(x)  (= S_u (n S_u + S_e)^-1 sum(x))
    mu = se @ _pinv(n * su + se, ridge) @ su @ f @ x.sum(0)
    b1 = mu @ f @ mu - mu1 @ f @ mu1
    b2 = mu @ f @ mu - mu2 @ f @ mu2
    n1 = int(z.sum())
    sc = n1 * b1 + (n - n1) * b2
    e = torch.where(z[:, None], (mu - mu1)[None], (mu - mu2)[None])         # N x M
    sc = sc - 2 * ((x @ f) * e).sum()
    return float(sc / n)


def anomaly_index(a: torch.Tensor) -> torch.Tensor:
    med = a.median()
    dev = (a - med).abs()
    mad = dev.median() * 1.4826
    return dev / mad.clamp(min=1e-12)


def scan_detect(feats: torch.Tensor, y: torch.Tensor, k: int, gen: torch.Generator, threshold: float,
                ref_feats: torch.Tensor | None = None, ref_y: torch.Tensor | None = None,
                em_iters: int = 100, tol: float = 1e-5, ridge: float = 1e-6) -> dict:
    """SCAn on features ``feats`` (N x M).  With references (trusted clean features) the global
    model is fitted on them and they join each class's split; the poison subgroup is the one
    holding fewer references.  Returns flagged classes, J, statistics and the flagged indices."""
    x = feats.double()
    mean = x.mean(0)
    xc = x - mean
    if ref_feats is not None:
        rc = ref_feats.double() - mean
        su, se = global_model(rc, ref_y, k, em_iters, tol, ridge)
    else:
        rc = None
        su, se = global_model(xc, y, k, em_iters, tol, ridge)
    f = _pinv(se, ridge)
    stats = torch.zeros(k, dtype=torch.float64)
    groups = []
    for c in range(k):
        idx = (y == c).nonzero().squeeze(1)
        xs = xc[idx]
        n_ref = 0
        if rc is not None:
            r = rc[ref_y == c]
            n_ref = len(r)
            xs = torch.cat([xs, r])
        z, mu1, mu2 = find_split(xs, f, gen)
        stats[c] = split_statistic(xs, su, se, f, z, mu1, mu2, ridge) if len(xs) >= 2 else 0.0
        z_d, z_r = z[:len(idx)], z[len(idx):]
        if n_ref:  # poison = the subgroup with fewer clean references (ties: the smaller one)
            r1, r2 = int(z_r.sum()), int((~z_r).sum())
            poison_is_1 = r1 < r2 or (r1 == r2 and int(z.sum()) <= int((~z).sum()))
        else:
            poison_is_1 = int(z_d.sum()) <= int((~z_d).sum())
        groups.append(idx[z_d] if poison_is_1 else idx[~z_d])
    a = stats / stats.max() if stats.max() > 0 else stats
    j = anomaly_index(a)
    flagged_classes = (j > threshold).nonzero().squeeze(1).tolist()
    flagged = torch.cat([groups[c] for c in flagged_classes]).sort().values if flagged_classes else \
        torch.empty(0, dtype=torch.long)
    return {"flagged_classes": flagged_classes, "j": j, "stats": stats, "flagged": flagged}


@register_defense("scanft")
@dataclass
class SCAnFT(Defense):
    """SCAn detection of contaminated classes and samples, then unlearning (or retraining without them)."""

    #: J threshold for a contaminated class (e^2; backdoor-toolbox's cleanser: e = 2.718)
    threshold: float = math.e ** 2
    #: fit the global model on the clean reserve (reference design; the run then uses clean data)
    trusted_reserve: bool = False
    #: "unlearn" (ascent on flagged + descent on the rest, from the backdoored model) or "retrain"
    repair: str = "unlearn"
    #: unlearn/relearn epochs (spec proposal 10); None = 0.1 x recipe epochs
    repair_epochs: int | None = 10
    #: unlearn/relearn learning rate (constant; spec proposal 5e-4, as ABL)
    repair_lr: float = 5e-4
    #: epochs of the retrain mode; None = the recipe's epochs
    retrain_epochs: int | None = None
    #: maximum EM iterations of the global model and of each split
    em_iters: int = 100
    #: EM convergence tolerance on |dS_u| + |dS_e|
    tol: float = 1e-5
    #: ridge added before every pseudo-inverse
    ridge: float = 1e-6

    needs_backdoored_model = True
    display_name = "SCAnFT"
    REPAIRS: ClassVar = ("unlearn", "retrain")

    def __post_init__(self):
        if self.repair not in self.REPAIRS:
            raise ValueError(f"repair: '{self.repair}' is not one of {list(self.REPAIRS)}")

    @property
    def uses_clean_data(self) -> bool:  # type: ignore[override]
        return self.trusted_reserve

    def detect(self, ctx: DefenseContext, model) -> dict:
        trainer = ctx.trainer
        feats = trainer.features(model, ctx.train.x)
        ref_feats = ref_y = None
        if self.trusted_reserve:
            if ctx.clean_reserve is None:
                raise RuntimeError("trusted_reserve needs the clean reserve, which the harness did not provide")
            ref_feats, ref_y = trainer.features(model, ctx.clean_reserve.x), ctx.clean_reserve.y
        gen = torch.Generator().manual_seed(ctx.seed + 21)
        return scan_detect(feats, ctx.train.y, ctx.num_classes, gen, self.threshold, ref_feats, ref_y,
                           self.em_iters, self.tol, self.ridge)

    def run(self, ctx: DefenseContext) -> Outcome:
        model = ctx.backdoored_model()
        det = self.detect(ctx, model)
        flagged = det["flagged"]
        keep = torch.ones(len(ctx.train), dtype=torch.bool)
        keep[flagged] = False
        info = {"flagged_classes": det["flagged_classes"], "j": [round(float(v), 4) for v in det["j"]],
                "n_flagged": len(flagged), "repair": self.repair}
        if len(flagged) == 0:
            info["repair"] = "none (nothing flagged)"
            return Outcome(model, flagged=flagged, info=info)
        if self.repair == "retrain":
            model = ctx.trainer.fit(ctx.make_model(), ctx.train, indices=keep.nonzero().squeeze(1),
                                    epochs=epochs_or_derived(self.retrain_epochs, ctx, 1.0), seed=ctx.seed)
        else:
            model = unlearn_relearn(ctx, model, ctx.train, flagged, keep.nonzero().squeeze(1),
                                    epochs=epochs_or_derived(self.repair_epochs, ctx, 0.1), lr=self.repair_lr,
                                    seed=ctx.seed + 22, tag="repair")
        return Outcome(model, flagged=flagged, info=info)

