"""Differential tests of NONE, CLP and the Jenks break against their reference implementations.

The expected values below were produced once, outside this repository, by running the reference
code unchanged (except where a shim is named) on the fixed weights and inputs built by
:func:`fixed_model` and :func:`fixed_images`:

* NONE: RU-System-Software-and-Security/NONE at commit 624b80f, ``analyze_neuros``
  (none/compromised_detection.py) and ``reset`` (none/reset_neurons.py), on the authors' own
  ResNet-18 (models/resnet.py) loaded with our ResNet-18's weights, fed our normalised images;
  ``.cuda()`` made a no-op.  For the small CNN, whose architecture the authors' code does not know,
  their VGG branch ran on a flat ``features`` list of our layers, with the conv list and channel
  counts of ``vgg16`` replaced by ours (conv indices 0, 3, 7, 10, 14, 17).
* CLP: rkteddy/channel-Lipschitzness-based-pruning at commit 5209c83, ``CLP`` (defense.py), with
  u = 3, on the same fixed models.
* Jenks: ``jenkspy.jenks_breaks(values.reshape(-1, 1), nb_class=2)`` with jenkspy 0.2.0, the
  version the NONE code pins (requirements.txt) and calls that way.
"""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn as nn

from bench.core.data import ImageSet
from bench.core.defense import DefenseContext
from bench.core.models import resnet18, small_cnn
from bench.core.trainer import Recipe, Trainer
from defenses._common import jenks_two_class
from defenses.clp import CLP
from defenses.nonlinearity import (
    NONE,
    conv_units,
    flag_threshold,
    monitored_units,
    reset_selected,
)

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
N_IMAGES, N_PATCHED = 256, 26


def fixed_images() -> torch.Tensor:
    """256 uniform-noise uint8 images; the first 26 carry a white 4x4 patch in the corner."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (N_IMAGES, 3, 32, 32), generator=g, dtype=torch.uint8)
    x[:N_PATCHED, :, -4:, -4:] = 255
    return x


def fixed_model(arch: str) -> nn.Module:
    """A fresh copy of :func:`_fixed_model` (built once per architecture)."""
    return copy.deepcopy(_fixed_model(arch))


@functools.lru_cache(maxsize=None)
@torch.no_grad()
def _fixed_model(arch: str) -> nn.Module:
    """A ResNet-18 or small CNN with seeded weights: He-scaled conv filters (1 in 32 channels per
    conv scaled x3), jittered BN parameters and statistics, and a head centred and scaled on
    :func:`fixed_images` so that every class has confident (> 0.9) and unconfident (< 0.1) images."""
    make = {"resnet18": resnet18, "small_cnn": small_cnn}[arch]
    model = make(3, 10, MEAN, STD, 32)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / m.weight[0].numel()))
            idx = torch.randperm(m.out_channels, generator=g)[:max(1, m.out_channels // 32)]
            m.weight[idx] *= 3.0
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
        elif isinstance(m, nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 10 / math.sqrt(m.in_features))
    model.eval()
    f = model.features(fixed_images().float() / 255)
    model.head.weight.mul_(1 / f.std(0).mean())
    model.head.bias.copy_(-(model.head.weight @ f.mean(0)))
    return model


def zero_fingerprint(model: nn.Module) -> dict[str, list[int]]:
    """Which channels of ``model`` are exactly zero: per conv weight its zero output filters
    (``name:out``) and zero input slices (``name:in``), per BN its zero gamma and zero beta
    entries, and the head's zero columns.  Empty entries are left out."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight.detach()
            out[f"{name}:out"] = (w.flatten(1).abs().sum(1) == 0).nonzero().flatten().tolist()
            out[f"{name}:in"] = (w.transpose(0, 1).flatten(1).abs().sum(1) == 0).nonzero().flatten().tolist()
        elif isinstance(m, nn.BatchNorm2d):
            out[f"{name}:gamma"] = (m.weight.detach() == 0).nonzero().flatten().tolist()
            out[f"{name}:beta"] = (m.bias.detach() == 0).nonzero().flatten().tolist()
        elif isinstance(m, nn.Linear):
            out[f"{name}:in"] = (m.weight.detach().abs().sum(0) == 0).nonzero().flatten().tolist()
    return {k: v for k, v in out.items() if v}


