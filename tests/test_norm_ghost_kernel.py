"""The fused C kernel behind Ghost BN on (N, C) inputs: exactness against a loop of torch's
BatchNorm over the virtual batches, hard inputs, and the fallback when it cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import batchlab.norm as N
from batchlab.norm import _kernels as kernels
from batchlab.norm.ghost import ghost_batch_norm

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"Ghost BN kernel unavailable: {kernels.unavailable_reason()}")


def _loop_reference(x: torch.Tensor, vbs: int, weight, bias, momentum, steps_before: int = 0, running=(0.0, 1.0)):
    """torch's BatchNorm1d applied to each virtual batch in order (the definition)."""
    ref = nn.BatchNorm1d(x.shape[1], momentum=momentum, affine=weight is not None).to(x.dtype)
    with torch.no_grad():
        if weight is not None:
            ref.weight.copy_(weight)
            ref.bias.copy_(bias)
        ref.running_mean.fill_(running[0])
        ref.running_var.fill_(running[1])
    ref.num_batches_tracked.fill_(steps_before)
    xr = x.detach().clone().requires_grad_()
    y = torch.cat([ref(c) for c in xr.split(vbs)])
    return ref, xr, y


@needs_kernel
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("n,c,vbs", [(256, 512, 32), (100, 7, 8), (35, 5, 16), (64, 3, 64), (512, 16, 200)])
@pytest.mark.parametrize("affine", [True, False])
def test_fused_equals_loop_of_torch_batchnorm(dtype: torch.dtype, atol: float, n: int, c: int, vbs: int, affine: bool) -> None:
    torch.manual_seed(n + c)
    x = (torch.randn(n, c, dtype=dtype) * 3 + 2).requires_grad_()
    w = torch.rand(c, dtype=dtype) + 0.5 if affine else None
    b = torch.randn(c, dtype=dtype) if affine else None
    wf = w.clone().requires_grad_() if affine else None
    bf = b.clone().requires_grad_() if affine else None
    rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    y = ghost_batch_norm(x, rm, rv, wf, bf, True, 0.1, 1e-5, vbs, impl="fused")
    ref, xr, yr = _loop_reference(x, vbs, w, b, 0.1)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(y, yr, atol=atol, rtol=atol)
    torch.testing.assert_close(x.grad, xr.grad, atol=10 * atol, rtol=10 * atol)
    if affine:
        torch.testing.assert_close(wf.grad, ref.weight.grad, atol=100 * atol, rtol=10 * atol)
        torch.testing.assert_close(bf.grad, ref.bias.grad, atol=100 * atol, rtol=10 * atol)
    torch.testing.assert_close(rm, ref.running_mean, atol=atol, rtol=atol)
    torch.testing.assert_close(rv, ref.running_var, atol=atol, rtol=atol)


