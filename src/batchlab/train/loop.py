"""``fit(task, config) -> RunResult``: the training loop every batchlab tool runs.

Design notes:
- Data live in memory; a step's batch is one ``index_select`` on a per-epoch permutation from a
  generator seeded with ``config.seed``, so a run is deterministic on CPU.
- The whole run executes inside ``torch.random.fork_rng``: it never perturbs the caller's RNG.
- A non-finite (or absurdly large) loss ends the run as ``"diverged"``; an out-of-memory error
  as ``"oom"``. Both are recorded with the step and returned, never raised.
- With float16 autocast a GradScaler skips steps whose gradients overflow. BatchNorm running
  statistics were already updated by that step's forward pass, so they are restored from a
  snapshot taken before it (otherwise a skipped step still moves them: a known PyTorch pitfall).
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from batchlab.tasks import Task, get_task
from batchlab.train.config import RunResult, TrainConfig
from batchlab.train.oom import free_memory, is_oom
from batchlab.train.optim import batch_factor, lr_factor, make_optimizer


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
    batch_size: int = 0  # examples in the current step (all micro-batches)
    micro_batch: int = 0  # index of the current micro-batch in the step
    micro_batch_size: int = 0  # examples in the current micro-batch
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


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: Task,
    *,
    batch_size: int = 1024,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
) -> tuple[float, float]:
    """Mean loss and the task's metric of ``model`` in eval mode on ``(x, y)``; restores the mode."""
    was_training = model.training
    model.eval()
    try:
        outs = []
        for start in range(0, x.shape[0], batch_size):
            with autocast or contextlib.nullcontext():
                outs.append(model(x[start : start + batch_size]).float())
        logits = torch.cat(outs)
        return float(task.loss(logits, y)), float(task.metric(logits, y))
    finally:
        model.train(was_training)


class _Sampler:
    """Per-epoch permutations consumed in batches of any size (the size may change between steps)."""

    def __init__(self, n: int, generator: torch.Generator, drop_last: bool, device: torch.device) -> None:
        self.n, self.gen, self.drop_last, self.device = n, generator, drop_last, device
        self.perm = torch.empty(0, dtype=torch.long)
        self.cursor = n  # the first take() draws the first permutation
        self.epoch = 0
        self.epoch_ended = False

    def take(self, b: int) -> torch.Tensor:
        left = self.n - self.cursor
        if left <= 0 or (self.drop_last and left < b):
            self.perm = torch.randperm(self.n, generator=self.gen).to(self.device)
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


def _resolve_device(name: str) -> torch.device:
    dev = torch.device(name)
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
) -> RunResult:
    """Train ``task``'s model with ``config`` and return its history.

    Args:
        task: a Task or a registered name / entry point.
        config: the run's settings (defaults: ``TrainConfig()``).
        model: train this model instead of ``task.make_model(...)`` (it is modified in place).
        callbacks: :class:`Callback` objects.
        progress: show a progress bar.
        raise_errors: re-raise errors other than divergence and OOM; when False they end the run
            with status ``"failed"`` and the traceback in ``error``.

    Returns:
        A :class:`RunResult`; ``status`` is ``"ok"``, ``"diverged"``, ``"oom"`` or ``"failed"``.
    """
    task = get_task(task) if not isinstance(task, Task) else task
    cfg = config or TrainConfig()
    if cfg.optimizer == "lbfgs" and cfg.accumulation > 1:
        raise ValueError(f"accumulation must be 1 with optimizer 'lbfgs', got {cfg.accumulation}")
    device = _resolve_device(cfg.device)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        return _fit(task, cfg, device, model, list(callbacks), progress, raise_errors)


