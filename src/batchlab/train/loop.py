"""``fit(task, config) -> RunResult``: the training loop every batchlab tool runs.

Design notes:
- A step's examples are indices from a per-epoch permutation drawn from a generator seeded with
  ``config.seed``, so a run is deterministic on CPU. In-memory data are batched by one
  ``index_select``; any other torch Dataset by a DataLoader (workers, pinned memory) whose batch
  sampler is that same sequence of indices. Steps are planned from the budget alone, so a
  prefetching DataLoader sees exactly the batches the loop will take.
- The whole run executes inside ``torch.random.fork_rng``: it never perturbs the caller's RNG.
- A non-finite (or absurdly large) loss ends the run as ``"diverged"``; an out-of-memory error
  as ``"oom"``. Both are recorded with the step and returned, never raised.
- With float16 autocast a GradScaler skips steps whose gradients overflow. BatchNorm running
  statistics were already updated by that step's forward pass, so they are restored from a
  snapshot taken before it (otherwise a skipped step still moves them: a known PyTorch pitfall).
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from batchlab.data.arrays import ArrayDataset
from batchlab.data.sources import ArraySource, Source, batch_size_of, make_source, move_to_device
from batchlab.norm import FrozenBatchNorm
from batchlab.tasks import Task, TaskError, get_task
from batchlab.tasks.task import is_pooled_metric
from batchlab.train.config import RunResult, TrainConfig
from batchlab.train.oom import free_memory, is_oom
from batchlab.train.optim import (
    batch_factor,
    default_hparam_rule,
    group_hparams,
    lr_factor,
    lr_ratios,
    optimizer_hparams,
    scale_group_hparams,
    scale_hparams,
    scheduled_batch,
    set_hparams,
)


@dataclass
class StepContext:
    """What callbacks see. Callbacks may set ``stop`` to end training and add scalars to ``logs``
    (they are copied into the next history row)."""

    task: Task
    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0  # optimizer steps completed
    examples: int = 0  # training examples consumed
    epoch: int = 0  # epochs started
    batch_size: int = 0  # examples in the current step (all micro-batches); 0 before the first step
    micro_batch: int = 0  # index of the current micro-batch in the step
    micro_batch_size: int = 0  # examples in the current micro-batch
    # the factor the current micro-batch's mean loss was multiplied by before backward: its share of
    # the step's examples, or with per-token targets its count of tokens (the step's gradient is
    # divided by the total before the optimizer step)
    micro_weight: float = 1.0
    accumulation: int = 1
    lr: float = 0.0
    loss: float = float("nan")  # mean training loss of the last step
    stop: bool = False
    logs: dict[str, float] = field(default_factory=dict)


class Callback:
    """Hooks into :func:`fit`. Override any subset."""

    def on_train_begin(self, ctx: StepContext) -> None: ...

    def on_micro_batch_end(self, ctx: StepContext) -> None:
        """After the backward pass of one micro-batch (gradients accumulate across micro-batches)."""

    def on_before_step(self, ctx: StepContext) -> None:
        """Gradients of the whole step are in ``.grad``; the optimizer has not stepped yet."""

    def on_step_end(self, ctx: StepContext) -> None: ...

    def on_evaluate(self, ctx: StepContext, row: dict[str, Any]) -> None: ...

    def on_train_end(self, ctx: StepContext, result: RunResult) -> None: ...


def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [
        b
        for m in model.modules()
        if getattr(m, "running_mean", None) is not None or getattr(m, "num_batches_tracked", None) is not None
        for b in m.buffers(recurse=False)
    ]


def _group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's settings (lr, weight decay, betas, ...) and size, as plain data."""
    out = []
    for g in optimizer.param_groups:
        row: dict[str, Any] = {"params": sum(p.numel() for p in g["params"])}
        for k, v in g.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = float(v)
            if isinstance(v, tuple):
                v = list(v)
            if k != "params" and (v is None or isinstance(v, (bool, int, float, str)) or
                                  (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v))):
                row[k] = v
        out.append(row)
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Any,
    *args: Any,
    batch_size: int = 1024,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
    limit: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """Mean loss and the task's metric of ``model`` in eval mode; restores the mode.

    Call as ``evaluate(model, source, task)`` with a :class:`~batchlab.data.sources.Source` (or
    a Dataset, wrapped with the task's collate function), or ``evaluate(model, x, y, task)`` with
    in-memory tensors. For the metric "loss" the metric is the mean loss. The mean is over what
    the loss averages: examples, or the counted tokens of a token-level loss
    (:meth:`~batchlab.tasks.Task.loss_weight`), so it does not depend on ``batch_size``.

    Args:
        batch_size: evaluation batch size.
        autocast: a context manager around each forward pass (mixed precision).
        limit: evaluate the first ``limit`` examples only.
        device: where batches go (default: the model's device).
    """
    if args and isinstance(data, torch.Tensor):
        data, task = ArraySource(ArrayDataset(data, args[0])), args[1]
    elif len(args) == 1:
        task = args[0]
        if not isinstance(data, Source):
            data = make_source(data, task.collate_fn, num_workers=task.num_workers)
    else:
        raise TypeError("call evaluate(model, source, task) or evaluate(model, x, y, task)")
    if device is None:
        ref = next(iter(model.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    loss_sum = loss_w = metric_sum = metric_w = 0.0
    count = 0
    pooled = task.batch_metric if is_pooled_metric(task.batch_metric) else None
    if pooled is not None:
        pooled.reset()
    try:
        for batch in data.ordered(batch_size, limit):
            batch = move_to_device(batch, device)
            n = batch_size_of(batch)
            with autocast or contextlib.nullcontext():
                out = task.forward_batch(model, batch)
                loss = task.loss_of(out, batch)
            # weighted by what the batch's mean averages over (its tokens for a token-level loss),
            # so the result does not depend on the evaluation batch size or padding
            w = task.loss_weight(out, batch, n)
            if w:
                loss_sum += float(loss) * w
                loss_w += w
            count += n
            if pooled is not None:
                pooled.update(out, batch)
            else:
                s, w = task.metric_of(out, batch, n)
                metric_sum += s
                metric_w += w
    finally:
        model.train(was_training)
    if count == 0:
        raise TaskError(f"task {task.name!r}: nothing to evaluate (the data set is empty)")
    if not loss_w:
        raise TaskError(f"task {task.name!r}: nothing to evaluate: every target in the {count} example(s) is -100 "
                        "(ignored), so the loss averages over nothing")
    mean_loss = loss_sum / loss_w
    if task.metric_name == "loss":
        return mean_loss, mean_loss
    if pooled is not None:
        v = pooled.compute()
        return mean_loss, float(v.item() if isinstance(v, torch.Tensor) else v)
    return mean_loss, (metric_sum / metric_w if metric_w else math.nan)


class _Sampler:
    """Per-epoch permutations consumed in batches of any size (the size may change between steps)."""

    def __init__(self, n: int | None, generator: torch.Generator, drop_last: bool, shuffle: bool = True) -> None:
        self.n, self.gen, self.drop_last, self.shuffle = n, generator, drop_last, shuffle
        self.perm = torch.empty(0, dtype=torch.long)
        self.cursor = 0 if n is None else n  # the first take() draws the first permutation
        self.epoch = 1 if n is None else 0
        self.epoch_ended = False

    def take(self, b: int) -> torch.Tensor:
        if self.n is None:  # a stream of unknown length: positions only (one endless epoch)
            self.cursor += b
            return torch.arange(self.cursor - b, self.cursor)
        left = self.n - self.cursor
        if left <= 0 or (self.drop_last and left < b):
            self.perm = torch.randperm(self.n, generator=self.gen) if self.shuffle else torch.arange(self.n)
            self.cursor = 0
            self.epoch += 1
        end = self.cursor + b
        if not self.drop_last and b > 1 and self.n - end == 1:
            end += 1  # never leave a one-example batch at the end of an epoch (BatchNorm cannot train on it)
        idx = self.perm[self.cursor : end]
        self.cursor += idx.shape[0]
        left = self.n - self.cursor
        self.epoch_ended = left <= 0 or (self.drop_last and left < b)
        return idx


@dataclass
class _StepPlan:
    """The micro-batches of one optimizer step, decided before the step (and possibly before the
    previous steps have run, when a DataLoader prefetches)."""

    micro: list[torch.Tensor]
    epoch: int
    epoch_ended: bool
    frac: float  # budget fraction done before this step
    batch: int = 0  # the planned examples per micro-batch (cfg.batch_size, grown or scheduled)
    examples: int = 0  # examples in the step (all micro-batches)


def _plan_steps(cfg: TrainConfig, sampler: _Sampler, total_examples: int | None) -> Iterator[_StepPlan]:
    """The steps of a run, each a pure function of the steps before it: the batch size comes from
    the budget fraction done so far (``batch_growth``) or the examples seen so far
    (``batch_schedule``), so planning ahead (for a prefetching DataLoader) gives exactly the
    batches that planning step by step would."""
    step = examples = 0
    while True:
        if cfg.max_steps is not None and step >= cfg.max_steps:
            return
        if total_examples is not None and (
            examples >= total_examples or (total_examples - examples == 1 and cfg.batch_size > 1)
        ):
            return  # a single leftover example of the budget is not worth a (BatchNorm-breaking) step
        frac = step / cfg.max_steps if cfg.max_steps is not None else examples / total_examples
        if cfg.batch_growth:
            b = cfg.batch_size * batch_factor(frac, cfg.batch_growth, cfg.growth_factor)
        elif cfg.batch_schedule:
            b = scheduled_batch(cfg.batch_size, cfg.batch_schedule, examples)
        else:
            b = cfg.batch_size
        micro: list[torch.Tensor] = []
        room = None if total_examples is None else total_examples - examples
        for _ in range(cfg.accumulation):
            take = b if room is None else min(b, room)
            if take <= 0:
                break
            idx = sampler.take(take)
            micro.append(idx)
            if room is not None:
                room -= idx.shape[0]
            if sampler.epoch_ended:
                break
        plan = _StepPlan(micro, sampler.epoch, sampler.epoch_ended, frac, b, sum(int(i.shape[0]) for i in micro))
        step += 1
        examples += plan.examples
        yield plan


def _frozen_at_init(model: nn.Module) -> bool:
    """Whether every frozen batch norm of ``model`` still holds a fresh layer's statistics."""
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm)]
    return bool(frozen) and all(bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all()) for m in frozen)


