"""Image classifiers with one uniform shape, registered by name in :data:`~bench.core.registry.MODELS`.

Every model is a :class:`Classifier`: ``normalize`` (per-channel mean/std, so attacks and
defenses work in [0, 1] pixel space) -> ``body`` (an ``nn.Sequential`` of stages producing a
feature map) -> global average pool -> ``head`` (``nn.Linear``).  Defenses rely on this
interface, which :func:`build_model` checks for every model it builds:

* ``model.features(x)``: penultimate features (the head's input), ``B x feature_dim``;
* ``model.feature_map(x)``: the last stage's output before pooling;
* ``model.pool(fmap)``: the feature map to the features (global average pooling by default);
* ``model.last_block``: the last stage (FinePruning masks its channels);
* ``model.body``: all stages in order (NONE and CLP walk their convolutions).

A model may also have ``init_from_data(x)``, which the trainer calls once, before the first
training step, with the float images it is about to train on (the fast network's whitening stem
is computed this way, see :mod:`bench.core.fastnet`), and ``data_initialized`` saying whether that
has happened (a buffer, so a loaded checkpoint keeps it).

A new architecture is a builder ``fn(in_channels, num_classes, mean, std, image_size)`` returning
a :class:`Classifier` (``body`` holding its stages), registered with ``@register_model("key")``
or named in a matrix as ``module:Name``.

Small-input variants (32 and 64 px) use a 3x3 stride-1 stem, as is standard for CIFAR;
inputs of ``LARGE_INPUT`` pixels or more use the ImageNet stem (7x7 stride 2 + max pool).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import MODELS, register_model

#: Inputs at least this large get the ImageNet stem (e.g. Imagenette at 224).
LARGE_INPUT = 128


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    def __init__(self, body: nn.Sequential, feature_dim: int, num_classes: int, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    @property
    def last_block(self) -> nn.Module:
        return self.body[-1]

    def feature_map(self, x):
        return self.body(self.normalize(x))

    def pool(self, fmap):
        """The feature map to the head's input: global average pooling (a subclass may differ)."""
        return F.adaptive_avg_pool2d(fmap, 1).flatten(1)

    def features(self, x):
        return self.pool(self.feature_map(x))

    def forward(self, x):
        return self.head(self.features(x))


def conv_bn(cin, cout, stride=1, kernel=3, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


# --- small CNN -------------------------------------------------------------------------------

def small_cnn(in_channels, num_classes, mean, std, image_size, widths=(32, 64, 128)):
    """VGG-style: per width two 3x3 conv-BN-ReLU, then 2x2 max pool (the last stage keeps its map)."""
    stages, c = [], in_channels
    for i, w in enumerate(widths):
        layers = [conv_bn(c, w), conv_bn(w, w)]
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        stages.append(nn.Sequential(*layers))
        c = w
    return Classifier(nn.Sequential(*stages), c, num_classes, mean, std)


# --- ResNet-18/34 ----------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class _FinalBNReLU(nn.Module):
    """PreAct-ResNet ends with BN + ReLU before pooling; kept inside the last stage."""

    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn(x))


def _stem(in_channels, width, image_size, preact=False):
    if image_size >= LARGE_INPUT:
        layers = [nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)]
        if not preact:
            layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        return nn.Sequential(*layers, nn.MaxPool2d(3, 2, 1))
    if preact:
        return nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False))
    return conv_bn(in_channels, width)


def _resnet(block, depths, in_channels, num_classes, mean, std, image_size, preact=False):
    widths = (64, 128, 256, 512)
    stages, c = [_stem(in_channels, widths[0], image_size, preact)], widths[0]
    for i, (w, d) in enumerate(zip(widths, depths)):
        blocks = []
        for j in range(d):
            blocks.append(block(c, w, 2 if (j == 0 and i > 0) else 1))
            c = w
        stages.append(nn.Sequential(*blocks))
    if preact:
        stages[-1].append(_FinalBNReLU(c))
    return Classifier(nn.Sequential(*stages), c, num_classes, mean, std)


def resnet18(in_channels, num_classes, mean, std, image_size):
    return _resnet(BasicBlock, (2, 2, 2, 2), in_channels, num_classes, mean, std, image_size)


def resnet34(in_channels, num_classes, mean, std, image_size):
    return _resnet(BasicBlock, (3, 4, 6, 3), in_channels, num_classes, mean, std, image_size)


