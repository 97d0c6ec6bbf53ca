"""CutMix as a backdoor defense (Borgnia et al., ICASSP 2021).

Per batch, with probability ``p``: draw ``lambda ~ Beta(beta, beta)`` (optionally clamped to
``lambda_range``, as BackdoorBox does; off by default, as in the original CutMix), cut a box of
``W*sqrt(1-lambda)`` by ``H*sqrt(1-lambda)`` centred at a uniform random pixel and clipped to the
image, paste that region from a randomly permuted copy of the batch, recompute
``lambda = 1 - box area / image area`` and use the per-sample loss
``lambda * CE(out, y) + (1 - lambda) * CE(out, y_perm)``.  Otherwise plain CE.  One box and one
lambda per batch (as the reference CutMix code); everything batched.  Mixing runs after the
recipe's crop/flip, through the trainer's ``loss_fn`` hook.

Modes:

* ``"repair"`` (default, the AdvrBD paper's use): start from the backdoored model and train on
  the poisoned set with CutMix for ``repair_epochs = 20`` at ``repair_lr = 0.01`` (cosine; the
  paper's text available to us lost its values; these are ours, a short repair at the lr of
  the other repair defenses).
* ``"scratch"`` (Borgnia): train a fresh model on the poisoned set with CutMix using the matrix
  recipe (its epochs, lr and schedule).

No clean data either way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from bench.core.defense import Defense, DefenseContext, Needs, Outcome
from bench.core.registry import register_defense
from bench.core.trainer import Schedule


@dataclass
class CutMixLoss:
    """The CutMix loss as a ``Trainer.fit`` ``loss_fn`` hook (seeded, batched)."""

    p: float = 1.0
    beta: float = 1.0
    clamp: bool = False
    lambda_range: tuple[float, float] = (0.3, 0.7)
    seed: int = 0
    #: counters for diagnostics
    mixed_batches: int = 0
    plain_batches: int = 0
    gen: torch.Generator = field(init=False, repr=False)
    #: lambda and box (y1, y2, x1, x2) of the last mixed batch
    last_lambda: float | None = field(default=None, init=False)
    last_box: tuple | None = field(default=None, init=False)

    def __post_init__(self):
        self.gen = torch.Generator().manual_seed(self.seed)

    def state_dict(self) -> dict:
        """The mixing generator and the counters: saved with a training checkpoint, so that a
        resumed training draws the same boxes as an uninterrupted one."""
        return {"generator": self.gen.get_state(), "mixed_batches": self.mixed_batches,
                "plain_batches": self.plain_batches}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        self.mixed_batches, self.plain_batches = state["mixed_batches"], state["plain_batches"]

    def _uniform(self) -> float:
        return torch.rand((), generator=self.gen).item()

    def sample_lambda(self) -> float:
        # torch's Beta sampler cannot take a generator: invert the CDF of a seeded uniform instead
        lam = _beta_icdf(self._uniform(), self.beta)
        if self.clamp:
            lam = min(max(lam, self.lambda_range[0]), self.lambda_range[1])
        return lam

    def box(self, lam: float, h: int, w: int) -> tuple[int, int, int, int]:
        """``(y1, y2, x1, x2)`` of a box of side ``sqrt(1-lam)`` times the image, clipped."""
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy = int(torch.randint(h, (), generator=self.gen))
        cx = int(torch.randint(w, (), generator=self.gen))
        y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        return y1, y2, x1, x2

    def mix(self, x: torch.Tensor, y: torch.Tensor):
        """``(x_mixed, y, y_perm, lam, box)``; ``lam`` is 1 - box area / image area."""
        h, w = x.shape[-2:]
        perm = torch.randperm(x.shape[0], generator=self.gen).to(x.device)
        y1, y2, x1, x2 = self.box(self.sample_lambda(), h, w)
        xm = x.clone()
        xm[:, :, y1:y2, x1:x2] = x[perm][:, :, y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
        return xm, y, y[perm], lam, (y1, y2, x1, x2)

    def __call__(self, model, x, y, idx):
        if self.p <= 0 or self._uniform() >= self.p:
            self.plain_batches += 1
            return F.cross_entropy(model(x).float(), y, reduction="none")
        xm, ya, yb, lam, box = self.mix(x, y)
        self.last_lambda, self.last_box = lam, box
        out = model(xm).float()
        self.mixed_batches += 1
        return lam * F.cross_entropy(out, ya, reduction="none") + (1 - lam) * F.cross_entropy(out, yb, reduction="none")


def _beta_icdf(u: float, beta: float) -> float:
    """Inverse CDF of the symmetric Beta(beta, beta) at ``u`` (closed form for beta = 1)."""
    if beta == 1.0:
        return u
    import scipy.special  # scikit-learn depends on scipy
    return float(scipy.special.betaincinv(beta, beta, u))


@register_defense("cutmix")
@dataclass
class CutMix(Defense):
    """Train with CutMix on the poisoned set: repair the backdoored model (default) or from scratch."""

    #: "repair" (from the backdoored model, the AdvrBD paper's use) or "scratch" (Borgnia: a fresh model)
    mode: Literal["repair", "scratch"] = "repair"
    #: probability of applying CutMix to a batch (BackdoorBox: 1.0)
    p: float = 1.0
    #: Beta(beta, beta) parameter of lambda (BackdoorBox: 1.0, i.e. uniform)
    beta: float = 1.0
    #: clamp lambda to lambda_range before drawing the box (BackdoorBox does; the original CutMix does not)
    clamp_lambda: bool = False
    #: the clamping range
    lambda_range: tuple[float, float] = (0.3, 0.7)
    #: repair mode: epochs on the poisoned set (spec proposal 20)
    repair_epochs: int = 20
    #: repair mode: learning rate (spec proposal 0.01)
    repair_lr: float = 0.01
    #: repair mode: lr schedule
    repair_schedule: Schedule = "cosine"

    display_name = "CutMix"

    def __post_init__(self):
        super().__post_init__()
        lo, hi = self.lambda_range
        if lo > hi:
            raise ValueError(f"lambda_range: {self.lambda_range} must satisfy low <= high")

    def needs(self) -> Needs:
        # training from scratch does not start from (or need) the backdoored model
        return Needs(backdoored_model=self.mode == "repair")

    def loss(self, seed: int) -> CutMixLoss:
        return CutMixLoss(self.p, self.beta, self.clamp_lambda, tuple(self.lambda_range), seed)

    def run(self, ctx: DefenseContext) -> Outcome:
        loss_fn = self.loss(ctx.seed)
        if self.mode == "repair":
            model = ctx.trainer.fit(ctx.backdoored_model(), ctx.train, loss_fn=loss_fn, epochs=self.repair_epochs,
                                    lr=self.repair_lr, schedule=self.repair_schedule, seed=ctx.seed,
                                    recipe=ctx.trainer.recipe.for_tuning(), checkpoint=ctx.checkpoint("repair"),
                                    name="CutMix repair")
        else:
            model = ctx.trainer.fit(ctx.make_model(), ctx.train, loss_fn=loss_fn, seed=ctx.seed,
                                    checkpoint=ctx.checkpoint("scratch"), name="CutMix scratch")
        return Outcome(model, info={"mode": self.mode, "mixed_batches": loss_fn.mixed_batches,
                                    "plain_batches": loss_fn.plain_batches})
