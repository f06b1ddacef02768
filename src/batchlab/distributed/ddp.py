"""Data-parallel training under ``torchrun``: ``fit_ddp(task, config) -> RunResult``.

``torchrun --nproc_per_node N -m batchlab.cli train --task digits-mlp --batch-size 32`` trains
with N processes; each takes ``--batch-size`` examples per micro-batch, so one optimizer step
sees ``batch_size * world_size * accumulation`` examples (the *global* batch).

How it reuses :func:`batchlab.train.fit` instead of a second training loop:

- **Sampling.** Every rank runs ``fit`` on the *global* micro-batch size with the same seed, so
  every rank plans the same per-epoch permutation and the same global batch of indices; ``fit``'s
  ``shard`` argument then makes each rank *fetch* only its contiguous slice of those indices
  (:func:`shard_bounds`): a DataLoader-backed task loads and augments only this rank's examples.
  The union of the rank slices is exactly the batch one process would take, budgets (epochs,
  examples) and schedules count global examples, and ``batch_growth`` just works. Any task works
  (pairs, dict batches, outputs carrying their loss): nothing is sliced after loading.
- **Loss.** Each rank back-propagates ``mean over its slice * n_local * world / n_global``: the
  average of these gradients over ranks is the gradient of the global mean loss, even when the
  slices differ in size (the short last batch of an epoch). The logged loss is the all-reduced
  global mean, so every rank sees the same value and takes the same divergence decision.
- **Gradients.** The model is wrapped in :class:`DistributedDataParallel` (torch's, taking batchlab's
  SyncBatchNorm on CPU; it broadcasts rank 0's parameters and buffers at construction) but its forward always runs under ``no_sync()``;
  gradients are all-reduced once per optimizer step in the ``on_before_step`` hook. Reason:
  ``fit`` owns the micro-batch loop and does not tell the model which micro-batch is the last, so
  DDP's automatic per-backward all-reduce would sync every micro-batch with accumulation and would
  destroy the per-rank gradients before the noise scale can read them. One flat all-reduce per step
  also carries each rank's ``|g_r|^2``, so the gradient noise scale costs no extra collective. The
  price is no overlap of communication with the backward pass (a hook telling callbacks which
  micro-batch is the last would let DDP's overlapped path and a comm hook do the same job).
- **Gradient clipping** is moved after the all-reduce (``fit`` would clip local gradients).
- **BatchNorm** layers become synchronized: batchlab's :class:`~batchlab.norm.SyncBatchNorm`, an
  ``nn.SyncBatchNorm`` that also runs on CPU (gloo; torch's only runs on accelerators) and uses
  torch's forward on CUDA. Batch statistics then cover the global batch.
- **Noise scale** (McCandlish et al. 2018): per-rank ``|g_r|^2`` (batch ``B/world``) before the
  all-reduce vs ``|mean_r g_r|^2`` (batch ``B``) after, smoothed by separate EMAs
  (:class:`batchlab.batchsize.GradientNoiseScale`); logged as ``b_simple`` in the history.

Every rank evaluates (the parameters are identical, so the numbers are too); only rank 0 should
write results (:func:`maybe_run_distributed` does so). Dropout masks differ per rank (the RNG is
re-seeded with ``seed + rank``), so a model with dropout matches one process only in distribution.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from batchlab.tasks import Task, get_task
from batchlab.train import LR_RULES, Callback, RunResult, StepContext, TrainConfig, default_lr_rule, fit, scale_lr

__all__ = [
    "DistEnv",
    "add_distributed_args",
    "dist_env",
    "fit_ddp",
    "maybe_run_distributed",
    "shard_bounds",
    "sync_batchnorm",
]


@dataclass(frozen=True)
class DistEnv:
    """The process's place in a ``torchrun`` job (from its environment variables)."""

    rank: int  # RANK: 0 .. world_size - 1 over all nodes
    world_size: int  # WORLD_SIZE
    local_rank: int  # LOCAL_RANK: index on this node (picks the GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env(environ: dict[str, str] | None = None) -> DistEnv | None:
    """The ``torchrun`` environment, or None when this process was not started by it.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    A job of one process returns ``DistEnv(0, 1, 0)``.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    try:
        world, rank, local = int(env["WORLD_SIZE"]), int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"]))
    except ValueError:
        raise ValueError(
            f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got RANK={env.get('RANK')!r} "
            f"WORLD_SIZE={env.get('WORLD_SIZE')!r} LOCAL_RANK={env.get('LOCAL_RANK')!r}"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE, got RANK={rank} WORLD_SIZE={world}")
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s contiguous share of a batch of ``n`` examples.

    Shares differ by at most one example (the first ``n % world_size`` ranks get one more), like
    ``torch.tensor_split``; concatenated in rank order they are the whole batch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class DistributedDataParallel(nn.parallel.DistributedDataParallel):
    """torch's ``DistributedDataParallel`` that also trains batchlab's ``SyncBatchNorm`` on CPU.

    torch's DDP refuses every ``nn.SyncBatchNorm`` in a CPU module, since torch's forward only
    runs on accelerators. :class:`batchlab.norm.SyncBatchNorm` is an ``nn.SyncBatchNorm`` whose
    forward also runs on CPU (gloo), so this class narrows the check to torch's own class (still
    refused on CPU, with a message saying what to use). Everything else is torch's DDP, same
    arguments; on accelerators the two behave the same.
    """

    def __init__(self, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        # Refused before torch builds its reducer (torch checks after, leaving a half-built DDP
        # that holds the process group until the garbage collector finds it).
        devices = {p.device.type for p in module.parameters()}
        if devices == {"cpu"}:
            _refuse_torch_sync_batchnorm(module)
        super().__init__(module, *args, **kwargs)

    def _passing_sync_batchnorm_handle(self, module: nn.Module) -> None:
        if self.device_type != "cpu":
            return super()._passing_sync_batchnorm_handle(module)
        _refuse_torch_sync_batchnorm(module)


def _refuse_torch_sync_batchnorm(module: nn.Module) -> None:
    from batchlab.norm import SyncBatchNorm

    for name, layer in module.named_modules():
        if isinstance(layer, nn.SyncBatchNorm) and not isinstance(layer, SyncBatchNorm):
            raise ValueError(
                f"torch's nn.SyncBatchNorm ({name or 'the module'}) only works with GPU modules; on CPU convert "
                "the model with batchlab.norm.convert_sync_batchnorm, whose SyncBatchNorm also runs on gloo"
            )


def sync_batchnorm(model: nn.Module, device: torch.device, process_group: Any = None) -> tuple[nn.Module, int]:
    """Make every batch norm of ``model`` synchronized across ranks; returns ``(model, n_converted)``.

    Plain BatchNorm layers become batchlab's ``SyncBatchNorm`` (an ``nn.SyncBatchNorm`` with
    torch's forward on CUDA and a gloo one on CPU); Batch Renorm, Ghost BN and
    norm+activation layers are left as they are. Converted in place, like torch's
    ``convert_sync_batchnorm``.
    """
    from batchlab.norm import convert_sync_batchnorm

    def count() -> int:
        return sum(1 for m in model.modules() if isinstance(m, nn.SyncBatchNorm))

    before = count()
    model = convert_sync_batchnorm(model, process_group)
    return model, count() - before


class _RankShard(nn.Module):
    """The (DDP) model, run under ``no_sync()`` while training: gradients are all-reduced once per
    optimizer step by :class:`_GradSync`, not by DDP after every micro-batch. In eval mode it is
    transparent (every rank evaluates the full data)."""

    def __init__(self, ddp: nn.Module) -> None:
        super().__init__()
        self.module = ddp

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.training:
            return self.module(*args, **kwargs)
        with self.module.no_sync():
            return self.module(*args, **kwargs)


@dataclass(frozen=True)
class _Shard:
    """This rank's share of every batch, as :func:`batchlab.train.fit`'s ``shard`` argument."""

    rank: int
    world_size: int

    def bounds(self, n: int) -> tuple[int, int]:
        return shard_bounds(n, self.rank, self.world_size)

    def global_mean(self, local_mean: float, n_local: int, n: int) -> float:
        """The mean over all ranks' slices of a batch of ``n`` from each rank's mean over its ``n_local``."""
        total = torch.tensor([local_mean * n_local / n], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total)


class _GradSync(Callback):
    """All-reduces (averages) the step's gradients before the optimizer step; measures the noise
    scale from the per-rank squared norms that ride along in the same all-reduce."""

    def __init__(self, params: list[nn.Parameter], world_size: int, rank: int, grad_clip: float | None, gns: Any) -> None:
        self.params, self.world_size, self.rank = params, world_size, rank
        self.grad_clip, self.gns = grad_clip, gns
        self.sync_count = 0

    def on_train_begin(self, ctx: StepContext) -> None:
        if self.rank:  # distinct dropout masks per rank; rank 0 keeps fit's seeding
            torch.manual_seed(ctx.config.seed + self.rank)

    def on_before_step(self, ctx: StepContext) -> None:
        for p in self.params:  # every rank must all-reduce the same tensors
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        dev = grads[0].device if grads else torch.device("cpu")
        norms = torch.zeros(self.world_size, dtype=torch.float64, device=dev)
        if grads:
            norms[self.rank] = torch.stack([g.double().square().sum() for g in grads]).sum()
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        flats = [_flatten_dense_tensors(gs) for gs in by_dtype.values()]
        for flat in flats:
            dist.all_reduce(flat)
        dist.all_reduce(norms)
        for flat, gs in zip(flats, by_dtype.values()):
            flat.div_(self.world_size)
            for g, synced in zip(gs, _unflatten_dense_tensors(flat, gs)):
                g.copy_(synced)
        self.sync_count += 1
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.gns is not None and grads and ctx.batch_size % self.world_size == 0:
            big = float(torch.stack([g.double().square().sum() for g in grads]).sum())
            b = self.gns.update_from_ranks(norms.tolist(), big, ctx.batch_size // self.world_size, step=ctx.step)
            ctx.logs["b_simple"] = b


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP keyword that stops the per-forward buffer broadcast (buffers still sync at construction):
    synchronized BN keeps the buffers equal on every rank anyway. Renamed in newer torch."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _init_process_group(env: DistEnv, device: torch.device, timeout_s: float) -> bool:
    """Join the job's process group (gloo on CPU, NCCL on CUDA); True when this call created it."""
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, **kwargs)
    return True


