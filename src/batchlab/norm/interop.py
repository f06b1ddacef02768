"""Converters between Caffe/darknet batch-norm parameters and batchlab's ``BatchNorm``.

Every converter gives a layer whose **eval** outputs are identical (up to float rounding) to the
source framework's inference formula.

Caffe (caffe/src/caffe/layers/batch_norm_layer.cpp): blobs ``mean`` M, ``variance`` V and
``scale_factor`` s; inference uses ``M / s`` and ``V / s`` (0 when s == 0) and ``eps``
(default 1e-5); gamma/beta live in a following ``Scale`` layer (``scale``, ``bias``).

Darknet (src/batch_norm_layer.c, ``normalize_cpu``): ``(x - mean) / (sqrt(var) + .000001f)``,
i.e. its epsilon is added to the *standard deviation*, and the rolling variance is the
``n - 1`` variance. torch normalizes with ``sqrt(var + eps)``. We represent darknet exactly with

    eps_bn = 1e-12 = (1e-6)^2,   running_var = rolling_variance + 2e-6 * sqrt(rolling_variance)

because then ``sqrt(running_var + eps_bn) = sqrt((sqrt(v) + 1e-6)^2) = sqrt(v) + 1e-6`` for
every ``v >= 0``, and ``running_var >= 0`` always (subtracting a larger eps could make it
negative for tiny variances). gamma is darknet's ``scales``, beta its ``biases``; the momentum of
the returned layer is darknet's 0.01 (``rolling = 0.99 * rolling + 0.01 * batch``). Training with
the result follows torch's rules (biased variance in the normalization), not darknet's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from torch import Tensor

from batchlab.norm.layers import BatchNorm1d, BatchNorm2d, BatchNorm3d, CaffeBatchNorm

__all__ = ["from_caffe", "to_caffe", "to_caffe_layer", "from_darknet", "to_darknet", "split_darknet_bn", "DARKNET_EPS"]

DARKNET_EPS = 1e-6
_BN_BY_DIMS: dict[int, type] = {0: BatchNorm1d, 1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}


def _bn_class(dims: int) -> type:
    if dims not in _BN_BY_DIMS:
        raise ValueError(f"dims must be one of {sorted(_BN_BY_DIMS)}, got {dims!r}")
    return _BN_BY_DIMS[dims]


def _t(v: object, name: str) -> Tensor:
    if isinstance(v, Tensor):
        return v.detach()
    try:
        return torch.as_tensor(v)
    except Exception as e:  # noqa: BLE001 - re-raised as a TypeError naming the argument
        raise TypeError(f"{name} must be a tensor or array-like, got {type(v).__name__}") from e


def from_caffe(
    caffe_bn: CaffeBatchNorm | Mapping[str, object],
    scale: object | None = None,
    bias: object | None = None,
    *,
    eps: float | None = None,
    dims: int = 2,
) -> nn.Module:
    """A batchlab BatchNorm with the eval outputs of Caffe's ``BatchNorm`` (+ ``Scale``).

    Args:
        caffe_bn: a :class:`CaffeBatchNorm`, or a mapping with the blobs ``mean``, ``variance``
            and ``scale_factor`` (and optionally ``eps``).
        scale: gamma of the following ``Scale`` layer (None: 1).
        bias: beta of the ``Scale`` layer (None: 0; Caffe's ``bias_term`` defaults to false).
        eps: overrides the layer's eps (Caffe default 1e-5).
        dims: 0/1 for BatchNorm1d, 2 for BatchNorm2d, 3 for BatchNorm3d.

    Returns:
        The BatchNorm, in eval mode, with ``running_mean = M / s``, ``running_var = V / s``,
        ``momentum = 1 - moving_average_fraction`` (the EMA that Caffe's accumulation tends to).
    """
    if isinstance(caffe_bn, CaffeBatchNorm):
        mean, var = caffe_bn.global_stats()
        layer_eps, frac = caffe_bn.eps, caffe_bn.moving_average_fraction
    elif isinstance(caffe_bn, Mapping):
        missing = {"mean", "variance", "scale_factor"} - set(caffe_bn)
        if missing:
            raise ValueError(f"caffe_bn mapping needs keys mean, variance, scale_factor; missing {sorted(missing)}")
        m, v, s = (_t(caffe_bn[k], k).double() for k in ("mean", "variance", "scale_factor"))
        s0 = float(s.reshape(-1)[0])
        f = 0.0 if s0 == 0 else 1.0 / s0
        mean, var = m * f, v * f
        layer_eps = float(caffe_bn.get("eps", 1e-5))  # type: ignore[arg-type]
        frac = float(caffe_bn.get("moving_average_fraction", 0.999))  # type: ignore[arg-type]
    else:
        raise TypeError(f"caffe_bn must be a CaffeBatchNorm or a mapping of blobs, got {type(caffe_bn).__name__}")
    if bool((var < 0).any()) or not bool(torch.isfinite(var).all()):
        bad = var[(var < 0) | ~torch.isfinite(var)].reshape(-1)[0].item()
        raise ValueError(f"caffe_bn: the variance blob must be finite and >= 0 in every channel (a variance), got {bad!r}")
    c = mean.numel()
    bn = _bn_class(dims)(c, eps=layer_eps if eps is None else eps, momentum=1.0 - frac)
    dtype = mean.dtype if isinstance(caffe_bn, CaffeBatchNorm) else torch.float32
    bn = bn.to(dtype)
    with torch.no_grad():
        bn.running_mean.copy_(mean.reshape(-1))
        bn.running_var.copy_(var.reshape(-1))
        if scale is not None:
            bn.weight.copy_(_t(scale, "scale").reshape(-1))
        if bias is not None:
            bn.bias.copy_(_t(bias, "bias").reshape(-1))
    return bn.eval()


def to_caffe(bn: nn.Module) -> dict[str, Tensor | float]:
    """Caffe blobs for a batch norm with running statistics.

    Args:
        bn: torch's or batchlab's BatchNorm (with ``running_mean``/``running_var``).

    Returns:
        ``{"mean", "variance", "scale_factor" (= [1.0]), "eps", "scale", "bias"}``; ``scale`` and
        ``bias`` (the following ``Scale`` layer) are ones/zeros when the layer has no affine.
    """
    if getattr(bn, "running_mean", None) is None:
        raise ValueError(f"bn must have running statistics, got {type(bn).__name__} without them")
    rm, rv = bn.running_mean.detach().clone(), bn.running_var.detach().clone()
    w = bn.weight.detach().clone() if getattr(bn, "weight", None) is not None else torch.ones_like(rm)
    b = bn.bias.detach().clone() if getattr(bn, "bias", None) is not None else torch.zeros_like(rm)
    return {"mean": rm, "variance": rv, "scale_factor": torch.ones(1, dtype=rm.dtype), "eps": float(bn.eps), "scale": w, "bias": b}


def to_caffe_layer(bn: nn.Module) -> tuple[CaffeBatchNorm, Tensor, Tensor]:
    """A :class:`CaffeBatchNorm` (eval) plus the ``Scale`` layer's gamma and beta for ``bn``."""
    blobs = to_caffe(bn)
    mean = blobs["mean"]
    assert isinstance(mean, Tensor)
    layer = CaffeBatchNorm(mean.numel(), eps=float(blobs["eps"]), dtype=mean.dtype)  # type: ignore[arg-type]
    with torch.no_grad():
        layer.mean.copy_(mean)
        layer.variance.copy_(blobs["variance"])  # type: ignore[arg-type]
        layer.scale_factor.fill_(1.0)
    return layer.eval(), blobs["scale"], blobs["bias"]  # type: ignore[return-value]


def from_darknet(
    biases: object,
    scales: object,
    rolling_mean: object,
    rolling_variance: object,
    *,
    dims: int = 2,
) -> nn.Module:
    """A batchlab BatchNorm with darknet's inference outputs
    ``scales * (x - rolling_mean) / (sqrt(rolling_variance) + 1e-6) + biases``.

    Represented exactly by ``eps = 1e-12`` and ``running_var = v + 2e-6 * sqrt(v)`` (see the
    module docstring). Computed in float64, stored in float32.

    Args:
        biases, scales, rolling_mean, rolling_variance: per-channel arrays in darknet's
            weights-file order (see :func:`split_darknet_bn`).
        dims: 0/1 for BatchNorm1d, 2 for BatchNorm2d, 3 for BatchNorm3d.

    Returns:
        The BatchNorm in eval mode (momentum 0.01 as darknet).
    """
    b, s, m, v = (
        _t(a, n).double().reshape(-1)
        for a, n in ((biases, "biases"), (scales, "scales"), (rolling_mean, "rolling_mean"), (rolling_variance, "rolling_variance"))
    )
    if not (b.numel() == s.numel() == m.numel() == v.numel()):
        raise ValueError(
            f"biases, scales, rolling_mean, rolling_variance must have the same length, got {b.numel()}, {s.numel()}, {m.numel()}, {v.numel()}"
        )
    if (v < 0).any():
        raise ValueError(f"rolling_variance must be >= 0, got min {float(v.min())}")
    bn = _bn_class(dims)(b.numel(), eps=DARKNET_EPS**2, momentum=0.01)
    with torch.no_grad():
        bn.weight.copy_(s)
        bn.bias.copy_(b)
        bn.running_mean.copy_(m)
        bn.running_var.copy_(v + 2 * DARKNET_EPS * v.sqrt())
    return bn.eval()


def to_darknet(bn: nn.Module) -> dict[str, Tensor]:
    """Darknet's ``biases, scales, rolling_mean, rolling_variance`` with the same eval outputs
    as ``bn``: ``rolling_variance = (sqrt(running_var + eps) - 1e-6)^2``.

    Args:
        bn: a batch norm with running statistics.

    Returns:
        The four arrays (float32) in darknet's weights-file order.
    """
    if getattr(bn, "running_mean", None) is None:
        raise ValueError(f"bn must have running statistics, got {type(bn).__name__} without them")
    rm = bn.running_mean.detach().double()
    std = (bn.running_var.detach().double() + bn.eps).sqrt()
    if (std < DARKNET_EPS).any():
        raise ValueError(f"sqrt(running_var + eps) must be >= {DARKNET_EPS} to be expressed in darknet, got min {float(std.min())}")
    w = bn.weight.detach().double() if getattr(bn, "weight", None) is not None else torch.ones_like(rm)
    b = bn.bias.detach().double() if getattr(bn, "bias", None) is not None else torch.zeros_like(rm)
    return {
        "biases": b.float(),
        "scales": w.float(),
        "rolling_mean": rm.float(),
        "rolling_variance": ((std - DARKNET_EPS) ** 2).float(),
    }


def split_darknet_bn(weights: object, num_features: int, offset: int = 0) -> tuple[dict[str, Tensor], int]:
    """Read one conv's batch-norm block from a flat darknet weights array (order: biases,
    scales, rolling_mean, rolling_variance; the conv weights follow).

    Args:
        weights: the flat float32 array after the header.
        num_features: filters of the conv layer.
        offset: where the block starts.

    Returns:
        ``({"biases", "scales", "rolling_mean", "rolling_variance"}, offset after the block)``.
    """
    for name, value, low in (("num_features", num_features, 1), ("offset", offset, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    flat = _t(weights, "weights").reshape(-1)
    end = offset + 4 * num_features
    if end > flat.numel():
        raise ValueError(f"weights has {flat.numel()} values, needs {end} for num_features={num_features} at offset={offset}")
    names = ("biases", "scales", "rolling_mean", "rolling_variance")
    out = {n: flat[offset + i * num_features : offset + (i + 1) * num_features].clone() for i, n in enumerate(names)}
    return out, end
