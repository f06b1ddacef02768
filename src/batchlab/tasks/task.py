"""The :class:`Task`: a model factory, its data, how a batch goes through the model, the loss, the
metric and its direction, and the default optimizer settings.

Two kinds of task share one type:

- the built-in tasks: in-memory tensors (:class:`~batchlab.data.arrays.ArrayDataset`), a model
  factory taking ``norm=`` and ``activation=``, ``model(x)`` and ``loss(logits, y)``;
- a user's own task, made by :meth:`Task.from_torch` from any ``nn.Module`` factory and any torch
  ``Dataset``: batches may be pairs, tuples or mappings (passed to the model as keyword arguments,
  as Hugging Face models take them); outputs may be tensors, tuples or objects carrying ``.loss``
  and ``.logits``; normalization swaps go through :func:`batchlab.norm.convert_norm`.

Every tool reaches a task's data and model only through its methods (:meth:`Task.make_model`,
:meth:`Task.forward_batch`, :meth:`Task.loss_of`, :meth:`Task.metric_of`, :attr:`Task.train_source`),
so each works on both kinds.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from batchlab.data.arrays import ArrayDataset
from batchlab.data.sources import TARGET_KEYS, Source, batch_size_of, make_source, move_to_device
from batchlab.tasks.optimizers import OPTIMIZERS, make_optimizer, optimizer_name, unwrap_optimizer

__all__ = ["METRICS", "Task", "TaskError", "accuracy"]

#: the metrics a task may name; anything else is a callable ``metric(out, batch) -> float``
METRICS = ("accuracy", "loss")


class TaskError(ValueError):
    """Something about a task (its model, data, loss or metric) is wrong; the message names the task."""


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose arg-max equals the label (``logits.shape[:-1]`` must equal ``y.shape``)."""
    pred = logits.argmax(dim=-1)
    if pred.shape != y.shape:
        raise ValueError(f"accuracy: logits of shape {tuple(logits.shape)} need targets of shape {tuple(pred.shape)} "
                         f"(the logits' shape without the class dimension), got {tuple(y.shape)}")
    return float((pred == y).float().mean())


def carried_loss(out: Any) -> Any:
    """The loss a model output carries, ``out.loss`` or ``out["loss"]`` (None when it has neither)."""
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    return loss


def _norm_layers(model: nn.Module) -> str:
    """What normalization a model has, e.g. "LayerNorm x 5" or "no normalization layer"."""
    counts: dict[str, int] = {}
    for m in model.modules():
        kind = type(m).__name__
        if "Norm" in kind:
            counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{k} x {v}" for k, v in counts.items()) or "no normalization layer"


def is_pooled_metric(metric: Any) -> bool:
    """A metric object pooled over the whole validation set: ``reset()``, ``update(out, batch)`` per
    batch, ``compute() -> number`` at the end (R^2, mIoU, AUC: anything a mean of per-batch values
    would get wrong). torchmetrics' objects have the same three methods, with ``update(preds, target)``."""
    return all(callable(getattr(metric, k, None)) for k in ("reset", "update", "compute")) and not isinstance(metric, type)


def shifts_labels(out: Any) -> bool:
    """Whether the model compares position t's logits with label t+1 itself, as a Hugging Face
    causal LM does (its output is a ``CausalLMOutput...``): the labels are the inputs, unshifted."""
    return type(out).__name__.startswith("CausalLMOutput")


def _scalar_output(name: str, out: torch.Tensor) -> str:
    return (f"task {name!r}: the model returned a scalar ({float(out.detach()):.4g}), not logits; if it is the loss, "
            "give loss=lambda out, batch: out, and a metric that does not need logits (metric='loss' or your own)")


def _shape_mismatch(name: str, logits: torch.Tensor, y: torch.Tensor) -> str:
    if logits.dim() == 0:
        return _scalar_output(name, logits)
    if logits.dim() == y.dim() + 1 >= 3 and logits.shape[0] == y.shape[0] and logits.shape[2:] == y.shape[1:]:
        return (f"task {name!r}: the model's logits {tuple(logits.shape)} have the classes in dimension 1, one score "
                f"per position, as a segmentation model's (N, C, H, W) against targets {tuple(y.shape)}; the default "
                "loss and accuracy take classes last: give loss= (e.g. lambda out, b: F.cross_entropy(out, b[1], "
                "ignore_index=255)) and metric= (a pixel accuracy, or an mIoU object with reset/update/compute)")
    return (f"task {name!r}: the model's logits have shape {tuple(logits.shape)} (classes last), so the default loss "
            f"and accuracy need targets of shape {tuple(logits.shape[:-1])}, got {tuple(y.shape)}; fix the model's "
            "output shape, or give loss= and metric=")


