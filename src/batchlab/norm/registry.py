"""Normalization layer registry: ``create_norm("group", 64)``.

Every factory takes the channel count first, then ``dims`` (spatial dimensions of the input:
0 for ``(N, C)``, 1 for ``(N, C, L)``, 2 for images, 3 for volumes), then keywords for the layer.
``create_norm`` also accepts a class or a partial; unknown names fail with the known ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from batchlab.norm import layers as L

__all__ = ["NormSpec", "create_norm", "known_norms", "register_norm"]

NormSpec = str | type | Callable[..., nn.Module] | None

_DIMS = (0, 1, 2, 3)


def _by_dims(kind: str, classes: dict[int, type], dims: int) -> type:
    if dims not in classes:
        raise ValueError(f"norm {kind!r} supports dims in {sorted(classes)}, got dims={dims}")
    return classes[dims]


def _batch(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    cls = _by_dims("batch", {0: L.BatchNorm1d, 1: L.BatchNorm1d, 2: L.BatchNorm2d, 3: L.BatchNorm3d}, dims)
    return cls(num_features, **kw)


def _group(num_features: int, dims: int = 2, num_groups: int | None = None, **kw: Any) -> nn.Module:
    # Default: 8 groups, or the largest divisor of C below 8; an explicit num_groups must divide.
    return L.GroupNorm(num_features, num_groups, **kw)


def _layer(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    # (N, C): LayerNorm over C. With spatial dims: per sample over (C, spatial), which is
    # GroupNorm with one group (per-channel affine, independent of the spatial size).
    if dims == 0:
        affine = kw.pop("affine", True)
        return L.LayerNorm(num_features, elementwise_affine=affine, **kw)
    return L.GroupNorm(num_features, 1, **kw)


def _instance(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    if dims == 0:
        raise ValueError("norm 'instance' needs spatial dimensions (dims >= 1), got dims=0")
    cls = _by_dims("instance", {1: L.InstanceNorm1d, 2: L.InstanceNorm2d, 3: L.InstanceNorm3d}, dims)
    kw.setdefault("affine", True)  # as a model building block, learnable (torch's class default is False)
    return cls(num_features, **kw)


def _renorm(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    cls = _by_dims("renorm", {0: L.BatchRenorm1d, 1: L.BatchRenorm1d, 2: L.BatchRenorm2d, 3: L.BatchRenorm3d}, dims)
    return cls(num_features, **kw)


def _ghost(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    cls = _by_dims("ghost", {0: L.GhostBatchNorm1d, 1: L.GhostBatchNorm1d, 2: L.GhostBatchNorm2d, 3: L.GhostBatchNorm3d}, dims)
    return cls(num_features, **kw)


def _sync(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    from batchlab.norm.sync import SyncBatchNorm

    return SyncBatchNorm(num_features, **kw)


def _caffe(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    return L.CaffeBatchNorm(num_features, **kw)


def _frozen(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    return L.FrozenBatchNorm(num_features, **kw)


def _none(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    return nn.Identity()


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "batch": _batch,
    "group": _group,
    "layer": _layer,
    "instance": _instance,
    "none": _none,
    "renorm": _renorm,
    "ghost": _ghost,
    "sync": _sync,
    "caffe": _caffe,
    "frozen": _frozen,
}


def known_norms() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def register_norm(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register ``factory(num_features, dims=..., **kw)`` under ``name`` (lower case).

    Args:
        name: the new name; must not be registered yet.
        factory: builds the layer.
    """
    key = name.lower()
    if key in _REGISTRY:
        raise ValueError(f"norm name {name!r} is already registered; known norms: {', '.join(known_norms())}")
    _REGISTRY[key] = factory


def create_norm(kind: NormSpec, num_features: int, *, dims: int = 2, **kw: Any) -> nn.Module:
    """Build a normalization layer for ``num_features`` channels.

    Args:
        kind: a registered name (see :func:`known_norms`: "batch", "group", "layer",
            "instance", "none", "renorm", "ghost", "sync", "caffe", "frozen"), a class or a
            callable (e.g. ``functools.partial``) taking ``num_features`` first; None means "none".
        num_features: channel count (features for an MLP).
        dims: spatial dimensions of the input: 0 for (N, C), 1 for (N, C, L), 2 for images,
            3 for volumes. Used by names only (a class is called as ``kind(num_features, **kw)``).
        kw: passed to the layer (``eps``, ``momentum``, ``affine``, ``num_groups``,
            ``virtual_batch_size``, ``rmax`` ...).

    Returns:
        The layer (``nn.Identity`` for "none").

    Raises:
        ValueError: unknown name (the message lists the known ones) or unsupported ``dims``.
        TypeError: ``kind`` is neither a name, a class nor a callable.
    """
    if dims not in _DIMS:
        raise ValueError(f"dims must be one of {list(_DIMS)}, got {dims!r}")
    if kind is None:
        kind = "none"
    if isinstance(kind, str):
        key = kind.lower()
        if key not in _REGISTRY:
            raise ValueError(f"unknown norm {kind!r}; known norms: {', '.join(known_norms())}")
        return _REGISTRY[key](num_features, dims=dims, **kw)
    if isinstance(kind, (type, functools.partial)) or callable(kind):
        return kind(num_features, **kw)
    raise TypeError(f"norm must be a name, a class or a callable, got {type(kind).__name__}: {kind!r}")
