"""MNIST-1D (Greydanus, 2020), generated locally with the ``mnist1d`` package.

Generation is procedural (templates of the ten digits, randomly padded, translated, sheared,
scaled and noised), so no download is needed. The package seeds NumPy's and Python's *global*
random generators; :func:`generate_mnist1d` saves and restores both so a caller's random
streams are not disturbed. Generated arrays are cached in memory per ``(n_samples, seed)`` and,
unless disabled, on disk under ``~/.cache/batchlab`` (``BATCHLAB_CACHE`` names another folder).
"""

from __future__ import annotations

import functools
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from batchlab.data.arrays import ArrayDataset
from batchlab.fileio import atomic_open

NUM_CLASSES = 10
SEQ_LENGTH = 40
_CACHE_VERSION = 1  # bump when the generated arrays change


def cache_dir() -> Path:
    """batchlab's cache folder: ``$BATCHLAB_CACHE`` if set, else ``~/.cache/batchlab``."""
    env = os.environ.get("BATCHLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "batchlab"


def _generate(n_samples: int, seed: int) -> dict[str, np.ndarray]:
    import mnist1d.data  # imports matplotlib; keep it out of batchlab's import time

    args = mnist1d.data.get_dataset_args(as_dict=False)
    args.num_samples = n_samples
    args.seed = seed
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        d = mnist1d.data.make_dataset(args)  # never get_dataset(): that one may download
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x": np.ascontiguousarray(d["x"], dtype=np.float32),
        "y": np.ascontiguousarray(d["y"], dtype=np.int64),
        "x_test": np.ascontiguousarray(d["x_test"], dtype=np.float32),
        "y_test": np.ascontiguousarray(d["y_test"], dtype=np.int64),
    }


def _write_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        np.savez(f, **arrays)


@functools.lru_cache(maxsize=8)
def _cached(n_samples: int, seed: int, disk: bool) -> dict[str, np.ndarray]:
    path = cache_dir() / f"mnist1d-v{_CACHE_VERSION}-n{n_samples}-s{seed}.npz"
    arrays: dict[str, np.ndarray] | None = None
    if disk and path.is_file():
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception as e:  # a corrupt cache file is regenerated, not fatal
            warnings.warn(f"ignoring unreadable MNIST-1D cache file {path}: {e}", stacklevel=3)
            arrays = None
    if arrays is None:
        arrays = _generate(n_samples, seed)
        if disk:
            try:
                _write_atomic(path, arrays)
            except OSError as e:
                warnings.warn(f"cannot write MNIST-1D cache file {path}: {e}", stacklevel=3)
    for a in arrays.values():
        a.setflags(write=False)
    return arrays


def generate_mnist1d(n_samples: int = 4000, seed: int = 0, *, disk_cache: bool = True) -> dict[str, np.ndarray]:
    """The raw MNIST-1D arrays: ``x`` (n_train, 40), ``y``, ``x_test``, ``y_test`` (read-only).

    The package makes ``n_samples // 10`` signals per class and keeps 80% for training.
    NumPy's and Python's global random states are the same after the call as before.

    Args:
        n_samples: total number of signals (train + test), at least 10.
        seed: generation seed.
        disk_cache: also read/write an ``.npz`` under :func:`cache_dir`.
    """
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 10:
        raise ValueError(f"n_samples must be an integer >= 10 (one signal per class), got {n_samples!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return _cached(n_samples, seed, disk_cache)


def load_mnist1d(n_samples: int = 4000, seed: int = 0, *, disk_cache: bool = True) -> tuple[ArrayDataset, ArrayDataset]:
    """MNIST-1D ``(train, test)``: float32 signals (N, 1, 40) and int64 labels in 0..9.

    See :func:`generate_mnist1d` for the arguments. The package already centres the whole
    set and scales it to unit standard deviation.
    """
    a = generate_mnist1d(n_samples, seed, disk_cache=disk_cache)

    def make(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        return ArrayDataset(torch.tensor(x).unsqueeze(1), torch.tensor(y))

    return make(a["x"], a["y"]), make(a["x_test"], a["y_test"])