@dataclass
class Task:
    """Everything needed to train one network on one data set.

    Build a user task with :meth:`Task.from_torch`; the built-in tasks use the constructor.

    Attributes:
        name: registry name or entry point.
        model_fn: a factory; with ``model_kwargs`` it takes ``norm=`` and ``activation=``
            (built-in models), otherwise no argument.
        train_set, val_set: an :class:`ArrayDataset` or any torch ``Dataset``.
        num_classes: number of target classes (None when not a classification task).
        loss: ``loss(logits, targets) -> scalar``, the criterion used when the output carries no
            loss and no ``batch_loss`` is given (cross-entropy by default).
        metric: ``metric(logits, targets) -> float`` for logits-level metrics (accuracy by default).
        optimizer: default optimizer name (see ``batchlab.train.config.OPTIMIZERS``).
        lr: default learning rate, tuned for ``batch_size``.
        batch_size: the batch size ``lr`` was set for.
        epochs: a sensible default training length.
        norm: the default normalization of a built-in model (None: the user model's own).
        forward: ``forward(model, batch) -> out``; None: ``model(inputs)`` for a pair or tuple,
            ``model(**batch)`` for a mapping.
        batch_loss: ``batch_loss(out, batch) -> scalar``; None: the loss the output carries
            (``out.loss`` / ``out["loss"]``), else ``loss(logits, targets)``.
        batch_metric: ``batch_metric(out, batch) -> float``, averaged over examples.
        metric_name: "accuracy", "loss" (the validation loss) or the callable's name.
        higher_is_better: the metric's direction.
        collate_fn, num_workers, pin_memory: how a ``DataLoader`` batches a torch ``Dataset``
            (``pin_memory`` None: pin when training on CUDA).
        model_kwargs: whether ``model_fn`` takes ``norm=`` and ``activation=``.
        version: the user's name for this version of model and data; when set, the results store
            trusts it instead of sampling the data.
        spec: how the registry built this task (``(name or entry point, kwargs)``), so another
            process can build it again instead of receiving its tensors.
        optimizer_fn: the user's own optimizer, ``optimizer_fn(model, lr) -> Optimizer`` (see
            :meth:`from_torch`); ``optimizer`` is then its kind (for the scaling rules), and
            :meth:`build_optimizer` uses it.
    """

    name: str
    model_fn: Callable[..., nn.Module]
    train_set: Any
    val_set: Any
    num_classes: int | None = None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    metric: Callable[[torch.Tensor, torch.Tensor], float] = accuracy
    optimizer: str = "momentum"
    lr: float = 0.05
    batch_size: int = 128
    epochs: float = 10.0
    norm: str | None = "batch"
    description: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    forward: Callable[[nn.Module, Any], Any] | None = None
    batch_loss: Callable[[Any, Any], torch.Tensor] | None = None
    batch_metric: Callable[[Any, Any], float] | None = None
    metric_name: str = "accuracy"
    higher_is_better: bool = True
    collate_fn: Callable[[list[Any]], Any] | None = None
    num_workers: int = 0
    pin_memory: bool | None = None
    model_kwargs: bool = True
    version: str | None = None
    spec: tuple[str, dict[str, Any]] | None = None
    optimizer_fn: Callable[[nn.Module, float], torch.optim.Optimizer] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_torch(
        cls,
        name: str,
        model: Callable[[], nn.Module] | nn.Module,
        train: Any,
        val: Any,
        *,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        loss: Callable[[Any, Any], torch.Tensor] | None = None,
        metric: str | Callable[[Any, Any], float] = "accuracy",
        higher_is_better: bool | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        optimizer: str | Callable[..., torch.optim.Optimizer] = "sgd",
        lr: float = 0.1,
        batch_size: int = 128,
        epochs: float = 10,
        version: str | None = None,
        description: str = "",
        info: Mapping[str, Any] | None = None,
    ) -> Task:
        """A task from a user's own model factory and torch Datasets.

        Args:
            name: the task's name (reports, results store, error messages).
            model: a zero-argument callable returning a fresh ``nn.Module`` (a class, a function, a
                ``functools.partial``); an ``nn.Module`` instance is copied for every run.
            train, val: any torch ``Dataset`` (map-style or ``IterableDataset``) or an ArrayDataset.
            forward: ``forward(model, batch) -> out``; None: ``model(inputs)`` for a pair (or
                ``model(*batch[:-1])`` for a longer tuple), ``model(**batch)`` for a mapping.
            loss: ``loss(out, batch) -> scalar tensor``; None: the loss the output carries
                (``out.loss`` or ``out["loss"]``), else cross-entropy of the logits and targets.
            metric: "accuracy" (arg-max of the logits against the targets, ignoring -100),
                "loss" (the validation loss, lower is better), ``metric(out, batch) -> float``
                (a per-batch value averaged over examples: right for means of per-example values,
                such as MAE), or an object with ``reset()``, ``update(out, batch)`` and
                ``compute()`` pooled over the whole validation set (R^2, mIoU, AUC). Logits are the output itself, ``out.logits``,
                ``out["logits"]`` or a tuple's first element; targets the batch's last element or
                ``batch["labels"]``.
            higher_is_better: the metric's direction; inferred for the named metrics, required
                for a callable.
            collate_fn, num_workers, pin_memory: passed to the ``DataLoader`` (``pin_memory``
                None: pin when training on CUDA).
            optimizer: a name (``"sgd"``, ``"momentum"``, ``"nesterov"``, ``"adam"``, ``"adamw"``,
                ``"lbfgs"``: batchlab builds it over all parameters) or your own optimizer:
                ``optimizer(model, lr) -> torch.optim.Optimizer`` (parameter groups, betas, weight
                decay as you train, e.g. ``lambda m, lr: m.configure_optimizers(0.1, lr, (0.9,
                0.95), "cpu")``), or a torch optimizer class or ``functools.partial`` of one
                (``partial(torch.optim.AdamW, betas=(0.9, 0.95), weight_decay=0.1)``), called as
                ``cls(model.parameters(), lr=lr)``. ``lr`` is the first parameter group's learning
                rate; other groups keep their ratio to it when batchlab scales it. The kind (SGD,
                Adam, AdamW, ...) decides the scaling rules; it is checked here, on one model.
            lr, batch_size, epochs: the defaults a run uses when its config does not say
                (``lr`` is the learning rate for ``batch_size``).
            version: a name for this version of model and data; the results store then trusts it
                instead of sampling the data set to notice a change.
        """
        where = f"Task.from_torch(name={name!r})"
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"Task.from_torch: name must be a non-empty string, got {name!r}")
        if isinstance(model, nn.Module):
            model = functools.partial(copy.deepcopy, model)
        elif not callable(model):
            raise TypeError(f"{where}: model must be a zero-argument callable returning an nn.Module "
                            f"(or an nn.Module), got {type(model).__name__}")
        for arg, value in (("train", train), ("val", val)):
            if not (isinstance(value, (ArrayDataset, torch.utils.data.Dataset)) or hasattr(value, "__getitem__")):
                raise TypeError(f"{where}: {arg} must be a torch Dataset (map-style or IterableDataset) or an "
                                f"ArrayDataset, got {type(value).__name__}")
        for arg, value in (("forward", forward), ("loss", loss), ("collate_fn", collate_fn)):
            if value is not None and not callable(value):
                raise TypeError(f"{where}: {arg} must be None or a callable, got {type(value).__name__}")
        if isinstance(metric, str):
            if metric not in METRICS:
                raise ValueError(f"{where}: metric must be one of {', '.join(METRICS)} or a callable(out, batch), "
                                 f"got {metric!r}")
            inferred = metric == "accuracy"
            if higher_is_better is not None and bool(higher_is_better) != inferred:
                raise ValueError(f"{where}: metric {metric!r} is {'higher' if inferred else 'lower'} is better; "
                                 f"got higher_is_better={higher_is_better!r}")
            higher_is_better, metric_name, batch_metric = inferred, metric, None
        elif not isinstance(metric, str) and callable(getattr(metric, "update", None)) and \
                callable(getattr(metric, "compute", None)) and not is_pooled_metric(metric):
            raise TypeError(f"{where}: a metric object needs reset(), update(out, batch) and compute(); "
                            f"{type(metric).__name__} has no reset()")
        elif is_pooled_metric(metric):
            if not isinstance(higher_is_better, bool):
                raise ValueError(f"{where}: a metric object needs higher_is_better=True or False, "
                                 f"got {higher_is_better!r}")
            metric_name = str(getattr(metric, "name", None) or type(metric).__name__)
            batch_metric = metric
        elif callable(metric):
            if not isinstance(higher_is_better, bool):
                raise ValueError(f"{where}: a callable metric needs higher_is_better=True or False, "
                                 f"got {higher_is_better!r}")
            metric_name = getattr(metric, "__name__", "metric")
            metric_name = "metric" if metric_name == "<lambda>" else metric_name
            batch_metric = metric
        else:
            raise TypeError(f"{where}: metric must be 'accuracy', 'loss', a callable(out, batch) or an object with "
                            f"reset() / update(out, batch) / compute(), got {type(metric).__name__}")
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"{where}: num_workers must be an integer >= 0, got {num_workers!r}")
        if pin_memory is not None and not isinstance(pin_memory, bool):
            raise TypeError(f"{where}: pin_memory must be None, True or False, got {pin_memory!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"{where}: lr must be a positive finite number, got {lr!r}")
        optimizer_fn = None
        if callable(optimizer):
            optimizer_fn = _optimizer_factory(optimizer)
            optimizer = _optimizer_kind(where, optimizer_fn, model, float(lr))
        elif optimizer not in OPTIMIZERS:
            raise ValueError(f"{where}: optimizer must be one of {', '.join(OPTIMIZERS)} or a callable "
                             f"optimizer(model, lr) -> torch.optim.Optimizer, got {optimizer!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{where}: batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not (math.isfinite(epochs) and epochs > 0):
            raise ValueError(f"{where}: epochs must be a positive finite number, got {epochs!r}")
        if version is not None and not isinstance(version, str):
            raise TypeError(f"{where}: version must be None or a string, got {type(version).__name__}")
        return cls(
            name=name, model_fn=model, train_set=train, val_set=val, num_classes=None, optimizer=optimizer,
            lr=float(lr), batch_size=batch_size, epochs=float(epochs), norm=None, description=description,
            info=dict(info or {}), forward=forward, batch_loss=loss, batch_metric=batch_metric,
            metric_name=metric_name, higher_is_better=higher_is_better, collate_fn=collate_fn,
            num_workers=num_workers, pin_memory=pin_memory, model_kwargs=False, version=version,
            optimizer_fn=optimizer_fn,
        )

    # ------------------------------------------------------------------ models
    def build_optimizer(self, model: nn.Module, lr: float, optimizer: str | None = None, *, momentum: float = 0.9,
                        weight_decay: float = 0.0, lbfgs_max_iter: int = 5) -> torch.optim.Optimizer:
        """The optimizer a run trains ``model`` with: the task's own (``optimizer_fn``) when
        ``optimizer`` is None or the task's kind, else the named one over all parameters
        (``momentum``, ``weight_decay`` and ``lbfgs_max_iter`` apply to named optimizers only)."""
        name = optimizer or self.optimizer
        if self.optimizer_fn is not None and name == self.optimizer:
            if weight_decay:
                raise ValueError(f"task {self.name!r} builds its own optimizer, which sets its weight decay; "
                                 f"got weight_decay={weight_decay!r} (allowed: 0, or name an optimizer)")
            return self.optimizer_fn(_unwrapped(model), lr)  # the user's module, as their factory expects
        return make_optimizer(name, model.parameters(), lr, momentum=momentum, weight_decay=weight_decay,
                              lbfgs_max_iter=lbfgs_max_iter)

    def make_model(self, norm: Any = None, activation: str | None = None, **kw: Any) -> nn.Module:
        """A fresh model. ``norm`` swaps the normalization layers (for a user model, by
        :func:`batchlab.norm.convert_norm` on its BatchNorm layers); ``activation`` works on
        built-in models only."""
        if self.model_kwargs:
            return self.model_fn(norm=self.norm if norm is None else norm, activation=activation or "relu", **kw)
        if activation not in (None, "relu"):
            raise TaskError(f"task {self.name!r}: activation={activation!r} needs a built-in model; a user model "
                            "keeps its own activations")
        try:
            model = self.model_fn(**kw)
        except Exception as e:  # noqa: BLE001 - reported with the task's name
            raise TaskError(f"task {self.name!r}: the model factory raised {type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise TaskError(f"task {self.name!r}: the model factory returned {type(model).__name__}, expected an nn.Module")
        if norm is not None:
            from batchlab.norm import convert_norm, is_batchnorm, known_norms

            if isinstance(norm, str) and norm not in known_norms():
                raise TaskError(f"task {self.name!r}: norm {norm!r} is unknown; known: {', '.join(known_norms())}")
            if not any(is_batchnorm(m) for m in model.modules()):
                raise TaskError(f"task {self.name!r}: norm {norm!r} replaces the model's BatchNorm layers, but "
                                f"{type(model).__name__} has none ({_norm_layers(model)}); a user model keeps its "
                                "own normalization")
            try:
                model = convert_norm(model, norm)
            except (ValueError, TypeError) as e:
                raise TaskError(f"task {self.name!r}: cannot convert the model's BatchNorm layers to {norm!r}: {e}") from e
        return model

    # ------------------------------------------------------------------ data
    @functools.cached_property
    def train_source(self) -> Source:
        """Where training batches come from (see :mod:`batchlab.data.sources`)."""
        return make_source(self.train_set, self.collate_fn, num_workers=self.num_workers,
                           pin_memory=bool(self.pin_memory))

    @functools.cached_property
    def val_source(self) -> Source:
        """Where validation batches come from."""
        return make_source(self.val_set, self.collate_fn, num_workers=self.num_workers,
                           pin_memory=bool(self.pin_memory))

    @property
    def in_memory(self) -> bool:
        """Whether both splits are in-memory tensors (the fast ``index_select`` path)."""
        return isinstance(self.train_set, ArrayDataset) and isinstance(self.val_set, ArrayDataset)

    @property
    def n_train(self) -> int:
        """Training examples (raises TaskError for an IterableDataset without a length)."""
        try:
            return len(self.train_source)
        except TypeError as e:
            raise TaskError(f"task {self.name!r}: {e}") from e

    def size(self, split: str = "train") -> int | None:
        """Examples in ``split`` ("train" or "val"); None for a stream without a length."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        try:
            return len(self.train_source if split == "train" else self.val_source)
        except TypeError:
            return None

    def sample_batch(self, n: int, *, seed: int = 0, split: str = "train", device: Any = "cpu") -> Any:
        """A batch of ``n`` examples drawn without replacement with ``seed`` (the first ``n`` of an
        iterable data set), on ``device``."""
        source = self.train_source if split == "train" else self.val_source
        if source.indexable:
            idx = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:n]
        else:
            idx = torch.arange(n)
        return move_to_device(source.fetch(idx), device)

    # ------------------------------------------------------------------ a batch through the model
    def forward_batch(self, model: nn.Module, batch: Any) -> Any:
        """The model's output on ``batch`` (the task's ``forward``, or the default rule)."""
        if self.forward is not None:
            return self.forward(model, batch)
        if type(batch) is tuple and len(batch) == 2:  # the common (inputs, targets) pair, first
            return model(batch[0])
        if isinstance(batch, Mapping):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(batch[0]) if len(batch) <= 2 else model(*batch[:-1])
        return model(batch)

    def inputs_of(self, batch: Any) -> Any:
        """The model's inputs in ``batch`` (used to feed a model directly, e.g. BN health checks)."""
        if isinstance(batch, (tuple, list)) and not isinstance(batch, Mapping):
            return batch[0]
        return batch

    def targets_of(self, batch: Any) -> torch.Tensor:
        """The targets in ``batch``: a pair's last element or ``batch["labels"]``."""
        if isinstance(batch, Mapping):
            for k in TARGET_KEYS:
                if k in batch:
                    return batch[k]
            raise TaskError(f"task {self.name!r}: a mapping batch needs a 'labels' entry for the default loss and "
                            f"accuracy (keys: {', '.join(map(str, batch))}); or give loss= and metric=")
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[-1]
        raise TaskError(f"task {self.name!r}: cannot find targets in a batch of type {type(batch).__name__}; "
                        "batches should be (inputs, targets) pairs or mappings with 'labels', or give loss= and metric=")

    def logits_of(self, out: Any) -> torch.Tensor:
        """The logits in a model output: the output itself, ``out.logits``, ``out["logits"]`` or a tuple's first."""
        if isinstance(out, torch.Tensor):
            return out
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, Mapping):
            logits = out.get("logits")
        if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            logits = out[0]
        if not isinstance(logits, torch.Tensor):
            raise TaskError(f"task {self.name!r}: cannot find logits in a model output of type {type(out).__name__} "
                            "(expected a tensor, .logits, ['logits'] or a tuple of tensors)")
        if logits.dim() == 0:
            raise TaskError(_scalar_output(self.name, logits))
        return logits

    def loss_of(self, out: Any, batch: Any) -> torch.Tensor:
        """The training loss of one batch (a scalar tensor)."""
        if self.batch_loss is not None:
            return self.batch_loss(out, batch)
        if type(out) is torch.Tensor and type(batch) is tuple and len(batch) == 2:  # logits and a pair, first
            y = batch[1]
            if out.dim() > 2:
                return self.loss(out.reshape(-1, out.shape[-1]), y.reshape(-1))
            return self.loss(out, y)
        carried = carried_loss(out)
        if isinstance(carried, torch.Tensor):
            return carried
        logits, y = self.logits_of(out), self.targets_of(batch)
        if logits.dim() > 2:  # token-level logits (N, T, V) against targets (N, T)
            return self.loss(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        return self.loss(logits, y)

    def loss_weight(self, out: Any, batch: Any, n: int) -> float:
        """What one batch's mean loss averages over, so that batches of different lengths pool
        exactly: the token targets that count (not -100; for a Hugging Face causal LM, the labels
        after its shift) when the targets are per token (an integer tensor of 2 or more
        dimensions) and the loss is the default or the model's own; else the ``n`` examples."""
        if not self.pools_by_tokens(batch):
            return float(n)
        y = self.targets_of(batch)
        if shifts_labels(out):
            y = y[..., 1:]
        return float((y != -100).sum())

    def pools_by_tokens(self, batch: Any) -> bool:
        """Whether this task's loss is a mean over tokens: per-token targets (an integer tensor of 2
        or more dimensions) with the default loss or the model's own (a user's loss averages over
        what it likes, which batchlab cannot know: it pools by examples, unless the callable says it
        returns the model's own loss with an ``is_model_loss = True`` attribute)."""
        if self.batch_loss is not None and not getattr(self.batch_loss, "is_model_loss", False):
            return False
        try:
            y = self.targets_of(batch)
        except TaskError:
            return False
        return isinstance(y, torch.Tensor) and y.dim() >= 2 and not y.is_floating_point()

    def metric_of(self, out: Any, batch: Any, n: int) -> tuple[float, float]:
        """The metric of one batch of ``n`` examples as ``(sum, weight)``, so that batches pool exactly.

        For "loss" the caller pools the losses itself; this returns ``(0, 0)``.
        """
        if self.metric_name == "loss" or is_pooled_metric(self.batch_metric):
            return 0.0, 0.0  # the caller pools the losses itself; a pooled metric pools itself (evaluate)
        if self.batch_metric is not None:
            return float(self.batch_metric(out, batch)) * n, float(n)
        logits, y = self.logits_of(out), self.targets_of(batch)
        if self.metric is accuracy:
            if shifts_labels(out) and logits.dim() > 2:  # next-token accuracy, as the model's own loss shifts
                logits, y = logits[:, :-1], y[:, 1:]
            pred = logits.argmax(dim=-1)
            if pred.shape != y.shape:  # broadcasting would compare every row with every label
                raise TaskError(_shape_mismatch(self.name, logits, y))
            keep = y != -100
            return float(((pred == y) & keep).sum()), float(keep.sum())
        return float(self.metric(logits, y)) * n, float(n)

    # ------------------------------------------------------------------ checks
    def check(self, device: Any = "cpu", *, model: nn.Module | None = None) -> None:
        """Run one tiny batch through the task before long work, and raise :class:`TaskError`
        naming what is wrong: an empty data set, a factory that raises, a batch the model rejects,
        a loss that is not a scalar, a metric of the wrong type, labels out of range.

        Checked once per task object and device; the global RNG is left as it was.
        """
        key = str(device)
        done = self.__dict__.setdefault("_checked", set())
        if key in done:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self._check(device, model)
        done.add(key)

    def _check(self, device: Any, model: nn.Module | None) -> None:
        name = self.name
        for split, source in (("training", self.train_source), ("validation", self.val_source)):
            try:
                empty = len(source) == 0
            except TypeError:
                empty = False  # an iterable data set of unknown length
            if empty:
                raise TaskError(f"task {name!r}: the {split} set is empty")
        if model is None:
            model = self.make_model()
        model = copy.deepcopy(model).to(device)
        for split, source in (("training", self.train_source), ("validation", self.val_source)):
            n = 4 if not source.indexable else min(4, len(source))
            try:
                batch = move_to_device(source.fetch(torch.arange(n)), device)
            except Exception as e:  # noqa: BLE001
                raise TaskError(f"task {name!r}: reading the {split} set failed: {type(e).__name__}: {e}") from e
            try:
                nb = batch_size_of(batch)
            except TypeError as e:
                raise TaskError(f"task {name!r}: {e}") from e
            model.train(split == "training")
            try:
                with torch.set_grad_enabled(split == "training"):
                    out = self.forward_batch(model, batch)
            except TaskError:
                raise
            except Exception as e:  # noqa: BLE001
                hint = ""
                if (self.forward is None and isinstance(batch, Mapping) and isinstance(e, TypeError)
                        and "unexpected keyword argument" in str(e)):
                    hint = (f"; a mapping batch is passed as model(**batch), every key ({', '.join(map(str, batch))}) "
                            "a keyword: give Task.from_torch(forward=lambda model, batch: model(input_ids=batch["
                            "'input_ids'], ...)) to feed it your way")
                raise TaskError(f"task {name!r}: the model rejected a {split} batch ({describe_batch(batch)}): "
                                f"{type(e).__name__}: {e}{hint}") from e
            default_loss = self.batch_loss is None and self.loss is F.cross_entropy and carried_loss(out) is None
            default_metric = self.batch_metric is None and self.metric is accuracy and self.metric_name == "accuracy"
            if default_loss or default_metric:
                self._check_targets(out, batch, "the default loss and accuracy" if default_loss and default_metric
                                    else "the default loss" if default_loss else "accuracy")
            try:
                loss = self.loss_of(out, batch)
            except TaskError:
                raise
            except Exception as e:  # noqa: BLE001
                mode = ("the model in training mode" if split == "training" else
                        "the model in eval mode, as batchlab computes the validation loss")
                raise TaskError(f"task {name!r}: the loss failed on a {split} batch ({describe_batch(batch)}; {mode}): "
                                f"{type(e).__name__}: {e}") from e
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
                what = f"a tensor of shape {tuple(loss.shape)} and dtype {loss.dtype}" if isinstance(loss, torch.Tensor) \
                    else type(loss).__name__
                raise TaskError(f"task {name!r}: the loss must be a scalar floating-point tensor (mean over the batch), "
                                f"got {what}")
            if split == "training" and not loss.requires_grad:
                raise TaskError(f"task {name!r}: the loss does not depend on the model's parameters (no gradient)")
            if split == "training":
                continue  # the metric is only ever computed on eval-mode outputs (a detection model's training
                # output is its loss dict): the validation batch checks it
            try:
                value = self._metric_value(out, batch, nb)
            except TaskError:
                raise
            except _PooledComputeError:
                # a pooled metric (AUC) may need more than this small batch (both classes, as a class-sorted
                # validation set's first rows are not): judged again on examples spread over the set
                self._check_pooled_spread(model, source, device)
                continue
            except Exception as e:  # noqa: BLE001
                raise TaskError(f"task {name!r}: the metric {self.metric_name!r} failed on a {split} batch: "
                                f"{type(e).__name__}: {e}") from e
            if not math.isfinite(value) and self.metric_name != "loss":
                raise TaskError(f"task {name!r}: the metric {self.metric_name!r} returned {value!r}")

    def _check_pooled_spread(self, model: nn.Module, source: Source, device: Any, k: int = 64) -> None:
        """A pooled metric's ``compute()`` on ``k`` validation examples spread evenly over the set
        (one batch); its error, if it still fails there, names the metric. A stream without a length
        is left to the evaluation."""
        try:
            n = len(source)
        except TypeError:
            return
        if not source.indexable or not n:
            return
        idx = torch.linspace(0, n - 1, min(k, n)).round().long().unique()
        try:
            batch = move_to_device(source.fetch(idx), device)
            with torch.no_grad():
                out = self.forward_batch(model.eval(), batch)
            self._metric_value(out, batch, batch_size_of(batch))
        except _PooledComputeError as e:
            raise TaskError(f"task {self.name!r}: the metric {self.metric_name!r} failed on {len(idx)} validation "
                            f"examples spread over the set: compute() raised {e.__cause__!r}") from e

    def _metric_value(self, out: Any, batch: Any, n: int) -> float:
        if self.batch_metric is not None:
            if is_pooled_metric(self.batch_metric):
                m = copy.deepcopy(self.batch_metric)  # the check leaves the task's metric as it was
                m.reset()
                m.update(out, batch)
                try:
                    v = m.compute()
                except Exception as e:  # noqa: BLE001 - told apart from a failing update() by check()
                    raise _PooledComputeError(str(e)) from e
            else:
                v = self.batch_metric(out, batch)
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                raise TaskError(f"task {self.name!r}: the metric {self.metric_name!r} must return a number, "
                                f"got {type(v).__name__}")
            return float(v)
        s, w = self.metric_of(out, batch, n)
        return s / w if w else 0.0

    def _check_targets(self, out: Any, batch: Any, what: str = "the default loss and accuracy") -> None:
        try:
            logits, y = self.logits_of(out), self.targets_of(batch)
        except TaskError:
            return
        if y.is_floating_point():
            fix = ("give loss= and metric=" if what.startswith("the default loss and") else
                   "give loss=" if what == "the default loss" else
                   "give a metric of your own (metric=callable or object, with higher_is_better) or metric='loss'")
            raise TaskError(f"task {self.name!r}: targets must be integer class indices for {what}, got dtype "
                            f"{y.dtype} (multi-label or regression targets); {fix}")
        if tuple(logits.shape[:-1]) != tuple(y.shape):
            raise TaskError(_shape_mismatch(self.name, logits, y))
        classes = logits.shape[-1]
        keep = y[y != -100]
        if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= classes):
            raise TaskError(f"task {self.name!r}: labels must be in 0..{classes - 1} (the model has {classes} outputs), "
                            f"found {int(keep.min())}..{int(keep.max())}")

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> dict[str, Any]:
        """What identifies this task for the results store.

        Built-in tasks: name, sizes, shapes and a BLAKE2 digest of at most 2**16 evenly strided
        elements of each tensor (exact bytes: independent of thread count and summation order).
        A user task adds the model (the factory's code and the parameter names and shapes of the
        model it builds), the forward/loss/metric code and the data (length and a digest of 16
        evenly spaced examples, read with fixed random seeds so augmentation does not change it),
        or the user's ``version`` instead of the data digest.
        """
        cached = self.__dict__.get("_fingerprint")
        if cached is not None:
            return cached
        info = {k: v for k, v in self.info.items() if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
        if self.in_memory and self.model_kwargs:
            h = hashlib.blake2b(digest_size=16)
            for t in (self.train_set.x, self.train_set.y, self.val_set.x, self.val_set.y):
                _digest_tensor(h, t)
            fp: dict[str, Any] = {
                "name": self.name, "n_train": len(self.train_set), "n_val": len(self.val_set),
                "shape": list(self.train_set.x.shape[1:]), "checksum": h.hexdigest(), "info": info,
            }
        else:
            fp = {
                "name": self.name,
                "model": _callable_fingerprint(self.model_fn),
                "model_structure": self._model_structure(),
                "code": {k: _callable_fingerprint(v) for k, v in (("forward", self.forward), ("loss", self.batch_loss),
                         ("metric", self.batch_metric), ("collate_fn", self.collate_fn),
                         ("optimizer", self.optimizer_fn)) if v is not None},
                "metric": self.metric_name,
                "data": {"version": self.version} if self.version is not None else
                        {"train": _data_digest(self.train_source), "val": _data_digest(self.val_source)},
                "info": info,
            }
        self.__dict__["_fingerprint"] = fp
        return fp

    def _model_structure(self) -> str:
        with torch.random.fork_rng(devices=[]):
            model = self.make_model()
        h = hashlib.blake2b(digest_size=8)
        h.update(type(model).__qualname__.encode())
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        return h.hexdigest()


class _PooledComputeError(Exception):
    """A pooled metric's ``compute()`` failed on the check's small batch (it may need more data)."""


def describe_batch(batch: Any, depth: int = 0) -> str:
    """A short description of a batch's structure: types, keys, shapes and dtypes."""
    if isinstance(batch, torch.Tensor):
        return f"tensor{tuple(batch.shape)} {str(batch.dtype).removeprefix('torch.')}"
    if depth > 2:
        return type(batch).__name__
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe_batch(v, depth + 1)}" for k, v in list(batch.items())[:8]) + "}"
    if isinstance(batch, (tuple, list)):
        inner = ", ".join(describe_batch(v, depth + 1) for v in batch[:6])
        return f"({inner})" if isinstance(batch, tuple) else f"[{inner}]"
    return type(batch).__name__


