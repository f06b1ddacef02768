"""Hugging Face ``Trainer`` integration: the gradient noise scale during ``Trainer.train`` and a
one-call batch-size / learning-rate suggestion for a Trainer.

``Trainer(..., callbacks=[GradientNoiseScaleCallback()])`` tracks B_simple (McCandlish et al. 2018,
"An Empirical Model of Large-Batch Training") and adds ``b_simple`` to the Trainer's logs:

- with ``gradient_accumulation_steps = k >= 2``: from the micro-batch gradients the step already
  computes. A hook on every parameter (``register_post_accumulate_grad_hook``) sees ``.grad`` right
  after it is accumulated in each micro-batch's backward, *before* the Trainer clips the gradients
  (clipping happens before any callback sees them, and would bias the big-batch norm). Each
  micro-batch's contribution is the difference from the previous value (one gradient copy). The
  weight the Trainer gave each micro-batch's loss (``1/k`` when it divides by the accumulation
  steps, 1 when the model is trusted to normalize by ``num_items_in_batch``) is read from a hook on
  the model's loss tensor, so contributions are turned back into micro-batch gradients and the
  accumulated ``.grad`` into the window's mean. Windows whose micro-batches differ in size, number
  or weight (the tail of an epoch) are skipped. A model that normalizes by ``num_items_in_batch``
  (the window's counted labels) weights each micro-batch by its own count over that total: the
  counts are read from each micro-batch's labels (after a causal LM's shift), so padded
  micro-batches with different numbers of tokens give each one's own per-token gradient.
- with ``k = 1``: by splitting the batch. On every ``every``-th step, before the optimizer steps,
  the callback takes the step's inputs (captured by a forward pre-hook), runs the two halves
  through the model again (one extra forward and backward, ``torch.autograd.grad``: ``.grad`` is
  not touched) and compares the halves'
  gradients (batch B/2) with their mean (batch B). The RNG and the model's buffers are restored
  afterwards, so training is unchanged.

:func:`suggest_for_trainer` builds a :class:`batchlab.Task` from the Trainer's model (a fresh copy
made from its config), datasets, data collator and training arguments, runs
:func:`batchlab.batchsize.suggest` on it and returns ``per_device_train_batch_size``,
``gradient_accumulation_steps`` and ``learning_rate`` to set (:meth:`TrainerSuggestion.apply` sets
them).

Needs the optional extra: ``pip install 'batchlab[hf]'`` (transformers with accelerate).
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"batchlab.integrations.huggingface needs transformers: pip install 'batchlab[hf]' (import failed: {e})"
    ) from e

from batchlab.batchsize.noise import GradientNoiseScale
from batchlab.data.sources import batch_size_of
from batchlab.integrations._split import rows, split_sqnorms
from batchlab.tasks import Task
from batchlab.tasks.task import carried_loss, shifts_labels

__all__ = ["GradientNoiseScaleCallback", "TrainerSuggestion", "suggest_for_trainer", "task_from_trainer"]


def _sqnorm(t: torch.Tensor) -> float:
    return float(t.detach().double().square().sum())


def _loss_of(out: Any) -> torch.Tensor | None:
    loss = carried_loss(out)
    if loss is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) and out[0].dim() == 0:
        loss = out[0]
    return loss if isinstance(loss, torch.Tensor) else None


class GradientNoiseScaleCallback(TrainerCallback):
    """Track the gradient noise scale B_simple during ``Trainer.train`` (one device).

    Args:
        beta: EMA factor of the two accumulators (0.99 in the paper; 0.9-0.95 for short runs).
        every: measure every ``every``-th optimizer step only.
        name: the key added to the Trainer's logs.

    Attributes:
        tracker: the :class:`~batchlab.batchsize.GradientNoiseScale` (``tracker.b_simple``,
            ``tracker.history``, ``tracker.state()``).
        mode: "accumulation" or "split", decided at ``on_train_begin``.
    """

    def __init__(self, beta: float = 0.99, every: int = 1, name: str = "b_simple") -> None:
        self.tracker = GradientNoiseScale(beta=beta, every=every)  # validates beta and every
        self.every = every
        self.name = name
        self.mode: str | None = None
        self._k = 1
        self._handles: list[Any] = []
        self._model: nn.Module | None = None
        self._params: list[nn.Parameter] = []
        self._measure_now = False
        self._measuring = False
        self._reset_window()
        self._inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    @property
    def b_simple(self) -> float:
        """The current EMA ratio (NaN before the first measurement)."""
        return self.tracker.b_simple

    def _reset_window(self) -> None:
        self._micro = 0
        self._weights: list[float] = []
        # a model normalizing by the Trainer's num_items_in_batch: each micro-batch's counted labels
        # (all, and after a causal LM's shift), the window's total, and whether the model shifts
        self._label_counts: list[tuple[int, int]] = []
        self._items: float | None = None
        self._shift = False
        self._sizes: list[int] = []
        self._small: list[float] = []
        self._total: list[float] = []
        self._prev: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ hooks
    def _forward_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not (module.training and torch.is_grad_enabled()) or self._measuring:
            return
        try:
            n = batch_size_of((args, kwargs))
        except TypeError:
            n = 0
        if self.mode == "accumulation":
            self._sizes.append(n)
            labels, items = kwargs.get("labels"), kwargs.get("num_items_in_batch")
            # per-token labels: the models whose losses divide by num_items_in_batch (causal and masked LMs,
            # token classification); a sequence classifier takes the argument and keeps its own mean
            if isinstance(labels, torch.Tensor) and items is not None and labels.dim() >= 2:
                self._items = float(items)
                self._label_counts.append((int((labels != -100).sum()), int((labels[..., 1:] != -100).sum())))
        else:
            self._inputs = (args, kwargs)

    def _forward_post(self, module: nn.Module, args: Any, out: Any) -> None:
        """Hook the model's loss: the gradient flowing into it is the weight the Trainer gave this
        micro-batch (1/k when it divides the loss by the accumulation steps, else 1)."""
        if not (module.training and torch.is_grad_enabled()) or self._measuring or not self._measure_now:
            return
        self._shift = shifts_labels(out)
        loss = _loss_of(out)
        if loss is not None and loss.requires_grad:
            loss.register_hook(self._loss_grad)

    def _loss_grad(self, grad: torch.Tensor) -> None:
        self._weights.append(float(grad))

    def _after_accumulate(self, p: torch.Tensor) -> None:
        if not self._measure_now or p.grad is None:
            return
        i, key, g = self._micro, id(p), p.grad
        while len(self._small) <= i:
            self._small.append(0.0)
            self._total.append(0.0)
        prev = self._prev.get(key)
        self._small[i] += _sqnorm(g if prev is None else g - prev)
        self._total[i] += _sqnorm(g)
        if prev is None:
            self._prev[key] = g.detach().clone()
        else:
            prev.copy_(g)

    # ------------------------------------------------------------------ TrainerCallback
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("GradientNoiseScaleCallback: the Trainer passed no model to on_train_begin")
        if getattr(args, "world_size", 1) > 1:
            raise ValueError(
                "GradientNoiseScaleCallback measures on one device (under DDP the accumulated gradient is already "
                f"all-reduced); got world_size={args.world_size}. Use batchlab.distributed.fit_ddp, which measures "
                "from per-rank gradients.")
        self._remove_hooks()
        self._k = int(args.gradient_accumulation_steps)
        self.mode = "accumulation" if self._k >= 2 else "split"
        self._model = model
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._measure_now = False
        self._handles.append(model.register_forward_pre_hook(self._forward_pre, with_kwargs=True))
        if self.mode == "accumulation":
            self._handles.append(model.register_forward_hook(self._forward_post))
            self._handles += [p.register_post_accumulate_grad_hook(self._after_accumulate) for p in self._params]

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._reset_window()
        self._measure_now = self.mode == "accumulation" and state.global_step % self.every == 0

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._micro += 1

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.mode == "split":
            if self._inputs is not None and state.global_step % self.every == 0:
                inputs, self._inputs = self._inputs, None
                self._measure_split(inputs, state.global_step)
            return
        if not self._measure_now:
            return
        self._measure_now = False
        k, sizes = self._k, self._sizes
        if self._micro + 1 != k or len(self._small) != k or len(sizes) != k or len(set(sizes)) != 1 or sizes[0] < 1:
            return  # a short window (the end of an epoch): its mean is not a k * b batch gradient
        # each micro-batch contributed w * (its gradient); w from the loss hook (1/k without it), or, for
        # a model that normalizes by num_items_in_batch, its counted labels over the window's total
        # (padded micro-batches hold different numbers of tokens)
        weights = self._weights if len(self._weights) == k else [1.0 / k] * k
        if self._items and len(self._label_counts) == k:
            counts = [c[1] if self._shift else c[0] for c in self._label_counts]
            weights = [w * c / self._items for w, c in zip(weights, counts)]
        elif any(abs(x - weights[0]) > 1e-6 * abs(weights[0]) for x in weights):
            return  # unequal weights of unknown origin: the accumulated gradient is not the window's mean
        if not all(w > 0 for w in weights):
            return
        small = sum(s / (w * w) for s, w in zip(self._small, weights)) / k  # each micro-batch's own gradient
        big = self._total[-1] / sum(weights) ** 2  # the accumulated gradient before clipping, as a weighted mean
        self.tracker.update(small, big, sizes[0], sizes[0] * k, step=state.global_step)
        self._prev = {}

    def _measure_split(self, inputs: tuple[tuple[Any, ...], dict[str, Any]], step: int) -> None:
        model = self._model
        assert model is not None
        try:
            n = batch_size_of(inputs)
        except TypeError:
            return
        args, kwargs = inputs
        # the Trainer's total token count would make each half's loss a share of the whole batch's
        kwargs = {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}

        def loss_of_rows(lo: int, hi: int) -> torch.Tensor | None:
            return _loss_of(model(*rows(args, n, lo, hi), **rows(kwargs, n, lo, hi)))

        self._measuring = True
        try:
            got = split_sqnorms(model, self._params, n, loss_of_rows)
        finally:
            self._measuring = False
        if got is not None:  # None: a batch of one, or no loss in the output (labels handled outside the model)
            small, big, h = got
            self.tracker.update(small, big, h, 2 * h, step=step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.tracker.updates == 0 or logs is None or "loss" not in logs:
            return
        logs[self.name] = self.tracker.b_simple
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1][self.name] = self.tracker.b_simple

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._remove_hooks()
        self._reset_window()
        self._inputs = None

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# ------------------------------------------------------------------ suggest on a Trainer
_OPTIMIZERS = {"sgd": "sgd", "adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw",
               "adamw_torch_xla": "adamw", "adamw_apex_fused": "adamw", "adafactor": "adamw"}


def _model_factory(model: nn.Module) -> Any:
    """A zero-argument factory of fresh, randomly initialized copies of ``model`` (from its config)."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"the Trainer's model ({type(model).__name__}) has no .config: pass model_init= "
                        "(a zero-argument factory) to suggest_for_trainer")
    cls, cfg = type(model), copy.deepcopy(config)

    def make() -> nn.Module:
        return cls(copy.deepcopy(cfg))

    make.__qualname__ = f"{cls.__qualname__}.from_config"
    return make


