"""Seeded synthetic classification data: a Gaussian mixture in D dimensions."""

from __future__ import annotations

import torch

from batchlab.data.arrays import ArrayDataset


def split_train_val(x: torch.Tensor, y: torch.Tensor, val_fraction: float) -> tuple[ArrayDataset, ArrayDataset]:
    """The first ``1 - val_fraction`` of the rows for training, the rest for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n_val = max(1, int(round(len(y) * val_fraction)))
    n_tr = len(y) - n_val
    if n_tr < 1:
        raise ValueError(f"n_samples={len(y)} leaves no training samples with val_fraction={val_fraction}")
    return ArrayDataset(x[:n_tr], y[:n_tr]), ArrayDataset(x[n_tr:], y[n_tr:])


def make_gaussian_mixture(
    n_samples: int = 4000,
    *,
    dim: int = 16,
    num_classes: int = 4,
    clusters_per_class: int = 3,
    separation: float = 3.0,
    noise: float = 1.0,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[ArrayDataset, ArrayDataset]:
    """A Gaussian-mixture classification set ``(train, val)``: float32 (N, dim), int64 labels.

    Each class owns ``clusters_per_class`` cluster centres drawn at random on a sphere of radius
    ``separation``; each sample is a centre plus isotropic Gaussian noise of standard deviation
    ``noise`` per coordinate. With more than one cluster per class the classes are not linearly
    separable, so an MLP has something to learn. Classes are balanced (``n_samples`` rows in
    random order). Everything is drawn from one ``torch.Generator`` seeded with ``seed``.

    Args:
        n_samples: total rows, split into train and val.
        dim: input dimension D.
        num_classes: number of classes (>= 2).
        clusters_per_class: mixture components per class (>= 1).
        separation: distance of the centres from the origin.
        noise: per-coordinate standard deviation around a centre (>= 0); larger is harder.
        val_fraction: share of rows held out for validation.
        seed: fixes everything.
    """
    for name, value, low in (("n_samples", n_samples, 2), ("dim", dim, 1), ("num_classes", num_classes, 2),
                             ("clusters_per_class", clusters_per_class, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes * clusters_per_class, dim, generator=g)
    centres = centres / centres.norm(dim=1, keepdim=True).clamp_min(1e-12) * separation
    y = torch.arange(n_samples) % num_classes
    y = y[torch.randperm(n_samples, generator=g)]
    comp = y * clusters_per_class + torch.randint(clusters_per_class, (n_samples,), generator=g)
    x = centres[comp] + noise * torch.randn(n_samples, dim, generator=g)
    return split_train_val(x.float().contiguous(), y.long(), val_fraction)
