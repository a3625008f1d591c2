"""Readers of the standard on-disk formats, with errors that name the file and the problem.

* IDX (MNIST, LeCun et al.): big-endian header ``0x00 0x00 <type> <ndim>``, then ``ndim``
  uint32 sizes, then the data. MNIST images are type 0x08 (ubyte), ndim 3 (magic 2051);
  labels ndim 1 (magic 2049). Optionally gzip-compressed.
* CIFAR-10 python batches (Krizhevsky): pickled dicts with ``b"data"`` a uint8 array
  ``(N, 3072)`` (1024 red, 1024 green, 1024 blue values, row-major 32×32) and
  ``b"labels"`` a list of N ints in 0..9.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path

import numpy as np

__all__ = ["read_idx", "read_cifar10_batch", "DataFormatError"]


class DataFormatError(ValueError):
    """A data file exists but is not in the expected format."""


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path, *, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain); ``ndim`` (if given) is the required number of dims."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as err:  # a plain file named .gz, a truncated or corrupt gzip
        raise DataFormatError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4:
        raise DataFormatError(f"{path} is too short ({len(raw)} bytes) to be an IDX file")
    magic = int.from_bytes(raw[:4], "big")
    zero, code, dims = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES:
        raise DataFormatError(
            f"{path} has magic number {magic:#010x}, not an IDX header (expected 0x0000TTDD with a "
            f"type code TT in {sorted(hex(c) for c in _IDX_DTYPES)}); is it the right file?"
        )
    if ndim is not None and dims != ndim:
        what = {3: "images", 1: "labels"}.get(ndim, f"{ndim}-d data")
        raise DataFormatError(
            f"{path} has magic number {magic} ({dims} dims) but {what} need {ndim} dims "
            f"(magic {0x0800 | ndim} for ubyte data); is it the right file?"
        )
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DataFormatError(f"{path} is truncated inside its header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataFormatError(
            f"{path}: header says shape {shape} ({expected} data bytes) but the file holds "
            f"{len(raw) - header} data bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def read_cifar10_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch → images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch not found: {path}")
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except Exception as err:  # pickle raises many types on garbage input
        raise DataFormatError(f"{path} is not a CIFAR-10 python pickle batch: {err}") from err
    if not isinstance(batch, dict):
        raise DataFormatError(f"{path} holds a {type(batch).__name__}, not a CIFAR-10 batch dict")
    keys = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in keys or "labels" not in keys:
        raise DataFormatError(f"{path} lacks the 'data'/'labels' entries of a CIFAR-10 batch (has {sorted(keys)})")
    data = np.asarray(keys["data"])
    labels = np.asarray(keys["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataFormatError(
            f"{path}: 'data' has shape {data.shape} and dtype {data.dtype}; a CIFAR-10 batch holds "
            "uint8 rows of 3072 = 3·32·32 values"
        )
    if labels.shape != (data.shape[0],):
        raise DataFormatError(f"{path}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataFormatError(f"{path}: labels outside 0..9 (range {labels.min()}..{labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels
