"""NONE (Wang et al., NeurIPS 2022: "Training with More Confidence"), specs/defenses.md §2.

Training-time, no clean data.  Trains from scratch for ``e1_epochs`` (default: the recipe's
epochs), then per round:

a. record: all of D, eval mode, no augmentation: softmax P (N x K) and, for every monitored conv,
   the spatial maximum of its output per channel (forward hooks on the conv, i.e. before BN);
b. score: per class k, H_k = {P_k > lambda_h}, L_k = {P_k < lambda_l}; a channel's score is
   max_k [max over H_k of a - (mean + outlier_std * std of a over L_k)] (classes with empty H_k
   or L_k are skipped);
c. select the ``ceil(reset_fraction * C)`` top-scoring channels of each monitored conv;
d. flag: the activation of each conv's single top channel, summed over convs, split in two by
   the exact Jenks natural break (:func:`defenses._common.jenks_two_class`); samples at or above
   the break are removed from the training set from then on (``flagged``);
e. reset (zero) every selected channel: its conv filter (and bias), the BN gamma and beta that
   follow it, and the matching input slice of the conv that consumes it, or the head's columns
   when it feeds global pooling directly;
f. fine-tune ``e2_epochs`` on the remaining samples at ``none_lr`` (constant), augmentation on,
   BatchNorm frozen (``Trainer.fit(freeze_bn=True)``).

Monitored convs (``monitor_from_stage``; None = ``len(model.body) // 2``): every non-grouped
Conv2d in ``model.body[monitor_from_stage:]``.  For the ResNets (body = stem, layer1..layer4) this
is layer2-layer4 including the downsample convs, as in the official code (15 convs for
ResNet-18); for the small CNN (3 stages) the last two stages (4 convs, 64/64/128/128 channels).
Depthwise (grouped) convs are skipped.

The consumer of a conv's channels is zeroed only where it is unambiguous: the next conv in module
order when both sit in the same block, or the conv is in a plain conv-BN-ReLU chain whose
parent is a stage ``nn.Sequential`` (small CNN, MobileNet's inner convs); the head columns when such
a chain conv is the last conv of the body.  Convs whose output enters a residual sum (ResNet
``conv2`` and shortcut convs) keep their consumers: zeroing a residual-stream channel downstream
would remove the skip path too.  Their output is still exactly zero after the reset, because BN
gamma = beta = 0.  (The official code's index-list bug for layer4 is not reproduced.)

Epoch fields accept ``None``: ``e1_epochs`` None = recipe epochs; ``e2_epochs`` None = 0.1 x
recipe epochs (the spec's 20 of a 200-epoch E1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import register_defense
from ._common import epochs_or_derived, jenks_two_class
from .base import Defense, DefenseContext, Outcome

_PASS = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity)


def monitored_convs(model, from_stage: int | None = None) -> list[tuple[str, nn.Conv2d]]:
    start = len(model.body) // 2 if from_stage is None else from_stage
    out = []
    for i in range(start, len(model.body)):
        for name, m in model.body[i].named_modules():
            if isinstance(m, nn.Conv2d) and m.groups == 1:
                out.append((f"body.{i}.{name}", m))
    return out


def reset_plan(model) -> dict[str, dict]:
    """For every conv of ``model.body``: its BN and its consumer ("conv", module) / ("head", None) / None."""
    leaves = [(n, m) for n, m in model.body.named_modules() if len(list(m.children())) == 0]
    parent_of = {}
    for pname, p in model.body.named_modules():
        for cname, c in p.named_children():
            parent_of[id(c)] = p
    plan = {}
    for pos, (name, m) in enumerate(leaves):
        if not isinstance(m, nn.Conv2d):
            continue
        bn = leaves[pos + 1][1] if pos + 1 < len(leaves) and isinstance(leaves[pos + 1][1], nn.BatchNorm2d) else None
        nxt, q = None, pos + 1
        while q < len(leaves) and isinstance(leaves[q][1], _PASS):
            q += 1
        if q < len(leaves) and isinstance(leaves[q][1], nn.Conv2d):
            nxt = leaves[q][1]
        parent = parent_of.get(id(m))
        grand = parent_of.get(id(parent)) if parent is not None else None
        chain = isinstance(parent, nn.Sequential) and isinstance(grand, nn.Sequential)
        consumer = None
        if nxt is not None and q < len(leaves):
            same_block = parent is not None and parent is parent_of.get(id(nxt))
            if (same_block or chain) and nxt.in_channels == m.out_channels and nxt.groups == 1:
                consumer = ("conv", nxt)
        elif q >= len(leaves) and chain and model.head.in_features == m.out_channels:
            consumer = ("head", None)
        plan["body." + name] = {"bn": bn, "consumer": consumer}
    return plan


@torch.no_grad()
def record(ctx: DefenseContext, model, convs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Softmax (N x K) and per monitored conv the spatial max of each channel (N x C)."""
    buffers: list[list[torch.Tensor]] = [[] for _ in convs]

    def hook(i):
        def fn(mod, inp, out):
            buffers[i].append(out.float().amax(dim=(2, 3)).cpu())
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(convs)]
    try:
        logits = ctx.trainer.logits(model, ctx.train.x)
    finally:
        for h in handles:
            h.remove()
    return logits.softmax(1), [torch.cat(b) for b in buffers]


