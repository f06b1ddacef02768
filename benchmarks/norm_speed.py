"""Forward + backward time of batchlab's normalization layers against torch's built-ins.

Usage::

    .venv/bin/python benchmarks/norm_speed.py            # shapes (256,64,32,32), (1024,512), (32,128,56,56)
    .venv/bin/python benchmarks/norm_speed.py --quick    # smaller shapes
    .venv/bin/python benchmarks/norm_speed.py --no-sync  # skip the two-rank SyncBatchNorm run
    .venv/bin/python benchmarks/norm_speed.py --channels-last  # image inputs in channels_last
    .venv/bin/python benchmarks/norm_speed.py --shape 1024,512 --repeats 41  # one shape, more repeats

Each row times ``y = layer(x); y.backward(g)`` for the batchlab layer and for its torch baseline
on the same input, interleaved (ours, torch, ours, torch, ...) so that load on the machine hits
both alike, and prints the median times and their ratio. Batch Renorm and Ghost BN are compared
with torch's BatchNorm (target <= 1.5x); BatchNorm, GroupNorm, LayerNorm, RMSNorm and InstanceNorm
with their torch counterparts (target <= 1.05x). SyncBatchNorm runs on two gloo ranks (one thread
each, half the batch each) against a plain BatchNorm on the same local half batch: the ratio is
its overhead (target <= 3x on (1024, 512), <= 2x on the image shapes).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import batchlab.norm as N

FULL_SHAPES = [(256, 64, 32, 32), (1024, 512), (32, 128, 56, 56)]
QUICK_SHAPES = [(32, 16, 16, 16), (256, 128), (8, 32, 28, 28)]


def _step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(g)

    return run


def time_pair(
    ours: Callable[[], None], ref: Callable[[], None], repeats: int, warmup: int = 2, min_sample_s: float = 0.02,
    agree: Callable[[int], int] | None = None, clock: Callable[[], float] = time.perf_counter,
    align: Callable[[], None] | None = None,
) -> tuple[float, float, float]:
    """Median seconds per call of ``ours`` and ``ref``, measured interleaved, and the ratio of
    their minimums (less sensitive to other processes on a shared machine).

    Each sample times a block of calls lasting at least ``min_sample_s`` (the same count for both),
    so sub-millisecond layers are not measured at the timer's and the scheduler's resolution.
    ``agree`` maps this process's block length to the one all processes use (collective layers
    must make the same number of calls on every rank). ``clock`` is wall time by default;
    ``time.process_time`` counts only the CPU time of this process, so time spent waiting for a
    core on a loaded machine drops out (right for one-process rows with one thread). ``align``
    runs before each timed block, untimed: a barrier for collective layers, so that the ranks'
    drift during the other layer's (unsynchronized) block is not billed to the collective one, as
    in training, where each step's gradient all-reduce realigns the ranks anyway."""
    for _ in range(warmup):
        ours()
        ref()
    t0 = clock()
    ref()
    one = max(clock() - t0, 1e-6)
    inner = max(1, min(1000, int(min_sample_s / one)))
    if agree is not None:
        inner = agree(inner)

    def block(fn: Callable[[], None]) -> float:
        if align is not None:
            align()
        t0 = clock()
        for _ in range(inner):
            fn()
        return (clock() - t0) / inner

    t_ours, t_ref = [], []
    for i in range(repeats):
        order = [(ours, t_ours), (ref, t_ref)] if i % 2 == 0 else [(ref, t_ref), (ours, t_ours)]
        for fn, acc in order:
            acc.append(block(fn))
    return statistics.median(t_ours), statistics.median(t_ref), min(t_ours) / min(t_ref)