def _digest_tensor(h: Any, t: torch.Tensor, max_elements: int = 1 << 16) -> None:
    flat = t.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // max_elements)].contiguous().cpu()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(sample.view(torch.uint8).numpy().tobytes())


def _digest_value(h: Any, v: Any) -> None:
    if isinstance(v, torch.Tensor):
        _digest_tensor(h, v)
    elif isinstance(v, np.ndarray):
        _digest_tensor(h, torch.from_numpy(np.ascontiguousarray(v)))
    elif isinstance(v, Mapping):
        for k in v:
            h.update(repr(k).encode())
            _digest_value(h, v[k])
    elif isinstance(v, (tuple, list)):
        h.update(f"seq{len(v)}".encode())
        for x in v:
            _digest_value(h, x)
    elif isinstance(v, _PLAIN):
        h.update(repr(v).encode()[:4096])
    else:  # an object of the user's own (a batch class): by its content, never its repr's address
        _digest_state(h, v, 0)


def _data_digest(source: Source, k: int = 16) -> dict[str, Any]:
    """Length and a digest of ``k`` evenly spaced examples, read under fixed seeds (RNGs restored)."""
    try:
        n: int | None = len(source)
    except TypeError:
        n = None
    h = hashlib.blake2b(digest_size=16)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            random.seed(0)
            np.random.seed(0)
            if source.indexable and n:
                idx = torch.linspace(0, n - 1, min(k, n)).round().long().unique()
            else:
                idx = torch.arange(k)
            for i in idx:
                _digest_value(h, source.fetch(i.view(1)))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {"n": n, "digest": h.hexdigest()}


