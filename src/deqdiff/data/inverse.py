"""Image-reconstruction data: clean images in [0, 1] and their noisy measurements ``y = A x + σ n``.

The images come from the classification sets of :mod:`deqdiff.data.datasets` (scikit-learn
digits by default, MNIST from local IDX files), scaled to [0, 1] by their format's maximum
(16 for digits, 255 for MNIST) and resized (bilinear, clamped to [0, 1]) to ``size × size``.
The noise n ~ N(0, I) is drawn once from a generator seeded with ``seed``, so a split's
measurements are fixed for the run (and identical in every process).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .datasets import load_dataset

__all__ = ["InverseData", "clean_images", "measure", "load_inverse_data", "IMAGE_SETS"]

#: image sets and the maximum intensity of their stored values
IMAGE_SETS = {"digits": 16.0, "mnist": 255.0}


@dataclass
class InverseData:
    """Clean images ``x`` and measurements ``y`` per split, ``(N, C, H, W)`` float32 in the
    image range [0, 1] (``y`` may leave it: it carries noise)."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    noise_std: float

    def size(self, split: str) -> int:
        return int(self._get(split, "x").shape[0])

    def _get(self, split: str, what: str) -> Tensor:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return getattr(self, f"{split}_{what}")

    def batch(self, split: str, index: Tensor | slice, *, dtype=torch.float32, device=None) -> tuple[Tensor, Tensor]:
        """``(y, x)`` of ``split`` at ``index`` as ``dtype`` on ``device``."""
        y, x = self._get(split, "y")[index], self._get(split, "x")[index]
        return y.to(device=device, dtype=dtype), x.to(device=device, dtype=dtype)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])


def clean_images(name: str = "digits", data_dir: str | Path | None = None, *, size: int | None = 16,
                 seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """``(train, test)`` images in [0, 1], float32 ``(N, C, size, size)`` (``size=None``: the
    stored size, 8 for digits and 28 for MNIST). Digits: the stratified held-out split of
    :func:`deqdiff.data.load_digits` with ``seed``; MNIST: its standard train/test files."""
    if name not in IMAGE_SETS:
        raise ValueError(f"unknown image set {name!r}; available: {list(IMAGE_SETS)}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 2):
        raise ValueError(f"the image size must be an integer >= 2, got {size!r}")
    ds = load_dataset(name, data_dir, seed=seed, test_fraction=test_fraction)
    out = []
    for images in (ds.train_images, ds.test_images):
        x = images.to(torch.float32) / IMAGE_SETS[name]
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
        out.append(x.contiguous())
    return out[0], out[1]


def measure(x: Tensor, operator: Callable[[Tensor], Tensor], noise_std: float, generator: torch.Generator,
            *, chunk: int = 4096) -> Tensor:
    """``y = A x + noise_std · n`` with n ~ N(0, I) from ``generator`` (computed in float64,
    returned in x's dtype; ``chunk`` images at a time)."""
    if not noise_std >= 0:
        raise ValueError(f"the noise level must be >= 0, got {noise_std!r}")
    parts = []
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk].to(torch.float64)
        with torch.no_grad():
            ax = operator(xs)
        n = torch.randn(ax.shape, generator=generator, dtype=torch.float64)
        parts.append((ax + noise_std * n).to(x.dtype))
    return torch.cat(parts) if parts else x.clone()


def load_inverse_data(operator: Callable[[Tensor], Tensor], noise_std: float, name: str = "digits",
                      data_dir: str | Path | None = None, *, size: int | None = 16, seed: int = 0,
                      train_limit: int | None = None, test_limit: int | None = None) -> InverseData:
    """Clean images (:func:`clean_images`), the first ``train_limit`` / ``test_limit`` of each
    split, and their measurements by ``operator`` with noise of standard deviation
    ``noise_std`` (image units; the generator is seeded with ``seed``, train split first)."""
    train, test = clean_images(name, data_dir, size=size, seed=seed)
    train, test = train[:train_limit], test[:test_limit]
    if train.shape[0] == 0 or test.shape[0] == 0:
        raise ValueError(f"{name}: an empty split ({train.shape[0]} train, {test.shape[0]} test images)")
    g = torch.Generator().manual_seed(seed)
    return InverseData(name, train, measure(train, operator, noise_std, g), test, measure(test, operator, noise_std, g),
                       float(noise_std))