# --- expected values, from the reference code (see the module docstring) ---------------------------
# NONE@624b80f analyze_neuros (max_reset_fraction 0.03, lamda_l 0.1, lamda_h 0.9, num_for_detect_biased
# -1): the selected channels per conv, in the reference's order (highest score first), renamed to
# our module names.  *_ZEROED: the exactly-zero weights after NONE@624b80f reset(), as
# zero_fingerprint reports them, BN entries left out (they equal the conv's ":out" entry).
# *_FLAGGED: the samples at or above breaks[1] of jenkspy 0.2.0 on the reference's 1-D scores;
# *_FLAGGED_JENKSPY020: poison_sample_index as analyze_neuros returns it (its 2-D jenkspy call).
RESNET18_SELECTED = {'body.2.0.conv1': [71, 31, 119, 5],
 'body.2.0.shortcut.0': [104, 103, 85, 69],
 'body.2.0.conv2': [96, 63, 26, 15],
 'body.2.1.conv1': [47, 92, 10, 34],
 'body.2.1.conv2': [55, 111, 124, 46],
 'body.3.0.conv1': [186, 161, 240, 84, 41, 152, 201, 30],
 'body.3.0.shortcut.0': [196, 68, 169, 207, 55, 164, 124, 220],
 'body.3.0.conv2': [210, 89, 235, 59, 238, 138, 8, 204],
 'body.3.1.conv1': [224, 131, 190, 80, 239, 123, 194, 95],
 'body.3.1.conv2': [164, 133, 61, 100, 35, 111, 194, 166],
 'body.4.0.conv1': [476, 390, 106, 441, 412, 393, 148, 349, 141, 173, 238, 326, 32, 179, 190, 97],
 'body.4.0.shortcut.0': [424, 462, 333, 101, 77, 402, 486, 381, 372, 435, 499, 168, 492, 406, 120, 73],
 'body.4.0.conv2': [505, 311, 193, 383, 179, 390, 356, 106, 422, 502, 457, 504, 228, 398, 456, 7],
 'body.4.1.conv1': [113, 70, 350, 116, 499, 65, 408, 390, 379, 419, 478, 104, 95, 25, 299, 126],
 'body.4.1.conv2': [157, 52, 369, 161, 421, 76, 501, 222, 108, 291, 140, 495, 178, 134, 329, 48]}
