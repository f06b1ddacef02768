"""Property-based tests (hypothesis) over shapes and values."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchlab.norm as N
from batchlab.norm import functional as BF
from batchlab.norm import reference as R

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])




@st.composite
def batches(draw: Any, min_n: int = 2, max_spatial: int = 2) -> np.ndarray:
    n = draw(st.integers(min_n, 6))
    c = draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(1, 4), min_size=0, max_size=max_spatial))
    shape = (n, c, *spatial)
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-2, 1.0, 1e3]))
    offset = draw(st.sampled_from([0.0, -5.0, 1e4]))
    x = np.random.default_rng(seed).normal(size=shape) * scale + offset
    return x


def _err(a: torch.Tensor, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.detach().double().numpy() - b)) / max(1.0, float(np.max(np.abs(b)))))


@SETTINGS
@given(x=batches(), momentum=st.floats(0.0, 1.0), eps=st.sampled_from([1e-5, 1e-3, 0.1]))
def test_batchnorm_matches_reference_and_torch(x: np.ndarray, momentum: float, eps: float) -> None:
    c = x.shape[1]
    rng = np.random.default_rng(0)
    gamma, beta, dout = rng.uniform(0.5, 1.5, c), rng.normal(size=c), rng.normal(size=x.shape)
    p: dict[str, Any] = {"mode": "train", "momentum": momentum, "eps": eps}
    out, cache = R.batchnorm_forward(x, gamma, beta, p)
    dx, dg, db = R.batchnorm_backward(dout, cache)
    xt = torch.tensor(x, requires_grad=True)
    layer = {2: N.BatchNorm1d, 3: N.BatchNorm1d, 4: N.BatchNorm2d, 5: N.BatchNorm3d}[x.ndim](c, eps=eps, momentum=momentum).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
    if x.size // c == 1:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            layer(xt)
        return
    y = layer(xt)
    y.backward(torch.from_numpy(dout))
    for what, a, b in (("out", y, out), ("dx", xt.grad, dx), ("dgamma", layer.weight.grad, dg), ("dbeta", layer.bias.grad, db)):
        e = _err(a, b)
        assert e < 1e-8, f"{what}: scaled max diff {e:.2e}, shape {x.shape}"
    assert _err(layer.running_mean, p["running_mean"]) < 1e-10
    assert _err(layer.running_var, p["running_var"]) < 1e-8
    assert torch.isfinite(y).all()


@SETTINGS
@given(x=batches(max_spatial=2), data=st.data())
def test_group_and_instance_norm_match_reference(x: np.ndarray, data: Any) -> None:
    n, c = x.shape[:2]
    divisors = [g for g in range(1, c + 1) if c % g == 0]
    g = data.draw(st.sampled_from(divisors))
    rng = np.random.default_rng(1)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    out, _ = R.groupnorm_forward(x, gamma, beta, {"num_groups": g})
    y = N.GroupNorm(c, g).double()
    with torch.no_grad():
        y.weight.copy_(torch.from_numpy(gamma))
        y.bias.copy_(torch.from_numpy(beta))
    assert _err(y(torch.from_numpy(x)), out) < 1e-8
    if x.ndim > 2 and np.prod(x.shape[2:]) > 1:
        out_i, _ = R.instancenorm_forward(x, gamma, beta, {})
        yi = BF.instance_norm(torch.from_numpy(x), None, None, torch.from_numpy(gamma), torch.from_numpy(beta))
        assert _err(yi, out_i) < 1e-8


@SETTINGS
@given(groups=st.integers(1, 4), vbs=st.integers(2, 5), c=st.integers(1, 3), spatial=st.lists(st.integers(1, 3), max_size=2), seed=st.integers(0, 10**6), momentum=st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_ghost_vectorized_equals_native(groups: int, vbs: int, c: int, spatial: list[int], seed: int, momentum: float | None) -> None:
    shape = (groups * vbs, c, *spatial)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    cls = {2: N.GhostBatchNorm1d, 3: N.GhostBatchNorm1d, 4: N.GhostBatchNorm2d}[len(shape)]
    a = cls(c, virtual_batch_size=vbs, momentum=momentum).double()
    b = cls(c, virtual_batch_size=vbs, momentum=momentum, impl="vectorized").double()
    for _ in range(2):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a(xa), b(xb)
        ya.backward(gy)
        yb.backward(gy)
        assert (ya - yb).abs().max() < 1e-10
        assert (xa.grad - xb.grad).abs().max() < 1e-9
        x = x * 0.5 + 2
    assert (a.weight.grad - b.weight.grad).abs().max() < 1e-9
    assert (a.running_mean - b.running_mean).abs().max() < 1e-10
    assert (a.running_var - b.running_var).abs().max() < 1e-9
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 2 * groups


@SETTINGS
@given(x=batches(min_n=3), rmax=st.floats(1.0, 4.0), dmax=st.floats(0.0, 3.0))
def test_batch_renorm_matches_reference(x: np.ndarray, rmax: float, dmax: float) -> None:
    c = x.shape[1]
    if x.size // c == 1:
        return
    rng = np.random.default_rng(2)
    rm, rv = rng.normal(size=c), rng.uniform(0.1, 3.0, size=c)
    gamma, beta, dout = rng.uniform(0.5, 1.5, c), rng.normal(size=c), rng.normal(size=x.shape)
    p = {"mode": "train", "running_mean": rm.copy(), "running_var": rv.copy(), "rmax": rmax, "dmax": dmax}
    out, cache = R.batchrenorm_forward(x, gamma, beta, p)
    dx, dg, db = R.batchrenorm_backward(dout, cache)
    assert np.all(cache["r"] <= rmax + 1e-12) and np.all(np.abs(cache["d"]) <= dmax + 1e-12)
    xt, gt, bt = (torch.tensor(v, requires_grad=True) for v in (x, gamma, beta))
    rmt, rvt = torch.tensor(rm), torch.tensor(rv)
    y = BF.batch_renorm(xt, rmt, rvt, gt, bt, True, 0.1, 1e-5, rmax, dmax)
    y.backward(torch.from_numpy(dout))
    for what, a, b in (("out", y, out), ("dx", xt.grad, dx), ("dgamma", gt.grad, dg), ("dbeta", bt.grad, db)):
        e = _err(a, b)
        assert e < 1e-8, f"{what}: scaled max diff {e:.2e}"
    assert _err(rvt, p["running_var"]) < 1e-8


@SETTINGS
@given(x=batches(min_n=3, max_spatial=1), a=st.floats(0.1, 10.0), b=st.floats(-100.0, 100.0))
def test_batchnorm_train_output_invariant_to_affine_input_change(x: np.ndarray, a: float, b: float) -> None:
    xt = torch.from_numpy(x)
    if xt.var(dim=BF.reduce_dims(xt)).min() < 1e-2:
        return  # eps is not negligible for tiny variances
    y1 = BF.batch_norm(xt, training=True, eps=1e-12)
    y2 = BF.batch_norm(xt * a + b, training=True, eps=1e-12)
    assert (y1 - y2).abs().max().item() < 1e-6


@SETTINGS
@given(sizes=st.lists(st.integers(2, 64), min_size=1, max_size=5), seed=st.integers(0, 1000))
def test_precise_bn_invariant_to_batch_split(sizes: list[int], seed: int) -> None:
    data = torch.randn(96, 3, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 + 5
    ref = N.BatchNorm1d(3).double()
    N.precise_bn(ref, [data], num_batches=1)
    splits, start = [], 0
    for s in sizes * 50:
        if start >= 96:
            break
        splits.append(data[start : start + s])
        start += s
    m = N.BatchNorm1d(3).double()
    N.precise_bn(m, splits, num_batches=len(splits))
    assert (m.running_mean - ref.running_mean).abs().max() < 1e-12
    assert (m.running_var - ref.running_var).abs().max() < 1e-11
