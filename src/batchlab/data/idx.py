"""MNIST in its original idx files, read from a folder the user names (no download).

The files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
and ``t10k-labels-idx1-ubyte``, each raw or gzip-compressed (``.gz``). An idx file starts with a
big-endian magic number (2051 for images, 2049 for labels), then one big-endian 32-bit size per
dimension, then the unsigned bytes.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from batchlab.data.arrays import ArrayDataset

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# torch's MNIST mean/std of pixel values in [0, 1], used when normalizing.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def check_labels(y: np.ndarray | torch.Tensor, num_classes: int, source: str) -> None:
    """Raise ValueError naming ``source`` if any label is outside ``0..num_classes-1``."""
    t = torch.as_tensor(y)
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{source}: labels must be in 0..{num_classes - 1}, found label {bad}")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a corrupt stream is zlib.error
        raise ValueError(f"{path}: cannot read idx file: {e}") from e


def _parse_idx(path: Path, magic: int, ndim: int) -> tuple[tuple[int, ...], np.ndarray]:
    data = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: file too short for an idx header: expected at least {header} bytes, found {len(data)}")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        kind = "images" if magic == IMAGES_MAGIC else "labels"
        raise ValueError(f"{path}: wrong magic number for idx {kind}: expected {magic}, found {found}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(
            f"{path}: byte count does not match header dims {dims}: expected {expected} bytes, found {len(data)}"
        )
    return dims, np.frombuffer(data, dtype=np.uint8, offset=header)


def read_idx_images(path: str | os.PathLike[str], *, image_shape: tuple[int, int] | None = (28, 28)) -> np.ndarray:
    """Images from an idx3 file (raw or ``.gz``) as uint8 (N, rows, cols).

    Args:
        path: the file.
        image_shape: the expected (rows, cols); None accepts any.
    """
    path = Path(path)
    dims, flat = _parse_idx(path, IMAGES_MAGIC, 3)
    if image_shape is not None and dims[1:] != tuple(image_shape):
        raise ValueError(f"{path}: expected images of {image_shape[0]}x{image_shape[1]} pixels, found {dims[1]}x{dims[2]}")
    return flat.reshape(dims)


def read_idx_labels(path: str | os.PathLike[str], *, num_classes: int = 10) -> np.ndarray:
    """Labels from an idx1 file (raw or ``.gz``) as int64 (N,), checked to lie in ``0..num_classes-1``."""
    path = Path(path)
    _, flat = _parse_idx(path, LABELS_MAGIC, 1)
    y = flat.astype(np.int64)
    check_labels(y, num_classes, str(path))
    return y


def find_mnist_files(root: str | os.PathLike[str]) -> dict[str, Path]:
    """Paths of the four MNIST files, raw or ``.gz``, in ``root`` or its ``mnist``, ``MNIST`` or
    ``MNIST/raw`` (torchvision's layout) subfolder."""
    root = Path(root).expanduser()
    expected = ", ".join(f"{n}[.gz]" for n in MNIST_FILES.values())
    if not root.is_dir():
        raise ValueError(f"MNIST folder {str(root)!r} does not exist or is not a folder; expected it to hold {expected}")
    found: dict[str, Path] = {}
    missing = []
    for key, name in MNIST_FILES.items():
        for folder in (root, root / "mnist", root / "MNIST", root / "MNIST" / "raw"):
            cands = [folder / name, folder / f"{name}.gz"]
            hit = next((c for c in cands if c.is_file()), None)
            if hit is not None:
                found[key] = hit
                break
        else:
            missing.append(f"{name}[.gz]")
    if missing:
        raise ValueError(
            f"MNIST folder {str(root)!r} is missing {', '.join(missing)}; expected files: {expected} "
            "(in the folder itself or in its mnist/, MNIST/ or MNIST/raw/ subfolder)"
        )
    return found


def _pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx_images(images)
    y = read_idx_labels(labels)
    if len(x) != len(y):
        raise ValueError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels; expected equal counts")
    return x, y


def load_mnist(root: str | os.PathLike[str], *, normalize: bool = True) -> tuple[ArrayDataset, ArrayDataset]:
    """MNIST ``(train, test)`` from the idx files in ``root``: float32 (N, 1, 28, 28), int64 labels.

    Args:
        root: folder holding the four files (raw or ``.gz``), or a torchvision-style root with
            ``MNIST/raw`` inside.
        normalize: scale to [0, 1] then standardize with the usual MNIST mean/std
            (0.1307, 0.3081); otherwise only scale to [0, 1].
    """
    files = find_mnist_files(root)
    out = []
    for split in ("train", "test"):
        x, y = _pair(files[f"{split}_images"], files[f"{split}_labels"])
        xt = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
        if normalize:
            xt = (xt - MNIST_MEAN) / MNIST_STD
        out.append(ArrayDataset(xt, torch.from_numpy(y)))
    return out[0], out[1]
