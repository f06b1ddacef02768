"""The NumPy reference: hand-derived backward vs central differences (float64, rel. error < 1e-7),
and reference vs batchlab's torch functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from batchlab.norm import functional as BF
from batchlab.norm import reference as R
from batchlab.norm.ghost import ghost_batch_norm




def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """cs231n's relative error: max |a - b| / max(1e-8, |a| + |b|)."""
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def num_grad(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, dout: np.ndarray, h: float = 1e-3) -> np.ndarray:
    """Fourth-order central differences of sum(f(x) * dout) with respect to x (x is restored).

    The 5-point stencil has O(h^4) truncation error, so h = 1e-3 keeps both truncation and
    rounding error near 1e-12: the 1e-7 relative bound then holds element-wise even for
    gradient entries close to zero (batch norm's dx sums to zero per channel).
    """
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    while not it.finished:
        i = it.multi_index
        old = x[i]
        vals = []
        for step in (2, 1, -1, -2):
            x[i] = old + step * h
            vals.append((f(x) * dout).sum())
        x[i] = old
        grad[i] = (-vals[0] + 8 * vals[1] - 8 * vals[2] + vals[3]) / (12 * h)
        it.iternext()
    return grad


def _params(kind: str, x: np.ndarray, mode: str = "train") -> dict[str, Any]:
    c = x.shape[1]
    rng = np.random.default_rng(5)
    p: dict[str, Any] = {"mode": mode, "eps": 1e-5, "momentum": 0.1}
    if kind in ("renorm", "bn_test", "ghost"):
        p["running_mean"] = rng.normal(size=c) * 0.3
        p["running_var"] = rng.uniform(0.5, 2.0, size=c)
    if kind == "renorm":
        p.update(rmax=1.5, dmax=0.4)
    if kind == "ghost":
        p["virtual_batch_size"] = 3
    if kind == "group":
        p["num_groups"] = 2
    return p