class _Batches:
    """Pairs each planned step with its fetched micro-batches (in-memory: fetched on demand;
    DataLoader: streamed, the loader consuming the plan ahead of the loop)."""

    def __init__(self, source: Source, plans: Iterator[_StepPlan], device: torch.device, non_blocking: bool,
                 shard: Any = None, seed: int | None = None) -> None:
        self.device, self.non_blocking, self.shard = device, non_blocking, shard
        self.pending: collections.deque[_StepPlan] = collections.deque()
        self.plans = plans
        self.direct = isinstance(source, ArraySource)
        self.source = source
        if not self.direct:
            self.stream = source.stream(self._indices(), seed=seed)  # workers seeded by the run, not shared state

    def close(self) -> None:
        """Shut a DataLoader's workers down now. Left to garbage collection (an exception's traceback
        keeps the stream alive), a later forked worker could collect the iterator and fail with
        "can only test a child process"."""
        if not self.direct:
            self.stream.close()

    def _local(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's share of a micro-batch's indices (all of them without a shard)."""
        if self.shard is None:
            return idx
        lo, hi = self.shard.bounds(int(idx.shape[0]))
        return idx[lo:hi]

    def _indices(self) -> Iterator[torch.Tensor]:
        for plan in self.plans:
            self.pending.append(plan)
            yield from (local for local in map(self._local, plan.micro) if local.numel())

    def __iter__(self) -> Iterator[tuple[_StepPlan, list[Any]]]:
        """Each step's plan and its micro-batches (None for a micro-batch whose share here is empty)."""
        if self.direct:
            for plan in self.plans:
                yield plan, [self.source.fetch(local) if local.numel() else None for local in map(self._local, plan.micro)]
            return
        fetched: collections.deque[Any] = collections.deque()  # loaded ahead of the step they belong to
        while True:
            if not self.pending:  # pulling one batch makes the loader plan (at least) the next step
                try:
                    fetched.append(next(self.stream))
                except StopIteration:
                    return
            plan = self.pending.popleft()
            batches: list[Any] = []
            for idx in plan.micro:
                if not self._local(idx).numel():
                    batches.append(None)
                else:
                    batches.append(fetched.popleft() if fetched else next(self.stream))
            yield plan, [None if b is None else move_to_device(b, self.device, self.non_blocking) for b in batches]


def _resolve_device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' (or another torch device), got {name!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def fit(
    task: Task | str,
    config: TrainConfig | None = None,
    *,
    model: nn.Module | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = False,
    raise_errors: bool = True,
    shard: Any = None,
) -> RunResult:
    """Train ``task``'s model with ``config`` and return its history.

    Args:
        task: a Task or a registered name / entry point.
        config: the run's settings (defaults: ``TrainConfig()``).
        model: train this model instead of ``task.make_model(...)`` (it is modified in place).
        callbacks: :class:`Callback` objects.
        progress: show a progress bar.
        raise_errors: re-raise errors other than divergence and OOM; when False they end the run
            with status ``"failed"`` and the traceback in ``error``. Problems with the task itself
            (found by :meth:`Task.check` before training) always raise :class:`TaskError`.
        shard: data-parallel training (see :mod:`batchlab.distributed.ddp`): an object with
            ``world_size``, ``bounds(n) -> (lo, hi)`` (this process's slice of a micro-batch of
            ``n`` planned examples; only those are loaded) and ``global_mean(local, n_local, n)``
            (the mean loss over all processes). None: this process takes whole batches.

    Returns:
        A :class:`RunResult`; ``status`` is ``"ok"``, ``"diverged"``, ``"oom"`` or ``"failed"``.
    """
    task = get_task(task) if not isinstance(task, Task) else task
    cfg = config or TrainConfig()
    if cfg.optimizer == "lbfgs" and cfg.accumulation > 1:
        raise ValueError(f"accumulation must be 1 with optimizer 'lbfgs', got {cfg.accumulation}")
    device = _resolve_device(cfg.device)
    if model is None:  # a caller passing its own model (a wrapper, a DDP shard) has checked the task itself
        task.check(device)
    n = task.n_train if task.train_source.indexable or cfg.epochs is not None else None
    if n is not None and cfg.batch_size > n:
        raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the training set of task {task.name!r} "
                         f"({n} examples)")
    if n is not None and cfg.batch_schedule and max(b for _, b in cfg.batch_schedule) > n:
        raise ValueError(f"batch_schedule's largest batch ({max(b for _, b in cfg.batch_schedule)}) is larger than the "
                         f"training set of task {task.name!r} ({n} examples)")
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        return _fit(task, cfg, device, model, list(callbacks), progress, raise_errors, shard)


