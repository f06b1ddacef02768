"""Pieces every batchlab model shares: activation by name, norm through the registry."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from batchlab.norm.registry import NormSpec, create_norm

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name ("relu", "sigmoid", "tanh")."""
    key = name.lower() if isinstance(name, str) else name
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[key]()


def check_activation(name: str) -> None:
    """Fail early, before any layer is built, on an unknown activation name."""
    make_activation(name)


def make_norm(norm: NormSpec, num_features: int, dims: int) -> nn.Module:
    """A normalization layer from :func:`batchlab.norm.create_norm` (``nn.Identity`` for "none")."""
    return create_norm(norm, num_features, dims=dims)


def has_norm(layer: nn.Module) -> bool:
    """Whether ``layer`` really normalizes (is not the "none" placeholder)."""
    return not isinstance(layer, nn.Identity)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