RESNET18_ZEROED = {'body.2.0.conv1:out': [5, 31, 71, 119],
 'body.2.0.conv2:out': [15, 26, 63, 96],
 'body.2.0.conv2:in': [5, 31, 71, 119],
 'body.2.0.shortcut.0:out': [69, 85, 103, 104],
 'body.2.1.conv1:out': [10, 34, 47, 92],
 'body.2.1.conv1:in': [15, 26, 63, 96],
 'body.2.1.conv2:out': [46, 55, 111, 124],
 'body.2.1.conv2:in': [10, 34, 47, 92],
 'body.3.0.conv1:out': [30, 41, 84, 152, 161, 186, 201, 240],
 'body.3.0.conv1:in': [46, 55, 111, 124],
 'body.3.0.conv2:out': [8, 59, 89, 138, 204, 210, 235, 238],
 'body.3.0.conv2:in': [30, 41, 84, 152, 161, 186, 201, 240],
 'body.3.0.shortcut.0:out': [55, 68, 124, 164, 169, 196, 207, 220],
 'body.3.1.conv1:out': [80, 95, 123, 131, 190, 194, 224, 239],
 'body.3.1.conv1:in': [8, 59, 89, 138, 204, 210, 235, 238],
 'body.3.1.conv2:out': [35, 61, 100, 111, 133, 164, 166, 194],
 'body.3.1.conv2:in': [80, 95, 123, 131, 190, 194, 224, 239],
 'body.4.0.conv1:out': [32, 35, 61, 97, 100, 106, 111, 133, 141, 148, 164, 166, 173, 179, 190, 194, 238, 326,
                        349, 390, 393, 412, 441, 476],
 'body.4.0.conv1:in': [35, 61, 100, 111, 133, 164, 166, 194],
 'body.4.0.conv2:out': [7, 73, 77, 101, 106, 120, 168, 179, 193, 228, 311, 333, 356, 372, 381, 383, 390, 398,
                        402, 406, 422, 424, 435, 456, 457, 462, 486, 492, 499, 502, 504, 505],
 'body.4.0.conv2:in': [32, 35, 61, 97, 100, 106, 111, 133, 141, 148, 164, 166, 173, 179, 190, 194, 238, 326,
                       349, 390, 393, 412, 441, 476],
 'body.4.0.shortcut.0:out': [73, 77, 101, 120, 168, 333, 372, 381, 402, 406, 424, 435, 462, 486, 492, 499],
 'body.4.1.conv1:out': [7, 25, 65, 70, 73, 77, 95, 101, 104, 106, 113, 116, 120, 126, 168, 179, 193, 228, 299,
                        311, 333, 350, 356, 372, 379, 381, 383, 390, 398, 402, 406, 408, 419, 422, 424, 435,
                        456, 457, 462, 478, 486, 492, 499, 502, 504, 505],
 'body.4.1.conv1:in': [7, 73, 77, 101, 106, 120, 168, 179, 193, 228, 311, 333, 356, 372, 381, 383, 390, 398,
                       402, 406, 422, 424, 435, 456, 457, 462, 486, 492, 499, 502, 504, 505],
 'body.4.1.conv2:out': [7, 25, 48, 52, 65, 70, 73, 76, 77, 95, 101, 104, 106, 108, 113, 116, 120, 126, 134,
                        140, 157, 161, 168, 178, 179, 193, 222, 228, 291, 299, 311, 329, 333, 350, 356, 369,
                        372, 379, 381, 383, 390, 398, 402, 406, 408, 419, 421, 422, 424, 435, 456, 457, 462,
                        478, 486, 492, 495, 499, 501, 502, 504, 505],
 'body.4.1.conv2:in': [7, 25, 65, 70, 73, 77, 95, 101, 104, 106, 113, 116, 120, 126, 168, 179, 193, 228, 299,
                       311, 333, 350, 356, 372, 379, 381, 383, 390, 398, 402, 406, 408, 419, 422, 424, 435,
                       456, 457, 462, 478, 486, 492, 499, 502, 504, 505],
 'head:in': [7, 25, 48, 52, 65, 70, 73, 76, 77, 95, 101, 104, 106, 108, 113, 116, 120, 126, 134, 140, 157,
             161, 168, 178, 179, 193, 222, 228, 291, 299, 311, 329, 333, 350, 356, 369, 372, 379, 381, 383,
             390, 398, 402, 406, 408, 419, 421, 422, 424, 435, 456, 457, 462, 478, 486, 492, 495, 499, 501,
             502, 504, 505]}
RESNET18_FLAGGED = [0, 2, 4, 6, 8, 9, 10, 11, 12, 17, 18, 19, 22, 23, 25, 32, 33, 36, 42, 44, 45, 47, 48, 49, 50, 53, 55, 58, 59,
 64, 65, 66, 67, 69, 70, 71, 72, 74, 76, 80, 82, 88, 94, 95, 96, 97, 98, 99, 102, 104, 109, 111, 112, 114,
 116, 117, 119, 123, 126, 127, 128, 129, 130, 131, 133, 134, 135, 137, 140, 141, 144, 150, 151, 152, 154, 157,
 159, 160, 161, 162, 164, 166, 167, 168, 171, 172, 173, 174, 175, 178, 180, 181, 182, 184, 187, 188, 190, 192,
 195, 196, 202, 203, 208, 212, 214, 215, 217, 221, 225, 227, 228, 230, 231, 233, 235, 236, 238, 239, 240, 243,
 244, 247, 248, 249, 250, 254]
