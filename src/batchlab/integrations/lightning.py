"""Lightning integration: the gradient noise scale while a ``Trainer`` trains, and a tuner-style
callback that sets the batch size and learning rate before it does.

``GradientNoiseScaleCallback`` logs ``b_simple`` (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training") through the module's logger once per measured optimizer step, from two
batch sizes:

- with gradient accumulation (``accumulate_grad_batches = k >= 2``, fixed or from a
  ``GradientAccumulationScheduler``, read afresh at every accumulation window), from gradients the
  step already computes. Small: each micro-batch's gradient. Lightning divides every micro-batch
  loss by k and accumulates into ``.grad``, so after the i-th backward (``on_after_backward``) the
  micro-batch gradient is ``k * (grad_after - grad_before)``. Big: the accumulated ``.grad`` at
  ``on_before_optimizer_step`` (before clipping): the mean of the k micro-batch gradients. One copy
  of the gradients, no extra forward or backward pass;
- without accumulation (k = 1), and always under DDP (where the accumulated gradient is already
  all-reduced), by splitting the batch: before the optimizer steps, the module's
  ``training_step`` runs on each half of the step's batch (one extra forward and backward,
  ``torch.autograd.grad`` on the module itself, outside DDP, so ``.grad`` and the other ranks are
  untouched; ``self.log`` is silenced, the RNG and buffers restored) and the halves' gradients
  (batch B/2) are compared with their mean (batch B). Under DDP every rank measures its own batch
  and the two norms are averaged over ranks.

The per-step estimates of ``|G|^2`` and ``tr(Sigma)`` are smoothed by two separate EMAs and
B_simple is their ratio (:class:`batchlab.batchsize.GradientNoiseScale` does the arithmetic).
Windows whose micro-batches differ in size or count (the short tail of an epoch) are skipped.

``BatchSizeTuner`` is a tuner in the manner of Lightning's ``BatchSizeFinder``: at ``on_fit_start``
it builds a :class:`batchlab.Task` from the LightningModule (a copy: its ``training_step`` gives the
loss, ``configure_optimizers`` the optimizer) and the DataModule's (or module's) datasets and
collate function, then either finds the memory maximum (``mode="memory"``,
:func:`batchlab.batchsize.max_batch_size`: every trial restored, a safety margin, the longest
examples, never past the data set, all ranks agreeing under DDP) or runs the whole recommendation
(``mode="suggest"``, :func:`batchlab.batchsize.suggest`). It sets the batch size where Lightning
looks for it (``batch_size`` on the module, its ``hparams`` or the DataModule) and the learning
rate (``lr`` or ``learning_rate``; in memory mode scaled by the LR rule from the old batch to the
new one), sets ``accumulate_grad_batches`` in suggest mode, and rebuilds the optimizers. The
module itself is never trained on: its parameters, buffers and the RNG are as before.

Needs the optional extra: ``pip install 'batchlab[lightning]'``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr, lightning_setattr
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "batchlab.integrations.lightning needs Lightning (>= 2.2): pip install 'batchlab[lightning]' "
        f"(import failed: {e})"
    ) from e

from batchlab.batchsize.noise import GradientNoiseScale
from batchlab.batchsize.state import preserved_state
from batchlab.integrations._split import rows, split_sqnorms
from batchlab.tasks import Task

__all__ = ["BatchSizeTuner", "GradientNoiseScaleCallback", "default_batch_size", "task_from_lightning"]


def default_batch_size(batch: Any) -> int:
    """Examples in ``batch``: the leading dimension of its first tensor (tuples, lists, dicts)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            try:
                return default_batch_size(item)
            except TypeError:
                continue
    raise TypeError(
        f"cannot tell the size of a batch of type {type(batch).__name__}; pass batch_size_fn= to GradientNoiseScaleCallback"
    )


def _step_loss(out: Any) -> torch.Tensor:
    """The loss a ``training_step`` returned (a tensor or a mapping with "loss")."""
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"training_step must return the loss (a tensor or a dict with 'loss'), got {type(out).__name__}")
    return out