@needs_kernel
def test_fused_cumulative_average_continues_the_count() -> None:
    """momentum=None: the running average weights every virtual batch so far equally, also
    across calls (num_batches_tracked counts virtual batches)."""
    torch.manual_seed(0)
    layer = N.GhostBatchNorm1d(6, virtual_batch_size=4, momentum=None, impl="fused").double()
    ref = nn.BatchNorm1d(6, momentum=None).double()
    for step in range(3):
        x = torch.randn(10, 6, dtype=torch.float64) + step
        layer(x)
        for chunk in x.split(4):
            ref(chunk)
    assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == 9
    torch.testing.assert_close(layer.running_mean, ref.running_mean, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(layer.running_var, ref.running_var, atol=1e-12, rtol=1e-12)


@needs_kernel
def test_fused_hard_inputs_are_finite_and_more_accurate_than_torch_float32() -> None:
    """A 1e6 offset in float32 and constant channels: finite outputs, constant channels exactly 0,
    and closer to the float64 result on the same (rounded) inputs than torch's float32 kernel."""
    torch.manual_seed(1)
    x = torch.randn(64, 8) + 1e6
    x[:, 3] = 5.0  # zero variance
    y = ghost_batch_norm(x, None, None, None, None, True, 0.1, 1e-5, 16, impl="fused")
    exact = torch.cat([nn.functional.batch_norm(c, None, None, None, None, True, 0.1, 1e-5) for c in x.double().split(16)])
    torch32 = torch.cat([nn.functional.batch_norm(c, None, None, None, None, True, 0.1, 1e-5) for c in x.split(16)])
    assert torch.isfinite(y).all()
    assert y[:, 3].abs().max() == 0
    err, err_torch = (y.double() - exact).abs().max().item(), (torch32.double() - exact).abs().max().item()
    assert err < 1e-5, err
    assert err < err_torch, (err, err_torch)


@needs_kernel
def test_auto_picks_fused_for_2d_float_and_native_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = kernels.ghost_forward
    monkeypatch.setattr(kernels, "ghost_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = N.GhostBatchNorm1d(4, virtual_batch_size=8)
    layer(torch.randn(32, 4))
    assert calls == [1]
    layer(torch.randn(32, 4, 3))  # 3-D: torch's kernel per virtual batch
    layer.float()(torch.randn(4, 32).t())  # non-contiguous
    assert calls == [1]


def test_fused_refuses_inputs_it_cannot_handle() -> None:
    with pytest.raises(ValueError, match=r"impl='fused' needs a contiguous 2-D float32/float64 CPU input, got shape \(8, 4, 3\)"):
        ghost_batch_norm(torch.randn(8, 4, 3), training=True, virtual_batch_size=4, impl="fused")
    with pytest.raises(ValueError, match=r"got shape \(8, 4\), torch.float32 on cpu \(non-contiguous\)"):
        ghost_batch_norm(torch.randn(4, 8).t(), training=True, virtual_batch_size=4, impl="fused")
    with pytest.raises(ValueError, match=r"got shape \(8, 4\), torch.bfloat16"):
        ghost_batch_norm(torch.randn(8, 4).bfloat16(), training=True, virtual_batch_size=4, impl="fused")


@needs_kernel
def test_fused_refuses_running_buffers_of_another_dtype() -> None:
    with pytest.raises(ValueError, match="running buffers"):
        ghost_batch_norm(torch.randn(8, 4), torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                            training=True, virtual_batch_size=4, impl="fused")


_FALLBACK = """
import torch, batchlab.norm as N
from batchlab.norm import _kernels as K
from batchlab.norm.ghost import ghost_batch_norm
assert not K.available(), K.unavailable_reason()
print(K.unavailable_reason())
torch.manual_seed(0)
x = torch.randn(64, 5)
a = N.GhostBatchNorm1d(5, virtual_batch_size=8)(x)
b = N.GhostBatchNorm1d(5, virtual_batch_size=8, impl="native")(x)
assert torch.equal(a, b)
try:
    ghost_batch_norm(x, training=True, virtual_batch_size=8, impl="fused")
except RuntimeError as e:
    print(e)
"""


@pytest.mark.parametrize("env,reason", [
    ({"BATCHLAB_NO_KERNELS": "1"}, "disabled by BATCHLAB_NO_KERNELS"),
    ({"CC": "/nonexistent/cc", "PATH": "/nonexistent"}, "no C compiler found"),
])
def test_without_the_kernel_auto_uses_torch_kernels_and_fused_says_why(env: dict[str, str], reason: str, tmp_path) -> None:
    full_env = {**os.environ, "BATCHLAB_KERNEL_CACHE": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-c", _FALLBACK], env=full_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(reason)
    assert lines[1] == f"impl='fused': the Ghost BN kernel is unavailable ({lines[0]})"


@needs_kernel
def test_a_failing_compiler_is_reported_not_raised(tmp_path) -> None:
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fatal: no space left' >&2\nexit 3\n")
    fake.chmod(0o755)
    env = {**os.environ, "BATCHLAB_KERNEL_CACHE": str(tmp_path / "cache"), "CC": str(fake)}
    code = "from batchlab.norm import _kernels as K; print(K.available(), K.unavailable_reason())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False building the kernel failed:") and "no space left" in out.stdout
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-written left behind


@needs_kernel
def test_kernel_is_cached_per_source(tmp_path) -> None:
    env = {**os.environ, "BATCHLAB_KERNEL_CACHE": str(tmp_path)}
    code = "from batchlab.norm import _kernels as K; assert K.available(), K.unavailable_reason()"
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    built = list(tmp_path.glob("ghost_bn-*.so"))
    assert len(built) == 1


@needs_kernel
@pytest.mark.parametrize("threads", [2, 3])
def test_fused_multithreaded_equals_loop_of_torch_batchnorm(threads: int) -> None:
    """Large inputs split the virtual batches over torch's thread count; the result is still
    the loop of torch BatchNorms (float64, uneven last virtual batch, momentum and None)."""
    n, c, vbs = 1000, 280, 24  # 280000 elements: over kernels.PARALLEL_MIN_ELEMENTS
    assert n * c >= kernels.PARALLEL_MIN_ELEMENTS
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert kernels._threads(n * c, -(-n // vbs)) == threads
        for momentum in (0.1, None):
            torch.manual_seed(threads)
            x = (torch.randn(n, c, dtype=torch.float64) * 2 - 1).requires_grad_()
            w, b = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
            wf, bf = w.clone().requires_grad_(), b.clone().requires_grad_()
            rm, rv = torch.full((c,), 0.3, dtype=torch.float64), torch.full((c,), 2.0, dtype=torch.float64)
            y = ghost_batch_norm(x, rm, rv, wf, bf, True, momentum, 1e-5, vbs, torch.tensor(5), impl="fused")
            ref, xr, yr = _loop_reference(x, vbs, w, b, momentum, steps_before=5, running=(0.3, 2.0))
            g = torch.randn_like(y)
            y.backward(g)
            yr.backward(g)
            torch.testing.assert_close(y, yr, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(x.grad, xr.grad, atol=1e-9, rtol=1e-9)
            torch.testing.assert_close(wf.grad, ref.weight.grad, atol=1e-8, rtol=1e-9)
            torch.testing.assert_close(bf.grad, ref.bias.grad, atol=1e-8, rtol=1e-9)
            torch.testing.assert_close(rm, ref.running_mean, atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(rv, ref.running_var, atol=1e-12, rtol=1e-10)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_a_compiler_rejecting_the_fast_flags_still_gets_a_working_kernel(tmp_path) -> None:
    """Flags are tried from fastest to plainest: a compiler without OpenMP or x86 tuning flags
    still builds a (serial) kernel, with the same results."""
    fake = tmp_path / "cc"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in -fopenmp|-mprefer-vector-width=*) '
                    'echo "unrecognized option $a" >&2; exit 1;; esac; done\nexec gcc "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "BATCHLAB_KERNEL_CACHE": str(tmp_path / "cache"), "CC": str(fake)}
    code = (
        "import torch\nfrom batchlab.norm import _kernels as K\nfrom batchlab.norm.ghost import ghost_batch_norm\n"
        "assert K.available(), K.unavailable_reason()\n"
        "torch.manual_seed(0); x = torch.randn(96, 7, dtype=torch.float64)\n"
        "a = ghost_batch_norm(x, training=True, virtual_batch_size=16, impl='fused')\n"
        "b = ghost_batch_norm(x, training=True, virtual_batch_size=16, impl='native')\n"
        "assert (a - b).abs().max() < 1e-12\nprint('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert len(list((tmp_path / "cache").glob("ghost_bn-*.so"))) == 1


@pytest.mark.parametrize("impl", ["auto", "native", "vectorized"])
def test_empty_batch_gives_an_empty_output_and_leaves_the_statistics(impl: str) -> None:
    layer = N.GhostBatchNorm1d(4, virtual_batch_size=8, impl=impl)
    x = torch.randn(0, 4, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert torch.equal(layer.running_mean, torch.zeros(4)) and torch.equal(layer.running_var, torch.ones(4))
    assert int(layer.num_batches_tracked) == 0  # no virtual batch was seen
