"""SyncBatchNorm with two gloo processes on CPU equals one BatchNorm over the concatenated batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import batchlab.norm as N

# (name, full batch shape, rank-0 size, momentum, affine)
CASES = [
    ("equal_2d", (8, 3, 4, 4), 4, 0.1, True),
    ("unequal_2d", (8, 3, 4, 4), 3, 0.1, True),
    ("unequal_1d_cumulative", (7, 5), 1, None, True),
    ("empty_rank", (6, 2, 3), 0, 0.3, False),
]
STEPS = 2


def _data(shape: tuple[int, ...], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + len(shape))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * (step + 1) + 3
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, gy


def _init_layer(layer: nn.Module) -> None:
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, layer.num_features, dtype=torch.float64))
            layer.bias.copy_(torch.linspace(-1, 1, layer.num_features, dtype=torch.float64))


def _worker(rank: int, world: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for (name, shape, n0, momentum, affine), compiled in [(c, False) for c in CASES] + [(c, True) for c in CASES]:
            layer = N.SyncBatchNorm(shape[1], momentum=momentum, affine=affine).double()
            _init_layer(layer)
            # the synchronized path under torch.compile(fullgraph=True): a graph break raises
            run = torch.compile(layer, fullgraph=True, backend="aot_eager") if compiled else layer
            if compiled:
                name = f"{name}_compiled"
            results = {}
            for step in range(STEPS):
                x, gy = _data(shape, step)
                lo, hi = (0, n0) if rank == 0 else (n0, shape[0])
                xl = x[lo:hi].clone().requires_grad_()
                y = run(xl)
                y.backward(gy[lo:hi])
                results[f"y{step}"] = y.detach()
                results[f"dx{step}"] = xl.grad
            if affine:
                results["dw"] = layer.weight.grad.clone()
                results["db"] = layer.bias.grad.clone()
            results["running_mean"] = layer.running_mean.clone()
            results["running_var"] = layer.running_var.clone()
            results["num_batches_tracked"] = layer.num_batches_tracked.clone()
            layer.eval()
            x, _ = _data(shape, 7)
            results["eval"] = layer(x[:2])
            torch.save(results, os.path.join(out_dir, f"{name}_r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sync_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syncbn")
    init = f"file://{out / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(out)), nprocs=2, join=True)
    return out


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-10) -> None:
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    assert a.shape == b.shape and diff <= tol * max(1.0, b.abs().max().item() if b.numel() else 1.0), f"{what}: max abs diff {diff:.3e} (shapes {tuple(a.shape)} vs {tuple(b.shape)})"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sync_bn_two_gloo_ranks_equal_one_bn_over_concatenated_batch(sync_results: Path, case: tuple, compiled: bool) -> None:
    name, shape, n0, momentum, affine = case
    suffix = "_compiled" if compiled else ""
    r0 = torch.load(sync_results / f"{name}{suffix}_r0.pt")
    r1 = torch.load(sync_results / f"{name}{suffix}_r1.pt")
    ref = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1], momentum=momentum, affine=affine).double()
    _init_layer(ref)
    for step in range(STEPS):
        x, gy = _data(shape, step)
        x.requires_grad_()
        y = ref(x)
        y.backward(gy)
        _close(torch.cat([r0[f"y{step}"], r1[f"y{step}"]]), y.detach(), f"{name} step {step} output")
        _close(torch.cat([r0[f"dx{step}"], r1[f"dx{step}"]]), x.grad, f"{name} step {step} input grad")
    if affine:
        # each rank holds its share; data-parallel training sums them
        _close(r0["dw"] + r1["dw"], ref.weight.grad, f"{name} weight grad")
        _close(r0["db"] + r1["db"], ref.bias.grad, f"{name} bias grad")
    for r in (r0, r1):
        _close(r["running_mean"], ref.running_mean, f"{name} running_mean")
        _close(r["running_var"], ref.running_var, f"{name} running_var")
        assert int(r["num_batches_tracked"]) == int(ref.num_batches_tracked)
    ref.eval()
    x, _ = _data(shape, 7)
    _close(r0["eval"], ref(x[:2]), f"{name} eval output")


def test_sync_bn_without_distributed_is_plain_batchnorm() -> None:
    assert not dist.is_initialized()
    torch.manual_seed(0)
    sbn, bn = N.SyncBatchNorm(3), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    for _ in range(2):
        _close(sbn(x), bn(x), "fallback output", 1e-6)
    _close(sbn.running_var, bn.running_var, "fallback running_var", 1e-6)
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        sbn(torch.randn(3))


def test_convert_sync_batchnorm_keeps_state() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Sequential(N.BatchNorm2d(3, momentum=None, eps=1e-3)))
    model(torch.randn(4, 2, 3, 3))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    conv = N.convert_sync_batchnorm(model)
    assert isinstance(conv[1], N.SyncBatchNorm) and isinstance(conv[3][0], N.SyncBatchNorm)
    assert conv[3][0].momentum is None and conv[3][0].eps == 1e-3
    assert not conv[1].training
    for k, v in conv.state_dict().items():
        assert torch.equal(v, sd[k]), k


def _bf16_worker(rank: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        results = {}
        for shape in ((4, 4, 3, 3), (6, 5)):
            x, gy = _data(shape, 0)
            layer = N.SyncBatchNorm(shape[1])
            xl = x.chunk(2)[rank].bfloat16().requires_grad_()
            y = layer(xl)
            y.backward(gy.chunk(2)[rank].bfloat16())
            results[str(len(shape))] = (y.detach(), xl.grad, layer.running_mean.clone())
        torch.save(results, os.path.join(out_dir, f"bf16_r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_bn_takes_bfloat16_input_on_two_ranks_as_torchs_batch_norm_does(tmp_path: Path) -> None:
    # the global statistics were cast to bf16 next to fp32 parameters: "mixed dtype (CPU)" on 2+ ranks
    mp.spawn(_bf16_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"bf16_r{r}.pt") for r in (0, 1)]
    for shape in ((4, 4, 3, 3), (6, 5)):
        x, gy = _data(shape, 0)
        ref = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1])
        xr = x.bfloat16().float().requires_grad_()
        yr = ref(xr)
        yr.backward(gy.bfloat16().float())
        y = torch.cat([p[str(len(shape))][0] for p in parts])
        dx = torch.cat([p[str(len(shape))][1] for p in parts])
        assert y.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16  # as torch's BN returns for bf16 input
        scale = max(1.0, yr.abs().max().item())
        assert (y.float() - yr).abs().max().item() <= 2e-2 * scale  # bf16 rounding of the output
        assert (dx.float() - xr.grad).abs().max().item() <= 5e-2 * max(1.0, xr.grad.abs().max().item())
        for p in parts:
            assert torch.allclose(p[str(len(shape))][2], ref.running_mean, atol=1e-3)