def preact_resnet18(in_channels, num_classes, mean, std, image_size):
    return _resnet(PreActBlock, (2, 2, 2, 2), in_channels, num_classes, mean, std, image_size, preact=True)


# --- MobileNetV2 -----------------------------------------------------------------------------

class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, stride, groups=hidden), conv_bn(hidden, cout, kernel=1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2(in_channels, num_classes, mean, std, image_size):
    """MobileNetV2; for small inputs the stem and the second stage keep stride 1 (CIFAR variant)."""
    small = image_size < LARGE_INPUT
    # (expand, channels, repeats, stride)
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1 if small else 2), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    stages, c = [conv_bn(in_channels, 32, 1 if small else 2)], 32
    for t, w, n, s in cfg:
        blocks = []
        for j in range(n):
            blocks.append(InvertedResidual(c, w, s if j == 0 else 1, t))
            c = w
        stages.append(nn.Sequential(*blocks))
    stages.append(conv_bn(c, 1280, kernel=1))
    return Classifier(nn.Sequential(*stages), 1280, num_classes, mean, std)


def tiny_cnn(in_channels, num_classes, mean, std, image_size):
    """The small CNN at half width (16/32/64): the embedded digits default, seconds per model on a CPU."""
    return small_cnn(in_channels, num_classes, mean, std, image_size, widths=(16, 32, 64))


for _key, _fn, _text in (
        ("small_cnn", small_cnn, "VGG-style 6-conv CNN (32/64/128 channels), fast on CPUs"),
        ("tiny_cnn", tiny_cnn, "the small CNN at half width (16/32/64), for the embedded digits set"),
        ("resnet18", resnet18, "ResNet-18 (CIFAR stem below 128 px, ImageNet stem above)"),
        ("resnet34", resnet34, "ResNet-34 (CIFAR stem below 128 px, ImageNet stem above)"),
        ("preact_resnet18", preact_resnet18, "PreAct-ResNet-18 (BN before conv; no conv->BN pairs)"),
        ("mobilenet_v2", mobilenet_v2, "MobileNetV2 (CIFAR strides below 128 px)")):
    register_model(_key, _text)(_fn)


def interface_problems(model: nn.Module) -> list[str]:
    """What ``model`` lacks of the interface defenses rely on (see the module docstring): an empty
    list for a conforming model."""
    problems = []
    for name in ("normalize", "body", "head", "features", "feature_map", "pool", "last_block", "num_classes",
                 "feature_dim"):
        if not hasattr(model, name):
            problems.append(f"no attribute '{name}'")
    if hasattr(model, "body") and not (isinstance(model.body, nn.Sequential) and len(model.body) > 0):
        problems.append("'body' is not a non-empty nn.Sequential of stages")
    if hasattr(model, "head") and not isinstance(model.head, nn.Linear):
        problems.append("'head' is not an nn.Linear")
    return problems


def build_model(name: str, in_channels: int, num_classes: int, mean, std, image_size: int) -> Classifier:
    """A new model of the registered architecture ``name`` (or ``module:Name``), checked against the
    interface defenses rely on."""
    model = MODELS.get(name, "model")(in_channels, num_classes, mean, std, image_size)
    problems = interface_problems(model)
    if problems:
        raise TypeError(f"model '{name}' does not have the interface defenses rely on: {'; '.join(problems)} "
                        f"(subclass bench.core.models.Classifier)")
    return model


@dataclass(frozen=True)
class ModelFactory:
    """A fresh model from plain data: the architecture's name, its input statistics and a seed,
    plus weights to load (the cached backdoored model) and where to put it.  It holds no reference
    to a runner, a dataset or ground truth, so a defense may be handed one (see
    :mod:`bench.core.defense`).  Each call seeds the initialisation and returns a new model."""

    name: str
    in_channels: int
    num_classes: int
    mean: tuple
    std: tuple
    image_size: int
    seed: int
    device: str = "cpu"
    channels_last: bool = False
    #: weights to load into each new model (CPU tensors, copied into the model, never shared)
    state: dict | None = None

    def __call__(self) -> Classifier:
        torch.manual_seed(self.seed)
        model = build_model(self.name, self.in_channels, self.num_classes, self.mean, self.std, self.image_size)
        if self.state is not None:
            model.load_state_dict(self.state)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model
