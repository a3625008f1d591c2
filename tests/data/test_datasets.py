"""Data loading: digits split, MNIST IDX and CIFAR-10 pickle batches written here in the real
formats, and errors that name the bad path or format."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from deqdiff.data import load_cifar10, load_dataset, load_digits, load_mnist, read_idx
from deqdiff.data.formats import DataFormatError


def write_idx(path, array: np.ndarray, *, compress=False, magic=None):
    header = struct.pack(">I", magic if magic is not None else (0x0800 | array.ndim))
    header += b"".join(struct.pack(">I", s) for s in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(raw)


def make_mnist(root, n_train=6, n_test=4, size=28, compress=False, rng=None):
    rng = rng or np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, a in arrays.items():
        write_idx(root / (name + (".gz" if compress else "")), a, compress=compress)
    return arrays


def make_cifar(root, n=3, rng=None):
    rng = rng or np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        b = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": list(rng.integers(0, 10, n).tolist())}
        with open(root / name, "wb") as fh:
            pickle.dump(b, fh)
        batches[name] = b
    return batches


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_round_trip(tmp_path, compress):
    arrays = make_mnist(tmp_path, compress=compress)
    ds = load_mnist(tmp_path)
    assert ds.image_shape == (1, 28, 28) and ds.size("train") == 6 and ds.size("test") == 4
    assert torch.equal(ds.train_images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.uint8)))
    assert ds.test_labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    x = ds.images("train", slice(None), dtype=torch.float64)
    assert abs(float(x.mean())) < 1e-9 and abs(float(x.std(unbiased=False)) - 1) < 1e-9


def test_mnist_bad_magic_truncation_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory not found"):
        load_mnist(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("mnist")
    make_mnist(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte"
    write_idx(bad, np.zeros((2, 4, 4)), magic=0x12345678)
    with pytest.raises(DataFormatError, match="magic number 0x12345678"):
        load_mnist(tmp_path)
    write_idx(bad, np.zeros(6), magic=0x0801)  # a label file where images belong
    with pytest.raises(DataFormatError, match="images need 3 dims"):
        load_mnist(tmp_path)
    write_idx(bad, np.zeros((6, 28, 28)))
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(DataFormatError, match="holds 4699 data bytes"):
        read_idx(bad)
    write_idx(bad, np.zeros((5, 28, 28)))  # 5 images, 6 labels
    with pytest.raises(ValueError, match="5 images but 6 labels"):
        load_mnist(tmp_path)


def test_cifar10_batches_round_trip_and_channel_order(tmp_path):
    batches = make_cifar(tmp_path)
    ds = load_cifar10(tmp_path)
    assert ds.image_shape == (3, 32, 32) and ds.size("train") == 15 and ds.size("test") == 3
    row = batches["data_batch_2"][b"data"][1]
    img = ds.train_images[3 + 1]
    assert torch.equal(img[0].flatten(), torch.from_numpy(row[:1024]))  # red plane first
    assert torch.equal(img[2, 31], torch.from_numpy(row[-32:]))  # last row of the blue plane
    assert ds.train_labels[4] == batches["data_batch_2"][b"labels"][1]
    assert ds.mean.shape == (3,) and ds.std.shape == (3,)


def test_cifar10_subdirectory_and_errors(tmp_path):
    sub = tmp_path / "cifar-10-batches-py"
    sub.mkdir()
    make_cifar(sub)
    assert load_dataset("cifar10", tmp_path).size("test") == 3  # parent of the batches directory
    (sub / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(sub)
    with open(sub / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((3, 1024), np.uint8), b"labels": [0, 1, 2]}, fh)
    with pytest.raises(DataFormatError, match=r"shape \(3, 1024\)"):
        load_cifar10(sub)
    with open(sub / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(DataFormatError, match="2 labels for 3 images"):
        load_cifar10(sub)
    (sub / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataFormatError, match="not a CIFAR-10 python pickle"):
        load_cifar10(sub)


def test_digits_stratified_fixed_split():
    a, b = load_digits(seed=0), load_digits(seed=0)
    assert torch.equal(a.test_labels, b.test_labels) and torch.equal(a.train_images, b.train_images)
    assert a.size("train") + a.size("test") == 1797 and a.size("test") == 360
    frac = torch.bincount(a.test_labels, minlength=10).double() / torch.bincount(a.train_labels, minlength=10).double()
    assert float(frac.max() - frac.min()) < 0.02  # same class proportions in both splits
    x = a.images("train", slice(None), dtype=torch.float64)
    assert abs(float(x.mean())) < 1e-9 and abs(float(x.std(unbiased=False)) - 1) < 1e-9
    assert not torch.equal(load_digits(seed=1).test_labels, a.test_labels)
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("imagenet")


def test_corrupt_gzip_is_a_data_format_error(tmp_path):
    """A gzip whose deflate stream is damaged raises zlib.error, not OSError: it must still be
    reported as a data-format error naming the file."""
    make_mnist(tmp_path, compress=True)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    raw = bytearray(bad.read_bytes())
    raw[20:40] = b"\xff" * 20
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataFormatError, match="train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path)
