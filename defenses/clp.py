"""CLP: Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022).

Data-free.  For every convolution ``conv`` whose output feeds a BatchNorm2d ``bn`` directly, the
upper bound of channel ``k``'s Lipschitz constant is::

    UCLC_k = sigma_max( conv.weight[k].reshape(C_in / groups, kh * kw) * |gamma_k / sigma_k| ),
    sigma_k = sqrt(max(running_var_k, bn_eps))

(the reference code uses sqrt(running_var) with no eps; the clamp only matters for dead channels
whose variance is 0, where it guards against a division by zero).  Within each pair, channels with
``UCLC_k > mean + u * std`` (std over the layer's channels, unbiased as ``torch.std``) are pruned by
setting ``gamma_k = beta_k = 0``.  All SVDs of a layer run as one batched call.

**Pairing.**  The reference code pairs each BN with the most recent conv in module order.  That
is wrong for pre-activation ResNets, where BN comes *before* the conv: ``bn1`` of a PreAct block
normalises the residual sum, not the previous block's ``conv2``.  Here the pairs come from the
model's dataflow (``torch.fx``): a pair is a BN whose input is exactly a conv's output, with that
output used by nothing else, possibly through a max pool (per channel and 1-Lipschitz, so the
channel's bound carries through it: the fast network pools between a group's first conv and its
BN, and the reference's module-order pairing pairs them too).  So this implementation **adapts** to PreAct-ResNet-18 rather than
refusing it: it prunes the genuine pairs (each block's ``conv1 -> bn2``) and leaves the
pre-activation BNs (``bn1`` of each block, the final BN) alone, listing them in ``info``.  With
``strict = True`` it instead refuses any model that has a BN not fed directly by a conv, with an
error that names them.  A model with no conv->BN pair at all (or one ``torch.fx`` cannot trace)
is always refused with a clear message.

Repair: off by default (the original is data-free and does no fine-tuning; the AdvrBD paper adds
an unspecified repair phase).  ``repair_epochs > 0`` fine-tunes after pruning, on the clean
reserve by default, in which case the run is marked as using clean data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx
import torch.nn as nn

from bench.core.defense import Defense, DefenseContext, Needs, Outcome
from bench.core.registry import register_defense
from bench.core.trainer import Schedule

from .finetuning import require_reserve


#: modules that act on each channel alone and are 1-Lipschitz: a conv's channel bound holds through them
PER_CHANNEL_1_LIPSCHITZ = (nn.MaxPool2d,)


class CLPError(ValueError):
    """The model does not have the conv -> BN structure CLP assumes."""


def conv_bn_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], list[str]]:
    """``([(conv_name, bn_name), ...], [unpaired BN names])`` from the traced dataflow."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # data-dependent control flow etc.
        raise CLPError(f"CLP needs the model's conv -> BN dataflow, but torch.fx cannot trace "
                       f"{type(model).__name__}: {e}") from e
    modules = dict(model.named_modules())
    pairs, unpaired = [], []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        while (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1
               and isinstance(modules.get(src.target), PER_CHANNEL_1_LIPSCHITZ)):
            src = src.args[0]  # a max pool between conv and BN keeps the channel's bound
        ok = (isinstance(src, torch.fx.Node) and src.op == "call_module"
              and isinstance(modules.get(src.target), nn.Conv2d) and len(src.users) == 1
              and modules[src.target].out_channels == modules[node.target].num_features)
        if ok:
            pairs.append((src.target, node.target))
        else:
            unpaired.append(node.target)
    return pairs, unpaired


def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d, eps: float) -> torch.Tensor:
    """UCLC of every output channel of ``bn(conv(.))`` (one batched SVD)."""
    w = conv.weight.detach().float()
    w = w.reshape(w.shape[0], w.shape[1], -1)
    sigma = bn.running_var.detach().float().clamp_min(eps).sqrt()
    scale = (bn.weight.detach().float() / sigma).abs()
    return torch.linalg.svdvals(w * scale.view(-1, 1, 1)).amax(dim=1)


