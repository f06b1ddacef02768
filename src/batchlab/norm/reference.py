"""NumPy reference implementations with hand-derived backward passes (cs231n style).

Each normalization is written once more, independently of torch, as
``*_forward(x, gamma, beta, params) -> (out, cache)`` and ``*_backward(dout, cache) ->
(dx, dgamma, dbeta)``. The tests check every backward against central differences in float64
and every forward/backward against :mod:`batchlab.norm.functional`.

All of them reduce to one primitive, normalization over a set of axes:

    xhat = (x - mu) / sqrt(var + eps),   mu, var = mean and biased variance over the axes (m values)

whose gradient, derived by hand (Ioffe & Szegedy 2015, Sec. 3; Kratzert's computational-graph
derivation), is

    dx = (1 / m) * invstd * (m * dxhat - sum(dxhat) - xhat * sum(dxhat * xhat))

with the sums over the same axes. Batch norm reduces over (N, spatial), layer norm over the
trailing dims, group norm over (channels of a group, spatial), instance norm over spatial.
Batch Renorm multiplies xhat by a constant ``r`` and adds a constant ``d`` (stop-gradient), so
``dxhat = dout * gamma * r``. Ghost BN applies batch norm to each virtual batch.

``params`` dicts follow cs231n: ``mode`` ("train"/"test"), ``eps``, ``momentum``, and the
running buffers ``running_mean``/``running_var``, which the forward updates in place (unbiased
variance in the running average, as torch does).
"""

from __future__ import annotations

from typing import Any

import numpy as np

Cache = dict[str, Any]

__all__ = [
    "batchnorm_forward",
    "batchnorm_backward",
    "batchrenorm_forward",
    "batchrenorm_backward",
    "ghostbn_forward",
    "ghostbn_backward",
    "groupnorm_forward",
    "groupnorm_backward",
    "layernorm_forward",
    "layernorm_backward",
    "instancenorm_forward",
    "instancenorm_backward",
]