RESNET18_FLAGGED_JENKSPY020 = [0, 6, 18, 33, 50, 71, 76, 97, 102, 117, 140, 151, 173, 174, 181, 190, 192, 212, 235, 249]
SMALL_CNN_SELECTED = {'body.0.0.0': [16],
 'body.0.1.0': [5],
 'body.1.0.0': [0, 27],
 'body.1.1.0': [24, 45],
 'body.2.0.0': [105, 23, 76, 47],
 'body.2.1.0': [26, 18, 99, 67]}
SMALL_CNN_ZEROED = {'body.0.0.0:out': [16],
 'body.0.1.0:out': [5],
 'body.0.1.0:in': [16],
 'body.1.0.0:out': [0, 27],
 'body.1.0.0:in': [5],
 'body.1.1.0:out': [24, 45],
 'body.1.1.0:in': [0, 27],
 'body.2.0.0:out': [23, 47, 76, 105],
 'body.2.0.0:in': [24, 45],
 'body.2.1.0:out': [18, 26, 67, 99],
 'body.2.1.0:in': [23, 47, 76, 105],
 'head:in': [18, 26, 67, 99]}
SMALL_CNN_FLAGGED = [1, 2, 5, 7, 9, 11, 15, 16, 19, 20, 22, 23, 24, 25, 26, 30, 36, 38, 39, 41, 43, 46, 47, 50, 51, 53, 54, 55,
 56, 58, 60, 61, 65, 67, 69, 71, 72, 75, 76, 77, 79, 82, 85, 86, 87, 90, 92, 97, 103, 104, 105, 107, 110, 111,
 113, 114, 116, 118, 120, 123, 125, 127, 128, 129, 132, 137, 139, 140, 142, 143, 144, 145, 146, 148, 149, 150,
 152, 155, 157, 159, 166, 168, 175, 178, 179, 181, 184, 189, 190, 191, 194, 196, 197, 198, 199, 202, 205, 208,
 214, 216, 217, 218, 221, 222, 224, 225, 226, 233, 236, 237, 242, 253, 255]
SMALL_CNN_FLAGGED_JENKSPY020 = [1, 2, 4, 5, 7, 9, 11, 15, 16, 19, 20, 22, 23, 24, 25, 26, 27, 30, 35, 36, 38, 39, 41, 43, 46, 47, 48, 49, 50,
 51, 53, 54, 55, 56, 58, 60, 61, 62, 65, 67, 69, 71, 72, 75, 76, 77, 78, 79, 80, 82, 85, 86, 87, 90, 92, 93,
 95, 96, 97, 99, 102, 103, 104, 105, 107, 110, 111, 113, 114, 116, 117, 118, 120, 123, 125, 127, 128, 129,
 131, 132, 136, 137, 139, 140, 141, 142, 143, 144, 145, 146, 147, 148, 149, 150, 151, 152, 153, 154, 155, 157,
 159, 165, 166, 168, 170, 175, 178, 179, 181, 182, 184, 187, 188, 189, 190, 191, 194, 196, 197, 198, 199, 202,
 205, 208, 214, 216, 217, 218, 221, 222, 223, 224, 225, 226, 232, 233, 236, 237, 239, 242, 246, 252, 253,
 255]

# channel-Lipschitzness-based-pruning@5209c83 defense.py CLP(net, u=3): the BN channels set to 0.
CLP_RESNET18_PRUNED = {'body.0.1': [36],
 'body.1.0.bn1': [19, 21],
 'body.1.0.bn2': [18, 22],
 'body.1.1.bn1': [36],
 'body.1.1.bn2': [2, 5],
 'body.2.0.bn1': [50],
 'body.2.0.bn2': [15, 63, 82],
 'body.2.0.shortcut.1': [75, 104, 119],
 'body.2.1.bn1': [23, 47, 74],
 'body.2.1.bn2': [111, 122, 123],
 'body.3.0.bn1': [80, 84, 133, 161, 186, 209, 232],
 'body.3.0.bn2': [89, 132, 207, 210, 235, 237],
 'body.3.0.shortcut.1': [29, 38, 68, 196, 249],
 'body.3.1.bn1': [119, 187, 217, 224, 239],
 'body.3.1.bn2': [35, 39, 42, 133, 161, 164],
 'body.4.0.bn1': [17, 33, 148, 181, 208, 220, 301, 389, 390, 398, 438, 461],
 'body.4.0.bn2': [13, 26, 166, 169, 193, 200, 215, 325, 383, 395, 419, 450, 505],
 'body.4.0.shortcut.1': [31, 34, 88, 101, 166, 272, 424, 467],
 'body.4.1.bn1': [5, 70, 104, 113, 116, 194, 261, 298, 324, 350, 444, 488, 499],
 'body.4.1.bn2': [20, 157, 230, 266, 291, 329, 348, 369, 391, 410, 421, 442, 449, 490, 495, 501]}