class _Silenced:
    """``self.log`` / ``self.log_dict`` of a module made no-ops inside the block (extra steps must not log)."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.log = lambda *a, **k: None  # type: ignore[method-assign]
        self.module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]

    def __exit__(self, *exc: Any) -> None:
        for name in ("log", "log_dict"):
            self.module.__dict__.pop(name, None)


class GradientNoiseScaleCallback(pl.Callback):
    """Log the gradient noise scale B_simple during ``Trainer.fit``.

    Args:
        beta: EMA factor of the two accumulators (0.99 in the paper; 0.9-0.95 for short runs).
        every: measure every ``every``-th optimizer step only (the others cost nothing).
        name: the logged metric's name.
        batch_size_fn: ``fn(batch) -> int`` examples in a micro-batch (default: leading dimension
            of the first tensor).
        prog_bar: also show the value in the progress bar.

    Attributes:
        tracker: the :class:`~batchlab.batchsize.GradientNoiseScale` holding the EMAs and history
            (``tracker.b_simple``, ``tracker.state()``).
        modes: how each measured step was measured, ``{"accumulation": n, "split": n}``.
    """

    def __init__(
        self,
        beta: float = 0.99,
        every: int = 1,
        name: str = "b_simple",
        batch_size_fn: Callable[[Any], int] | None = None,
        prog_bar: bool = False,
    ) -> None:
        super().__init__()
        self.tracker = GradientNoiseScale(beta=beta, every=every)  # validates beta and every
        self.every = every
        self.name = name
        self.batch_size_fn = batch_size_fn or default_batch_size
        self.prog_bar = prog_bar
        self.modes = {"accumulation": 0, "split": 0}
        self._k = 1
        self._split = False
        self._active = False
        self._prev: list[torch.Tensor] | None = None
        self._small: list[torch.Tensor] = []
        self._sizes: list[int] = []
        self._size = 0
        self._batch: tuple[Any, int] | None = None

    @property
    def b_simple(self) -> float:
        """The current EMA ratio (NaN before the first measurement)."""
        return self.tracker.b_simple

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError("GradientNoiseScaleCallback needs automatic optimization (automatic_optimization=True)")

    def _params(self, pl_module: pl.LightningModule) -> list[torch.nn.Parameter]:
        return [p for p in pl_module.parameters() if p.requires_grad]

    @staticmethod
    def _sqnorm(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        if not ts:
            return torch.zeros((), dtype=torch.float64)
        return torch.stack([t.detach().double().square().sum() for t in ts]).sum()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        k = int(trainer.accumulate_grad_batches)  # a GradientAccumulationScheduler changes it between epochs
        if batch_idx % k == 0:  # first micro-batch of an accumulation window
            self._k = k
            self._split = k == 1 or trainer.world_size > 1
            self._active = trainer.global_step % self.every == 0
            self._prev, self._small, self._sizes, self._batch = None, [], [], None
        self._size = self.batch_size_fn(batch)
        if self._active and self._split:
            self._batch = (batch, batch_idx)  # the last micro-batch of the window is split

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active or self._split:
            return
        params = self._params(pl_module)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        diff = grads if self._prev is None else torch._foreach_sub(grads, self._prev)
        self._small.append(self._sqnorm(diff) * (self._k * self._k))  # undo Lightning's loss / k
        self._sizes.append(self._size)
        if self._prev is None:
            self._prev = [g.detach().clone() for g in grads]
        else:
            torch._foreach_copy_(self._prev, grads)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self._active:
            return
        self._active = False
        if self._split:
            batch, self._batch = self._batch, None
            if batch is not None:
                self._measure_split(trainer, pl_module, *batch)
            return
        sizes, small = self._sizes, self._small
        self._prev, self._small, self._sizes = None, [], []
        if len(sizes) != self._k or len(set(sizes)) != 1:
            return  # a short window at the end of an epoch: its mean is not a k * b batch gradient
        params = self._params(pl_module)
        big = float(self._sqnorm([p.grad for p in params if p.grad is not None]))
        mean_small = float(torch.stack(small).mean())
        self._record(trainer, pl_module, mean_small, big, sizes[0], sizes[0] * self._k, "accumulation")

    def _measure_split(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        n = self.batch_size_fn(batch)

        def loss_of_rows(lo: int, hi: int) -> torch.Tensor:
            return _step_loss(pl_module.training_step(rows(batch, n, lo, hi), batch_idx))

        with _Silenced(pl_module):
            got = split_sqnorms(pl_module, self._params(pl_module), n, loss_of_rows)
        if trainer.world_size > 1:
            # every rank measured its own batch: average the two norms over the ranks that could (every
            # rank joins the reduction, also one whose batch was too small, so none waits for another)
            small, big, h = got if got is not None else (0.0, 0.0, 0)
            ok = 1.0 if got is not None else 0.0
            t = torch.tensor([small * ok, big * ok, ok, float(h)], dtype=torch.float64, device=pl_module.device)
            t = trainer.strategy.reduce(t, reduce_op="sum")
            low = trainer.strategy.reduce(torch.tensor([float(h)], dtype=torch.float64, device=pl_module.device),
                                          reduce_op="min")
            if float(t[2]) < trainer.world_size or float(t[3]) != float(low[0]) * trainer.world_size:
                return  # some rank had no measurement, or the ranks' batches differ in size
            small, big = float(t[0]) / trainer.world_size, float(t[1]) / trainer.world_size
        elif got is None:
            return
        else:
            small, big, h = got
        self._record(trainer, pl_module, small, big, h, 2 * h, "split")

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, small: float, big: float, b_small: int,
                b_big: int, mode: str) -> None:
        value = self.tracker.update(small, big, b_small, b_big, step=trainer.global_step)
        self.modes[mode] += 1
        pl_module.log(self.name, value, on_step=True, on_epoch=False, prog_bar=self.prog_bar, batch_size=b_big)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prev, self._small, self._batch = None, [], None

    def state_dict(self) -> dict[str, Any]:
        return {"ema_g2": self.tracker.ema_g2, "ema_tr_sigma": self.tracker.ema_tr_sigma, "updates": self.tracker.updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.ema_g2 = float(state_dict["ema_g2"])
        self.tracker.ema_tr_sigma = float(state_dict["ema_tr_sigma"])
        self.tracker.updates = int(state_dict["updates"])


# ------------------------------------------------------------------ the tuner
def _lightning_forward(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return _step_loss(model.training_step(batch, 0))


def _lightning_loss(out: Any, batch: Any) -> torch.Tensor:
    return out


def _first_optimizer(configured: Any) -> torch.optim.Optimizer:
    """The optimizer in whatever ``configure_optimizers`` returned."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, Mapping) and "optimizer" in configured:
        return _first_optimizer(configured["optimizer"])
    if isinstance(configured, (list, tuple)) and configured:
        return _first_optimizer(configured[0])
    raise TypeError(f"configure_optimizers returned {type(configured).__name__}; BatchSizeTuner needs an optimizer")