def _unwrapped(model: nn.Module) -> nn.Module:
    """The user's module inside wrappers that share its parameters: DistributedDataParallel,
    DataParallel and batchlab's rank shard (a ``module`` child and nothing else), torch.compile's
    ``_orig_mod``."""
    for _ in range(8):
        children = dict(model.named_children())
        if set(children) == {"module"}:
            model = children["module"]
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def _optimizer_factory(optimizer: Callable[..., Any]) -> Callable[[nn.Module, float], torch.optim.Optimizer]:
    """``optimizer(model, lr)`` from a user's callable: a torch optimizer class (or a partial of
    one) is called on the model's parameters; anything else is called with the model itself."""
    target = optimizer.func if isinstance(optimizer, functools.partial) else optimizer
    if inspect.isclass(target) and issubclass(target, torch.optim.Optimizer):
        return functools.partial(_call_on_parameters, optimizer)
    return optimizer


def _call_on_parameters(cls: Callable[..., torch.optim.Optimizer], model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return cls(model.parameters(), lr=lr)


def _optimizer_kind(where: str, factory: Callable[[nn.Module, float], Any], model_fn: Callable[[], nn.Module],
                    lr: float) -> str:
    """Build the user's optimizer once on one model: it must be a torch optimizer of a kind whose
    scaling rules batchlab knows, and its first group must take the ``lr`` it is given."""
    try:
        opt = factory(model_fn(), lr)
    except Exception as e:  # noqa: BLE001 - the user's code: report what it raised, here, not mid-run
        raise ValueError(f"{where}: optimizer(model, lr) raised {type(e).__name__}: {e}") from e
    inner = unwrap_optimizer(opt)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"{where}: optimizer(model, lr) must return a torch.optim.Optimizer, got {type(opt).__name__}")
    kind = optimizer_name(inner)
    if kind is None:
        raise ValueError(f"{where}: optimizer(model, lr) built {type(inner).__name__}, whose batch-size scaling rule "
                         "batchlab does not know; allowed: SGD (with or without momentum or Nesterov), Adam, AdamW "
                         "and Adam-like classes (NAdam, RAdam, Adamax, FusedAdam, AdamW8bit, ...), LBFGS")
    first = float(inner.param_groups[0]["lr"]) if inner.param_groups else math.nan
    if not math.isclose(first, lr, rel_tol=1e-6):
        raise ValueError(f"{where}: optimizer(model, lr) must set the first parameter group's learning rate to the lr "
                         f"it is given (batchlab scales it with the batch size); given lr={lr!r}, the group has {first!r}")
    return kind