CASES: dict[str, tuple[Callable[..., Any], Callable[..., Any], tuple[int, ...], str]] = {
    "batch": (R.batchnorm_forward, R.batchnorm_backward, (5, 3, 2, 2), "train"),
    "batch_1d": (R.batchnorm_forward, R.batchnorm_backward, (6, 4), "train"),
    "bn_test": (R.batchnorm_forward, R.batchnorm_backward, (4, 3, 2), "test"),
    "renorm": (R.batchrenorm_forward, R.batchrenorm_backward, (6, 3, 2), "train"),
    "ghost": (R.ghostbn_forward, R.ghostbn_backward, (8, 3, 2), "train"),  # last virtual batch smaller
    "group": (R.groupnorm_forward, R.groupnorm_backward, (3, 4, 2, 2), "train"),
    "layer": (R.layernorm_forward, R.layernorm_backward, (3, 4, 5), "train"),
    "instance": (R.instancenorm_forward, R.instancenorm_backward, (3, 2, 3, 2), "train"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_backward_matches_central_differences(name: str) -> None:
    fwd, bwd, shape, mode = CASES[name]
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape) * 2 + 1
    if name == "layer":
        gamma, beta = rng.normal(size=shape[1:]), rng.normal(size=shape[1:])
    else:
        gamma, beta = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    dout = rng.normal(size=shape)
    kind = "batch" if name == "batch_1d" else name

    _, cache = fwd(x, gamma, beta, _params(kind, x, mode))
    fixed = {k: cache[k] for k in ("r", "d")} if kind == "renorm" else {}  # stop-gradient constants

    def run(x_: np.ndarray, g_: np.ndarray, b_: np.ndarray) -> np.ndarray:
        # fresh params each call: the forward updates the running buffers in place
        return fwd(x_, g_, b_, {**_params(kind, x, mode), **fixed})[0]

    dx, dgamma, dbeta = bwd(dout, cache)
    dx_num = num_grad(lambda v: run(v, gamma, beta), x, dout)
    dg_num = num_grad(lambda v: run(x, v, beta), gamma, dout)
    db_num = num_grad(lambda v: run(x, gamma, v), beta, dout)
    for what, a, b in (("dx", dx, dx_num), ("dgamma", dgamma, dg_num), ("dbeta", dbeta, db_num)):
        err = rel_error(a, b)
        assert err < 1e-7, f"{name} {what}: relative error {err:.2e} >= 1e-7 (max abs diff {np.max(np.abs(a - b)):.2e})"


def _torch_case(name: str, x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    if name in ("batch", "batch_1d"):
        rm, rv = torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype)
        return BF.batch_norm(x, rm, rv, g, b, True, p["momentum"], p["eps"])
    if name == "bn_test":
        return BF.batch_norm(x, torch.tensor(p["running_mean"], dtype=x.dtype), torch.tensor(p["running_var"], dtype=x.dtype), g, b, False, 0.1, p["eps"])
    if name == "renorm":
        return BF.batch_renorm(x, torch.tensor(p["running_mean"], dtype=x.dtype).clone(), torch.tensor(p["running_var"], dtype=x.dtype).clone(), g, b, True, 0.1, p["eps"], p["rmax"], p["dmax"])
    if name == "ghost":
        return ghost_batch_norm(x, torch.tensor(p["running_mean"], dtype=x.dtype).clone(), torch.tensor(p["running_var"], dtype=x.dtype).clone(), g, b, True, 0.1, p["eps"], p["virtual_batch_size"])
    if name == "group":
        return BF.group_norm(x, p["num_groups"], g, b, p["eps"])
    if name == "layer":
        return BF.layer_norm(x, tuple(g.shape), g, b, p["eps"])
    if name == "instance":
        return BF.instance_norm(x, None, None, g, b, True, 0.1, p["eps"])
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_torch_functions_match_reference(name: str, dtype: torch.dtype, tol: float) -> None:
    fwd, bwd, shape, mode = CASES[name]
    shape = (shape[0] * 2, *shape[1:]) if name != "layer" else shape
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape) * 3 - 2
    pshape = shape[1:] if name == "layer" else (shape[1],)
    gamma, beta = rng.uniform(0.5, 1.5, size=pshape), rng.normal(size=pshape)
    dout = rng.normal(size=shape)
    kind = "batch" if name == "batch_1d" else name
    p_ref, p_t = _params(kind, x, mode), _params(kind, x, mode)
    out, cache = fwd(x, gamma, beta, p_ref)
    dx, dgamma, dbeta = bwd(dout, cache)
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    gt = torch.tensor(gamma, dtype=dtype, requires_grad=True)
    bt = torch.tensor(beta, dtype=dtype, requires_grad=True)
    yt = _torch_case(name, xt, gt, bt, p_t)
    yt.backward(torch.tensor(dout, dtype=dtype))
    for what, a, b in (("out", yt, out), ("dx", xt.grad, dx), ("dgamma", gt.grad, dgamma), ("dbeta", bt.grad, dbeta)):
        diff = np.max(np.abs(a.detach().double().numpy() - b))
        scale = max(1.0, float(np.max(np.abs(b))))
        assert diff <= tol * scale, f"{name} {dtype} {what}: max abs diff {diff:.2e} > {tol * scale:.2e}"


def test_reference_running_stats_match_torch_batchnorm() -> None:
    rng = np.random.default_rng(2)
    p: dict[str, Any] = {"mode": "train", "momentum": 0.2, "eps": 1e-5}
    bn = torch.nn.BatchNorm2d(3, momentum=0.2).double()
    for _ in range(3):
        x = rng.normal(size=(4, 3, 2, 2)) * 2 + 1
        R.batchnorm_forward(x, np.ones(3), np.zeros(3), p)
        bn(torch.from_numpy(x))
    assert np.max(np.abs(p["running_mean"] - bn.running_mean.numpy())) < 1e-12
    assert np.max(np.abs(p["running_var"] - bn.running_var.numpy())) < 1e-12, "reference running_var must be the unbiased average"
