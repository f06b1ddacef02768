"""Data sets that need no download, and readers for MNIST/CIFAR-10 files on disk."""

from batchlab.data.arrays import ArrayDataset

__all__ = ["ArrayDataset"]
