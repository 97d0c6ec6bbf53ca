"""TaCT (Tang, Wang, Zhang, Qian, Wang, "Demon in the Variant: Statistical Analysis of DNNs for
Robust Backdoor Contamination Detection", USENIX Security 2021): a source-specific trigger.

The BadNet patch sends images of the ``source`` class to the target; the same patch on images of
the ``cover_classes`` keeps their labels, so only the source class is hijacked and the poison
does not form a separate cluster in feature space.  ASR counts source-class test images only.
Follows backdoor-toolbox's ``TaCT`` poisoner (source 0, covers from classes 5 and 7, 1 % covers).
Deviation: the same patch scaling as BadNet.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.core.registry import register_attack

from .badnet import BadNet


@register_attack("tact")
@dataclass
class TaCT(BadNet):
    """BadNet patch on source-class images -> target; the same patch on cover-class images, labels kept.

    ``int(N * poison_ratio)`` source-class images (capped at the class size) are poisoned and
    ``int(N * cover_ratio)`` cover-class images carry the trigger with their own labels, so only the
    source class is hijacked.  ASR counts only source-class test images.  The patch is BadNet's
    (AdvrBD: 3x3 white square scaled with the image; ``style``/``patch_size`` as in BadNet).
    """

    #: the only class whose images the trigger sends to the target (AdvrBD: 0)
    source: int = 0
    #: classes whose images carry the trigger but keep their labels (backdoor-toolbox: [5, 7])
    cover_classes: tuple[int, ...] = (5, 7)
    #: fraction of the training set used as cover samples (backdoor-toolbox: 0.01)
    cover_ratio: float = 0.01

    display_name = "TaCT"
    class_fields: ClassVar[tuple[str, ...]] = ("target", "source", "cover_classes")

    def __post_init__(self):
        super().__post_init__()
        self.cover_classes = tuple(self.cover_classes)
        if self.source == self.target:
            raise ValueError(f"source: {self.source} must differ from target {self.target}")
        if self.source in self.cover_classes:
            raise ValueError(f"cover_classes: {list(self.cover_classes)} must not contain the source {self.source}")

    def eligible_poison(self, y: torch.Tensor) -> torch.Tensor:
        return y == self.source

    def eligible_cover(self, y: torch.Tensor) -> torch.Tensor:
        return torch.isin(y, torch.tensor(self.cover_classes, dtype=y.dtype))

    def asr_mask(self, y: torch.Tensor) -> torch.Tensor:
        return y == self.source
