"""Datasets as ``uint8`` tensors (N x C x H x W) plus labels.

Every dataset is loaded once into memory as ``uint8``: a poisoned dataset is a set of
image files, and the trainer holds it on the device and does its augmentation batched.

Where data comes from, in order:

1. ``<data_root>/<name>.npz`` with arrays ``x_train, y_train, x_test, y_test``
   (uint8 images as N x H x W x C, N x C x H x W or N x H x W).
2. The usual on-disk layout of a user's machine: torchvision's folders for CIFAR-10/100,
   MNIST and GTSRB (``download=False``: we never download inside a run), and an
   ``ImageFolder`` tree for Tiny-ImageNet and Imagenette.  Folder datasets are converted
   once and written back as ``<data_root>/<name>.npz`` so later runs load in seconds.

``digits`` (scikit-learn's bundled 8x8 handwritten digits) needs no files at all and is the
embedded default.  It is upscaled to ``DIGITS_SIZE`` pixels so that patch triggers, warps
and 4x4 trigger grids have room.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .params import ConfigError
from .registry import DATASETS, register_dataset
from .tensors import round_robin

DATA_ROOT_ENV = "BENCH_DATA_ROOT"
DEFAULT_DATA_ROOT = "data"
#: Side length the 8x8 digits are resized to.  16 keeps a 3x3-equivalent patch (2x2),
#: the WaNet warp and the 4x4 AdaptiveBlend grid meaningful while the whole quick matrix
#: stays within minutes on two CPU cores (32 px costs 4x the compute for no extra insight).
DIGITS_SIZE = 16
#: Fraction of digits held out as the test set (stratified, fixed split seed).
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0


class DataNotFoundError(FileNotFoundError):
    """Raised with one message that says where data was looked for and how to get it."""


class DataError(ValueError):
    """A data file that exists but cannot be used: one message naming it and how to rebuild it."""


@dataclass
class ImageSet:
    """Images as uint8 ``N x C x H x W`` and int64 labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self):
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(f"labels must have shape ({self.x.shape[0]},), got {tuple(self.y.shape)}")
        self.y = self.y.long()

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, idx) -> "ImageSet":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageSet(self.x[idx], self.y[idx])


@dataclass
class Dataset:
    name: str
    train: ImageSet
    test: ImageSet
    num_classes: int
    classes: list[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return self.train.x.shape[1]

    @property
    def size(self) -> int:
        return self.train.x.shape[2]

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the training images in [0, 1] (computed once per training set)."""
        return self._stats()[0]

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation of the training images in [0, 1] (computed once)."""
        return self._stats()[1]

    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        cached = self.__dict__.get("_stats_cache")
        if cached is None or cached[0] is not self.train.x:  # a replaced training set gets new statistics
            mean = torch.zeros(self.channels, dtype=torch.float64)
            sq = torch.zeros(self.channels, dtype=torch.float64)
            n = 0
            for i in range(0, len(self.train), STATS_CHUNK):  # chunks: no float copy of the whole set
                x = self.train.x[i:i + STATS_CHUNK].double() / 255
                mean += x.sum(dim=(0, 2, 3))
                sq += (x * x).sum(dim=(0, 2, 3))
                n += x.shape[0] * x.shape[2] * x.shape[3]
            mean /= max(n, 1)
            var = (sq / max(n, 1) - mean * mean) * n / max(n - 1, 1)  # unbiased, as torch.std
            cached = (self.train.x, tuple(mean.tolist()), tuple(var.clamp(min=0).sqrt().tolist()))
            self.__dict__["_stats_cache"] = cached
        return cached[1], cached[2]


#: images per chunk when computing a dataset's mean and std
STATS_CHUNK = 4096


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_data_root(explicit: str | os.PathLike | None = None) -> Path:
    """``explicit`` (CLI flag or matrix field) wins, then ``$BENCH_DATA_ROOT``, then ``./data``."""
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT).expanduser()


# ---------------------------------------------------------------------------------------------
# Datasets as registry entries


