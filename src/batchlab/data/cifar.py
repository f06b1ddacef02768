"""CIFAR-10 in its original python pickle batches, read from a folder the user names.

The folder (or a ``cifar-10-batches-py`` folder inside it) holds ``data_batch_1`` .. ``data_batch_5``
and ``test_batch``; each is a pickled dict with ``b'data'`` (uint8, N x 3072, channel-major
32x32 images) and ``b'labels'`` (N ints in 0..9).

A plain ``pickle.load`` would run whatever code the file names, so the batches are read with a
restricted unpickler (:class:`_BatchUnpickler`) that can build only what the format needs -- dicts,
lists, bytes, str, ints and NumPy arrays -- and refuses any other global (``os.system``,
``builtins.eval``, an unknown module ...) with a ValueError naming the file and the global, before
anything is called.
"""

from __future__ import annotations

import codecs
import importlib
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchlab.data.arrays import ArrayDataset
from batchlab.data.idx import check_labels

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
SUBFOLDER = "cifar-10-batches-py"
# Per-channel mean/std of CIFAR-10's training images in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def find_cifar10_folder(root: str | os.PathLike[str]) -> Path:
    """The folder holding the CIFAR-10 batches: ``root`` itself or ``root/cifar-10-batches-py``."""
    root = Path(root).expanduser()
    names = ", ".join(TRAIN_FILES + TEST_FILES)
    if not root.is_dir():
        raise ValueError(f"CIFAR-10 folder {str(root)!r} does not exist or is not a folder; expected it to hold {names}")
    for folder in (root, root / SUBFOLDER):
        if (folder / TRAIN_FILES[0]).is_file():
            break
    else:
        folder = root / SUBFOLDER if (root / SUBFOLDER).is_dir() else root
    missing = [n for n in TRAIN_FILES + TEST_FILES if not (folder / n).is_file()]
    if missing:
        raise ValueError(
            f"CIFAR-10 folder {str(folder)!r} is missing {', '.join(missing)}; expected files: {names} "
            f"(in the folder itself or in {SUBFOLDER}/ inside it)"
        )
    return folder


# The only globals a CIFAR-10 batch (as published, pickled by Python 2 with NumPy, or re-pickled by
# Python 3 with NumPy 1.x or 2.x, protocols 2-5) references: NumPy's array and dtype constructors,
# and codecs.encode, which protocol-2 pickles written by Python 3 use for bytes.
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((m, "_reconstruct") for m in _NUMPY_CORE[:2]), *((m, "scalar") for m in _NUMPY_CORE[:2]),
    *((m, "_frombuffer") for m in _NUMPY_CORE[2:]),
}


def _numpy_core(module: str) -> Any:
    """NumPy's core submodule under either name (``numpy._core`` since 2.0, ``numpy.core`` before)."""
    leaf = module.rsplit(".", 1)[1]
    try:
        return importlib.import_module(f"numpy._core.{leaf}")
    except ImportError:  # NumPy < 2
        return importlib.import_module(f"numpy.core.{leaf}")


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`_ALLOWED_GLOBALS`; anything else is refused unrun."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name} (nothing was run): a CIFAR-10 batch holds only dicts, lists, bytes, "
                "str, ints and NumPy arrays; this file is not a CIFAR-10 batch or was tampered with"
            )
        if module == "_codecs":
            return codecs.encode
        if module == "numpy":
            return getattr(np, name)
        return getattr(_numpy_core(module), name)


def _get(d: dict[Any, Any], key: str) -> Any:
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def read_cifar_batch(path: str | os.PathLike[str], *, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch as uint8 images (N, 3, 32, 32) and int64 labels (N,), validated."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            d = _BatchUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError) as e:
        raise ValueError(f"{path}: cannot unpickle CIFAR-10 batch: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a pickled dict with b'data' and b'labels', found {type(d).__name__}")
    data, labels = _get(d, "data"), _get(d, "labels")
    if data is None or labels is None:
        keys = ", ".join(repr(k) for k in d)
        raise ValueError(f"{path}: expected keys b'data' and b'labels', found {keys or 'none'}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        what = f"{type(data).__name__} of {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: expected b'data' to be a uint8 numpy array, found {what}")
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: expected b'data' of shape (N, 3072), found {tuple(data.shape)}")
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: expected b'labels' to be a list of integers, found array of shape {y.shape} and dtype {y.dtype}")
    if len(y) != len(data):
        raise ValueError(f"{path}: b'data' holds {len(data)} images but b'labels' holds {len(y)} labels; expected equal counts")
    y = y.astype(np.int64)
    check_labels(y, num_classes, str(path))
    return data.reshape(-1, 3, 32, 32), y


def _load(folder: Path, names: tuple[str, ...], normalize: bool) -> ArrayDataset:
    parts = [read_cifar_batch(folder / n) for n in names]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts])).float().div_(255.0)
    if normalize:
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        x.sub_(mean).div_(std)
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ArrayDataset(x, y)


def load_cifar10(root: str | os.PathLike[str], *, normalize: bool = True) -> tuple[ArrayDataset, ArrayDataset]:
    """CIFAR-10 ``(train, test)``: float32 (N, 3, 32, 32) and int64 labels in 0..9.

    Args:
        root: the folder holding the batches, or one with ``cifar-10-batches-py`` inside.
        normalize: scale to [0, 1] then standardize per channel with CIFAR-10's usual
            mean/std; otherwise only scale to [0, 1].
    """
    folder = find_cifar10_folder(root)
    return _load(folder, TRAIN_FILES, normalize), _load(folder, TEST_FILES, normalize)
