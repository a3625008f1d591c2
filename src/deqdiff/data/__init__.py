"""Image classification data held in memory: scikit-learn digits (default, no download),
MNIST from local IDX files and CIFAR-10 from the local python-pickle batches."""

from .datasets import ImageDataset, load_cifar10, load_dataset, load_digits, load_mnist, DATASETS
from .formats import read_cifar10_batch, read_idx
from .loader import ShardedBatches

__all__ = [
    "DATASETS",
    "ImageDataset",
    "ShardedBatches",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "read_cifar10_batch",
    "read_idx",
]