def default_crop_padding(size: int) -> int:
    """Crop padding scaled with the image: an eighth of the side (4 px at 32 px, 8 at 64, 28 at 224),
    the 4-px-at-32 convention of the CIFAR literature carried to other sizes."""
    return max(1, size // 8)


@dataclass(frozen=True)
class DatasetSource:
    """A registered dataset: what a matrix needs to know before loading it (classes, geometry),
    its augmentation defaults (a matrix's recipe can override them), and how to load it.

    ``load(root)`` returns a :class:`Dataset` from the data root.  Register one with
    :func:`dataset` on a loader function, or give a plain ``.npz`` file as the dataset's name
    (:meth:`from_npz`)."""

    description: str
    num_classes: int
    channels: int
    size: int
    #: random horizontal flips suit the dataset (off where classes are not mirror-symmetric:
    #: handwritten digits, and traffic signs, whose "turn left"/"turn right" classes are mirror images)
    flip: bool = True
    #: random-crop zero padding in px; ``None``: an eighth of the image side
    crop_padding: int | None = None
    loader: Callable[[Path], "Dataset"] | None = field(default=None, compare=False, repr=False)
    #: a dataset read from one file: its path and SHA-256 (part of every cache key that uses it)
    path: str | None = None
    sha256: str | None = None

    def augmentation(self) -> dict:
        """The recipe fields this dataset fills in when a matrix leaves them unset."""
        pad = self.crop_padding if self.crop_padding is not None else default_crop_padding(self.size)
        return {"flip": self.flip, "crop_padding": pad}

    def load(self, root: Path) -> "Dataset":
        return self.loader(root)

    @classmethod
    def from_npz(cls, path: str | os.PathLike, field: str = "dataset") -> "DatasetSource":
        """A dataset given as a file: its classes and image shape are read from the file (the
        labels and the test images; the training images are read when the cell runs)."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"{field}: the dataset file '{p}' does not exist")
        stat = p.stat()
        key = (str(p.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _NPZ_SOURCES:  # read and hashed once per file version, however often it is named
            _NPZ_SOURCES[key] = cls._read_npz_source(p, field)
        return _NPZ_SOURCES[key]

    @classmethod
    def _read_npz_source(cls, p: Path, field: str) -> "DatasetSource":
        try:
            with np.load(p, allow_pickle=False) as z:
                missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
                if missing:
                    raise ValueError(f"missing arrays {sorted(missing)} (has {sorted(z.files)})")
                shape = _to_nchw(z["x_test"][:1]).shape
                k = int(max(z["y_train"].max(), z["y_test"].max())) + 1
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 (any unreadable file: one message)
            raise ConfigError(f"{field}: '{p}' is not a dataset file ({' '.join(str(e).split())}); it needs uint8 "
                              f"arrays x_train, y_train, x_test, y_test") from None
        if shape[2] != shape[3]:
            raise ConfigError(f"{field}: '{p}' has {shape[2]}x{shape[3]} images; square images are supported")
        name = p.stem
        return cls(f"{name} from {p} ({k} classes, {shape[1]}x{shape[2]}x{shape[3]})", k, shape[1], shape[2],
                   loader=lambda root, p=p, name=name: _from_npz(p, name), path=str(p), sha256=sha256_file(p))


#: the dataset files already read: (path, size, mtime) -> DatasetSource
_NPZ_SOURCES: dict[tuple, DatasetSource] = {}


def _check_source(obj) -> str | None:
    return None if isinstance(obj, DatasetSource) else "is not a DatasetSource (see bench.core.data)"


def _npz_source(name: str, field: str) -> DatasetSource | None:
    """A matrix's dataset given as a path to an ``.npz`` file."""
    return DatasetSource.from_npz(name, field) if name.endswith(".npz") else None


DATASETS.configure(_check_source, _npz_source)


def dataset(name: str, description: str, num_classes: int, channels: int, size: int, flip: bool = True,
            crop_padding: int | None = None):
    """Register a loader ``fn(root) -> Dataset`` as the dataset ``name``."""

    def deco(fn):
        register_dataset(name)(DatasetSource(description, num_classes, channels, size, flip, crop_padding, fn))
        return fn

    return deco


def load_dataset(name: str, data_root: str | os.PathLike | None = None, train_limit: int | None = None,
                 test_limit: int | None = None) -> Dataset:
    """Load a dataset by name.  ``train_limit``/``test_limit`` keep a class-stratified prefix
    (first ``n`` samples after a fixed shuffle) for quick experiments on large datasets."""
    ds = DATASETS.get(name).load(resolve_data_root(data_root))
    if train_limit:
        ds.train = _limit(ds.train, train_limit)
    if test_limit:
        ds.test = _limit(ds.test, test_limit)
    return ds


def _limit(s: ImageSet, n: int) -> ImageSet:
    if n >= len(s):
        return s
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(s), generator=g)
    order = perm[round_robin(s.y[perm])]  # class-balanced
    return s.subset(order[:n].sort().values)


def _to_nchw(a: np.ndarray) -> torch.Tensor:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {a.dtype}")
    if a.ndim == 3:  # N H W (grayscale)
        a = a[:, None]
    elif a.ndim == 4 and a.shape[-1] in (1, 3) and a.shape[1] not in (1, 3):
        a = a.transpose(0, 3, 1, 2)  # N H W C -> N C H W
    return torch.from_numpy(np.ascontiguousarray(a))


