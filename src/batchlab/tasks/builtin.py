"""The built-in tasks, registered by name (see ``docs/tasks.md`` for measured accuracies).

Every default learning rate is for SGD with momentum 0.9 at batch size 128, and was checked
to train at that batch size. Tasks that read files (``mnist-cnn``, ``cifar10-resnet``) take
``root=`` or read the ``BATCHLAB_DATA`` environment variable.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

from batchlab.data.cifar import SUBFOLDER, TEST_FILES, TRAIN_FILES, load_cifar10
from batchlab.data.digits import load_digits
from batchlab.data.idx import MNIST_FILES, load_mnist
from batchlab.data.mnist1d import load_mnist1d
from batchlab.data.sequence import make_sequences
from batchlab.data.shapes32 import load_shapes32
from batchlab.data.synthetic import make_gaussian_mixture
from batchlab.models import CNN1d, CNN2d, MLP, ResNet, SequenceNet
from batchlab.tasks.registry import register_task
from batchlab.tasks.task import Task

DATA_ENV = "BATCHLAB_DATA"


def _data_root(task: str, root: str | os.PathLike[str] | None, expected: str) -> Path:
    if root is None:
        root = os.environ.get(DATA_ENV) or None
    if root is None:
        raise ValueError(
            f"task {task!r} reads local files: pass root=FOLDER (or set {DATA_ENV}=FOLDER); "
            f"expected in that folder: {expected}"
        )
    return Path(root).expanduser()


@register_task("digits-mlp", "MLP 64-100-100-100-10 on scikit-learn's 8x8 digits (1438 train / 359 val)")
def digits_mlp(*, seed: int = 0, val_fraction: float = 0.2, hidden: Sequence[int] = (100, 100, 100)) -> Task:
    """MLP on the 8x8 digits."""
    train, val = load_digits(val_fraction=val_fraction, seed=seed)
    return Task(
        name="digits-mlp",
        model_fn=functools.partial(MLP, 64, tuple(hidden), 10),
        train_set=train,
        val_set=val,
        num_classes=10,
        optimizer="momentum",
        lr=0.05,
        batch_size=128,
        epochs=20,
        norm="batch",
        description="MLP on 8x8 digits",
        info={"seed": seed, "val_fraction": val_fraction, "hidden": list(hidden)},
    )


@register_task("digits-cnn", "2-layer CNN (16/32 channels) on scikit-learn's 8x8 digits")
def digits_cnn(*, seed: int = 0, val_fraction: float = 0.2) -> Task:
    """Small CNN on the 8x8 digits."""
    train, val = load_digits(val_fraction=val_fraction, seed=seed)
    return Task(
        name="digits-cnn",
        model_fn=functools.partial(CNN2d, 1, 10, (16, 32), input_size=8),
        train_set=train,
        val_set=val,
        num_classes=10,
        optimizer="momentum",
        lr=0.05,
        batch_size=128,
        epochs=20,
        norm="batch",
        description="CNN on 8x8 digits",
        info={"seed": seed, "val_fraction": val_fraction},
    )


def _shapes32(name: str, channels: tuple[int, ...], description: str, n_samples: int, seed: int,
              val_fraction: float) -> Task:
    """A CNN2d with ``channels`` (each block pooling by 2) on Shapes-32."""
    train, val = load_shapes32(n_samples, seed, val_fraction=val_fraction)
    return Task(
        name=name,
        model_fn=functools.partial(CNN2d, 3, 10, channels, input_size=32),
        train_set=train,
        val_set=val,
        num_classes=10,
        optimizer="momentum",
        lr=0.05,
        batch_size=128,
        epochs=20,
        norm="batch",
        description=description,
        info={"n_samples": n_samples, "seed": seed, "val_fraction": val_fraction},
    )


@register_task("shapes32-cnn", "3-layer CNN (8/16/32 channels) on Shapes-32, generated 32x32 RGB shapes (n_samples=3000)")
def shapes32_cnn(*, n_samples: int = 3000, seed: int = 0, val_fraction: float = 0.2) -> Task:
    """Small CNN on Shapes-32 (10 classes of shapes with random colour, position, clutter and noise)."""
    return _shapes32("shapes32-cnn", (8, 16, 32), "CNN on generated 32x32 RGB shapes", n_samples, seed, val_fraction)


@register_task("shapes32-vgg", "VGG-style CNN, 5 blocks (8/16/32/64/64 channels) pooling to 1x1, on Shapes-32 (n_samples=3000)")
def shapes32_vgg(*, n_samples: int = 3000, seed: int = 0, val_fraction: float = 0.2) -> Task:
    """Shapes-32 with a VGG-style CNN for CIFAR-sized images: five conv blocks, each pooling by 2, down to 1x1,
    so the last two norms see 4x4 and 2x2 maps of image-level features (shapes32-cnn's last norm sees 8x8)."""
    return _shapes32("shapes32-vgg", (8, 16, 32, 64, 64), "VGG-style CNN (to 1x1) on generated 32x32 RGB shapes",
                     n_samples, seed, val_fraction)


@register_task("mnist1d-mlp", "MLP 40-100-100-100-10 on MNIST-1D (generated, n_samples=4000)")
def mnist1d_mlp(*, n_samples: int = 4000, seed: int = 0, hidden: Sequence[int] = (100, 100, 100)) -> Task:
    """MLP on MNIST-1D."""
    train, val = load_mnist1d(n_samples, seed)
    return Task(
        name="mnist1d-mlp",
        model_fn=functools.partial(MLP, 40, tuple(hidden), 10),
        train_set=train,
        val_set=val,
        num_classes=10,
        optimizer="momentum",
        lr=0.05,
        batch_size=128,
        epochs=30,
        norm="batch",
        description="MLP on MNIST-1D",
        info={"n_samples": n_samples, "seed": seed, "hidden": list(hidden)},
    )


@register_task("mnist1d-cnn", "strided 1-D CNN (3x32 channels) on MNIST-1D (generated, n_samples=4000)")
def mnist1d_cnn(*, n_samples: int = 4000, seed: int = 0) -> Task:
    """1-D CNN on MNIST-1D."""
    train, val = load_mnist1d(n_samples, seed)
    return Task(
        name="mnist1d-cnn",
        model_fn=functools.partial(CNN1d, 1, 10, (32, 32, 32), input_length=40),
        train_set=train,
        val_set=val,
        num_classes=10,
        optimizer="momentum",
        lr=0.05,
        batch_size=128,
        epochs=30,
        norm="batch",
        description="CNN on MNIST-1D",
        info={"n_samples": n_samples, "seed": seed},
    )


@register_task("synthetic-mlp", "MLP 16-64-64-4 on a seeded Gaussian mixture (4 classes x 3 clusters)")
def synthetic_mlp(*, n_samples: int = 4000, dim: int = 16, noise: float = 1.0, seed: int = 0) -> Task:
    """MLP on a synthetic Gaussian mixture."""
    train, val = make_gaussian_mixture(n_samples, dim=dim, noise=noise, seed=seed)
    return Task(
        name="synthetic-mlp",
        model_fn=functools.partial(MLP, dim, (64, 64), 4),
        train_set=train,
        val_set=val,
        num_classes=4,
        optimizer="momentum",
        lr=0.05,
        batch_size=128,
        epochs=10,
        norm="batch",
        description="MLP on a Gaussian mixture",
        info={"n_samples": n_samples, "dim": dim, "noise": noise, "seed": seed},
    )


@register_task("sequence-cls", "position-wise residual net on padded variable-length sequences (LayerNorm)")
def sequence_cls(
    *, n_samples: int = 4000, max_len: int = 32, signal_fraction: float = 0.25, noise: float = 0.3, seed: int = 0
) -> Task:
    """Sequence classification with padding; its default norm is LayerNorm.

    Lower ``signal_fraction`` or higher ``noise`` make it harder.
    """
    train, val = make_sequences(n_samples, max_len=max_len, signal_fraction=signal_fraction, noise=noise, seed=seed)
    dim = train.features.shape[-1]
    return Task(
        name="sequence-cls",
        model_fn=functools.partial(SequenceNet, dim, 4),
        train_set=train,
        val_set=val,
        num_classes=4,
        optimizer="momentum",
        lr=0.05,
        batch_size=128,
        epochs=15,
        norm="layer",
        description="padded sequence classification",
        info={"n_samples": n_samples, "max_len": max_len, "signal_fraction": signal_fraction, "noise": noise,
              "seed": seed},
    )


@register_task("mnist-cnn", "2-layer CNN (16/32 channels) on MNIST from local idx files (root= or BATCHLAB_DATA)")
def mnist_cnn(*, root: str | os.PathLike[str] | None = None) -> Task:
    """CNN on MNIST read from the original idx files."""
    expected = ", ".join(f"{n}[.gz]" for n in MNIST_FILES.values())
    train, test = load_mnist(_data_root("mnist-cnn", root, expected))
    return Task(
        name="mnist-cnn",
        model_fn=functools.partial(CNN2d, 1, 10, (16, 32), input_size=28),
        train_set=train,
        val_set=test,
        num_classes=10,
        optimizer="momentum",
        lr=0.05,
        batch_size=128,
        epochs=3,
        norm="batch",
        description="CNN on MNIST (local files)",
    )


@register_task("cifar10-resnet", "CIFAR-style ResNet-20 (depth=) on CIFAR-10 from local batches (root= or BATCHLAB_DATA)")
def cifar10_resnet(*, root: str | os.PathLike[str] | None = None, depth: int = 20) -> Task:
    """ResNet on CIFAR-10 read from the python pickle batches."""
    expected = f"{', '.join(TRAIN_FILES + TEST_FILES)} (directly or in {SUBFOLDER}/)"
    train, test = load_cifar10(_data_root("cifar10-resnet", root, expected))
    return Task(
        name="cifar10-resnet" if depth == 20 else f"cifar10-resnet{depth}",
        model_fn=functools.partial(ResNet, depth, 10),
        train_set=train,
        val_set=test,
        num_classes=10,
        optimizer="momentum",
        lr=0.1,
        batch_size=128,
        epochs=30,
        norm="batch",
        description=f"ResNet-{depth} on CIFAR-10 (local files)",
        info={"depth": depth},
    )
