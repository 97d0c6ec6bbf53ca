"""``fastnet``: a small network that reaches paper-grade CIFAR-10 accuracy in minutes on a CPU.

It follows the design of Keller Jordan's airbench94 ("94% on CIFAR-10 in 3.29 seconds on a single
GPU", 2024; reference code ``KellerJordan/cifar10-airbench``, ``legacy/airbench94.py``), written
here from the paper's description, with the changes a backdoor benchmark needs:

* **Whitening stem.**  A 2x2 convolution without padding whose filters are the eigenvectors of
  the covariance of the training set's 2x2 patches, scaled by ``1/sqrt(eigenvalue + eps)``, in
  both signs (2 x C x 2 x 2 filters).  Its weights are computed from the images the trainer is
  about to train on (:meth:`FastNet.init_from_data`, called by the trainer before the first step):
  the defender's own, possibly poisoned, training set, as any defense would see it, never the
  test set.  The weights stay frozen; its bias trains for the first ``recipe.whiten_bias_epochs``
  epochs of a training (3 in the fast recipe, as in the reference) and is frozen afterwards.
* **Three conv groups**, each ``conv -> max pool 2 -> BN -> act -> conv -> BN -> act`` with widths
  64/256/256 by default, every conv 3x3 without bias and identity-initialised on its first
  input channels (a Dirac delta, as in the reference).  BatchNorm has a frozen unit scale and a
  learnable bias, momentum 0.4 in PyTorch's convention (0.6 in the reference's), eps 1e-12.
* **Head**: global max pooling of the last 4x4 map (the reference pools a 3x3 window of it), times
  1/9, into a linear layer (bias-free in the reference; here ``nn.Linear`` with its bias kept at
  zero-initialisation and trained, since the model interface promises an ``nn.Linear`` head).

**Deviations from the reference, and why.**

* **ReLU instead of GELU.**  NONE reasons about piecewise-linear units (a neuron is linear when its
  pre-activations lie on one side of zero), CLP bounds a channel's Lipschitz constant through a
  1-Lipschitz activation, and FinePruning ranks channels by their mean activation after a ReLU.
  GELU breaks the first premise and blurs the third.  ReLU keeps all three, at some accuracy.
* **No label smoothing, no test-time augmentation.**  ABL, DBR and AdvrBD read per-sample losses
  and confidences (label smoothing changes them); test-time flips and shifts are themselves a
  defense against static triggers.  Both stay off in every ACC and ASR (the fast recipe's
  ``label_smoothing`` field exists and is 0).
* **The scale 1/9 sits in the pooling** (:meth:`FastNet.pool`), not after the head: the same
  logits, and defenses that call ``model.head(model.pool(fmap))`` see them.

Which defenses' premises it keeps: NONE (plain Sequential body, ReLU units, BN after each conv of a
group), CLP (each BN follows a conv; in the first conv of a group a max pool sits between them,
which is per-channel and 1-Lipschitz, so CLP pairs them through it), FinePruning (channels of the
last stage, pruned before the head), ABL, DBR, SCAnFT and AdvrBD (per-sample losses and penultimate
features).  The frozen whitening conv is part of ``body[0]``; NONE may reset its channels like any
other unit's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .models import Classifier
from .registry import register_model

#: conv group widths of airbench94
WIDTHS = (64, 256, 256)
#: side of the whitening stem's patches
WHITEN_KERNEL = 2
#: added to each eigenvalue before the inverse square root (the reference's 5e-4)
WHITEN_EPS = 5e-4
#: images whose patches estimate the covariance (the reference uses 5,000)
WHITEN_IMAGES = 5000
#: BatchNorm momentum in PyTorch's convention (new statistic weight): the reference's 0.6 is 1 - 0.4
BN_MOMENTUM = 0.4
BN_EPS = 1e-12
#: logits scale of the reference (its ``scaling_factor``), applied to the pooled features
HEAD_SCALE = 1 / 9


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with a frozen unit scale and a learnable bias (the reference's).  A plain
    ``nn.BatchNorm2d``, so that ``torch.fx`` (CLP) sees a leaf module."""
    bn = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
    bn.weight.requires_grad_(False)
    return bn


def _conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():  # identity on the first min(cin, cout) channels, the rest as PyTorch draws them
        nn.init.dirac_(conv.weight[:min(cin, cout)])
    return conv


def conv_group(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(_conv(cin, cout), nn.MaxPool2d(2), _batch_norm(cout), nn.ReLU(inplace=True),
                         _conv(cout, cout), _batch_norm(cout), nn.ReLU(inplace=True))


def whitening_weights(x: torch.Tensor, kernel: int = WHITEN_KERNEL, eps: float = WHITEN_EPS) -> torch.Tensor:
    """Filters that whiten the ``kernel x kernel`` patches of the (normalised, float) images ``x``:
    ``2 * C * k * k`` filters, each eigenvector of the patch covariance over ``sqrt(eigenvalue +
    eps)``, in both signs, largest eigenvalue first.  The covariance is the uncentred second
    moment, as in the reference (normalised images have near-zero patch means)."""
    c = x.shape[1]
    patches = x.float().unfold(2, kernel, 1).unfold(3, kernel, 1)          # N C H' W' k k
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kernel * kernel).double()
    cov = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)                      # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
    filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).reshape(-1, c, kernel, kernel)
    return torch.cat([filters, -filters]).float()


class FastNet(Classifier):
    """The airbench-shaped classifier (see the module docstring)."""

    #: how many training images the trainer hands :meth:`init_from_data`
    init_samples = WHITEN_IMAGES

    def __init__(self, in_channels: int, num_classes: int, mean, std, widths=WIDTHS):
        stem_width = 2 * in_channels * WHITEN_KERNEL ** 2
        whiten = nn.Conv2d(in_channels, stem_width, WHITEN_KERNEL, padding=0, bias=True)
        whiten.weight.requires_grad_(False)
        nn.init.zeros_(whiten.bias)
        stages, c = [nn.Sequential(whiten, nn.ReLU(inplace=True))], stem_width
        for w in widths:
            stages.append(conv_group(c, w))
            c = w
        super().__init__(nn.Sequential(*stages), c, num_classes, mean, std)
        self.register_buffer("data_initialized", torch.zeros((), dtype=torch.bool))

    @property
    def whiten(self) -> nn.Conv2d:
        return self.body[0][0]

    def pool(self, fmap):
        return fmap.amax(dim=(2, 3)) * HEAD_SCALE

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Whiten the stem on float images ``x`` in [0, 1] (the first :data:`WHITEN_IMAGES` are used)."""
        x = x[:self.init_samples].to(self.whiten.weight.device, torch.float32)
        w = whitening_weights(self.normalize(x.contiguous()))
        self.whiten.weight.copy_(w.to(self.whiten.weight.dtype))
        self.data_initialized.fill_(True)

    def stem_bias(self) -> list[nn.Parameter]:
        """The parameters trained only during a training's first ``recipe.whiten_bias_epochs``."""
        return [self.whiten.bias]


@register_model("fastnet", "airbench-shaped CNN with a whitening stem (ReLU, 64/256/256): ~93% on CIFAR-10 "
                           "in minutes on a CPU")
def fastnet(in_channels, num_classes, mean, std, image_size):
    return FastNet(in_channels, num_classes, mean, std)