CLP_SMALL_CNN_PRUNED = {'body.0.0.1': [13],
 'body.0.1.1': [5],
 'body.1.0.1': [3, 55],
 'body.1.1.1': [13, 50],
 'body.2.0.1': [76, 106, 116],
 'body.2.1.1': [18, 26, 71]}

# jenkspy 0.2.0: jenks_breaks(v, nb_class=2)[1] (the largest value of the lower class) for the
# arrays of jenks_cases(), as a 1-D array and as the (N, 1) array NONE@624b80f passes.
JENKS_BREAK = [1.2, 2.0, 3.3, -0.293428897857666, -0.40334352850914, -0.8919953107833862, -0.7184800505638123,
               -0.5007584095001221, 1.6458669900894165, 7.929318904876709]
JENKS_BREAK_2D = [1.2, 2.0, 3.3, -0.293428897857666, -0.40334352850914, -0.8919953107833862, -0.7184800505638123,
                  -0.5007584095001221, 0.7968871593475342, 4.0730061531066895]


def jenks_cases() -> list[list[float]]:
    cases = [[1.0, 1.2, 0.9, 5.0, 5.5, 4.8], [0.0, 1.0, 2.0, 10.0], [3.0, 3.1, 3.2, 3.3, 100.0]]
    g = torch.Generator().manual_seed(0)
    cases += [torch.randn(9, generator=g).tolist() for _ in range(5)]
    # bimodal: 180 clean-like scores and 20 high ones; then a skewed heavy-tailed sample
    cases.append(torch.cat([torch.randn(180, generator=g), 4 + torch.randn(20, generator=g)]).tolist())
    cases.append(torch.randn(300, generator=g).exp().tolist())
    return cases


def _ctx() -> DefenseContext:
    return DefenseContext(train=ImageSet(fixed_images(), torch.zeros(N_IMAGES, dtype=torch.long)), num_classes=10,
                          make_model=lambda: None, trainer=Trainer(recipe=Recipe(epochs=1, batch_size=64)))


def _bn_of(conv_key: str) -> str:
    name = conv_key.rsplit(":", 1)[0]
    if name.endswith("conv1") or name.endswith("conv2"):
        return name[:-5] + "bn" + name[-1]
    return name[:-2] + ".1"          # shortcut.0 -> shortcut.1, small CNN conv_bn.0 -> conv_bn.1


def _check_zeroed(fp: dict, expected: dict) -> None:
    convs = {k: v for k, v in fp.items() if not (k.endswith(":gamma") or k.endswith(":beta"))}
    assert convs == expected
    for k, v in expected.items():
        if k.endswith(":out"):
            assert fp[_bn_of(k) + ":gamma"] == v and fp[_bn_of(k) + ":beta"] == v, k
    assert len(fp) == len(convs) + 2 * sum(k.endswith(":out") for k in expected)


# --- NONE ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["resnet18", "small_cnn"])
def none_case(request):
    arch = request.param
    model = fixed_model(arch)
    expected = {k: globals()[f"{arch.upper()}_{k}"] for k in ("SELECTED", "ZEROED", "FLAGGED", "FLAGGED_JENKSPY020")}
    return arch, model, NONE().detect(_ctx(), model), expected


@pytest.mark.slow
def test_none_monitors_the_reference_convs(none_case):
    arch, model, det, expected = none_case
    units = monitored_units(model)
    assert [u.name for u in units] == list(expected["SELECTED"])      # same convs, same order
    if arch == "resnet18":       # the shortcut is recorded after its BN, like the reference's downsample hook
        sc = [u for u in units if u.shortcut]
        assert len(sc) == 3 and all(isinstance(u.probe, nn.Sequential) and u.probe[0] is u.conv for u in sc)
    else:                        # VGG-style: every conv, as the reference's VGG/NiN lists
        assert len(units) == 6