def _fit(
    task: Task,
    cfg: TrainConfig,
    device: torch.device,
    model: nn.Module | None,
    callbacks: list[Callback],
    progress: bool,
    raise_errors: bool,
    shard: Any = None,
) -> RunResult:
    t_start = time.perf_counter()
    opt_name = cfg.optimizer or task.optimizer
    base_lr = float(cfg.lr if cfg.lr is not None else task.lr)
    result = RunResult(task=task.name, config=cfg.to_dict(),
                       extra={"optimizer": opt_name, "lr": base_lr, "metric": task.metric_name,
                              "higher_is_better": task.higher_is_better})
    if model is None:
        model = task.make_model(norm=cfg.norm, activation=cfg.activation)
        if cfg.norm == "frozen" and _frozen_at_init(model):
            note = ("norm 'frozen' on a model whose batch norms hold their initial statistics (mean 0, variance 1): "
                    "freezing keeps them, and gamma as initialized, for the whole run; it is meant for pretrained "
                    "weights (a model factory that loads them)")
            warnings.warn(note, stacklevel=3)
            result.extra["warning"] = note
    model = model.to(device)
    model.train()
    optimizer = task.build_optimizer(model, base_lr, opt_name, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                     lbfgs_max_iter=cfg.lbfgs_max_iter)
    # batch_schedule: LR, Adam betas and eps co-scaled from cfg.batch_size to the step's batch, each
    # time from the base values (so the hyperparameters are a function of the batch alone)
    result.extra["optimizer_class"] = type(optimizer).__name__
    result.extra["param_groups"] = _group_settings(optimizer)  # what it trains with (a task's own optimizer too)
    base_hp = optimizer_hparams(optimizer)
    base_groups = group_hparams(optimizer)  # each group's own betas/eps (a head with other betas keeps them)
    ratios = lr_ratios(optimizer)  # per-group LRs (a user's optimizer factory) keep their ratio to the first
    scale_rule = (cfg.batch_scale_rule or default_hparam_rule(opt_name)) if cfg.batch_schedule else None
    hp = scale_hparams(opt_name, base_hp, cfg.batch_size, cfg.batch_size, scale_rule) if scale_rule else base_hp
    hp_batch = cfg.batch_size
    train_src, val_src = task.train_source, task.val_source
    if isinstance(train_src, ArraySource):
        train_src, val_src = train_src.to(device), val_src.to(device)  # type: ignore[union-attr]
    pin = task.pin_memory if task.pin_memory is not None else device.type == "cuda"
    non_blocking = bool(pin) and device.type == "cuda"
    if pin and not isinstance(train_src, ArraySource):
        train_src = make_source(task.train_set, task.collate_fn, num_workers=task.num_workers, pin_memory=True)
        val_src = make_source(task.val_set, task.collate_fn, num_workers=task.num_workers, pin_memory=True)
    accuracy_names = task.metric_name == "accuracy"

    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[
        cfg.amp_dtype or ("float16" if device.type == "cuda" else "bfloat16")
    ]
    autocast = torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=cfg.amp)
    if cfg.amp:
        result.extra["amp_dtype"] = str(amp_dtype).removeprefix("torch.")  # the dtype used (the config may say None)
    use_scaler = cfg.amp and amp_dtype == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler) if use_scaler else None
    bn_buffers = _bn_buffers(model) if scaler is not None else []

    n = len(train_src) if train_src.indexable else (train_src.length or 0)
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = _Sampler(n or None, gen, cfg.drop_last, shuffle=train_src.indexable)
    n_val = len(val_src) if val_src.indexable else None
    eval_n = min(n, 2048 if isinstance(train_src, ArraySource) else min(2048, n_val or 2048))
    eval_idx = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))[:eval_n] if train_src.indexable else None
    if eval_idx is not None:
        train_eval_src: Source = _IndexedSubset(train_src, eval_idx)
    eval_bs = eval_batch_size(task, cfg.batch_size * cfg.accumulation)

    total_examples = None
    if cfg.max_steps is None:
        total_examples = cfg.max_examples if cfg.max_examples is not None else max(1, round(cfg.epochs * n))

    ctx = StepContext(task=task, config=cfg, model=model, optimizer=optimizer, accumulation=cfg.accumulation)
    est_steps = cfg.max_steps or math.ceil(total_examples / (cfg.batch_size * cfg.accumulation))
    if cfg.warmup_steps > est_steps:
        warnings.warn(f"warmup_steps={cfg.warmup_steps} is longer than the run ({est_steps} steps): the LR ends at "
                      f"{est_steps / cfg.warmup_steps:.0%} of its base value and never reaches it", stacklevel=2)
    # "every epoch" on a stream without a length (no epochs): ten evaluations over the run instead of one
    stream_every = max(1, est_steps // 10) if not n and not cfg.eval_every else 0
    label = f"B={cfg.batch_size}" if cfg.accumulation == 1 else f"B={cfg.batch_size}x{cfg.accumulation}"
    bar = tqdm(total=est_steps, desc=f"{task.name} {label}", unit="step", disable=not progress, leave=False)
    loss_sum, loss_count = 0.0, 0
    train_time = 0.0

    def record() -> None:
        nonlocal loss_sum, loss_count
        t0 = time.perf_counter()
        val_loss, val_metric = evaluate(model, val_src, task, batch_size=eval_bs, autocast=autocast, device=device)
        tr_loss, tr_metric = (
            evaluate(model, train_eval_src, task, batch_size=eval_bs, autocast=autocast, device=device)
            if cfg.eval_train and eval_idx is not None else (math.nan, math.nan)
        )
        row: dict[str, Any] = {
            "step": ctx.step, "epoch": ctx.examples / n if n else math.nan, "examples": ctx.examples,
            "wall_time": time.perf_counter() - t_start, "train_time": train_time, "lr": ctx.lr,
            "batch_size": planned_batch, "step_examples": ctx.batch_size, "batch_loss": loss_sum / loss_count if loss_count else float("nan"),
            "train_loss": tr_loss, "train_metric": tr_metric, "val_loss": val_loss, "val_metric": val_metric,
        }
        if accuracy_names:
            row["train_acc"], row["val_acc"] = tr_metric, val_metric
        row.update(ctx.logs)
        ctx.logs.clear()
        loss_sum, loss_count = 0.0, 0
        result.history.append(row)
        for cb in callbacks:
            cb.on_evaluate(ctx, row)
        nonlocal t_eval
        t_eval += time.perf_counter() - t0

    t_eval = 0.0
    # the batch setting of the latest step (micro-batch x accumulation, grown or scheduled); a step cut
    # short by the end of the budget or of an epoch has fewer examples (``step_examples``)
    planned_batch = 0
    ctx.lr = base_lr * lr_factor(cfg.schedule, 0.0, 0, warmup_steps=cfg.warmup_steps, milestones=cfg.milestones, gamma=cfg.gamma)
    for cb in callbacks:
        cb.on_train_begin(ctx)
    # the DataLoader's worker seeds follow the run's seed (passed, not set on the task's shared source:
    # what another tool reads from it afterwards must not depend on which runs came before)
    batches = _Batches(train_src, _plan_steps(cfg, sampler, total_examples), device, non_blocking, shard, seed=cfg.seed)
    try:
        if cfg.eval_every:
            record()
        t_step = time.perf_counter()
        for plan, micro in batches:
            step_n = plan.examples
            ctx.epoch, ctx.batch_size = plan.epoch, step_n
            planned_batch = plan.batch * cfg.accumulation
            if scale_rule is not None and plan.batch != hp_batch:
                hp, hp_batch = scale_hparams(opt_name, base_hp, cfg.batch_size, plan.batch, scale_rule), plan.batch
                set_hparams(optimizer, scale_group_hparams(opt_name, base_groups, cfg.batch_size, plan.batch, scale_rule))
            ctx.lr = hp["lr"] * lr_factor(
                cfg.schedule, plan.frac, ctx.step, warmup_steps=cfg.warmup_steps, milestones=cfg.milestones, gamma=cfg.gamma
            )
            set_hparams(optimizer, {"lr": ctx.lr}, ratios)
            optimizer.zero_grad(set_to_none=True)
            snapshot = [t.clone() for t in bn_buffers] if scaler is not None else None

            if opt_name == "lbfgs":
                batch0 = micro[0]

                def closure() -> torch.Tensor:
                    optimizer.zero_grad(set_to_none=True)
                    with autocast:
                        l = task.loss_of(task.forward_batch(model, batch0), batch0)
                    l.backward()
                    return l

                step_loss = float(optimizer.step(closure).detach())
            elif shard is None and len(micro) > 1 and task.pools_by_tokens(micro[0]):
                # per-token targets with batchlab's or the model's own loss (a mean over the tokens that
                # count): micro-batches with padding hold different numbers of tokens, so the step's
                # loss is the mean over all its tokens, as one batch of the same examples would give
                # (the Hugging Face Trainer's num_items_in_batch), not a mean of micro-batch means
                step_sum, total = 0.0, 0.0
                for i, (idx, batch) in enumerate(zip(plan.micro, micro)):
                    with autocast:
                        out = task.forward_batch(model, batch)
                        loss = task.loss_of(out, batch)
                    w = task.loss_weight(out, batch, int(idx.shape[0]))
                    (scaler.scale(loss * w) if scaler is not None else loss * w).backward()
                    step_sum += loss.item() * w
                    total += w
                    if callbacks:
                        ctx.micro_batch, ctx.micro_batch_size, ctx.micro_weight = i, int(idx.shape[0]), w
                        for cb in callbacks:
                            cb.on_micro_batch_end(ctx)
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                if grads and total > 0:
                    torch._foreach_div_(grads, total)
                step_loss = step_sum / total if total > 0 else math.nan
                if not math.isfinite(step_loss) or step_loss > cfg.divergence_loss:
                    raise _Diverged(step_loss)
                _clip_and_step(cfg, model, optimizer, scaler, callbacks, ctx, bn_buffers, snapshot, result)
            else:
                step_loss = 0.0
                for i, (idx, batch) in enumerate(zip(plan.micro, micro)):
                    n_micro = int(idx.shape[0])
                    weight = scale = n_micro / step_n
                    if shard is not None:  # this rank's slice: its share of the global mean's gradient
                        lo, hi = shard.bounds(n_micro)
                        scale = weight * (hi - lo) * shard.world_size / n_micro
                    local = 0.0
                    if batch is not None:  # None: this rank's slice of the micro-batch is empty
                        with autocast:
                            loss = task.loss_of(task.forward_batch(model, batch), batch)
                        scaled = loss if scale == 1.0 else loss * scale
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                        local = loss.item()
                    step_loss += (local if shard is None else shard.global_mean(local, hi - lo, n_micro)) * weight
                    if callbacks:
                        ctx.micro_batch, ctx.micro_batch_size, ctx.micro_weight = i, int(idx.shape[0]), weight
                        for cb in callbacks:
                            cb.on_micro_batch_end(ctx)
                if not math.isfinite(step_loss) or step_loss > cfg.divergence_loss:
                    raise _Diverged(step_loss)
                _clip_and_step(cfg, model, optimizer, scaler, callbacks, ctx, bn_buffers, snapshot, result)
            if not math.isfinite(step_loss) or step_loss > cfg.divergence_loss:
                raise _Diverged(step_loss)
            ctx.step += 1
            ctx.examples += step_n
            ctx.loss = step_loss
            loss_sum += step_loss
            loss_count += 1
            now = time.perf_counter()
            train_time += now - t_step
            if ctx.step == 1:  # allocator and kernel warm-up, DataLoader start: speeds are read without it
                result.extra["first_step_time"] = train_time
            for cb in callbacks:
                cb.on_step_end(ctx)
            bar.update(1)
            if progress and ctx.step % 10 == 0:
                bar.set_postfix(loss=f"{step_loss:.3f}", refresh=False)
            if ((cfg.eval_every and ctx.step % cfg.eval_every == 0) or (not cfg.eval_every and plan.epoch_ended)
                    or (stream_every and ctx.step % stream_every == 0)):
                record()
            if ctx.stop:
                break
            t_step = time.perf_counter()
        if not result.history or result.history[-1]["step"] != ctx.step:
            record()
    except _Diverged as e:
        result.status, result.failed_step = "diverged", ctx.step
        result.error = f"training loss became {e.loss!r} at step {ctx.step}"
    except Exception as e:  # noqa: BLE001 - classified below
        if is_oom(e):
            result.status, result.failed_step = "oom", ctx.step
            result.error = f"out of memory at step {ctx.step} (batch {ctx.batch_size}): {str(e).splitlines()[0][:300]}"
            free_memory()
        elif raise_errors:
            if isinstance(e, TaskError):
                raise
            raise TaskError(f"task {task.name!r}: training failed at step {ctx.step} (batch {ctx.batch_size}): "
                            f"{type(e).__name__}: {e}") from e
        else:
            result.status, result.failed_step = "failed", ctx.step
            result.error = traceback.format_exc(limit=20)
    finally:
        bar.close()
        batches.close()  # shuts down DataLoader workers
    result.steps, result.examples = ctx.step, ctx.examples
    result.train_time = train_time
    result.wall_time = time.perf_counter() - t_start
    if result.history:
        last = result.history[-1]
        result.final = {k: float(v) for k, v in last.items() if isinstance(v, (int, float))}
    result.extra["eval_time"] = t_eval
    for cb in callbacks:
        cb.on_train_end(ctx, result)
    return result


class _IndexedSubset(Source):
    """A fixed subset of a source, in the given order (the training examples scored at each evaluation)."""

    def __init__(self, source: Source, idx: torch.Tensor) -> None:
        self.source, self.idx = source, idx

    def __len__(self) -> int:
        return int(self.idx.numel())

    def fetch(self, idx: torch.Tensor) -> Any:
        return self.source.fetch(self.idx[idx])

    def stream(self, index_batches: Iterable[torch.Tensor]) -> Iterator[Any]:
        return self.source.stream(self.idx[i] for i in index_batches)


class _Diverged(Exception):
    def __init__(self, loss: float) -> None:
        super().__init__(f"loss {loss}")
        self.loss = loss


def eval_batch_size(task: Task, train_batch: int) -> int:
    """The batch a run of ``task`` evaluates with: 1024 for in-memory arrays; a DataLoader's data at
    the run's own training batch (known to fit), except with a per-batch callable metric (F1,
    balanced accuracy), which depends on the chunks it is averaged over: then the task's own batch
    size for every run, so runs at different batch sizes (and the untrained baseline) compare on one scale."""
    if isinstance(task.train_source, ArraySource):
        return 1024
    if task.batch_metric is not None and not is_pooled_metric(task.batch_metric):
        return task.batch_size
    return train_batch


def _clip_and_step(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                   callbacks: Sequence[Callback], ctx: StepContext, bn_buffers: list[torch.Tensor],
                   snapshot: list[torch.Tensor] | None, result: RunResult) -> None:
    """The end of a step once its gradient is accumulated: clipping, the callbacks' on_before_step,
    the optimizer step (through the GradScaler, BN statistics rolled back when it skips the step)."""
    if cfg.grad_clip is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    for cb in callbacks:
        cb.on_before_step(ctx)
    if scaler is not None:
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if scaler.get_scale() < scale_before:  # step skipped: roll BN statistics back
            assert snapshot is not None
            for buf, saved in zip(bn_buffers, snapshot):
                buf.copy_(saved)
            result.extra["skipped_steps"] = result.extra.get("skipped_steps", 0) + 1
    else:
        optimizer.step()


def iterate_batches(task: Task, batch_size: int, seed: int = 0, device: torch.device | str = "cpu") -> Iterator[Any]:
    """Endless shuffled training batches of ``batch_size`` examples of ``task`` on ``device``
    (for tools that need raw batches: the noise scale, precise BN, throughput)."""
    source = task.train_source
    n = len(source) if source.indexable else None
    if n is not None and batch_size > n:
        raise ValueError(f"batch_size ({batch_size}) is larger than the training set of task {task.name!r} ({n} examples)")
    sampler = _Sampler(n, torch.Generator().manual_seed(seed), drop_last=True, shuffle=source.indexable)
    for batch in source.stream(iter(lambda: sampler.take(batch_size), None), seed=seed):
        yield move_to_device(batch, device)
