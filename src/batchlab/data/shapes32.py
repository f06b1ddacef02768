"""Shapes-32: a procedurally generated 32x32 RGB image set (10 classes), no download needed.

Each image is one shape on a cluttered, coloured background. The class is the shape (and, for
three classes, the texture inside it); everything else varies at random and carries no label
information:

- position (centre 10..22 pixels), size (radius 7..11 pixels) and rotation (0..2 pi);
- the shape's colour (each channel uniform in 0.5..1) and the background's two-colour linear
  gradient in a random direction (each channel of both colours uniform in 0..0.5): any hue, but
  the shape is lighter than its background in every channel, so edges have one polarity (with
  unconstrained colours the small CNNs batchlab trains on a CPU stay near chance after several
  epochs; measured while building this set);
- clutter: one to three thin line segments of random colour (any), length and angle behind the shape;
- a brightness and contrast jitter per image, then Gaussian pixel noise, then 8-bit quantization.

Why batch statistics could matter here: the colour and brightness jitter makes each image's own
channel means and variances differ a lot from the data set's, so a BatchNorm layer's statistics
over a batch of 2 images (what it normalizes with in training) differ from the running averages it
normalizes with at evaluation; a batch of 32 averages that variation out. The 8x8 digits have one
grey level and a centred digit, so the two hardly differ there. Measured, though (claim C17 in
docs/reproduce.md): the small CNN of ``shapes32-cnn`` with BatchNorm was no worse at 2 images per
batch than at 32, so on this set at that size the effect did not appear.

The classes, in shape coordinates (u, v rotated and divided by the radius, d = sqrt(u^2 + v^2)):

====  =================  ==========================================================
  0   disc               d <= 1
  1   ring               0.55 <= d <= 1
  2   square             max(|u|, |v|) <= 0.8
  3   frame              0.45 <= max(|u|, |v|) <= 0.8
  4   triangle           equilateral, inscribed in d <= 1
  5   plus               two bars 2 x 0.56
  6   striped disc       d <= 1, stripes of period 0.8 across it
  7   checkered square   max(|u|, |v|) <= 0.8, squares of side 0.4
  8   five-petal flower  d <= 0.55 + 0.45 cos(5 theta)
  9   crescent           d <= 1 outside a disc of radius 0.8 centred at u = 0.45
====  =================  ==========================================================

Everything is drawn from one ``numpy.random.Generator`` seeded with ``seed`` in a fixed order,
so the same ``(n_samples, seed)`` gives the same bytes on every machine. Classes are balanced
(``n_samples`` a multiple of 10 gives exactly ``n_samples / 10`` per class) and shuffled.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from batchlab.data.arrays import ArrayDataset
from batchlab.data.synthetic import split_train_val

NUM_CLASSES = 10
IMAGE_SIZE = 32
CLASS_NAMES = ("disc", "ring", "square", "frame", "triangle", "plus", "striped disc", "checkered square",
               "flower", "crescent")


def _class_mask(c: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of class ``c``'s shape, ``u``/``v`` in shape coordinates (any equal shapes)."""
    d = np.hypot(u, v)
    box = np.maximum(np.abs(u), np.abs(v))
    if c == 0:
        return d <= 1.0
    if c == 1:
        return (d >= 0.55) & (d <= 1.0)
    if c == 2:
        return box <= 0.8
    if c == 3:
        return (box >= 0.45) & (box <= 0.8)
    if c == 4:  # equilateral triangle: inside the three edges, each 0.5 from the centre
        tri = np.ones(d.shape, dtype=bool)
        for a in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6):  # outward edge normals (vertices at 90, 210, 330 deg)
            tri &= u * np.cos(a) + v * np.sin(a) <= 0.5
        return tri
    if c == 5:
        return ((np.abs(u) <= 0.28) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.28) & (np.abs(u) <= 1.0))
    if c == 6:
        return (d <= 1.0) & (np.cos(2.5 * np.pi * u) > 0)
    if c == 7:
        return (box <= 0.8) & (np.sin(2.5 * np.pi * u) * np.sin(2.5 * np.pi * v) > 0)
    if c == 8:
        return d <= 0.55 + 0.45 * np.cos(5 * np.arctan2(v, u))
    if c == 9:
        return (d <= 1.0) & (np.hypot(u - 0.45, v) > 0.8)
    raise AssertionError(f"no class {c}")