@register_defense("clp")
@dataclass
class CLP(Defense):
    """Data-free pruning of channels with outlying channel Lipschitz constants (BN gamma, beta := 0)."""

    #: threshold in standard deviations above the layer's mean UCLC (CLP code and BackdoorBench: 3)
    u: float = 3.0
    #: variance floor in sigma = sqrt(max(running_var, bn_eps)) (guards dead channels; the code has none)
    bn_eps: float = 1e-5
    #: refuse models with BN layers not fed directly by a conv (e.g. PreAct-ResNet) instead of skipping them
    strict: bool = False
    #: fine-tuning epochs after pruning (0 = none, the original; the AdvrBD paper adds an unspecified repair)
    repair_epochs: int = 0
    #: data for the optional repair: "reserve" (clean reserve; marks the run as using clean data) or "poisoned"
    repair_data: Literal["reserve", "poisoned"] = "reserve"
    #: repair learning rate
    repair_lr: float = 0.01
    #: repair lr schedule
    repair_schedule: Schedule = "cosine"

    display_name = "CLP"

    def needs(self) -> Needs:
        # only a repair on the clean reserve breaks the data-free threat model
        # and only a repair trains (pruning itself is data-free and training-free)
        return Needs(backdoored_model=True, clean_data=self.repair_epochs > 0 and self.repair_data == "reserve",
                     training=self.repair_epochs > 0)

    @torch.no_grad()
    def prune(self, model: nn.Module) -> dict:
        """Prune ``model`` in place; return per-layer diagnostics."""
        pairs, unpaired = conv_bn_pairs(model)
        if not pairs:
            raise CLPError(f"CLP found no conv -> BatchNorm2d pair in {type(model).__name__}; it needs "
                           "convolutions followed directly by BN layers")
        if unpaired and self.strict:
            raise CLPError(f"CLP (strict) assumes every BatchNorm2d directly follows a Conv2d, but "
                           f"{len(unpaired)} do not (BN before conv, as in PreAct-ResNet, or BN on a "
                           f"residual sum): {', '.join(unpaired[:6])}{' ...' if len(unpaired) > 6 else ''}. "
                           "Use strict=false to prune only the genuine conv -> BN pairs.")
        modules = dict(model.named_modules())
        layers, total = [], 0
        for conv_name, bn_name in pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            if bn.weight is None or bn.running_var is None:
                raise CLPError(f"CLP needs affine BN with running statistics; {bn_name} has none")
            lips = channel_lipschitz(conv, bn, self.bn_eps)
            threshold = (lips.mean() + self.u * lips.std()).item()
            idx = (lips > threshold).nonzero().squeeze(1)
            bn.weight[idx.to(bn.weight.device)] = 0
            bn.bias[idx.to(bn.bias.device)] = 0
            total += len(idx)
            layers.append({"conv": conv_name, "bn": bn_name, "channels": lips.numel(),
                           "threshold": threshold, "pruned": idx.tolist()})
        return {"pairs": len(pairs), "unpaired_bn": unpaired, "pruned_total": total,
                "channels_total": sum(x["channels"] for x in layers), "layers": layers}

    def run(self, ctx: DefenseContext) -> Outcome:
        model = ctx.backdoored_model()
        info = self.prune(model)
        if info["unpaired_bn"]:
            ctx.log.warning("CLP: %d BN layers are not fed directly by a conv and were left alone: %s",
                            len(info["unpaired_bn"]), info["unpaired_bn"])
        ctx.log.info("CLP: pruned %d of %d channels in %d conv->BN pairs", info["pruned_total"],
                     info["channels_total"], info["pairs"])
        if self.repair_epochs > 0:
            ctx.observe("pruned", model)
            data = require_reserve(ctx, "CLP repair") if self.repair_data == "reserve" else ctx.train
            model = ctx.trainer.fit(model, data, epochs=self.repair_epochs, lr=self.repair_lr,
                                    schedule=self.repair_schedule, seed=ctx.seed,
                                    recipe=ctx.trainer.recipe.for_tuning())
        return Outcome(model, info=info)
