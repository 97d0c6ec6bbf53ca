"""NONE: NON-LinEarity training (Liu et al., NeurIPS 2022, "Training with More Confidence:
Mitigating Injected and Natural Backdoors During Training").

Follows the authors' code (RU-System-Software-and-Security/NONE: run_none.py,
none/compromised_detection.py ``analyze_neuros``, none/reset_neurons.py ``reset``).
Training-time, no clean data.  Trains from scratch for ``e1_epochs``, then per round:

a. record: all of D, eval mode, no augmentation: softmax P (N x K) and, for every monitored conv,
   the spatial maximum of its output per channel.  Hooks sit on the conv itself (before BN), except
   for a ResNet shortcut conv, whose value is taken after its BN, at the output of the shortcut
   branch, where the authors' code hooks its ``downsample`` module;
b. score: per class k, H_k = {P_k > lambda_h}, L_k = {P_k < lambda_l}; a channel's score is
   max_k [max over H_k of a - (mean + outlier_std * std of a over L_k)] with the population std
   (numpy's default, as the authors' code).  A class with empty H_k contributes a score of 0, as
   in the authors' code, where the score table starts at zero;
c. select the ``ceil(reset_fraction * C)`` top-scoring channels of each monitored conv;
d. flag: the activation of each conv's single top channel, summed over convs, split in two by
   the exact Jenks natural break (:func:`defenses._common.jenks_two_class`).  Like the authors'
   code, which compares with ``jenkspy.jenks_breaks(...)[1]``, the largest value of the lower
   class, samples at or above that value are flagged: the lower class's maximum is flagged too.
   With ``jenks_input = "jenkspy-0.2.0"`` the break is computed on the N scores plus N copies of
   the first sample's score: the authors' call ``jenks_breaks(scores.reshape(-1, 1), nb_class=2)``
   computes exactly that with jenkspy 0.2.0, the version their requirements pin, which selects the
   finite values of a 2-D array with ``np.argwhere(...).reshape(-1)``, interleaving every row index
   with a 0 (newer jenkspy rejects the call).  The default, "scores", is the split the paper and the
   code intend;
e. reset (zero) the selected channels (see "Reset" below);
f. fine-tune ``e2_epochs`` at ``none_lr`` (constant) on D minus this round's flagged samples,
   augmentation on, BatchNorm frozen (``Trainer.fit(freeze_bn=True)``).

Every round records and flags all of D again and trains on D minus that round's flags, as the
authors' code (its removal is not cumulative); ``Outcome.flagged`` is the last round's set.

**Monitored convs** (``monitor_from_stage``; None = the authors' choice per architecture):
VGG-style bodies (nothing but ``nn.Sequential`` chains of conv-BN-ReLU, e.g. the small CNN) monitor
every conv, as the authors' code does for VGG and NiN; bodies with residual blocks monitor
``model.body[len(body) // 2:]``, which for the ResNets (body = stem, layer1..layer4) is layer2 to
layer4 with the shortcut convs: the authors' 15 convs for ResNet-18, in their order (per block
conv1, shortcut, conv2).  Depthwise (grouped) convs are never monitored.

**Reset** (``reset_rule``).  A selected channel's conv filter (and bias) and the BN gamma and beta
that directly follow the conv are zeroed, and so is the matching input slice of its consumer:

* VGG-style chains (all rules): the next conv in the chain, or the head's columns after the last
  conv of the body, as the authors' VGG reset;
* ResNets with basic blocks (``BasicBlock``), rule ``"reference"`` (default) and ``"consumers"``:
  conv1's consumer is the block's conv2; conv2 (and the stem conv) feed the residual stream, and
  their consumer is the *next block's conv1* (not its shortcut conv nor the identity path), or the
  head's columns after the last block; a shortcut conv has no consumer.  These are the authors'
  ``reset`` rules.  ``"reference"`` also reproduces that function's index list in the last stage
  (layer4), which is never cleared except at the shortcut conv: the last stage's first conv1 also
  resets the channels selected in the previous conv (the preceding stage's last conv2), the
  shortcut conv starts a new list, and every later conv of the stage resets the union of its own
  channels and those listed before it, the last conv2 zeroing the head's columns of the union.
  ``"consumers"`` applies the same consumers to each conv's own channels only;
* rule ``"local"`` (the earlier behaviour of this module), and every other residual architecture
  (PreAct-ResNet, MobileNetV2, which the authors' code does not support): a consumer is zeroed
  only where it is unambiguous, the next conv in the same block or in a plain chain, or the head
  after a chain's last conv; convs whose output enters a residual sum keep their consumers (their
  output is still zero: BN gamma = beta = 0).  Under this rule the convs are taken in module order
  and a shortcut conv is recorded before its BN, as before.

A BN belongs to a conv only when it directly follows the conv inside the same module, so the
pre-activation BN of a PreAct block (which normalises the residual sum) is never zeroed.

**Deviations.**  E1 trains with the harness recipe (optimizer, schedule, augmentation) instead of
the authors' SGD lr 0.1 with x0.1 every 80 epochs, so NONE's first phase is the undefended
training; E2 starts a fresh SGD optimizer (recipe momentum and weight decay) at the constant
``none_lr``, where the authors' code keeps the E1 optimizer and its momentum.  BN gamma and beta of
VGG-style chains are zeroed too (the authors' VGG has no BN).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn as nn

from bench.core.defense import Defense, DefenseContext, Outcome
from bench.core.models import BasicBlock
from bench.core.params import Range
from bench.core.registry import register_defense

from ._common import jenks_two_class

_PASS = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity)


@dataclass(eq=False)
class Unit:
    """One conv of ``model.body`` and what a reset of its channels touches."""

    name: str                       #: qualified name in the model, e.g. ``body.3.0.conv2``
    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None       #: the BN fed directly by the conv (same parent module)
    probe: nn.Module                #: the module whose output is recorded
    stage: int                      #: index in ``model.body``
    #: ("conv", module) zeroes ``module.weight[:, ch]``; ("head", None) zeroes ``head.weight[:, ch]``
    consumers: list = field(default_factory=list)
    shortcut: bool = False          #: a ResNet shortcut (downsample) conv


def is_plain(model) -> bool:
    """True for VGG-style bodies: every module of ``model.body`` that has children is a Sequential."""
    return all(isinstance(m, nn.Sequential) for m in model.body.modules() if len(list(m.children())) > 0)


def _is_basic_resnet(model) -> bool:
    return any(isinstance(m, BasicBlock) for m in model.body.modules())


def _local_units(model) -> list[Unit]:
    """The ``"local"`` plan: module order; consumers only where unambiguous (see module doc)."""
    leaves = [(n, m) for n, m in model.body.named_modules() if len(list(m.children())) == 0]
    parent_of = {}
    for _, p in model.body.named_modules():
        for _, c in p.named_children():
            parent_of[id(c)] = p
    units = []
    for pos, (name, m) in enumerate(leaves):
        if not isinstance(m, nn.Conv2d):
            continue
        parent = parent_of.get(id(m))
        k = pos + 1  # the BN fed by the conv, looking past a max pool (the fast network pools first)
        while k < len(leaves) and isinstance(leaves[k][1], nn.MaxPool2d):
            k += 1
        nxt_leaf = leaves[k][1] if k < len(leaves) else None
        bn = nxt_leaf if (isinstance(nxt_leaf, nn.BatchNorm2d) and parent_of.get(id(nxt_leaf)) is parent
                          and nxt_leaf.num_features == m.out_channels) else None
        q = pos + 1
        while q < len(leaves) and isinstance(leaves[q][1], _PASS):
            q += 1
        grand = parent_of.get(id(parent)) if parent is not None else None
        chain = isinstance(parent, nn.Sequential) and isinstance(grand, nn.Sequential)
        consumers = []
        if q < len(leaves) and isinstance(leaves[q][1], nn.Conv2d):
            nxt = leaves[q][1]
            same_block = parent is not None and parent is parent_of.get(id(nxt))
            if (same_block or chain) and nxt.in_channels == m.out_channels and nxt.groups == 1:
                consumers = [("conv", nxt)]
        elif q >= len(leaves) and chain and model.head.in_features == m.out_channels:
            consumers = [("head", None)]
        units.append(Unit("body." + name, m, bn, m, int(name.split(".")[0]), consumers))
    return units


def _resnet_units(model) -> list[Unit]:
    """The authors' ResNet plan: per block conv1, shortcut, conv2; the stream feeds the next conv1."""
    units: list[Unit] = []
    stream: list[Unit] = []          # units whose output is the residual stream, awaiting a consumer
    for s, stage in enumerate(model.body):
        blocks = [b for b in stage.children() if isinstance(b, BasicBlock)]
        if not blocks:               # the stem: conv-BN-ReLU (plus max pool for large inputs)
            local = [u for u in _local_units(model) if u.stage == s]
            for u in local:
                u.consumers = []
            units += local
            stream = local[-1:]
            continue
        for j, b in enumerate(blocks):
            prefix = f"body.{s}.{j}"
            for u in stream:
                u.consumers = [("conv", b.conv1)]
            units.append(Unit(f"{prefix}.conv1", b.conv1, b.bn1, b.conv1, s, [("conv", b.conv2)]))
            if len(b.shortcut) > 0:
                sc = b.shortcut[0]
                units.append(Unit(f"{prefix}.shortcut.0", sc, b.shortcut[1], b.shortcut, s, [], shortcut=True))
            conv2 = Unit(f"{prefix}.conv2", b.conv2, b.bn2, b.conv2, s)
            units.append(conv2)
            stream = [conv2]
    for u in stream:
        u.consumers = [("head", None)]
    return units


