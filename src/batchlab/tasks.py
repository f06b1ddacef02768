"""Tasks: a model, its data, loss, metric and default optimizer settings, by name.

Built-in tasks are registered with :func:`register_task`; a user's own task is an entry point
``package.module:function`` returning a :class:`Task`.
"""

from __future__ import annotations

import hashlib
import importlib
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


TaskFactory = Callable[..., Task]
_TASKS: dict[str, tuple[TaskFactory, str]] = {}


def register_task(name: str, description: str = "") -> Callable[[TaskFactory], TaskFactory]:
    def deco(fn: TaskFactory) -> TaskFactory:
        _TASKS[name] = (fn, description or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


def list_tasks() -> dict[str, str]:
    """Registered task names with a one-line description."""
    _load_builtins()
    return {k: v[1] for k, v in sorted(_TASKS.items())}


def _load_builtins() -> None:
    import batchlab.builtin_tasks  # noqa: F401  (registers the built-in tasks)


def get_task(spec: str | Task, **kwargs: Any) -> Task:
    """A task by registry name or ``package.module:function`` entry point.

    Args:
        spec: a name from :func:`list_tasks`, an entry point, or a Task (returned as is).
        kwargs: passed to the task factory (e.g. ``root=`` for file-based tasks, ``n_samples=``).
    """
    if isinstance(spec, Task):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"task must be a registered name or 'package.module:function', got {spec!r}")
    if ":" in spec:
        return _load_entry_point(spec, **kwargs)
    _load_builtins()
    if spec not in _TASKS:
        raise ValueError(f"unknown task {spec!r}; known tasks: {', '.join(sorted(_TASKS))} (or 'package.module:function')")
    return _TASKS[spec][0](**kwargs)


def _load_entry_point(spec: str, **kwargs: Any) -> Task:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ValueError(f"task entry point must look like 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} of task entry point {spec!r}: {e}") from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (task entry point {spec!r})")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"task entry point {spec!r} is not callable")
    task = fn(**kwargs)
    if not isinstance(task, Task):
        raise ValueError(f"task entry point {spec!r} returned {type(task).__name__}, expected batchlab.tasks.Task")
    return task