def _normalize(x: np.ndarray, axes: tuple[int, ...], eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    mu = x.mean(axis=axes, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(var + eps)
    return xc * invstd, mu, var, invstd


def _normalize_backward(dxhat: np.ndarray, xhat: np.ndarray, invstd: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    m = np.prod([xhat.shape[a] for a in axes])
    s1 = dxhat.sum(axis=axes, keepdims=True)
    s2 = (dxhat * xhat).sum(axis=axes, keepdims=True)
    return invstd / m * (m * dxhat - s1 - xhat * s2)


def _channel_shape(x: np.ndarray) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _bn_axes(x: np.ndarray) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.ndim))


def _update_running(params: dict[str, Any], mu: np.ndarray, var: np.ndarray, m: int) -> None:
    momentum = params.get("momentum", 0.1)
    c = mu.size
    rm = params.setdefault("running_mean", np.zeros(c, dtype=mu.dtype))
    rv = params.setdefault("running_var", np.ones(c, dtype=mu.dtype))
    unbiased = var.reshape(-1) * m / max(m - 1, 1)
    rm *= 1 - momentum
    rm += momentum * mu.reshape(-1)
    rv *= 1 - momentum
    rv += momentum * unbiased


def batchnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, params: dict[str, Any]) -> tuple[np.ndarray, Cache]:
    """Batch norm forward over ``(N, C, *)`` (statistics over N and spatial dims).

    Args:
        x: input.
        gamma, beta: per-channel scale and shift ``(C,)``.
        params: ``mode`` ("train" or "test"), ``eps`` (1e-5), ``momentum`` (0.1),
            ``running_mean``/``running_var`` (created as zeros/ones when missing, updated in
            place in train mode).

    Returns:
        ``(out, cache)``.
    """
    eps = params.get("eps", 1e-5)
    cs = _channel_shape(x)
    if params.get("mode", "train") == "train":
        axes = _bn_axes(x)
        xhat, mu, var, invstd = _normalize(x, axes, eps)
        _update_running(params, mu, var, x.size // x.shape[1])
    else:
        axes = ()
        rm, rv = params["running_mean"], params["running_var"]
        invstd = 1.0 / np.sqrt(rv.reshape(cs) + eps)
        xhat = (x - rm.reshape(cs)) * invstd
    out = gamma.reshape(cs) * xhat + beta.reshape(cs)
    return out, {"xhat": xhat, "invstd": invstd, "gamma": gamma, "axes": axes, "r": 1.0}


def batchnorm_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch norm backward (also for test mode, where statistics are constants).

    Returns:
        ``(dx, dgamma, dbeta)``.
    """
    xhat, invstd, gamma, axes = cache["xhat"], cache["invstd"], cache["gamma"], cache["axes"]
    bn_axes = _bn_axes(dout)
    cs = _channel_shape(dout)
    r = cache["r"]
    dgamma = (dout * (xhat * r + cache.get("d", 0.0))).sum(axis=bn_axes)
    dbeta = dout.sum(axis=bn_axes)
    dxhat = dout * gamma.reshape(cs) * r
    if axes:
        dx = _normalize_backward(dxhat, xhat, invstd, axes)
    else:
        dx = dxhat * invstd
    return dx, dgamma, dbeta


def batchrenorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, params: dict[str, Any]) -> tuple[np.ndarray, Cache]:
    """Batch Renorm forward (Ioffe 2017): ``xhat * r + d`` with stop-gradient r and d.

    Args:
        x: input ``(N, C, *)``.
        gamma, beta: ``(C,)``.
        params: as :func:`batchnorm_forward` plus ``rmax`` (3.0) and ``dmax`` (5.0);
            ``running_mean``/``running_var`` are required in train mode (r and d use them).
            Optional ``r``/``d`` (arrays shaped like the per-channel statistics) fix the two
            factors: they are constants for the gradient (stop-gradient), so a numerical
            gradient check must hold them fixed too.

    Returns:
        ``(out, cache)``.
    """
    if params.get("mode", "train") != "train":
        return batchnorm_forward(x, gamma, beta, params)
    eps = params.get("eps", 1e-5)
    rmax, dmax = params.get("rmax", 3.0), params.get("dmax", 5.0)
    cs = _channel_shape(x)
    axes = _bn_axes(x)
    rm, rv = params["running_mean"], params["running_var"]
    xhat, mu, var, invstd = _normalize(x, axes, eps)
    std = np.sqrt(rv.reshape(cs) + eps)
    r = params["r"] if "r" in params else np.clip(np.sqrt(var + eps) / std, 1.0 / rmax, rmax)
    d = params["d"] if "d" in params else np.clip((mu - rm.reshape(cs)) / std, -dmax, dmax)
    out = gamma.reshape(cs) * (xhat * r + d) + beta.reshape(cs)
    _update_running(params, mu, var, x.size // x.shape[1])
    return out, {"xhat": xhat, "invstd": invstd, "gamma": gamma, "axes": axes, "r": r, "d": d}


def batchrenorm_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch Renorm backward: batch norm backward with ``dxhat = dout * gamma * r``;
    ``dgamma = sum(dout * (xhat * r + d))``."""
    return batchnorm_backward(dout, cache)


def ghostbn_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, params: dict[str, Any]) -> tuple[np.ndarray, Cache]:
    """Ghost BN forward (Hoffer et al. 2017): batch norm on consecutive virtual batches of
    ``params["virtual_batch_size"]`` samples (the last may be smaller); the running statistics
    are updated once per virtual batch, in order.

    Returns:
        ``(out, cache)``.
    """
    if params.get("mode", "train") != "train":
        return batchnorm_forward(x, gamma, beta, params)
    vbs = params["virtual_batch_size"]
    outs, caches = [], []
    for start in range(0, x.shape[0], vbs):
        o, c = batchnorm_forward(x[start : start + vbs], gamma, beta, params)
        outs.append(o)
        caches.append(c)
    return np.concatenate(outs), {"chunks": caches, "vbs": vbs}