def _trainer_model_init(trainer: Any) -> Any:
    """The Trainer's own ``model_init`` as a zero-argument factory (Hugging Face lets it take the
    hyperparameter-search trial, which is None outside a search), or None."""
    init = getattr(trainer, "model_init", None)
    if init is None:
        return None

    def make() -> nn.Module:
        return trainer.call_model_init(None) if hasattr(trainer, "call_model_init") else init()

    make.__qualname__ = getattr(init, "__qualname__", "model_init")
    return make


class _ColumnCollator:
    """The Trainer's data collator, fed only the columns the model's forward takes (what the Trainer
    does with ``remove_unused_columns``)."""

    def __init__(self, collator: Any, keep: set[str] | None) -> None:
        self.collator, self.keep = collator, keep

    def __call__(self, features: list[Any]) -> Any:
        if self.keep is not None and features and isinstance(features[0], Mapping):
            features = [{k: v for k, v in f.items() if k in self.keep} for f in features]
        return self.collator(features)


def _trainer_loss(out: Any, batch: Any) -> torch.Tensor:
    """The loss as ``Trainer.compute_loss`` reads it: ``out.loss``, ``out["loss"]`` or, for a
    tuple, its first element."""
    loss = _loss_of(out)
    if loss is None:
        raise ValueError(f"the model returned no loss ({type(out).__name__}); a Trainer's model computes its loss "
                         "when the batch has labels (or give the Trainer a compute_loss and batchlab a task of its own)")
    return loss


