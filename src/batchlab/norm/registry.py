"""Normalization layer registry: ``create_norm("group", 64)``.

A minimal registry over torch's layers; the normalization library replaces the classes with
batchlab's own. Every factory takes the channel count first, then keywords.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch.nn as nn

NormSpec = str | type | Callable[..., nn.Module] | None


def _group(num_features: int, num_groups: int = 8, **kw: Any) -> nn.Module:
    g = min(num_groups, num_features)
    while num_features % g:
        g -= 1
    return nn.GroupNorm(g, num_features, **kw)


def _layer(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    # LayerNorm over channels and spatial positions is GroupNorm with one group.
    if dims == 0:
        return nn.LayerNorm(num_features, **kw)
    return nn.GroupNorm(1, num_features, **kw)


def _batch(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    return cls(num_features, **kw)


def _instance(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    if dims == 0:
        raise ValueError("instance normalization needs spatial dimensions (dims >= 1), got dims=0")
    cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
    kw.setdefault("affine", True)
    return cls(num_features, **kw)


def _none(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    return nn.Identity()


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "batch": _batch,
    "group": _group,
    "layer": _layer,
    "instance": _instance,
    "none": _none,
}


def known_norms() -> list[str]:
    return sorted(_REGISTRY)


def create_norm(kind: NormSpec, num_features: int, *, dims: int = 2, **kw: Any) -> nn.Module:
    """Build a normalization layer for ``num_features`` channels.

    Args:
        kind: a registered name ("batch", "group", "layer", "instance", "none"), a class or a
            callable (e.g. ``functools.partial``) taking ``num_features`` first; None means "none".
        num_features: channel count (features for an MLP).
        dims: spatial dimensions of the input: 0 for (N, C), 1 for (N, C, L), 2 for images.
        kw: passed to the layer (``eps``, ``momentum``, ``affine``, ``num_groups`` ...).
    """
    if kind is None:
        kind = "none"
    if isinstance(kind, str):
        key = kind.lower()
        if key not in _REGISTRY:
            raise ValueError(f"unknown norm {kind!r}; known norms: {', '.join(known_norms())}")
        return _REGISTRY[key](num_features, dims=dims, **kw) if key != "group" else _REGISTRY[key](num_features, **kw)
    if isinstance(kind, type) or callable(kind) or isinstance(kind, functools.partial):
        return kind(num_features, **kw)
    raise TypeError(f"norm must be a name, a class or a callable, got {type(kind).__name__}")