def _from_npz(path: Path, name: str, classes=None, rebuild: str = "") -> Dataset:
    """Read ``path``; anything wrong with the file is one :class:`DataError` naming it."""
    try:
        ds = _read_npz(path, name, classes)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 (a truncated zip, a bad array, an unreadable file: all one message)
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise DataError(f"dataset '{name}': '{path}' is unreadable ({reason}). {rebuild}".rstrip()) from None
    info = DATASETS.get(name) if name in DATASETS else None
    bad = [int(t.y.min()) for t in (ds.train, ds.test) if len(t) and int(t.y.min()) < 0]
    if bad or (info is not None and ds.num_classes > info.num_classes):
        raise DataError(f"dataset '{name}': '{path}' has labels outside 0..{info.num_classes - 1 if info else 'N'} "
                        f"(found {min(bad) if bad else ds.num_classes - 1}). {rebuild}".rstrip())
    return ds


def _read_npz(path: Path, name: str, classes=None) -> Dataset:
    with np.load(path, allow_pickle=False) as z:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)} (has {sorted(z.files)})")
        train = ImageSet(_to_nchw(z["x_train"]), torch.from_numpy(z["y_train"].astype(np.int64)))
        test = ImageSet(_to_nchw(z["x_test"]), torch.from_numpy(z["y_test"].astype(np.int64)))
        if classes is None and "classes" in z.files:
            classes = [str(c) for c in z["classes"]]
    k = int(max(train.y.max(), test.y.max())) + 1
    return Dataset(name, train, test, k, list(classes or range(k)))


def _save_npz(path: Path, ds: Dataset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, x_train=ds.train.x.numpy(), y_train=ds.train.y.numpy(), x_test=ds.test.x.numpy(),
             y_test=ds.test.y.numpy(), classes=np.array([str(c) for c in ds.classes]))
    os.replace(tmp, path)


def _missing(name: str, looked: list[Path], how: str) -> DataNotFoundError:
    where = ", ".join(str(p) for p in looked)
    return DataNotFoundError(
        f"dataset '{name}' not found (looked in: {where}). {how} "
        f"Set the data root with --data-root, the matrix field 'data_root', or ${DATA_ROOT_ENV}.")


def _npz_or(name: str, root: Path, fallback, rebuild: str = "") -> Dataset:
    npz = root / f"{name}.npz"
    if npz.exists():
        return _from_npz(npz, name, rebuild=rebuild or _NPZ_REBUILD.format(npz=npz))
    return fallback(npz)


#: how to rebuild an ``.npz`` that cannot be read (datasets converted from folders say so themselves)
_NPZ_REBUILD = ("Rebuild it: write it again with numpy.savez('{npz}', x_train=..., y_train=..., x_test=..., "
                "y_test=...) (uint8 images), or delete it to read the dataset's folder layout instead.")


@dataset("digits", "scikit-learn's bundled 8x8 handwritten digits, upscaled to 16x16, 1 channel, 10 classes (offline)",
         10, 1, DIGITS_SIZE, flip=False, crop_padding=1)
def _digits(root: Path) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0  # values 0..16
    x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, te = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_FRACTION, stratify=d.target,
                              random_state=DIGITS_SPLIT_SEED)
    tr, te = np.sort(tr), np.sort(te)
    return Dataset("digits", ImageSet(x[tr], y[tr]), ImageSet(x[te], y[te]), 10, [str(i) for i in range(10)])


def _torchvision_class(cls_name: str):
    """``torchvision.datasets.<cls_name>``, imported only when a dataset is read from torchvision's
    folder layout (the ``.npz`` files and the embedded dataset do not need torchvision)."""
    try:
        import torchvision.datasets
    except ImportError as e:
        raise DataError(f"reading torchvision's {cls_name} folder needs torchvision (pip install torchvision), "
                        f"or provide the dataset's .npz file: {e}") from e
    return getattr(torchvision.datasets, cls_name)


def _torchvision_arrays(name: str, root: Path, cls_name: str, **kw) -> Dataset:
    def fallback(npz):
        looked = [npz, root / name]
        cls = _torchvision_class(cls_name)
        try:
            tr = cls(str(root / name), train=True, download=False, **kw)
            te = cls(str(root / name), train=False, download=False, **kw)
        except (RuntimeError, FileNotFoundError, OSError) as e:
            raise _missing(name, looked, f"Download it with torchvision ({cls.__name__}(root='{root / name}', "
                                         f"download=True)) or provide {npz.name}.") from e
        data = lambda d: d.data.numpy() if torch.is_tensor(d.data) else d.data  # noqa: E731
        targets = lambda d: np.asarray(d.targets, dtype=np.int64)  # noqa: E731
        return Dataset(name, ImageSet(_to_nchw(data(tr)), torch.from_numpy(targets(tr))),
                       ImageSet(_to_nchw(data(te)), torch.from_numpy(targets(te))), len(tr.classes),
                       [str(c) for c in tr.classes])

    return _npz_or(name, root, fallback, _NPZ_REBUILD.format(npz=root / f"{name}.npz") +
                   f" Torchvision's folder: {cls_name}(root='{root / name}', download=True).")


