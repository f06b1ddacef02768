"""The :class:`Task`: a model factory, its data, loss, metric and default optimizer settings."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from batchlab.data.arrays import ArrayDataset


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose arg-max equals the label."""
    return float((logits.argmax(dim=-1) == y).float().mean())


@dataclass
class Task:
    """Everything needed to train one network on one data set.

    Attributes:
        name: registry name or entry point.
        model_fn: ``model_fn(norm=..., activation=...) -> nn.Module``.
        train_set, val_set: in-memory data sets.
        num_classes: number of target classes.
        loss: ``loss(logits, y) -> scalar tensor`` (mean over the batch).
        metric: ``metric(logits, y) -> float``, higher is better (accuracy by default).
        optimizer: default optimizer name (see ``batchlab.train.config.OPTIMIZERS``).
        lr: default learning rate, tuned for ``batch_size``.
        batch_size: the batch size ``lr`` was set for.
        epochs: a sensible default training length.
        norm: the default normalization of the model.
    """

    name: str
    model_fn: Callable[..., nn.Module]
    train_set: ArrayDataset
    val_set: ArrayDataset
    num_classes: int
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    metric: Callable[[torch.Tensor, torch.Tensor], float] = accuracy
    optimizer: str = "momentum"
    lr: float = 0.05
    batch_size: int = 128
    epochs: float = 10.0
    norm: str = "batch"
    description: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def make_model(self, norm: Any = None, activation: str = "relu", **kw: Any) -> nn.Module:
        """A fresh model; ``norm`` defaults to the task's."""
        return self.model_fn(norm=self.norm if norm is None else norm, activation=activation, **kw)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this task's data for caching: name, sizes, shapes and a checksum.

        The checksum is a BLAKE2 digest of the exact bytes of at most 2**16 evenly strided
        elements of each tensor (with shapes and dtypes): cheap for any data size and, unlike a
        floating-point sum, independent of thread count and summation order.
        """
        h = hashlib.blake2b(digest_size=16)
        for t in (self.train_set.x, self.train_set.y, self.val_set.x, self.val_set.y):
            _digest_tensor(h, t)
        return {
            "name": self.name,
            "n_train": len(self.train_set),
            "n_val": len(self.val_set),
            "shape": list(self.train_set.x.shape[1:]),
            "checksum": h.hexdigest(),
            "info": {k: v for k, v in self.info.items() if isinstance(v, (str, int, float, bool, list, tuple, type(None)))},
        }


def _digest_tensor(h: Any, t: torch.Tensor, max_elements: int = 1 << 16) -> None:
    flat = t.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // max_elements)].contiguous().cpu()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(sample.view(torch.uint8).numpy().tobytes())