def _configured_optimizer(model: pl.LightningModule, trainer: pl.Trainer) -> torch.optim.Optimizer:
    """The first optimizer of ``model.configure_optimizers()``, run with ``trainer`` attached (it may read
    ``self.trainer.estimated_stepping_batches`` and the like)."""
    model._trainer = trainer
    try:
        return _first_optimizer(model.configure_optimizers())
    finally:
        model._trainer = None


def _configured_lr(pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> float:
    """The LR the user configured: the module's ``lr`` / ``learning_rate`` when it has one (what the
    tuner sets), else the optimizer's before any scheduler moved it: OneCycleLR keeps it as "max_lr"
    (its "initial_lr" is max_lr / div_factor), torch's other schedulers as "initial_lr"."""
    attr = next((a for a in ("lr", "learning_rate") if lightning_hasattr(pl_module, a)), None)
    if attr is not None:
        try:
            return float(lightning_getattr(pl_module, attr))
        except (TypeError, ValueError):
            pass
    group = optimizer.param_groups[0]
    return float(group.get("max_lr", group.get("initial_lr", group["lr"])))


def _reload_dataloaders(trainer: pl.Trainer) -> None:
    """Make the fit loop build its DataLoaders again (with the new batch size): Lightning keeps the
    ones it built, and ``configure_optimizers`` reading ``trainer.estimated_stepping_batches`` builds
    them before any callback runs (what Lightning's own BatchSizeFinder resets)."""
    loop = trainer.fit_loop
    if hasattr(loop, "_combined_loader"):
        loop._combined_loader = None
    val_loop = getattr(getattr(loop, "epoch_loop", None), "val_loop", None)
    if val_loop is not None and hasattr(val_loop, "_combined_loader"):
        val_loop._combined_loader = None


def _loader_given_to_fit(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether the training DataLoader was passed to ``trainer.fit`` itself (not built by a hook of the
    DataModule or the module): its batch size is fixed, a tuner cannot change it."""
    holders = [h for h in (trainer.datamodule, pl_module) if h is not None]
    for h in holders:
        fn = getattr(h, "train_dataloader", None)
        if fn is None:
            continue
        try:
            if fn() is not None:
                return False
        except (NotImplementedError, MisconfigurationException):
            continue
    source = getattr(trainer.fit_loop, "_data_source", None)
    return source is not None and getattr(source, "instance", None) is not None and not source.is_module()


def _loaders(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Any, Any]:
    """The training and validation DataLoaders of the DataModule, the module, or ``fit``'s arguments."""
    holders = [h for h in (trainer.datamodule, pl_module) if h is not None]

    def get(kind: str) -> Any:
        for h in holders:
            fn = getattr(h, f"{kind}_dataloader", None)
            if fn is None:
                continue
            try:
                loader = fn()
            except (NotImplementedError, MisconfigurationException):  # a hook the user did not define
                continue
            if loader is not None:
                return loader[0] if isinstance(loader, (list, tuple)) and loader else loader
        source = getattr(trainer.fit_loop, "_data_source" if kind == "train" else "", None)
        if source is not None and getattr(source, "instance", None) is not None and not source.is_module():
            return source.instance
        return None

    train, val = get("train"), get("val")
    if train is None:
        raise ValueError("BatchSizeTuner: found no training DataLoader on the DataModule or the LightningModule")
    return train, val


def task_from_lightning(trainer: pl.Trainer, pl_module: pl.LightningModule, *, batch_arg_name: str = "batch_size",
                        name: str | None = None) -> tuple[Task, torch.nn.Module, torch.optim.Optimizer]:
    """A :class:`batchlab.Task` from a LightningModule and its data, plus a copy of the module and
    that copy's optimizer to measure with (the module itself is never trained on).

    The task's forward is the module's ``training_step`` (its loss), its metric the validation loss
    from the same ``training_step`` in eval mode; the datasets and collate function are those of
    the training (and validation, else training) DataLoader.
    """
    train_loader, val_loader = _loaders(trainer, pl_module)
    held = pl_module._trainer
    pl_module._trainer = None  # never copy the Trainer along with the module
    try:
        with preserved_state():
            template = copy.deepcopy(pl_module)
    finally:
        pl_module._trainer = held
    _Silenced(template).__enter__()  # the copies run training_step outside a Trainer: no logging

    def factory() -> torch.nn.Module:
        return copy.deepcopy(template)

    factory.__qualname__ = f"{type(pl_module).__qualname__}.copy"
    model = factory()
    optimizer = _configured_optimizer(model, trainer)
    lr = _configured_lr(pl_module, optimizer)
    batch = int(lightning_getattr(pl_module, batch_arg_name)) if lightning_hasattr(pl_module, batch_arg_name) else 32
    # the optimizer's LR goes with the examples per optimizer step: the loader's batch times the
    # Trainer's gradient accumulation times the processes (as the Hugging Face integration counts it)
    batch *= max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1)) * max(1, int(trainer.world_size or 1))
    epochs = float(trainer.max_epochs) if trainer.max_epochs and trainer.max_epochs > 0 else math.inf
    try:
        n = len(train_loader.dataset)
    except TypeError:
        n = None
    if trainer.max_steps and trainer.max_steps > 0 and n:  # Lightning stops at whichever comes first
        epochs = min(epochs, trainer.max_steps * batch / n)
    attr = next((a for a in ("lr", "learning_rate") if lightning_hasattr(template, a)), None)
    task = Task.from_torch(
        name=name or type(pl_module).__name__, model=factory, train=train_loader.dataset,
        val=(val_loader if val_loader is not None else train_loader).dataset, forward=_lightning_forward,
        loss=_lightning_loss, metric="loss", collate_fn=train_loader.collate_fn,
        optimizer=_ConfiguredOptimizer(trainer, attr), lr=lr, batch_size=max(1, batch),
        epochs=epochs if math.isfinite(epochs) else 1.0,
    )
    return task, model, optimizer


