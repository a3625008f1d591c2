"""In-memory image classification data sets.

Images stay in their stored form (uint8 for MNIST/CIFAR-10) and are normalized per batch with
per-channel mean and standard deviation of the *training* split, so a 50 000-image CIFAR-10 set
costs 150 MB, not 600 MB of floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .formats import read_cifar10_batch, read_idx

__all__ = ["ImageDataset", "load_digits", "load_mnist", "load_cifar10", "load_dataset", "DATASETS"]


@dataclass
class ImageDataset:
    """Train/test images ``(N, C, H, W)`` (any dtype) with integer labels ``(N,)`` and the
    per-channel ``mean``/``std`` ``(C,)`` used by :meth:`images`."""

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    mean: Tensor
    std: Tensor
    num_classes: int

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if x.ndim != 4:
                raise ValueError(f"{self.name}: {split} images must be (N, C, H, W), got shape {tuple(x.shape)}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"{self.name}: {split} has {x.shape[0]} images but labels of shape {tuple(y.shape)}")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"{self.name}: train images {tuple(self.train_images.shape[1:])} and test images "
                f"{tuple(self.test_images.shape[1:])} differ in shape"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def size(self, split: str) -> int:
        return int(self._split(split)[0].shape[0])

    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")

    def images(self, split: str, index: Tensor | slice, *, dtype=torch.float32, device=None) -> Tensor:
        """Normalized images ``(x − mean)/std`` of ``split`` at ``index``."""
        x = self._split(split)[0][index]
        x = x.to(device=device, dtype=dtype)
        mean = self.mean.to(device=x.device, dtype=dtype)[:, None, None]
        std = self.std.to(device=x.device, dtype=dtype)[:, None, None]
        # a copy, not .contiguous(): single-channel (HW,1,W,1) strides count as contiguous
        # but read as channels-last, which group norm under vmap/forward AD rejects
        return ((x - mean) / std).clone(memory_format=torch.contiguous_format)

    def labels(self, split: str, index: Tensor | slice, *, device=None) -> Tensor:
        return self._split(split)[1][index].to(device)

    def limit(self, train: int | None = None, test: int | None = None) -> "ImageDataset":
        """The first ``train``/``test`` samples of each split (quick runs); statistics unchanged."""
        tr, te = slice(None, train), slice(None, test)
        return ImageDataset(
            self.name, self.train_images[tr], self.train_labels[tr], self.test_images[te],
            self.test_labels[te], self.mean, self.std, self.num_classes,
        )


def _channel_stats(images: np.ndarray) -> tuple[Tensor, Tensor]:
    x = images.astype(np.float64)
    mean = x.mean(axis=(0, 2, 3))
    std = x.std(axis=(0, 2, 3))
    return torch.tensor(mean, dtype=torch.float64), torch.tensor(np.where(std > 0, std, 1.0), dtype=torch.float64)


def _writable(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a) if a.flags.writeable else np.array(a)


def _make(name, xtr, ytr, xte, yte, num_classes) -> ImageDataset:
    mean, std = _channel_stats(xtr)
    xtr, xte = _writable(xtr), _writable(xte)
    return ImageDataset(
        name, torch.from_numpy(np.ascontiguousarray(xtr)), torch.from_numpy(ytr.astype(np.int64)),
        torch.from_numpy(np.ascontiguousarray(xte)), torch.from_numpy(yte.astype(np.int64)),
        mean, std, num_classes,
    )


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """scikit-learn's 8×8 digits (1797 images, 10 classes, values 0..16), split into a
    stratified held-out test set of ``test_fraction`` with a fixed ``seed``."""
    try:
        from sklearn.datasets import load_digits as sk_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # a core dependency; missing only in a hand-made environment
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from err
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    d = sk_digits()
    images = d.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(
        images, d.target, test_size=test_fraction, random_state=seed, stratify=d.target,
    )
    return _make("digits", xtr, ytr, xte, yte, 10)


_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"MNIST file {stem}[.gz] not found in {root}; expected the four standard IDX files "
        f"{', '.join(_MNIST_FILES.values())} (optionally .gz)"
    )


def _check_dir(data_dir, what: str) -> Path:
    if data_dir is None:
        raise ValueError(f"{what} is read from local files: give the directory that holds them (--data-dir)")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {root}")
    return root


def load_mnist(data_dir: str | Path) -> ImageDataset:
    """MNIST from the four standard IDX files in ``data_dir`` (28×28 uint8 images)."""
    root = _check_dir(data_dir, "MNIST")
    if not any((root / n).exists() for n in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz")) and (root / "MNIST" / "raw").is_dir():
        root = root / "MNIST" / "raw"  # torchvision's layout
    arrays = {}
    for key, stem in _MNIST_FILES.items():
        arrays[key] = read_idx(_find(root, stem), ndim=3 if key.endswith("images") else 1)
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"MNIST {split}: {x.shape[0]} images but {y.shape[0]} labels in {root}")
        if x.dtype != np.uint8 or y.dtype != np.uint8:
            raise ValueError(f"MNIST {split}: expected ubyte IDX files, got {x.dtype} images, {y.dtype} labels")
        if y.size and y.max() > 9:
            raise ValueError(f"MNIST {split}: labels outside 0..9 (max {y.max()})")
    return _make(
        "mnist", arrays["train_images"][:, None], arrays["train_labels"],
        arrays["test_images"][:, None], arrays["test_labels"], 10,
    )


def load_cifar10(data_dir: str | Path) -> ImageDataset:
    """CIFAR-10 from the python batches ``data_batch_1`` … ``data_batch_5`` and ``test_batch``
    in ``data_dir`` (or its ``cifar-10-batches-py`` subdirectory)."""
    root = _check_dir(data_dir, "CIFAR-10")
    if not (root / "test_batch").exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in names + ["test_batch"] if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 batches {missing} not found in {root}; expected data_batch_1..5 and test_batch "
            "(the python version, cifar-10-python.tar.gz, extracted)"
        )
    parts = [read_cifar10_batch(root / n) for n in names]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = read_cifar10_batch(root / "test_batch")
    return _make("cifar10", xtr, ytr, xte, yte, 10)


DATASETS = ("digits", "mnist", "cifar10")


def load_dataset(name: str, data_dir: str | Path | None = None, *, seed: int = 0, test_fraction: float = 0.2) -> ImageDataset:
    """``"digits"`` (scikit-learn, no files needed), ``"mnist"`` or ``"cifar10"`` (from ``data_dir``)."""
    if name == "digits":
        return load_digits(test_fraction=test_fraction, seed=seed)
    if name == "mnist":
        return load_mnist(data_dir)
    if name == "cifar10":
        return load_cifar10(data_dir)
    raise ValueError(f"unknown data set {name!r}; available: {list(DATASETS)}")