def _callable_id(fn: Any) -> str:
    """A stable name and code digest of a callable (a partial's arguments included)."""
    if isinstance(fn, functools.partial):
        args = [_callable_id(a) if callable(a) and not isinstance(a, nn.Module) else _short_repr(a) for a in fn.args]
        kwargs = {k: _short_repr(v) for k, v in sorted(fn.keywords.items())}
        return f"partial({_callable_id(fn.func)}, {args}, {kwargs})"
    target = fn if inspect.isfunction(fn) or inspect.isclass(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn) else type(fn)
    name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"
    if target is type(fn) and type(fn).__repr__ is not object.__repr__:
        name += f"[{_short_repr(fn)}]"  # a callable object that says what it holds (settings are part of it)
    try:
        src = inspect.getsource(target)
    except (OSError, TypeError):
        return name
    return f"{name}@{hashlib.blake2b(src.encode(), digest_size=6).hexdigest()}"


def _callable_fingerprint(fn: Any) -> str:
    """:func:`_callable_id` and a digest of what the callable holds beyond its code (see
    :func:`_held_state`): a loss object's class weights, a closure's width, a partial's arguments.
    Two tasks whose code is the same but whose loss weights differ must not share stored results."""
    h = hashlib.blake2b(digest_size=6)
    for key, value in _held_state(fn):
        h.update(key.encode())
        _digest_state(h, value, 0)
    return f"{_callable_id(fn)}#{h.hexdigest()}"