def conv_units(model, rule: str = "reference") -> list[Unit]:
    """Every conv of ``model.body`` with its BN, recorded module and consumers, in processing order."""
    if rule != "local" and _is_basic_resnet(model):
        return _resnet_units(model)
    return _local_units(model)


def monitored_units(model, from_stage: int | None = None, rule: str = "reference") -> list[Unit]:
    """The convs NONE scores: see "Monitored convs" in the module docstring."""
    start = from_stage if from_stage is not None else (0 if is_plain(model) else len(model.body) // 2)
    return [u for u in conv_units(model, rule) if u.stage >= start and u.conv.groups == 1]


@torch.no_grad()
def record(ctx: DefenseContext, model, units) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Softmax (N x K) and per monitored unit the spatial max of each channel (N x C)."""
    buffers: list[list[torch.Tensor]] = [[] for _ in units]

    def hook(i):
        def fn(mod, inp, out):
            buffers[i].append(out.float().amax(dim=(2, 3)).cpu())
        return fn

    handles = [u.probe.register_forward_hook(hook(i)) for i, u in enumerate(units)]
    try:
        logits = ctx.trainer.logits(model, ctx.train.x)
    finally:
        for h in handles:
            h.remove()
    return logits.softmax(1), [torch.cat(b) for b in buffers]


def channel_scores(probs: torch.Tensor, act: torch.Tensor, lambda_h: float, lambda_l: float,
                   outlier_std: float) -> torch.Tensor:
    """Per channel: max over classes of (max over H_k) - (mean + outlier_std * std over L_k).

    The std is the population std; a class with empty H_k scores 0 (the authors' code fills a
    zero-initialised table and skips such classes)."""
    a = act.double()
    per_class = torch.zeros(probs.shape[1], act.shape[1], dtype=torch.float64)
    for k in range(probs.shape[1]):
        hi, lo = probs[:, k] > lambda_h, probs[:, k] < lambda_l
        if not hi.any():
            continue
        per_class[k] = a[hi].amax(0) - (a[lo].mean(0) + outlier_std * a[lo].std(0, unbiased=False))
    return per_class.amax(0)


def flag_threshold(total: torch.Tensor, jenks_input: str = "scores") -> float:
    """The authors' flag threshold: the largest value of the lower Jenks class (``breaks[1]``).

    ``jenks_input="jenkspy-0.2.0"`` computes the break, as the authors' code does with the jenkspy
    version it pins, on the scores plus ``len(total)`` copies of the first sample's score."""
    values = total
    if jenks_input == "jenkspy-0.2.0" and len(total):
        values = torch.cat([total, total[:1].expand(len(total))])
    brk = jenks_two_class(values)
    if not math.isfinite(brk):
        return brk
    lower = values[values < brk]
    return float(lower.max()) if len(lower) else brk


@torch.no_grad()
def _zero(model, unit: Unit, ch: torch.Tensor) -> None:
    ch = ch.to(unit.conv.weight.device)
    unit.conv.weight[ch] = 0
    if unit.conv.bias is not None:
        unit.conv.bias[ch] = 0
    if unit.bn is not None:
        unit.bn.weight[ch] = 0
        unit.bn.bias[ch] = 0
    for kind, mod in unit.consumers:
        if kind == "conv":
            mod.weight[:, ch] = 0
        else:
            model.head.weight[:, ch] = 0


@torch.no_grad()
def reset_selected(model, selected: dict[str, torch.Tensor], rule: str = "reference") -> int:
    """Zero the channels ``selected`` ({unit name: channel indices}) under ``rule``; returns the
    number of (conv, channel) pairs zeroed."""
    units = conv_units(model, rule)
    carry = rule == "reference" and _is_basic_resnet(model)
    last = len(model.body) - 1
    listed = torch.empty(0, dtype=torch.long)
    n = 0
    for u in units:
        own = selected.get(u.name, torch.empty(0, dtype=torch.long)).long().cpu()
        if carry and u.stage == last:
            # the authors' index list: kept from the previous conv, restarted at the shortcut conv
            listed = own if u.shortcut else torch.cat([listed, own])
        else:
            listed = own
        if len(listed):
            ch = torch.unique(listed)
            _zero(model, u, ch)
            n += len(ch)
    return n


@register_defense("nonlinearity")
@dataclass
class NONE(Defense):
    """NONE: reset neurons with hyperplane-like (backdoor) behaviour and drop the samples that drive them."""

    #: normal training epochs from scratch before the first round (authors' README for CIFAR-10: 200)
    e1_epochs: int = field(default=200, metadata={"range": Range(1)})
    #: fine-tuning epochs per round (authors' README and run_none.py default: 20)
    e2_epochs: int = 20
    #: rounds of detect/reset/fine-tune (authors' README for injected backdoors: 1)
    rounds: int = 1
    #: constant fine-tuning learning rate (authors' README: 1e-4)
    none_lr: float = 1e-4
    #: fraction of each monitored conv's channels reset per round (authors' README for CIFAR-10: 0.03)
    reset_fraction: float = field(default=0.03, metadata={"range": Range(0, 1, low_open=True)})
    #: high-confidence threshold lambda_h (authors' run_none.py default: 0.9)
    lambda_h: float = 0.9
    #: low-confidence threshold lambda_l (authors' run_none.py default: 0.1)
    lambda_l: float = 0.1
    #: the outlier rule's multiple of the std over low-confidence samples (authors' code: 3)
    outlier_std: float = 3.0
    #: first monitored stage of model.body; None = the authors' choice (VGG-style: all, ResNet: layer2 on)
    monitor_from_stage: int | None = None
    #: consumers zeroed with a channel: "reference" (authors' reset, with its layer4 index list),
    #: "consumers" (authors' consumers, each conv's own channels), "local" (the earlier behaviour here)
    reset_rule: Literal["reference", "consumers", "local"] = "reference"
    #: values the Jenks break is computed on: "scores" (the method as described) or "jenkspy-0.2.0"
    #: (what the authors' call computes with the jenkspy version they pin; see the module docstring)
    jenks_input: Literal["scores", "jenkspy-0.2.0"] = "scores"

    version: ClassVar[int] = 3
    display_name = "NONE"

    def detect(self, ctx: DefenseContext, model) -> dict:
        """Score the channels of the current model on all of D; select channels; Jenks-flag samples."""
        units = monitored_units(model, self.monitor_from_stage, self.reset_rule)
        probs, acts = record(ctx, model, units)
        selected, total = {}, torch.zeros(len(probs), dtype=torch.float64)
        for u, a in zip(units, acts):
            s = channel_scores(probs, a, self.lambda_h, self.lambda_l, self.outlier_std)
            top = s.argsort(stable=True).flip(0)     # as numpy's argsort()[::-1]
            selected[u.name] = top[:math.ceil(self.reset_fraction * a.shape[1])]
            total += a[:, top[0]].double()
        thr = flag_threshold(total, self.jenks_input)
        flagged = (total >= thr).nonzero().squeeze(1) if math.isfinite(thr) else torch.empty(0, dtype=torch.long)
        return {"selected": selected, "score_sum": total, "threshold": thr, "flagged": flagged}

    def run(self, ctx: DefenseContext) -> Outcome:
        trainer, data = ctx.trainer, ctx.train
        model = trainer.fit(ctx.make_model(), data, epochs=self.e1_epochs, seed=ctx.seed,
                            checkpoint=ctx.checkpoint("e1"))
        ctx.observe("trained", model)
        info = {"rounds": []}
        flagged = torch.empty(0, dtype=torch.long)
        for r in range(self.rounds):
            det = self.detect(ctx, model)
            flagged = det["flagged"]
            keep = torch.ones(len(data), dtype=torch.bool)
            keep[flagged] = False
            n_reset = reset_selected(model, det["selected"], self.reset_rule)
            ctx.observe(f"reset{r + 1}", model)
            model = trainer.fit(model, data, indices=keep.nonzero().squeeze(1), lr=self.none_lr,
                                schedule="constant", epochs=self.e2_epochs, freeze_bn=True,
                                seed=ctx.seed_for(f"finetune{r + 1}"), recipe=trainer.recipe.for_tuning())
            ctx.observe(f"finetune{r + 1}", model)
            info["rounds"].append({"n_flagged": len(flagged), "n_reset": n_reset,
                                   "threshold": det["threshold"]})
        info["n_flagged"] = len(flagged)
        return Outcome(model, flagged=flagged, info=info)