def _shape_masks(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean (N, H, W): the pixels inside each sample's shape, ``u``/``v`` (N, H, W) in shape coordinates."""
    out = np.zeros(u.shape, dtype=bool)
    for c in range(NUM_CLASSES):
        rows = np.flatnonzero(y == c)
        out[rows] = _class_mask(c, u[rows], v[rows])
    return out


def _render(y: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """float32 (N, 3, S, S) in [0, 1] for labels ``y``; draws from ``rng`` in a fixed order."""
    n, s = len(y), IMAGE_SIZE
    grid = np.arange(s, dtype=np.float64) + 0.5
    gy, gx = np.meshgrid(grid, grid, indexing="ij")  # (S, S) pixel centres
    gx, gy = gx[None], gy[None]

    def col(low: float, high: float, k: int = 1) -> np.ndarray:
        return rng.uniform(low, high, size=(n, 3) if k == 1 else (n, k, 3))

    # background: a two-colour linear gradient in a random direction, darker than any shape
    c0, c1 = col(0.0, 0.5), col(0.0, 0.5)
    phi = rng.uniform(0, 2 * np.pi, size=n)[:, None, None]
    t = ((gx - s / 2) * np.cos(phi) + (gy - s / 2) * np.sin(phi)) / s + 0.5  # (N, S, S), roughly 0..1
    img = c0[:, :, None, None] + (c1 - c0)[:, :, None, None] * np.clip(t, 0, 1)[:, None]
    # clutter: thin segments of random colour behind the shape
    k_max = 3
    n_lines = rng.integers(1, k_max + 1, size=n)
    lc = col(0.0, 1.0, k_max)
    lx, ly = rng.uniform(0, s, size=(n, k_max)), rng.uniform(0, s, size=(n, k_max))
    la = rng.uniform(0, np.pi, size=(n, k_max))
    ll = rng.uniform(4, 12, size=(n, k_max))
    for k in range(k_max):
        dx, dy = gx - lx[:, k, None, None], gy - ly[:, k, None, None]
        along = dx * np.cos(la[:, k, None, None]) + dy * np.sin(la[:, k, None, None])
        across = -dx * np.sin(la[:, k, None, None]) + dy * np.cos(la[:, k, None, None])
        m = (np.abs(along) <= ll[:, k, None, None] / 2) & (np.abs(across) <= 0.6) & (k < n_lines)[:, None, None]
        img = np.where(m[:, None], lc[:, k, :, None, None], img)
    # the shape: random centre, radius, rotation and (light) colour
    cx, cy = rng.uniform(10, 22, size=n), rng.uniform(10, 22, size=n)
    r = rng.uniform(7, 11, size=n)
    rot = rng.uniform(0, 2 * np.pi, size=n)
    fg = col(0.5, 1.0)
    dx, dy = gx - cx[:, None, None], gy - cy[:, None, None]
    cr, sr = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
    u = (dx * cr + dy * sr) / r[:, None, None]
    v = (-dx * sr + dy * cr) / r[:, None, None]
    mask = _shape_masks(y, u, v)
    img = np.where(mask[:, None], fg[:, :, None, None], img)
    # per-image brightness and contrast, then pixel noise
    contrast = rng.uniform(0.6, 1.4, size=n)[:, None, None, None]
    bright = rng.uniform(-0.2, 0.2, size=n)[:, None, None, None]
    img = (img - 0.5) * contrast + 0.5 + bright
    img = img + noise * rng.standard_normal(size=img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _cached(n_samples: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n_samples, dtype=np.int64) % NUM_CLASSES
    y = y[rng.permutation(n_samples)]
    x = np.round(_render(y, rng, noise) * 255.0).astype(np.uint8)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def generate_shapes32(n_samples: int = 4000, seed: int = 0, *, noise: float = 0.08) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw Shapes-32 images: uint8 (N, 3, 32, 32) and int64 labels in 0..9 (see the module docstring).

    Args:
        n_samples: number of images, at least 10 (one per class).
        seed: fixes every random choice; the same arguments give the same bytes.
        noise: standard deviation of the Gaussian pixel noise, in units of the full [0, 1] range.

    Returns:
        ``(x, y)``: fresh tensors (the arrays behind them are cached per arguments, read-only).
    """
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < NUM_CLASSES:
        raise ValueError(f"n_samples must be an integer >= {NUM_CLASSES} (one image per class), got {n_samples!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not (isinstance(noise, (int, float)) and 0 <= noise <= 1):
        raise ValueError(f"noise must be a number in [0, 1], got {noise!r}")
    x, y = _cached(n_samples, seed, float(noise))
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def load_shapes32(n_samples: int = 4000, seed: int = 0, *, val_fraction: float = 0.2,
                  noise: float = 0.08) -> tuple[ArrayDataset, ArrayDataset]:
    """Shapes-32 as ``(train, val)``: float32 images (N, 3, 32, 32) and int64 labels in 0..9.

    The generated images are in random order, so the first ``1 - val_fraction`` of them train and
    the rest validate (both balanced up to rounding). Pixels are scaled to [0, 1], then
    standardized per channel with the training split's mean and standard deviation.

    Args:
        n_samples: total images (train + val).
        seed: generation seed (see :func:`generate_shapes32`).
        val_fraction: share held out for validation, in (0, 1).
        noise: pixel noise (see :func:`generate_shapes32`).
    """
    x8, y = generate_shapes32(n_samples, seed, noise=noise)
    x = x8.float() / 255.0
    train, val = split_train_val(x, y, val_fraction)
    mean = train.x.mean(dim=(0, 2, 3), keepdim=True)
    std = train.x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (ArrayDataset(((train.x - mean) / std).contiguous(), train.y),
            ArrayDataset(((val.x - mean) / std).contiguous(), val.y))