_PLAIN = (str, int, float, bool, complex, bytes, type(None))


def _held_state(fn: Any) -> list[tuple[str, Any]]:
    """What a callable holds: a partial's arguments (and its function's state); a function's default
    arguments, closure cells and the plain module-level values its code reads (numbers, strings,
    tensors: editing a constant changes the task); a bound method's object; a callable object's
    attributes (an ``nn.Module``'s state_dict and settings)."""
    if isinstance(fn, functools.partial):
        return [("args", list(fn.args)), ("keywords", dict(fn.keywords)), *_held_state(fn.func)]
    if inspect.ismethod(fn):
        return [("self", fn.__self__), *_held_state(fn.__func__)]
    if inspect.isfunction(fn):
        code = fn.__code__
        cells = [(f"closure.{name}", c.cell_contents) for name, c in zip(code.co_freevars, fn.__closure__ or ())
                 if _cell_filled(c)]
        glob = [(f"global.{n}", fn.__globals__[n]) for n in code.co_names
                if n in fn.__globals__ and isinstance(fn.__globals__[n], (*_PLAIN, torch.Tensor, np.ndarray))]
        return [("defaults", fn.__defaults__), ("kwdefaults", fn.__kwdefaults__), *cells, *glob]
    if inspect.isclass(fn) or inspect.isbuiltin(fn):
        return []
    return [("object", fn)]


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _digest_state(h: Any, v: Any, depth: int, max_items: int = 64) -> None:
    """Digest a value by content, never by identity (no ``<object at 0x...>`` repr, which differs
    between processes and would stop an interrupted run from resuming): tensors and arrays by their
    bytes, containers by up to ``max_items`` entries, modules by state_dict and settings, other
    objects by their attributes down to depth 2, below that by type."""
    if isinstance(v, (torch.Tensor, np.ndarray)):
        _digest_value(h, v)
    elif isinstance(v, _PLAIN):
        h.update(repr(v).encode())
    elif isinstance(v, Mapping):
        h.update(f"map{len(v)}".encode())
        for k in list(v)[:max_items]:
            h.update(repr(k).encode() if isinstance(k, _PLAIN) else type(k).__qualname__.encode())
            _digest_state(h, v[k], depth)
    elif isinstance(v, (list, tuple, set, frozenset)):
        items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else list(v)
        h.update(f"seq{len(items)}".encode())
        for x in items[:max_items]:
            _digest_state(h, x, depth)
    elif isinstance(v, nn.Module):
        h.update(type(v).__qualname__.encode())
        for k, t in v.state_dict().items():
            h.update(k.encode())
            _digest_tensor(h, t)
        for k, x in sorted(vars(v).items()):  # settings such as label_smoothing, reduction, ignore_index
            if not k.startswith("_") and k != "training" and isinstance(x, (*_PLAIN, tuple)):
                h.update(f"{k}={x!r}".encode())
    elif depth < 2 and (callable(v) or hasattr(v, "__dict__")):
        h.update((_callable_id(v) if callable(v) else type(v).__qualname__).encode())
        own = _is_plain_object(v)  # an object: its attributes; a function or partial: what it holds
        for k, x in sorted(getattr(v, "__dict__", {}).items()) if own else _held_state(v):
            h.update(str(k).encode())
            _digest_state(h, x, depth + 1)
    else:
        h.update(type(v).__qualname__.encode())


def _is_plain_object(v: Any) -> bool:
    return not (inspect.isfunction(v) or inspect.ismethod(v) or isinstance(v, functools.partial)
                or inspect.isclass(v) or inspect.isbuiltin(v))


def _short_repr(v: Any) -> str:
    if isinstance(v, nn.Module):
        return f"{type(v).__qualname__}({sum(p.numel() for p in v.parameters())} params)"
    text = repr(v)
    return text if len(text) <= 200 else hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