@pytest.mark.slow
def test_none_selects_the_reference_channels(none_case):
    _, _, det, expected = none_case
    assert {k: v.tolist() for k, v in det["selected"].items()} == expected["SELECTED"]


@pytest.mark.slow
def test_none_flags_the_reference_samples(none_case):
    _, model, det, expected = none_case
    assert det["flagged"].tolist() == expected["FLAGGED"]
    det2 = NONE(jenks_input="jenkspy-0.2.0").detect(_ctx(), model)
    assert det2["flagged"].tolist() == expected["FLAGGED_JENKSPY020"]
    assert expected["FLAGGED"] != expected["FLAGGED_JENKSPY020"]      # the two rules do differ here


@pytest.mark.slow
def test_none_reset_matches_the_reference(none_case):
    arch, _, det, expected = none_case
    model = fixed_model(arch)
    reset_selected(model, det["selected"], "reference")
    _check_zeroed(zero_fingerprint(model), expected["ZEROED"])


# the reference's consumers on a basic-block ResNet (none/reset_neurons.py): conv1 -> conv2 of the block,
# conv2 -> conv1 of the next block, the last conv2 -> fc, the downsample conv -> nothing
R18_CONSUMER = {f"body.{s}.{b}.conv1": f"body.{s}.{b}.conv2:in" for s in range(1, 5) for b in range(2)}
R18_CONSUMER.update({f"body.{s}.0.conv2": f"body.{s}.1.conv1:in" for s in range(1, 5)})
R18_CONSUMER.update({f"body.{s}.1.conv2": f"body.{s + 1}.0.conv1:in" for s in range(1, 4)})
R18_CONSUMER["body.4.1.conv2"] = "head:in"


def test_none_reset_rule_consumers_drops_only_the_layer4_carry():
    model = fixed_model("resnet18")
    sel = {k: torch.tensor(v) for k, v in RESNET18_SELECTED.items()}
    reset_selected(model, sel, "consumers")
    fp = zero_fingerprint(model)
    want = {}
    for name, ch in RESNET18_SELECTED.items():
        want[f"{name}:out"] = sorted(ch)
        if name in R18_CONSUMER:
            want[R18_CONSUMER[name]] = sorted(ch)
    _check_zeroed(fp, want)
    # outside the last stage this is exactly the reference's reset
    assert {k: v for k, v in want.items() if not k.startswith(("body.4", "head"))} == \
        {k: v for k, v in RESNET18_ZEROED.items() if not k.startswith(("body.4", "head"))}
    assert want != RESNET18_ZEROED


def test_none_reset_rule_local_keeps_residual_consumers():
    model = fixed_model("resnet18")
    reset_selected(model, {k: torch.tensor(v) for k, v in RESNET18_SELECTED.items()}, "local")
    fp = zero_fingerprint(model)
    assert "head:in" not in fp and "body.3.0.conv1:in" not in fp and "body.2.1.conv1:in" not in fp
    assert fp["body.2.0.conv2:in"] == sorted(RESNET18_SELECTED["body.2.0.conv1"])   # same-block consumer
    assert fp["body.4.1.conv2:out"] == sorted(RESNET18_SELECTED["body.4.1.conv2"])  # no carry


def test_none_reset_zeroes_the_branch_output():
    """After the reference reset the reset channels of every monitored conv's BN output are zero."""
    model = fixed_model("resnet18")
    sel = {k: torch.tensor(v) for k, v in RESNET18_SELECTED.items()}
    reset_selected(model, sel, "reference")
    outs = {}
    units = {u.name: u for u in conv_units(model)}
    hooks = [units[n].bn.register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o)) for n in sel]
    with torch.no_grad():
        model(fixed_images()[:8].float() / 255)
    for h in hooks:
        h.remove()
    for n, ch in sel.items():
        assert outs[n][:, ch].abs().max() == 0, n


