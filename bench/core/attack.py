"""The :class:`Attack` base class.

An attack is a dataclass whose fields are its hyperparameters.  It poisons statically
(backdoor-toolbox style, which AdvrBD follows): indices are drawn once with a seeded shuffle,
the trigger is applied to un-augmented ``uint8`` images, and the poisoned set is stored as
images; the ordinary training augmentation then runs on every sample.

Counts use floor: ``n_poison = int(N * poison_ratio)`` and ``n_cover = int(N * cover_ratio)``.
By default the poisoned samples are the first ``n_poison`` of one seeded permutation of the
eligible indices and the cover samples the next ``n_cover``, so the two never overlap.
Dirty-label attacks draw from all classes, target included (as backdoor-toolbox does).

Subclasses implement :meth:`apply_trigger` (test-time trigger, also used for training poison by
default) and, where they differ, :meth:`poison_images`, :meth:`cover_images`,
:meth:`eligible_poison`, :meth:`eligible_cover`, :meth:`asr_mask`, :attr:`clean_label`.
Triggers that depend on image geometry are built lazily from the shape they are applied to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from .data import ImageSet
from .registry import Registered
from .tensors import to_float, to_uint8  # noqa: F401 (attacks import them from here)


@dataclass
class PoisonedSet:
    """A poisoned training set with its ground truth (which defenses never see)."""

    train: ImageSet          # images (poisoned where applicable) and the labels a defender sees
    is_poison: torch.Tensor  # bool N: trigger applied and (dirty-label) relabelled / counted as poison
    is_cover: torch.Tensor   # bool N: trigger-like perturbation with the label kept
    y_orig: torch.Tensor     # the true labels

    @property
    def poison_idx(self) -> torch.Tensor:
        return self.is_poison.nonzero().squeeze(1)

    @property
    def cover_idx(self) -> torch.Tensor:
        return self.is_cover.nonzero().squeeze(1)


@dataclass
class TriggeredTest:
    """Triggered test images.  ``counts`` marks the samples that count for ASR and RA."""

    x: torch.Tensor       # uint8, same order as the clean test set
    y: torch.Tensor       # true labels
    counts: torch.Tensor  # bool
    target: int


@dataclass
class Attack(Registered):
    """Base class: random dirty-label poisoning of ``poison_ratio`` of the set to ``target``."""

    #: fraction of the training set that is poisoned (floor of N * ratio samples)
    poison_ratio: float = 0.05
    #: target class of the backdoor
    target: int = 1

    key: ClassVar[str] = ""
    kind: ClassVar[str] = "attack"
    #: the name used in reports and in the paper's tables (defaults to the key)
    display_name: ClassVar[str] = ""
    #: bump when the attack's output changes, so cached artifacts are recomputed
    version: ClassVar[int] = 1
    #: clean-label attacks keep the poisoned samples' labels
    clean_label: ClassVar[bool] = False
    #: fraction of cover samples; attacks with covers redeclare it as a dataclass field
    #: (``cover_ratio: float = 0.01``) so it becomes a parameter
    cover_ratio: ClassVar[float] = 0.0
    #: fields that hold class indices (checked against the dataset before any work)
    class_fields: ClassVar[tuple[str, ...]] = ("target",)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.poison_ratio <= 1.0:
            raise ValueError(f"poison_ratio: {self.poison_ratio} is outside [0, 1]")
        if self.target < 0:
            raise ValueError(f"target: {self.target} must be a class index >= 0")

    #: fields that hold a length in pixels (each must fit in the image)
    pixel_fields: ClassVar[tuple[str, ...]] = ("patch_size",)

    def class_params(self) -> dict:
        return {f: getattr(self, f) for f in self.class_fields}

    def check(self, image_size: int, num_classes: int) -> None:
        """Raise ``ValueError("<field>: ...")`` when the parameters do not fit a dataset of this
        geometry: class fields in range and distinct from each other, pixel lengths within the image.
        Called before any work; subclasses with other geometric parameters extend it."""
        seen: dict[int, str] = {}
        for name, value in self.class_params().items():
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                if not 0 <= v < num_classes:
                    raise ValueError(f"{name}: class {v} is outside the dataset (allowed: 0..{num_classes - 1})")
                if v in seen:
                    twice = "is listed twice" if seen[v] == name else f"is also the {seen[v]}"
                    raise ValueError(f"{name}: class {v} {twice}; {', '.join(self.class_fields)} must be distinct")
                seen[v] = name
        for name in self.pixel_fields:
            v = getattr(self, name, None)
            if v is not None and v > image_size:
                raise ValueError(f"{name}: {v} px does not fit {image_size}x{image_size} images "
                                 f"(allowed: 1..{image_size})")

    # --- what subclasses implement ------------------------------------------------------------
    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the test-time trigger to uint8 images ``B x C x H x W``; return uint8."""
        raise NotImplementedError

    def poison_images(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Training-time poison (default: the test trigger)."""
        return self.apply_trigger(x)

    def cover_images(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Training-time cover perturbation (labels kept)."""
        return self.apply_trigger(x)

    def eligible_poison(self, y: torch.Tensor) -> torch.Tensor:
        """Bool mask of training samples that may be poisoned."""
        return torch.ones_like(y, dtype=torch.bool)

    def eligible_cover(self, y: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(y, dtype=torch.bool)

    def asr_mask(self, y: torch.Tensor) -> torch.Tensor:
        """Test samples that count for ASR: every sample whose true label is not the target."""
        return y != self.target

    def train_augment(self) -> Callable | None:
        """Extra batched augmentation the attacker's training pipeline applies (PhysicalBA)."""
        return None

    # --- the shared procedure -----------------------------------------------------------------
    def select(self, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(y)
        n_poison = int(n * self.poison_ratio)
        n_cover = int(n * self.cover_ratio)
        ep, ec = self.eligible_poison(y), self.eligible_cover(y)
        if bool((ep == ec).all()):
            pool = ep.nonzero().squeeze(1)
            pool = pool[torch.randperm(len(pool), generator=gen)]
            return pool[:n_poison].sort().values, pool[n_poison:n_poison + n_cover].sort().values
        pp = ep.nonzero().squeeze(1)
        pp = pp[torch.randperm(len(pp), generator=gen)][:n_poison]
        cp = (ec & ~torch.isin(torch.arange(n), pp)).nonzero().squeeze(1)
        cp = cp[torch.randperm(len(cp), generator=gen)][:n_cover]
        return pp.sort().values, cp.sort().values

    def poison(self, train: ImageSet, seed: int = 0, indices: tuple | None = None) -> PoisonedSet:
        """The poisoned training set.  ``indices`` = (poison, cover) index lists replace the seeded
        draw (a model poisoned elsewhere); the draw still runs first so the trigger's own random
        stream is the same either way."""
        gen = torch.Generator().manual_seed(seed)
        p_idx, c_idx = self.select(train.y, gen)
        if indices is not None:
            p_idx, c_idx = (torch.as_tensor(list(i), dtype=torch.long) for i in indices)
            if len(p_idx) and int(p_idx.max()) >= len(train.y) or len(c_idx) and int(c_idx.max()) >= len(train.y):
                raise ValueError(f"poison indices go up to {max(p_idx.tolist() + c_idx.tolist())}, but the "
                                 f"training set has {len(train.y)} images")
        x, y = train.x.clone(), train.y.clone()
        if len(p_idx):
            x[p_idx] = self.poison_images(train.x[p_idx], gen)
            if not self.clean_label:
                y[p_idx] = self.target
        if len(c_idx):
            x[c_idx] = self.cover_images(train.x[c_idx], gen)
        is_p = torch.zeros(len(y), dtype=torch.bool)
        is_c = torch.zeros(len(y), dtype=torch.bool)
        is_p[p_idx], is_c[c_idx] = True, True
        return PoisonedSet(ImageSet(x, y), is_p, is_c, train.y.clone())

    def test_set(self, test: ImageSet) -> TriggeredTest:
        counts = self.asr_mask(test.y)
        x = test.x.clone()
        if bool(counts.any()):
            x[counts] = self.apply_trigger(test.x[counts])
        return TriggeredTest(x, test.y.clone(), counts, self.target)
