"""scikit-learn's bundled handwritten digits (8x8 images, 1797 samples), no download needed."""

from __future__ import annotations

import functools

import numpy as np
import torch

from batchlab.data.arrays import ArrayDataset

NUM_CLASSES = 10


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float64) / 16.0  # pixel values are 0..16
    y = np.asarray(bunch.target, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)`` with each class split in the same proportion, fixed by ``seed``.

    Every class keeps at least one training sample; the order inside each part is ascending.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = min(int(round(len(idx) * val_fraction)), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def load_digits(*, val_fraction: float = 0.2, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """The 8x8 digits as ``(train, val)`` data sets of images (N, 1, 8, 8).

    Pixels are scaled to [0, 1] (divided by 16), then standardized with one mean and one
    standard deviation computed on the training split only (a single scalar pair, so blank
    border pixels do not get divided by a near-zero per-pixel deviation).

    Args:
        val_fraction: fraction of every class held out for validation.
        seed: fixes the stratified split.

    Returns:
        ``(train, val)``: float32 inputs (N, 1, 8, 8), int64 labels in 0..9.
    """
    x, y = _raw_digits()
    tr, va = stratified_split(y, val_fraction, seed)
    mean = float(x[tr].mean())
    std = float(x[tr].std())
    xs = ((x - mean) / std).astype(np.float32).reshape(-1, 1, 8, 8)

    def make(idx: np.ndarray) -> ArrayDataset:
        return ArrayDataset(torch.from_numpy(xs[idx].copy()), torch.from_numpy(y[idx].copy()))

    return make(tr), make(va)