def test_none_defaults_are_absolute():
    d = NONE()
    assert (d.e1_epochs, d.e2_epochs, d.rounds, d.none_lr, d.reset_fraction) == (200, 20, 1, 1e-4, 0.03)
    assert d.reset_rule == "reference" and d.jenks_input == "scores"
    with pytest.raises(ValueError):
        NONE(reset_rule="bogus")
    with pytest.raises(ValueError):
        NONE(jenks_input="bogus")


# --- Jenks ----------------------------------------------------------------------------------------------

def _jenks_brute(values):
    """The lower class's largest value of the SSE-minimising two-class split, by enumeration."""
    v = sorted(values)
    best, brk = None, None
    for i in range(1, len(v)):
        lo, hi = v[:i], v[i:]
        sse = sum((a - sum(lo) / len(lo)) ** 2 for a in lo) + sum((a - sum(hi) / len(hi)) ** 2 for a in hi)
        if best is None or sse < best - 1e-9 * max(1.0, abs(best)):
            best, brk = sse, v[i - 1]
    return brk


def test_jenks_matches_jenkspy_and_brute_force():
    for vals, ref1, ref2 in zip(jenks_cases(), JENKS_BREAK, JENKS_BREAK_2D):
        t = torch.tensor(vals, dtype=torch.float64)
        brk = jenks_two_class(t)
        lower_max = float(t[t < brk].max())
        assert lower_max == ref1, vals[:5]
        assert lower_max == _jenks_brute(vals)
        assert float(t[t >= brk].min()) == brk          # the break is the upper class's smallest value
        assert flag_threshold(t) == ref1
        assert flag_threshold(t, "jenkspy-0.2.0") == ref2


# --- CLP ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "small_cnn"])
def test_clp_prunes_like_the_reference(arch):
    model = fixed_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = CLP(u=3.0).prune(model)
    expected = globals()[f"CLP_{arch.upper()}_PRUNED"]
    fp = zero_fingerprint(model)
    assert {k.rsplit(":", 1)[0]: v for k, v in fp.items() if k.endswith(":gamma")} == expected
    assert {k.rsplit(":", 1)[0]: v for k, v in fp.items() if k.endswith(":beta")} == expected
    assert {x["bn"]: x["pruned"] for x in info["layers"] if x["pruned"]} == expected
    # nothing else changed: the rest of the state dict is bit-identical
    after = model.state_dict()
    for k, v in before.items():
        bn = k.rsplit(".", 1)[0]
        if bn in expected and k.endswith((".weight", ".bias")):
            keep = torch.ones(len(v), dtype=torch.bool)
            keep[expected[bn]] = False
            assert torch.equal(after[k][keep], v[keep]) and (after[k][~keep] == 0).all(), k
        else:
            assert torch.equal(after[k], v), k


@pytest.mark.parametrize("arch", ["preact_resnet18", "mobilenet_v2", "tiny_cnn"])
def test_none_runs_on_other_architectures(arch):
    """Architectures the reference does not support use the local reset; nothing zeroes a
    pre-activation BN (one that normalises a residual sum)."""
    from bench.core.models import build_model
    torch.manual_seed(0)
    model = build_model(arch, 3, 10, MEAN, STD, 32).eval()
    x = fixed_images()[:16]
    ctx = DefenseContext(train=ImageSet(x, torch.zeros(len(x), dtype=torch.long)), num_classes=10,
                         make_model=lambda: None, trainer=Trainer(recipe=Recipe(epochs=1, batch_size=16)))
    units = monitored_units(model)
    assert units and all(u.conv.groups == 1 for u in units)
    if arch == "tiny_cnn":
        assert len(units) == 6
    sel = {u.name: torch.tensor([0, 1]) for u in units}
    reset_selected(model, sel, "reference")
    for u in units:
        assert u.conv.weight[:2].abs().sum() == 0
    if arch == "preact_resnet18":
        for name, m in model.named_modules():
            if name.endswith("bn1") or name.endswith("body.4.2.bn"):
                assert (m.weight != 0).all(), name
    assert len(NONE().detect(ctx, model)["selected"]) == len(units)
