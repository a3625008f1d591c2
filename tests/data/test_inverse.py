"""Reconstruction data: clean images in [0, 1] at the asked size, reproducible measurements."""

from __future__ import annotations

import pytest
import torch

from deqdiff.data.inverse import clean_images, load_inverse_data, measure
from deqdiff.models.inverse import GaussianBlur, Identity


def test_clean_digits_are_scaled_and_resized():
    train, test = clean_images("digits", size=16)
    assert train.shape == (1437, 1, 16, 16) and test.shape == (360, 1, 16, 16)
    assert float(train.min()) >= 0.0 and float(train.max()) == pytest.approx(1.0)
    native, _ = clean_images("digits", size=None)
    assert native.shape[-2:] == (8, 8) and float(native.max()) == 1.0
    with pytest.raises(ValueError, match="unknown image set"):
        clean_images("cifar10")
    with pytest.raises(ValueError, match="size"):
        clean_images("digits", size=1)


def test_measurements_are_reproducible_and_have_the_stated_noise():
    A = GaussianBlur(1.0, 5)
    a = load_inverse_data(A, 0.05, size=16, seed=3, train_limit=200, test_limit=10)
    b = load_inverse_data(A, 0.05, size=16, seed=3, train_limit=200, test_limit=10)
    assert torch.equal(a.train_y, b.train_y) and torch.equal(a.test_y, b.test_y)
    residual = a.train_y.double() - A(a.train_x.double())
    assert float(residual.std()) == pytest.approx(0.05, rel=0.02)
    y, x = a.batch("test", slice(0, 4), dtype=torch.float64)
    assert y.dtype == x.dtype == torch.float64 and y.shape == (4, 1, 16, 16)
    clean = measure(a.test_x, Identity(), 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(clean, a.test_x)
    with pytest.raises(ValueError, match="empty split"):
        load_inverse_data(A, 0.05, train_limit=0)


def test_mnist_from_local_idx_files(tmp_path):
    from tests.data.test_datasets import make_mnist

    arrays = make_mnist(tmp_path, n_train=5, n_test=3)
    train, test = clean_images("mnist", tmp_path, size=None)
    assert train.shape == (5, 1, 28, 28) and test.shape == (3, 1, 28, 28)
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype("float32")) / 255
    torch.testing.assert_close(train[:, 0], expected)
    small, _ = clean_images("mnist", tmp_path, size=14)
    assert small.shape == (5, 1, 14, 14) and 0.0 <= float(small.min()) <= float(small.max()) <= 1.0
    with pytest.raises(FileNotFoundError, match="MNIST directory not found"):
        clean_images("mnist", tmp_path / "missing")