@dataset("cifar10", "CIFAR-10, 32x32 RGB, 10 classes (torchvision layout or cifar10.npz)", 10, 3, 32)
def _cifar10(root: Path) -> Dataset:
    return _torchvision_arrays("cifar10", root, "CIFAR10")


@dataset("cifar100", "CIFAR-100, 32x32 RGB, 100 classes (torchvision layout or cifar100.npz)", 100, 3, 32)
def _cifar100(root: Path) -> Dataset:
    return _torchvision_arrays("cifar100", root, "CIFAR100")


@dataset("mnist", "MNIST, 28x28 grayscale, 10 classes (torchvision layout or mnist.npz)", 10, 1, 28,
         flip=False)
def _mnist(root: Path) -> Dataset:
    return _torchvision_arrays("mnist", root, "MNIST")


def _images_to_tensor(paths_labels, size: int) -> ImageSet:
    from PIL import Image

    x = np.empty((len(paths_labels), size, size, 3), dtype=np.uint8)
    for i, (p, _) in enumerate(paths_labels):
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            x[i] = np.asarray(im)
    y = torch.tensor([label for _, label in paths_labels], dtype=torch.long)
    return ImageSet(_to_nchw(x), y)


def _image_folder(name: str, root: Path, size: int, train_dir: str, test_dir: str, how: str) -> Dataset:
    """Read an ``ImageFolder`` tree (``<root>/<name>/{train,val}/<class>/*``) resized to ``size``."""

    def fallback(npz):
        base = root / name
        looked = [npz, base / train_dir, base / test_dir]
        if not (base / train_dir).is_dir() or not (base / test_dir).is_dir():
            raise _missing(name, looked, how)
        ImageFolder = _torchvision_class("ImageFolder")
        try:
            tr, te = ImageFolder(str(base / train_dir)), ImageFolder(str(base / test_dir))
            if tr.classes != te.classes:
                raise DataError(f"dataset '{name}': '{base / train_dir}' and '{base / test_dir}' have different "
                                f"classes. {how}")
            ds = Dataset(name, _images_to_tensor(tr.samples, size), _images_to_tensor(te.samples, size),
                         len(tr.classes), list(tr.classes))
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 (an unreadable image, an empty class folder, ...: one message)
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            raise DataError(f"dataset '{name}': the folder '{base}' cannot be converted ({reason}). Remove or "
                            f"replace the file it names, then run again. {how}") from None
        _save_npz(npz, ds)  # converted once; later runs read the npz
        return ds

    return _npz_or(name, root, fallback, f"Rebuild it: delete it and the next run converts "
                                         f"{root / name}/{{{train_dir},{test_dir}}} again. {how}")


@dataset("gtsrb", "GTSRB traffic signs, resized to 32x32 RGB, 43 classes (ImageFolder train/ test/ or gtsrb.npz)",
         43, 3, 32, flip=False)
def _gtsrb(root: Path) -> Dataset:
    return _image_folder("gtsrb", root, 32, "train", "test",
                         "Arrange GTSRB as <root>/gtsrb/{train,test}/<class>/<image> or provide gtsrb.npz.")


@dataset("tinyimagenet", "Tiny-ImageNet, 64x64 RGB, 200 classes (ImageFolder train/ val/ or tinyimagenet.npz)",
         200, 3, 64)
def _tiny(root: Path) -> Dataset:
    return _image_folder("tinyimagenet", root, 64, "train", "val",
                         "Arrange Tiny-ImageNet as <root>/tinyimagenet/{train,val}/<wnid>/<image> "
                         "(sort val/images by val_annotations.txt) or provide tinyimagenet.npz.")


@dataset("imagenette", "Imagenette, resized to 224x224 RGB, 10 classes (ImageFolder train/ val/ or imagenette.npz)",
         10, 3, 224)
def _imagenette(root: Path) -> Dataset:
    return _image_folder("imagenette", root, 224, "train", "val",
                         "Unpack imagenette2 as <root>/imagenette/{train,val}/<wnid>/<image> or provide imagenette.npz.")