def channel_scores(probs: torch.Tensor, act: torch.Tensor, lambda_h: float, lambda_l: float,
                   outlier_std: float) -> torch.Tensor:
    """Per channel: max over classes of (max over H_k) - (mean + outlier_std * std over L_k)."""
    score = torch.full((act.shape[1],), -math.inf, dtype=torch.float64)
    a = act.double()
    for k in range(probs.shape[1]):
        hi, lo = probs[:, k] > lambda_h, probs[:, k] < lambda_l
        if not hi.any() or int(lo.sum()) < 2:
            continue
        s = a[hi].amax(0) - (a[lo].mean(0) + outlier_std * a[lo].std(0))
        score = torch.maximum(score, s)
    return score


@torch.no_grad()
def reset_channels(model, conv: nn.Conv2d, channels: torch.Tensor, plan: dict) -> None:
    ch = channels.to(conv.weight.device)
    conv.weight[ch] = 0
    if conv.bias is not None:
        conv.bias[ch] = 0
    bn = plan.get("bn")
    if bn is not None:
        bn.weight[ch] = 0
        bn.bias[ch] = 0
    consumer = plan.get("consumer")
    if consumer is not None:
        kind, mod = consumer
        if kind == "conv":
            mod.weight[:, ch] = 0
        else:
            model.head.weight[:, ch] = 0


@register_defense("nonlinearity")
@dataclass
class NONE(Defense):
    """NONE: reset neurons with hyperplane-like (backdoor) behaviour and drop the samples that drive them."""

    #: normal training epochs from scratch (spec E1 = 200); None = the recipe's epochs
    e1_epochs: int | None = None
    #: fine-tuning epochs per round (spec E2 = 20 of E1 = 200); None = 0.1 x recipe epochs
    e2_epochs: int | None = 20
    #: rounds of detect/reset/fine-tune (spec R = 1)
    rounds: int = 1
    #: constant fine-tuning learning rate (official README 1e-4)
    none_lr: float = 1e-4
    #: fraction of each monitored conv's channels reset per round (official README 0.03)
    reset_fraction: float = 0.03
    #: high-confidence threshold lambda_h
    lambda_h: float = 0.9
    #: low-confidence threshold lambda_l
    lambda_l: float = 0.1
    #: the outlier rule's multiple of the std over low-confidence samples
    outlier_std: float = 3.0
    #: first monitored stage of model.body; None = len(body) // 2 (ResNet: layer2; small CNN: stage 2)
    monitor_from_stage: int | None = None

    display_name = "NONE"

    def __post_init__(self):
        if not 0 < self.reset_fraction <= 1:
            raise ValueError(f"reset_fraction: {self.reset_fraction} must be in (0, 1]")
        if self.rounds < 1:
            raise ValueError(f"rounds: {self.rounds} must be >= 1")

    def detect(self, ctx: DefenseContext, model, keep: torch.Tensor | None = None) -> dict:
        """Score channels on the current model; select channels per conv; Jenks-flag samples.

        ``keep`` (bool N): samples still in the training set; only these are recorded and flagged."""
        convs = monitored_convs(model, self.monitor_from_stage)
        probs, acts = record(ctx, model, convs)
        if keep is None:
            keep = torch.ones(len(probs), dtype=torch.bool)
        probs = probs[keep]
        selected, total = [], torch.zeros(int(keep.sum()), dtype=torch.float64)
        for (name, conv), a in zip(convs, acts):
            a = a[keep]
            s = channel_scores(probs, a, self.lambda_h, self.lambda_l, self.outlier_std)
            if not torch.isfinite(s).any():
                selected.append((name, conv, torch.empty(0, dtype=torch.long)))
                continue
            n_sel = math.ceil(self.reset_fraction * a.shape[1])
            top = s.argsort(descending=True)
            selected.append((name, conv, top[:n_sel]))
            total += a[:, top[0]].double()
        brk = jenks_two_class(total)
        kept_idx = keep.nonzero().squeeze(1)
        flagged = kept_idx[total >= brk] if math.isfinite(brk) else torch.empty(0, dtype=torch.long)
        return {"selected": selected, "score_sum": total, "break": brk, "flagged": flagged}

    def run(self, ctx: DefenseContext) -> Outcome:
        trainer, data = ctx.trainer, ctx.train
        model = trainer.fit(ctx.make_model(), data, epochs=epochs_or_derived(self.e1_epochs, ctx, 1.0), seed=ctx.seed)
        ctx.observe("trained", model)
        keep = torch.ones(len(data), dtype=torch.bool)
        info = {"rounds": []}
        for r in range(self.rounds):
            det = self.detect(ctx, model, keep)
            keep[det["flagged"]] = False
            plan = reset_plan(model)
            n_reset = 0
            for name, conv, ch in det["selected"]:
                if len(ch):
                    reset_channels(model, conv, ch, plan.get(name, {}))
                    n_reset += len(ch)
            ctx.observe(f"reset{r + 1}", model)
            model = trainer.fit(model, data, indices=keep.nonzero().squeeze(1), lr=self.none_lr,
                                schedule="constant", epochs=epochs_or_derived(self.e2_epochs, ctx, 0.1),
                                freeze_bn=True, seed=ctx.seed + 31 + r)
            ctx.observe(f"finetune{r + 1}", model)
            info["rounds"].append({"n_flagged": len(det["flagged"]), "n_reset": n_reset,
                                   "break": det["break"]})
        flagged = (~keep).nonzero().squeeze(1)
        info["n_flagged"] = len(flagged)
        return Outcome(model, flagged=flagged, info=info)