def cases(shape: tuple[int, ...]) -> list[tuple[str, nn.Module, nn.Module, float]]:
    c = shape[1]
    spatial = len(shape) - 2
    torch_bn = nn.BatchNorm1d if spatial <= 1 else nn.BatchNorm2d
    ours_bn = N.BatchNorm1d if spatial <= 1 else N.BatchNorm2d
    renorm = N.BatchRenorm1d if spatial <= 1 else N.BatchRenorm2d
    ghost = N.GhostBatchNorm1d if spatial <= 1 else N.GhostBatchNorm2d
    vbs = 32 if shape[0] >= 64 else max(2, shape[0] // 4)
    out = [
        # the noise floor: two instances of the same torch layer (any ratio but 1.00 is noise)
        ("control: torch BatchNorm vs itself", torch_bn(c), torch_bn(c), 1.05),
        ("BatchNorm", ours_bn(c), torch_bn(c), 1.05),
        ("GroupNorm(8)", N.GroupNorm(c, 8), nn.GroupNorm(8, c), 1.05),
        ("LayerNorm(C,*)", N.LayerNorm(shape[1:]), nn.LayerNorm(shape[1:]), 1.05),
        ("RMSNorm(C,*)", N.RMSNorm(shape[1:]), nn.RMSNorm(shape[1:]), 1.05),
        # constant limits: r and d are active from the first step (the worst case)
        ("BatchRenorm vs BN", renorm(c, warmup_steps=0, rmax_steps=0, dmax_steps=0), torch_bn(c), 1.5),
        (f"GhostBN(vbs={vbs}) vs BN", ghost(c, virtual_batch_size=vbs), torch_bn(c), 1.5),
        (f"GhostBN(vbs={vbs}, native) vs BN", ghost(c, virtual_batch_size=vbs, impl="native"), torch_bn(c), 1.5),
        (f"GhostBN(vbs={vbs}, vectorized) vs BN", ghost(c, virtual_batch_size=vbs, impl="vectorized"), torch_bn(c), 1.5),
    ]
    if spatial >= 1:
        out.append(("InstanceNorm", N.InstanceNorm2d(c) if spatial == 2 else N.InstanceNorm1d(c), nn.InstanceNorm2d(c) if spatial == 2 else nn.InstanceNorm1d(c), 1.05))
    return out


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _sync_worker(rank: int, world: int, init: str, shape: tuple[int, ...], repeats: int, out_file: str, channels_last: bool = False) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        local = (shape[0] // world, *shape[1:])
        torch.manual_seed(rank)
        x = _layout(torch.randn(local), channels_last).requires_grad_()
        g = _layout(torch.randn(local), channels_last)
        c = shape[1]
        bn_cls = nn.BatchNorm1d if len(shape) <= 3 else nn.BatchNorm2d
        def agree(inner: int) -> int:  # rank 0's block length everywhere
            t = torch.tensor([inner])
            dist.broadcast(t, src=0)
            return int(t.item())

        sync_t, ref_t, min_ratio = time_pair(_step(N.SyncBatchNorm(c), x, g), _step(bn_cls(c), x, g), repeats, agree=agree, align=dist.barrier)
        # the communication floor: SyncBatchNorm's two all-reduces (forward 1 + 2C, backward 2C
        # float64 values) and nothing else, against the same BN step
        fwd, bwd = torch.zeros(1 + 2 * c, dtype=torch.float64), torch.zeros(2 * c, dtype=torch.float64)

        def comm() -> None:
            dist.all_reduce(fwd)
            dist.all_reduce(bwd)

        comm_t, ref2_t, _ = time_pair(comm, _step(bn_cls(c), x, g), repeats, agree=agree, align=dist.barrier)
        if rank == 0:
            with open(out_file, "w") as f:
                f.write(f"{sync_t} {ref_t} {min_ratio} {comm_t / ref2_t}")
    finally:
        dist.destroy_process_group()


def sync_overhead(shape: tuple[int, ...], repeats: int, channels_last: bool = False) -> tuple[float, float, float, float]:
    """SyncBatchNorm's and BN's median step times, the ratio of their minimums, and the ratio of
    the two all-reduces alone to the BN step (the part of the overhead that is communication)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "times")
        mp.spawn(_sync_worker, args=(2, f"file://{os.path.join(d, 'rdv')}", shape, repeats, out, channels_last), nprocs=2, join=True)
        with open(out) as f:
            a, b, r, floor = f.read().split()
    return float(a), float(b), float(r), float(floor)


def sync_compute(shape: tuple[int, ...], repeats: int, channels_last: bool = False) -> tuple[float, float, float]:
    """SyncBatchNorm's synchronized path in this one process against BN on the same half batch,
    CPU time: a one-rank gloo group makes the all-reduces local, so this is its compute (kernels
    plus small operations) without communication or waiting for another rank."""
    from batchlab.norm.sync import _SyncBatchNormFn

    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'rdv')}", rank=0, world_size=1)
        try:
            local = (shape[0] // 2, *shape[1:])
            x = _layout(torch.randn(local), channels_last).requires_grad_()
            g = _layout(torch.randn(local), channels_last)
            c = shape[1]
            layer = nn.BatchNorm1d(c) if len(shape) <= 3 else nn.BatchNorm2d(c)
            sync_layer = copy.deepcopy(layer)

            def sync_step() -> None:
                x.grad = None
                for p in sync_layer.parameters():
                    p.grad = None
                _SyncBatchNormFn.apply(x, sync_layer.weight, sync_layer.bias, sync_layer.running_mean, sync_layer.running_var,
                                       sync_layer.eps, 0.1, None).backward(g)

            return time_pair(sync_step, _step(layer, x, g), repeats, clock=time.process_time)
        finally:
            dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per layer (default 9, quick 5)")
    ap.add_argument("--no-sync", action="store_true", help="skip the two-rank SyncBatchNorm measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--only", default=None, help="run only layers whose name contains this text (SyncBatchNorm: 'Sync')")
    ap.add_argument("--channels-last", action="store_true", help="4-D inputs in channels_last memory format")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time (default) or this process's CPU time for the one-process rows (robust to a loaded machine; "
                         "SyncBatchNorm rows always use wall time, since waiting for the other rank is part of their cost)")
    ap.add_argument("--shape", action="append", default=None, help="run this shape only, e.g. 1024,512 (repeatable)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shape:
        shapes = [tuple(int(v) for v in text.split(",")) for text in args.shape]
    repeats = args.repeats or (5 if args.quick else 9)
    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    layout = ", channels_last images" if args.channels_last else ""
    clock_note = ", CPU time of this process (SyncBatchNorm rows: wall time)" if args.clock == "cpu" else ", wall time"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores (load average {load:.1f}), medians of {repeats} interleaved repeats (forward + backward){layout}{clock_note}")
    print()
    print("| shape | layer | batchlab ms | torch ms | ratio of medians | ratio of minimums | target |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape in shapes:
        x = _layout(torch.randn(shape), args.channels_last).requires_grad_()
        g = _layout(torch.randn(shape), args.channels_last)
        for name, ours, ref, target in cases(shape):
            if args.only and args.only not in name:
                continue
            clock = time.process_time if args.clock == "cpu" else time.perf_counter
            t_o, t_r, r_min = time_pair(_step(ours, x, g), _step(ref, x, g), repeats, clock=clock)
            flag = "" if t_o / t_r <= target else " (over)"
            flag_min = "" if r_min <= target else " (over)"
            print(f"| {tuple(shape)} | {name} | {t_o * 1e3:.2f} | {t_r * 1e3:.2f} | {t_o / t_r:.2f}{flag} | {r_min:.2f}{flag_min} | {target} |", flush=True)
    if not args.no_sync and (not args.only or args.only in "SyncBatchNorm"):
        for shape in shapes:
            t_s, t_b, r_min, floor = sync_overhead(shape, repeats, args.channels_last)
            target = 3.0 if len(shape) == 2 else 2.0
            flag = "" if t_s / t_b <= target else " (over)"
            flag_min = "" if r_min <= target else " (over)"
            print(f"| {tuple(shape)} | SyncBatchNorm, 2 gloo ranks (1 thread each, N/2 per rank) vs BN on N/2 (the two all-reduces alone: {floor:.2f}) | {t_s * 1e3:.2f} | {t_b * 1e3:.2f} | {t_s / t_b:.2f}{flag} | {r_min:.2f}{flag_min} | {target} |", flush=True)
            t_c, t_cb, r_cmin = sync_compute(shape, repeats, args.channels_last)
            print(f"| {tuple(shape)} | SyncBatchNorm's compute alone (one process, one-rank group, CPU time) vs BN on N/2 | {t_c * 1e3:.2f} | {t_cb * 1e3:.2f} | {t_c / t_cb:.2f} | {r_cmin:.2f} | reported |", flush=True)


if __name__ == "__main__":
    main()