def fit_ddp(
    task: Task | str,
    config: TrainConfig,
    *,
    lr_rule: str | None = None,
    model: nn.Module | None = None,
    callbacks: Sequence[Callback] = (),
    gns: bool = True,
    gns_beta: float = 0.9,
    sync_bn: bool = True,
    progress: bool = False,
    raise_errors: bool = True,
    env: DistEnv | None = None,
    timeout_s: float = 600.0,
) -> RunResult:
    """Data-parallel :func:`batchlab.train.fit` across the ranks of a ``torchrun`` job.

    Call it in every rank. The process group is created when none exists (gloo on CPU, NCCL on
    CUDA, from the ``torchrun`` environment) and destroyed again at the end if created here.

    Args:
        task: a Task or a registered name.
        config: the run's settings; ``batch_size`` is per rank and per micro-batch, so one
            optimizer step uses ``batch_size * world_size * accumulation`` examples. With
            ``device="cuda"`` each rank uses GPU ``LOCAL_RANK``. Budgets count global examples.
        lr_rule: how the learning rate (``config.lr`` or the task's) given for one process's step
            batch (``batch_size * accumulation``) is scaled to the global batch: ``"linear"``,
            ``"sqrt"`` or ``"none"`` (see :func:`batchlab.train.scale_lr`); None: the optimizer's
            default rule (:func:`batchlab.train.default_lr_rule`).
        model: train this model instead of ``task.make_model(...)`` (converted in place).
        callbacks: more :class:`~batchlab.train.Callback` objects; they run after the gradient
            all-reduce, so ``on_before_step`` sees the synchronized gradients.
        gns: measure the gradient noise scale (logged as ``b_simple``; needs world_size >= 2).
        gns_beta: EMA factor of the noise-scale accumulators.
        sync_bn: convert batch norms to synchronized batch norms.
        progress: progress bar (rank 0 only).
        raise_errors: as in :func:`~batchlab.train.fit`.
        env: the rank/world (default: from the environment, or a process group that already exists).
        timeout_s: collective timeout.

    Returns:
        The :class:`~batchlab.train.RunResult` (identical on every rank). ``config`` is the given
        (per-rank) config; ``extra["distributed"]`` holds world size, batch sizes, the scaled LR,
        the number of synchronized BN layers and the noise-scale state.
    """
    task = get_task(task) if not isinstance(task, Task) else task
    opt_name = config.optimizer or task.optimizer
    if opt_name == "lbfgs":
        raise ValueError("optimizer 'lbfgs' is not supported by fit_ddp (its closure re-evaluates the loss)")
    rule = lr_rule if lr_rule is not None else default_lr_rule(opt_name)
    if rule not in LR_RULES:
        raise ValueError(f"lr_rule must be one of {', '.join(LR_RULES)} or None; got {lr_rule!r}")
    if env is None:
        env = dist_env()
    if env is None and dist.is_initialized():
        env = DistEnv(dist.get_rank(), dist.get_world_size(), dist.get_rank())
    if env is None:
        raise ValueError("fit_ddp needs a torchrun environment (RANK, WORLD_SIZE) or an initialized process group")

    device = torch.device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else env.local_rank)
        torch.cuda.set_device(device)
    world = env.world_size
    global_micro = config.batch_size * world
    task.check(device)
    n = task.n_train
    if global_micro > n:
        raise ValueError(
            f"batch_size * world_size ({config.batch_size} * {world} = {global_micro}) is larger than "
            f"the training set ({n} examples)"
        )
    if config.grad_clip is not None and config.amp and device.type == "cuda":
        raise ValueError("grad_clip with float16 AMP is not supported by fit_ddp (gradients are still scaled at the all-reduce)")
    base_lr = float(config.lr if config.lr is not None else task.lr)
    step_local = config.batch_size * config.accumulation
    lr = scale_lr(base_lr, step_local, step_local * world, rule)

    created = _init_process_group(env, device, timeout_s)
    try:
        if model is None:
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                torch.manual_seed(config.seed)  # the model fit() itself would build
                model = task.make_model(norm=config.norm, activation=config.activation)
        model = model.to(device)
        n_sync = 0
        if sync_bn and world > 1:
            model, n_sync = sync_batchnorm(model, device)
        ddp = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, **_no_forward_buffer_sync(),
        )
        shard = _RankShard(ddp)
        params = [p for p in model.parameters() if p.requires_grad]
        tracker = None
        if gns and world > 1:
            from batchlab.batchsize.noise import GradientNoiseScale

            tracker = GradientNoiseScale(beta=gns_beta)
        sync = _GradSync(params, world, env.rank, config.grad_clip, tracker)
        inner_cfg = config.replace(batch_size=global_micro, lr=lr, grad_clip=None, device=str(device))
        result = fit(
            task, inner_cfg, model=shard, callbacks=[sync, *callbacks], shard=_Shard(env.rank, world),
            progress=progress and env.is_main, raise_errors=raise_errors,
        )
    finally:
        if created:
            dist.destroy_process_group()
    result.config = config.to_dict()
    result.extra["distributed"] = {
        "world_size": world,
        "backend": "nccl" if device.type == "cuda" else "gloo",
        "per_rank_batch": config.batch_size,
        "accumulation": config.accumulation,
        "global_batch": global_micro * config.accumulation,
        "lr_rule": rule,
        "base_lr": base_lr,
        "lr": lr,
        "sync_bn_layers": n_sync,
        "gradient_syncs": sync.sync_count,
        "noise_scale": tracker.state() if tracker is not None else None,
    }
    return result


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``batchlab train`` that matter only under ``torchrun``."""
    p.add_argument(
        "--lr-rule", choices=LR_RULES, default=None,
        help="under torchrun: scale the LR from one process's batch to the global batch "
        "(default: linear for SGD, sqrt for Adam)",
    )
    p.add_argument("--no-sync-bn", action="store_true", help="under torchrun: keep per-rank batch-norm statistics")
    p.add_argument("--no-gns", action="store_true", help="under torchrun: do not measure the gradient noise scale")


def maybe_run_distributed(args: argparse.Namespace, task: Task, config: TrainConfig) -> RunResult | None:
    """Run ``batchlab train`` data-parallel when started by ``torchrun`` with 2+ processes.

    Returns None when not under ``torchrun`` (or with one process): the caller trains as usual.
    On rank 0 it returns the result; the other ranks exit with the run's status code once
    training ends, so only rank 0 prints and writes.
    """
    env = dist_env()
    if env is None or env.world_size < 2:
        given = [f for f, set_ in (("--lr-rule", getattr(args, "lr_rule", None) is not None),
                                   ("--no-sync-bn", getattr(args, "no_sync_bn", False)),
                                   ("--no-gns", getattr(args, "no_gns", False))) if set_]
        if given:
            print(f"note: {', '.join(given)} only apply under torchrun with 2+ processes; this run is one process, "
                  "so they change nothing", file=sys.stderr)
        return None
    result = fit_ddp(
        task, config, lr_rule=getattr(args, "lr_rule", None), sync_bn=not getattr(args, "no_sync_bn", False),
        gns=not getattr(args, "no_gns", False), progress=not getattr(args, "quiet", True), env=env,
    )
    if not env.is_main:
        raise SystemExit(0 if result.ok else 1)
    return result