class _ConfiguredOptimizer:
    """``optimizer(model, lr)`` as the module configures it (``configure_optimizers`` with its LR
    attribute set to ``lr``): the trials train with the user's optimizer, its momentum, betas and
    weight decay, and refuse one whose batch-size rule batchlab does not know. Its LR scheduler is
    left out (the trials run a constant LR); every group keeps its ratio to the first."""

    def __init__(self, trainer: pl.Trainer, lr_attr: str | None) -> None:
        self.trainer, self.lr_attr = trainer, lr_attr

    def __call__(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        if self.lr_attr is not None:
            lightning_setattr(model, self.lr_attr, lr)
        opt = _configured_optimizer(model, self.trainer)  # type: ignore[arg-type]
        bases = [float(g.get("max_lr", g.get("initial_lr", g["lr"]))) for g in opt.param_groups]
        for g, b in zip(opt.param_groups, bases):
            g["lr"] = lr * (b / bases[0]) if bases[0] else lr
        return opt


class BatchSizeTuner(pl.Callback):
    """Set the batch size and learning rate at the start of ``Trainer.fit`` (a tuner, like
    Lightning's ``BatchSizeFinder``, that also works under DDP and also sets the LR).

    Args:
        mode: "memory" (the largest batch that fits, with a safety margin; the LR scaled from the
            old batch by ``lr_rule``) or "suggest" (batchlab's recommendation: batch, LR and
            accumulation).
        batch_arg_name: the attribute Lightning reads the batch size from.
        lr_attr: the LR attribute (default: ``lr`` or ``learning_rate``, whichever exists); the
            optimizers are rebuilt from ``configure_optimizers`` after it is set.
        scale_lr: in memory mode, scale the LR with the batch (False: keep it).
        lr_rule: "linear", "sqrt" or "none" (default: square root for Adam/AdamW, else linear).
        max_batch: never set a batch larger than this (default: the training-set size).
        margin, memory_limit: see :func:`batchlab.batchsize.max_batch_size`.
        quick, store, suggest_kwargs: passed to :func:`batchlab.batchsize.suggest` in suggest mode.

    Attributes:
        result: what was measured and set (plain data).
    """

    MODES = ("memory", "suggest")

    def __init__(self, mode: str = "memory", *, batch_arg_name: str = "batch_size", lr_attr: str | None = None,
                 scale_lr: bool = True, lr_rule: str | None = None, max_batch: int | None = None,
                 margin: float = 0.1, memory_limit: int | None = None, quick: bool = True, store: Any = None,
                 suggest_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        from batchlab.train.config import LR_RULES

        if lr_rule is not None and lr_rule not in LR_RULES:
            raise ValueError(f"lr_rule must be one of {', '.join(LR_RULES)}, got {lr_rule!r}")
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        from batchlab.batchsize.memory import check_margin, check_memory_limit

        check_margin(margin)
        check_memory_limit(memory_limit)
        self.mode, self.batch_arg_name, self.lr_attr = mode, batch_arg_name, lr_attr
        self.scale_lr, self.lr_rule, self.max_batch = scale_lr, lr_rule, max_batch
        self.margin, self.memory_limit = margin, memory_limit
        self.quick, self.store, self.suggest_kwargs = quick, store, dict(suggest_kwargs or {})
        self.result: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not lightning_hasattr(pl_module, self.batch_arg_name):
            raise ValueError(f"BatchSizeTuner: {self.batch_arg_name!r} is not an attribute of the module, its hparams "
                             "or the DataModule (batch_arg_name names where Lightning reads the batch size)")

    def _lr_attr(self, pl_module: pl.LightningModule) -> str | None:
        if self.lr_attr is not None:
            if not lightning_hasattr(pl_module, self.lr_attr):
                raise ValueError(f"BatchSizeTuner: lr_attr {self.lr_attr!r} is not an attribute of the module, its "
                                 "hparams or the DataModule")
            return self.lr_attr
        return next((a for a in ("lr", "learning_rate") if lightning_hasattr(pl_module, a)), None)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from batchlab.batchsize import max_batch_size, suggest
        from batchlab.train import default_lr_rule, scale_lr

        if _loader_given_to_fit(trainer, pl_module):
            raise ValueError("BatchSizeTuner: the training DataLoader was passed to trainer.fit() itself, so its batch "
                             "size cannot be changed (nor the LR scaled to a batch it would not train with); build it "
                             "in a LightningDataModule's or the module's train_dataloader() from the batch_size "
                             "attribute, as Lightning's BatchSizeFinder asks too")
        task, model, optimizer = task_from_lightning(trainer, pl_module, batch_arg_name=self.batch_arg_name)
        old_batch = int(lightning_getattr(pl_module, self.batch_arg_name))
        lr_attr = self._lr_attr(pl_module)
        old_lr = float(lightning_getattr(pl_module, lr_attr)) if lr_attr else task.lr
        device = pl_module.device.type if pl_module.device.type in ("cpu", "cuda") else "cpu"
        if device == "cuda":
            device = str(pl_module.device)
        accumulation = int(trainer.accumulate_grad_batches)
        if self.mode == "memory":
            model = model.to(pl_module.device)
            optimizer = _configured_optimizer(model, trainer)
            high = self.max_batch
            if accumulation > 1:  # one optimizer step takes `accumulation` loader batches: leave room for them
                n = task.size("train")
                if n is not None:
                    high = min(high or n, max(1, n // accumulation))
            r = max_batch_size(task, device=device, model=model, optimizer=optimizer, high=high,
                               margin=self.margin, memory_limit=self.memory_limit)
            if r.batch_size is None:
                raise RuntimeError(f"BatchSizeTuner: even a batch of {r.tried[0][0] if r.tried else 2} does not fit "
                                   f"(tried {r.tried})")
            batch = r.batch_size
            rule = self.lr_rule or default_lr_rule(task.optimizer)
            lr = scale_lr(old_lr, old_batch, batch, rule) if self.scale_lr else old_lr
            measured: dict[str, Any] = r.to_dict()
        else:
            # one measurement, on rank 0, for every rank (ranks measuring on their own would time and decide
            # differently); the others wait for it in the broadcast
            s = (suggest(task, device=device, quick=self.quick, store=self.store, progress=False, **self.suggest_kwargs)
                 if trainer.is_global_zero else None)
            s = trainer.strategy.broadcast(s, src=0)
            if s.micro_batch is None or s.lr is None or not math.isfinite(s.lr):
                raise RuntimeError(f"BatchSizeTuner: batchlab could not recommend a batch size (status {s.status!r}): "
                                   + "; ".join(s.rationale) + f" (here the cost budget is set with BatchSizeTuner("
                                   f"'suggest', suggest_kwargs={{'cost_budget': N}}), in examples; the default is "
                                   f"one full training run, {task.epochs:g} epoch(s) of the Trainer)")
            batch, lr, accumulation = int(s.micro_batch), float(s.lr), int(s.accumulation)
            world = max(1, int(trainer.world_size or 1))
            if world > 1:  # the task's batch counts every process: each rank's loader takes its share
                step = batch * accumulation
                batch = max(1, batch // world)
                lr = scale_lr(lr, step, batch * world * accumulation, s.rule)
            if self.max_batch is not None and batch > self.max_batch:
                # a smaller loader batch, more accumulation: the step's examples (and so the LR) as
                # close to the recommendation as whole micro-batches allow, the LR rescaled to them
                step = batch * accumulation
                batch = self.max_batch
                accumulation = max(1, round(step / batch))
                lr = scale_lr(lr, step, batch * accumulation, s.rule)
            if accumulation != int(trainer.accumulate_grad_batches) and any(
                    isinstance(cb, pl.callbacks.GradientAccumulationScheduler) for cb in trainer.callbacks):
                raise ValueError(f"BatchSizeTuner('suggest') recommends {accumulation} accumulated batches, which it sets "
                                 "as accumulate_grad_batches, and Lightning refuses that next to a "
                                 "GradientAccumulationScheduler: remove the scheduler, or use mode='memory' with it")
            measured = s.to_dict()
        lightning_setattr(pl_module, self.batch_arg_name, batch)
        _reload_dataloaders(trainer)  # the loaders Lightning built have the old batch
        if self.mode == "suggest":
            trainer.accumulate_grad_batches = accumulation
        if lr_attr is not None:
            lightning_setattr(pl_module, lr_attr, lr)
        else:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"BatchSizeTuner: the batch size is now {batch} (was {old_batch}), but the module has no "
                           f"'lr' or 'learning_rate' attribute, so the learning rate was left as configure_optimizers "
                           f"sets it (for batch {batch} it would be {lr:.3g}); pass lr_attr= to name yours")
        # configure_optimizers again: the new LR, and schedules whose length comes from the new batch
        trainer.strategy.setup_optimizers(trainer)
        self.result = {"mode": self.mode, "batch_size": batch, "old_batch_size": old_batch, "lr": lr if lr_attr else None,
                       "old_lr": old_lr if lr_attr else None, "accumulation": accumulation, "measured": measured}