def ghostbn_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ghost BN backward: batch norm backward per virtual batch; parameter gradients add up."""
    vbs = cache["vbs"]
    dxs, dg, db = [], 0.0, 0.0
    for i, c in enumerate(cache["chunks"]):
        dx, g, b = batchnorm_backward(dout[i * vbs : (i + 1) * vbs], c)
        dxs.append(dx)
        dg, db = dg + g, db + b
    return np.concatenate(dxs), dg, db


def groupnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, params: dict[str, Any]) -> tuple[np.ndarray, Cache]:
    """Group norm forward (Wu & He 2018): ``params["num_groups"]`` groups, per-channel affine.

    Returns:
        ``(out, cache)``.
    """
    eps = params.get("eps", 1e-5)
    g = params["num_groups"]
    n, c = x.shape[:2]
    xg = x.reshape(n, g, -1)
    xhat, _, _, invstd = _normalize(xg, (2,), eps)
    xhat = xhat.reshape(x.shape)
    cs = _channel_shape(x)
    out = gamma.reshape(cs) * xhat + beta.reshape(cs)
    return out, {"xhat": xhat, "invstd": invstd, "gamma": gamma, "g": g}


def groupnorm_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group norm backward. Returns ``(dx, dgamma, dbeta)``."""
    xhat, invstd, gamma, g = cache["xhat"], cache["invstd"], cache["gamma"], cache["g"]
    axes = _bn_axes(dout)
    cs = _channel_shape(dout)
    dgamma = (dout * xhat).sum(axis=axes)
    dbeta = dout.sum(axis=axes)
    n = dout.shape[0]
    dxhat = (dout * gamma.reshape(cs)).reshape(n, g, -1)
    dx = _normalize_backward(dxhat, xhat.reshape(n, g, -1), invstd, (2,))
    return dx.reshape(dout.shape), dgamma, dbeta


def layernorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, params: dict[str, Any]) -> tuple[np.ndarray, Cache]:
    """Layer norm forward (Ba et al. 2016) over the trailing ``gamma.ndim`` dimensions,
    element-wise affine ``gamma``/``beta`` of that shape.

    Returns:
        ``(out, cache)``.
    """
    eps = params.get("eps", 1e-5)
    axes = tuple(range(x.ndim - gamma.ndim, x.ndim))
    xhat, _, _, invstd = _normalize(x, axes, eps)
    return gamma * xhat + beta, {"xhat": xhat, "invstd": invstd, "gamma": gamma, "axes": axes}


def layernorm_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer norm backward. Returns ``(dx, dgamma, dbeta)``."""
    xhat, invstd, gamma, axes = cache["xhat"], cache["invstd"], cache["gamma"], cache["axes"]
    lead = tuple(range(dout.ndim - gamma.ndim))
    dgamma = (dout * xhat).sum(axis=lead)
    dbeta = dout.sum(axis=lead)
    dx = _normalize_backward(dout * gamma, xhat, invstd, axes)
    return dx, dgamma, dbeta


def instancenorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, params: dict[str, Any]) -> tuple[np.ndarray, Cache]:
    """Instance norm forward (Ulyanov et al. 2016): per sample and channel over spatial dims,
    per-channel affine.

    Returns:
        ``(out, cache)``.
    """
    eps = params.get("eps", 1e-5)
    axes = tuple(range(2, x.ndim))
    xhat, _, _, invstd = _normalize(x, axes, eps)
    cs = _channel_shape(x)
    return gamma.reshape(cs) * xhat + beta.reshape(cs), {"xhat": xhat, "invstd": invstd, "gamma": gamma, "axes": axes}


def instancenorm_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instance norm backward. Returns ``(dx, dgamma, dbeta)``."""
    xhat, invstd, gamma, axes = cache["xhat"], cache["invstd"], cache["gamma"], cache["axes"]
    bn_axes = _bn_axes(dout)
    dgamma = (dout * xhat).sum(axis=bn_axes)
    dbeta = dout.sum(axis=bn_axes)
    dx = _normalize_backward(dout * gamma.reshape(_channel_shape(dout)), xhat, invstd, axes)
    return dx, dgamma, dbeta