def _fit(
    task: Task,
    cfg: TrainConfig,
    device: torch.device,
    model: nn.Module | None,
    callbacks: list[Callback],
    progress: bool,
    raise_errors: bool,
) -> RunResult:
    t_start = time.perf_counter()
    opt_name = cfg.optimizer or task.optimizer
    base_lr = float(cfg.lr if cfg.lr is not None else task.lr)
    result = RunResult(task=task.name, config=cfg.to_dict(), extra={"optimizer": opt_name, "lr": base_lr})
    if model is None:
        model = task.make_model(norm=cfg.norm, activation=cfg.activation)
    model = model.to(device)
    model.train()
    optimizer = make_optimizer(
        opt_name, model.parameters(), base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        lbfgs_max_iter=cfg.lbfgs_max_iter,
    )
    train, val = task.train_set.to(device), task.val_set.to(device)
    n = len(train)
    if cfg.batch_size > n:
        raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the training set ({n} examples)")

    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[
        cfg.amp_dtype or ("float16" if device.type == "cuda" else "bfloat16")
    ]
    autocast = torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=cfg.amp)
    use_scaler = cfg.amp and amp_dtype == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler) if use_scaler else None
    bn_buffers = _bn_buffers(model) if scaler is not None else []

    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = _Sampler(n, gen, cfg.drop_last, device)
    eval_idx = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))[:2048].to(device)
    train_eval_x, train_eval_y = train.x.index_select(0, eval_idx), train.y.index_select(0, eval_idx)

    total_examples = None
    if cfg.max_steps is None:
        total_examples = cfg.max_examples if cfg.max_examples is not None else max(1, round(cfg.epochs * n))

    def progress_frac() -> float:
        if cfg.max_steps is not None:
            return ctx.step / cfg.max_steps
        return ctx.examples / total_examples

    ctx = StepContext(task=task, config=cfg, model=model, optimizer=optimizer, accumulation=cfg.accumulation)
    est_steps = cfg.max_steps or math.ceil(total_examples / (cfg.batch_size * cfg.accumulation))
    bar = tqdm(total=est_steps, desc=f"{task.name} B={cfg.batch_size}", unit="step", disable=not progress, leave=False)
    loss_sum, loss_count = 0.0, 0
    train_time = 0.0

    def record() -> None:
        nonlocal loss_sum, loss_count
        t0 = time.perf_counter()
        val_loss, val_acc = evaluate(model, val.x, val.y, task, autocast=autocast)
        tr_loss, tr_acc = (
            evaluate(model, train_eval_x, train_eval_y, task, autocast=autocast) if cfg.eval_train else (math.nan, math.nan)
        )
        row: dict[str, Any] = {
            "step": ctx.step, "epoch": ctx.examples / n, "examples": ctx.examples,
            "wall_time": time.perf_counter() - t_start, "train_time": train_time, "lr": ctx.lr,
            "batch_size": ctx.batch_size, "batch_loss": loss_sum / loss_count if loss_count else float("nan"),
            "train_loss": tr_loss, "train_acc": tr_acc, "val_loss": val_loss, "val_acc": val_acc,
        }
        row.update(ctx.logs)
        ctx.logs.clear()
        loss_sum, loss_count = 0.0, 0
        result.history.append(row)
        for cb in callbacks:
            cb.on_evaluate(ctx, row)
        nonlocal t_eval
        t_eval += time.perf_counter() - t0

    t_eval = 0.0
    ctx.lr = base_lr * lr_factor(cfg.schedule, 0.0, 0, warmup_steps=cfg.warmup_steps, milestones=cfg.milestones, gamma=cfg.gamma)
    for cb in callbacks:
        cb.on_train_begin(ctx)
    if cfg.eval_every:
        record()
    try:
        while True:
            if cfg.max_steps is not None and ctx.step >= cfg.max_steps:
                break
            if total_examples is not None and (
                ctx.examples >= total_examples or (total_examples - ctx.examples == 1 and cfg.batch_size > 1)
            ):
                break  # a single leftover example of the budget is not worth a (BatchNorm-breaking) step
            t_step = time.perf_counter()
            frac = progress_frac()
            b = cfg.batch_size * batch_factor(frac, cfg.batch_growth, cfg.growth_factor) if cfg.batch_growth else cfg.batch_size
            micro_idx = []
            room = None if total_examples is None else total_examples - ctx.examples
            for _ in range(cfg.accumulation):
                take = b if room is None else min(b, room)
                if take <= 0:
                    break
                idx = sampler.take(take)
                micro_idx.append(idx)
                if room is not None:
                    room -= idx.shape[0]
                if sampler.epoch_ended:
                    break
            step_n = sum(i.shape[0] for i in micro_idx)
            ctx.epoch, ctx.batch_size = sampler.epoch, step_n
            ctx.lr = base_lr * lr_factor(
                cfg.schedule, frac, ctx.step, warmup_steps=cfg.warmup_steps, milestones=cfg.milestones, gamma=cfg.gamma
            )
            for group in optimizer.param_groups:
                group["lr"] = ctx.lr
            optimizer.zero_grad(set_to_none=True)
            snapshot = [t.clone() for t in bn_buffers] if scaler is not None else None

            if opt_name == "lbfgs":
                xb, yb = train.x.index_select(0, micro_idx[0]), train.y.index_select(0, micro_idx[0])

                def closure() -> torch.Tensor:
                    optimizer.zero_grad(set_to_none=True)
                    with autocast:
                        l = task.loss(model(xb), yb)
                    l.backward()
                    return l

                step_loss = float(optimizer.step(closure).detach())
            else:
                step_loss = 0.0
                for i, idx in enumerate(micro_idx):
                    xb, yb = train.x.index_select(0, idx), train.y.index_select(0, idx)
                    with autocast:
                        loss = task.loss(model(xb), yb)
                    weight = idx.shape[0] / step_n
                    scaled = loss if weight == 1.0 else loss * weight
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    step_loss += loss.item() * weight
                    if callbacks:
                        ctx.micro_batch, ctx.micro_batch_size = i, idx.shape[0]
                        for cb in callbacks:
                            cb.on_micro_batch_end(ctx)
                if not math.isfinite(step_loss) or step_loss > cfg.divergence_loss:
                    raise _Diverged(step_loss)
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
                        for buf, saved in zip(bn_buffers, snapshot):
                            buf.copy_(saved)
                        result.extra["skipped_steps"] = result.extra.get("skipped_steps", 0) + 1
                else:
                    optimizer.step()
            if not math.isfinite(step_loss) or step_loss > cfg.divergence_loss:
                raise _Diverged(step_loss)
            ctx.step += 1
            ctx.examples += step_n
            ctx.loss = step_loss
            loss_sum += step_loss
            loss_count += 1
            train_time += time.perf_counter() - t_step
            for cb in callbacks:
                cb.on_step_end(ctx)
            bar.update(1)
            if progress and ctx.step % 10 == 0:
                bar.set_postfix(loss=f"{step_loss:.3f}", refresh=False)
            if (cfg.eval_every and ctx.step % cfg.eval_every == 0) or (not cfg.eval_every and sampler.epoch_ended):
                record()
            if ctx.stop:
                break
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
            raise
        else:
            result.status, result.failed_step = "failed", ctx.step
            result.error = traceback.format_exc(limit=20)
    finally:
        bar.close()
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


class _Diverged(Exception):
    def __init__(self, loss: float) -> None:
        super().__init__(f"loss {loss}")
        self.loss = loss


def iterate_batches(task: Task, batch_size: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled training batches of ``task`` (for tools that need raw batches)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from task.train_set.batches(batch_size, generator=gen, drop_last=True)