_trainer_loss.is_model_loss = True  # type: ignore[attr-defined]  # a per-token loss pools by tokens (Task.pools_by_tokens)


class _TrainerOptimizer:
    """``optimizer(model, lr)`` as the Trainer builds it (``Trainer.create_optimizer``): its optimizer
    class and arguments (betas, eps, ...) from the training arguments, weight decay on the parameters
    the Trainer decays (not biases and norm weights), no decay on the others."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.args = copy.deepcopy(trainer.args)  # the settings when the task was made: the task stays what it was

    def __call__(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        args = self.args
        decay = set(self.trainer.get_decay_parameter_names(model))
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in params if n in decay], "weight_decay": float(args.weight_decay)},
                  {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0}]
        cls, kwargs = type(self.trainer).get_optimizer_cls_and_kwargs(args, model)
        return cls([g for g in groups if g["params"]], **{**kwargs, "lr": lr})

    def __repr__(self) -> str:  # what the results store keys the task by
        a = self.args
        return (f"TrainerOptimizer(optim={getattr(a.optim, 'value', a.optim)}, weight_decay={a.weight_decay}, "
                f"betas=({a.adam_beta1}, {a.adam_beta2}), eps={a.adam_epsilon})")


def task_from_trainer(trainer: Any, *, model_init: Any = None, name: str | None = None, metric: Any = "loss",
                      higher_is_better: bool | None = None) -> Task:
    """A :class:`batchlab.Task` from a ``transformers.Trainer``: a fresh model from the Trainer's
    model config (or ``model_init`` / the Trainer's own ``model_init``), its train and eval datasets,
    data collator and training arguments: the optimizer as the Trainer builds it (its class, betas,
    eps, and weight decay on the parameters it decays), learning rate, batch and epochs. (The
    Trainer's LR scheduler, warmup and gradient clipping are not applied to batchlab's trials, which
    use a constant LR.)"""
    args = trainer.args
    if trainer.train_dataset is None:
        raise ValueError("suggest_for_trainer: the Trainer has no train_dataset")
    val = trainer.eval_dataset
    if isinstance(val, Mapping):
        val = next(iter(val.values()), None)
    if val is None:
        raise ValueError("suggest_for_trainer: the Trainer has no eval_dataset; batchlab's suggestion checks "
                         "generalization on it (pass eval_dataset= to the Trainer)")
    model = trainer.model
    factory = model_init or _trainer_model_init(trainer) or _model_factory(model)
    keep = None
    if getattr(args, "remove_unused_columns", True):
        keep = set(inspect.signature(model.forward).parameters) | {"label", "label_ids", "labels"}
        keep |= set(getattr(args, "label_names", None) or [])
    optim = str(getattr(args.optim, "value", args.optim))
    world = max(1, int(getattr(args, "world_size", 1)))
    batch = int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * world
    n = len(trainer.train_dataset)
    epochs = float(args.num_train_epochs) if args.max_steps is None or args.max_steps <= 0 \
        else max(args.max_steps * batch / max(n, 1), 1e-6)
    return Task.from_torch(
        name=name or f"hf-{type(model).__name__}", model=factory, train=trainer.train_dataset, val=val,
        collate_fn=_ColumnCollator(trainer.data_collator, keep), loss=_trainer_loss, metric=metric,
        higher_is_better=higher_is_better,
        optimizer=_optimizer_of(trainer, optim), lr=float(args.learning_rate), batch_size=batch, epochs=epochs,
        num_workers=int(getattr(args, "dataloader_num_workers", 0) or 0),
    )


def _optimizer_of(trainer: Any, optim: str) -> Any:
    """The Trainer's own optimizer when its class can say how it builds it, else the closest name."""
    if hasattr(type(trainer), "get_optimizer_cls_and_kwargs") and hasattr(trainer, "get_decay_parameter_names"):
        return _TrainerOptimizer(trainer)
    return _OPTIMIZERS.get(optim, "adamw")


@dataclass
class TrainerSuggestion:
    """The settings to give a Trainer, and batchlab's full :class:`~batchlab.batchsize.Suggestion`."""

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    suggestion: Any

    def apply(self, trainer: Any) -> None:
        """Set them on ``trainer.args`` (and the Trainer's own copy of the batch size). When the
        Trainer already has an optimizer (an earlier ``train()``, or one given to it), which its next
        ``train()`` reuses, the new LR is written into it too: every parameter group keeps its ratio
        to the first, and the LR scheduler's base LRs (``initial_lr``) follow, so a scheduler the
        Trainer builds again starts from the new LR."""
        from batchlab.train.optim import set_hparams

        args = trainer.args
        before = (args.per_device_train_batch_size, args.gradient_accumulation_steps)
        after = (self.per_device_train_batch_size, self.gradient_accumulation_steps)
        given = getattr(trainer, "lr_scheduler", None)
        if given is not None and not getattr(trainer, "_created_lr_scheduler", False) and \
                before[0] * before[1] != after[0] * after[1]:
            # the Trainer rebuilds a scheduler it made itself; one it was given keeps the step count it was
            # built for, and at another batch the run takes another number of steps
            warnings.warn(
                f"suggest_for_trainer.apply: the Trainer was given its LR scheduler ({type(given).__name__}), built for "
                f"the steps of batch {before[0]} x {before[1]}; at {after[0]} x {after[1]} the run takes another number "
                "of steps, so its warmup and decay end at the wrong step (past its end the LR may stay 0): build it again "
                "for the new step count, or let the Trainer make it (no optimizers= argument)", stacklevel=2)
        args.per_device_train_batch_size = self.per_device_train_batch_size
        args.gradient_accumulation_steps = self.gradient_accumulation_steps
        args.learning_rate = self.learning_rate
        if hasattr(trainer, "_train_batch_size"):
            trainer._train_batch_size = args.train_batch_size
        optimizer = getattr(trainer, "optimizer", None)
        if optimizer is not None:
            sched = getattr(trainer, "lr_scheduler", None)
            sched = sched if sched is not None and hasattr(sched, "base_lrs") else None
            if sched is not None:  # the scheduler's base LRs: the configured ones, whatever the decay did since
                ratios = [b / sched.base_lrs[0] if sched.base_lrs[0] else 1.0 for b in sched.base_lrs]
            else:
                firsts = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
                ratios = [f / firsts[0] if firsts[0] else 1.0 for f in firsts]
            # with a scheduler this also sets its base LRs and each group's initial_lr
            set_hparams(optimizer, {"lr": self.learning_rate}, ratios=ratios, scheduler=sched)
            if sched is None:  # a scheduler the Trainer builds next takes initial_lr as its base
                for g, r in zip(optimizer.param_groups, ratios):
                    g["initial_lr"] = self.learning_rate * r

    def to_dict(self) -> dict[str, Any]:
        return {"per_device_train_batch_size": self.per_device_train_batch_size,
                "gradient_accumulation_steps": self.gradient_accumulation_steps,
                "learning_rate": self.learning_rate}


def suggest_for_trainer(trainer: Any, *, device: str | None = None, quick: bool = False, store: Any = None,
                        progress: bool = False, apply: bool = False, model_init: Any = None, metric: Any = "loss",
                        higher_is_better: bool | None = None, **suggest_kwargs: Any) -> TrainerSuggestion:
    """Run :func:`batchlab.batchsize.suggest` on a Trainer's model and data; return the settings.

    Args:
        trainer: a ``transformers.Trainer`` with ``train_dataset`` and ``eval_dataset``.
        device: where to measure (default: the Trainer's device type, "cpu" or "cuda").
        quick, store, progress: passed to ``suggest``; further keyword arguments too.
        apply: also set the values on the Trainer (:meth:`TrainerSuggestion.apply`).
        model_init: a zero-argument factory of fresh models (default: ``type(model)(model.config)``).
        metric, higher_is_better: what the generalization check compares ("loss": the eval loss).

    Returns:
        A :class:`TrainerSuggestion`; raises ``RuntimeError`` when ``suggest`` recommends nothing.
        ``apply=True`` with a recommendation that is not supported by its evidence (status "not
        supported": no candidate beat a trivial baseline) warns and leaves the Trainer as it was.

    Under ``torchrun`` (a process group initialized, as the Trainer does) the measurement runs on
    rank 0 only and every rank gets its result; the batch the task trains counts all processes,
    so ``per_device_train_batch_size`` is the recommended micro-batch divided by the world size.
    The other ranks wait in the broadcast meanwhile, so the process group's timeout
    (``TrainingArguments(ddp_timeout=...)``) must be longer than the measurement; or run it on one
    device before launching ``torchrun``.
    """
    from batchlab.batchsize import suggest
    from batchlab.train import scale_lr

    task = task_from_trainer(trainer, model_init=model_init, metric=metric, higher_is_better=higher_is_better)
    dev = device or trainer.args.device.type
    world, rank = _distributed()
    s = None
    if rank == 0:  # one measurement: ranks measuring on their own would time and decide differently
        s = suggest(task, device=dev, quick=quick, store=store, progress=progress, **suggest_kwargs)
    if world > 1:
        box = [s]
        torch.distributed.broadcast_object_list(box, src=0)
        s = box[0]
    if s.batch_size is None or s.micro_batch is None or s.lr is None or not math.isfinite(s.lr):
        raise RuntimeError(f"suggest_for_trainer: batchlab could not recommend a batch size for {task.name} "
                           f"(status {s.status!r}): " + "; ".join(s.rationale))
    # the task's batch counts every process (per device x accumulation x world size): the recommended
    # micro-batch is the examples all processes take together, so each device gets its share
    micro, acc, lr = int(s.micro_batch), int(s.accumulation), float(s.lr)
    per_device = max(1, micro // world)
    if per_device * world != micro:  # the step's examples change: the LR goes with them, by the task's rule
        lr = scale_lr(lr, micro * acc, per_device * world * acc, s.rule)
    out = TrainerSuggestion(per_device_train_batch_size=per_device, gradient_accumulation_steps=acc,
                            learning_rate=lr, suggestion=s)
    if apply:
        if s.status != "ok":
            warnings.warn(f"suggest_for_trainer(apply=True): the recommendation is {s.status!r} ("
                          + "; ".join(s.rationale[:2]) + "), so the Trainer's settings were left as they were; "
                          "set them from the returned values yourself if you want them", stacklevel=2)
        else:
            out.apply(trainer)
    return out


def _distributed() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0
