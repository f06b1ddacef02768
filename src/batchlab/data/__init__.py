"""Data sets that need no download, and readers for MNIST/CIFAR-10 files on disk."""

from batchlab.data.arrays import ArrayDataset
from batchlab.data.cifar import load_cifar10, read_cifar_batch
from batchlab.data.digits import load_digits
from batchlab.data.idx import check_labels, load_mnist, read_idx_images, read_idx_labels
from batchlab.data.mnist1d import cache_dir, generate_mnist1d, load_mnist1d
from batchlab.data.sequence import SequenceDataset, make_sequences
from batchlab.data.shapes32 import generate_shapes32, load_shapes32
from batchlab.data.synthetic import make_gaussian_mixture

__all__ = [
    "ArrayDataset",
    "SequenceDataset",
    "cache_dir",
    "check_labels",
    "generate_mnist1d",
    "generate_shapes32",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "load_mnist1d",
    "load_shapes32",
    "make_gaussian_mixture",
    "make_sequences",
    "read_cifar_batch",
    "read_idx_images",
    "read_idx_labels",
]
