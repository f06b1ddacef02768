"""Normalization followed by an activation in one module, as timm's ``BatchNormAct2d`` and
``GroupNormAct`` (timm/layers/norm_act.py).

Each class *is* the norm layer (``BatchNormAct2d`` subclasses :class:`batchlab.norm.BatchNorm2d`,
hence ``torch.nn.BatchNorm2d``), with two child modules, ``drop`` (identity unless a
``drop_layer`` is given) and ``act``, applied after it: ``act(drop(norm(x)))``. So checkpoints
keep the norm's keys, and tools that look for BatchNorm (precise BN, pruning, folding, which puts
``act`` in the folded layer's place) find it. The activation is in place by default, like
timm's: batch norm's backward does not need its output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from batchlab.norm import _checks as C
from batchlab.norm.layers import BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, LayerNorm

__all__ = ["ACTIVATIONS", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "GroupNormAct", "LayerNormAct", "is_norm_act", "make_activation"]

# activation names accepted by ``act_layer`` (a class or a callable returning a module works too)
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "elu": nn.ELU,
    "hardswish": nn.Hardswish,
    "mish": nn.Mish,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}
_INPLACE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.ELU, nn.Hardswish, nn.Mish)

ActLayer = str | type[nn.Module] | Callable[..., nn.Module] | None


def make_activation(act_layer: ActLayer, apply_act: bool = True, inplace: bool = True, act_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The activation module: ``nn.Identity`` when ``apply_act`` is False or ``act_layer`` is
    None; a name from :data:`ACTIVATIONS`, a class or a callable otherwise. ``inplace`` is
    passed to the activations that take it."""
    C.check_bool("apply_act", apply_act)
    C.check_bool("inplace", inplace)
    if not apply_act or act_layer is None:
        return nn.Identity()
    kw = dict(act_kwargs or {})
    if isinstance(act_layer, str):
        key = act_layer.lower()
        if key not in ACTIVATIONS:
            raise ValueError(f"act_layer must be one of {', '.join(sorted(ACTIVATIONS))} or a module class, got {act_layer!r}")
        act_layer = ACTIVATIONS[key]
    if not callable(act_layer):
        raise TypeError(f"act_layer must be a name, a module class or a callable, got {type(act_layer).__name__}: {act_layer!r}")
    if isinstance(act_layer, type) and issubclass(act_layer, _INPLACE):
        kw.setdefault("inplace", inplace)
    return act_layer(**kw)


class _NormAct:
    """``act(drop(norm(x)))`` for a norm class mixed in after it."""

    act: nn.Module
    drop: nn.Module

    def _add_act(self, apply_act: bool, act_layer: ActLayer, act_kwargs: dict[str, Any] | None, inplace: bool, drop_layer: Callable[[], nn.Module] | None) -> None:
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = make_activation(act_layer, apply_act, inplace, act_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))  # type: ignore[misc]


def is_norm_act(module: nn.Module) -> bool:
    """Whether ``module`` is a norm + activation layer (its output is not a norm's output)."""
    return isinstance(module, _NormAct)


class _BatchNormAct(_NormAct):
    """Batch norm + activation (timm's ``BatchNormAct2d``): torch's ``BatchNorm*d`` (so
    ``isinstance(m, nn.BatchNorm2d)``) followed by ``drop`` and ``act``.

    Args:
        num_features, eps, momentum, affine, track_running_stats, bias: as :class:`BatchNorm2d`.
        apply_act: False gives an identity activation.
        act_layer: a name from :data:`ACTIVATIONS` ("relu" by default), a class or a callable.
        act_kwargs: keywords for the activation.
        inplace: in-place activation where the activation supports it.
        drop_layer: a callable returning a module applied between norm and activation
            (e.g. a DropBlock), or None.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: ActLayer = "relu",
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: Callable[[], nn.Module] | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)  # type: ignore[call-arg]
        self._add_act(apply_act, act_layer, act_kwargs, inplace, drop_layer)


class BatchNormAct1d(_BatchNormAct, BatchNorm1d):
    __doc__ = _BatchNormAct.__doc__


class BatchNormAct2d(_BatchNormAct, BatchNorm2d):
    __doc__ = _BatchNormAct.__doc__


class BatchNormAct3d(_BatchNormAct, BatchNorm3d):
    __doc__ = _BatchNormAct.__doc__


class GroupNormAct(_NormAct, GroupNorm):
    """Group norm + activation (timm's ``GroupNormAct``): :class:`GroupNorm` (channels first,
    ``num_groups=None`` picks a divisor <= 8) followed by ``drop`` and ``act``; other arguments
    as :class:`BatchNormAct2d`."""

    def __init__(
        self,
        num_channels: int,
        num_groups: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
        apply_act: bool = True,
        act_layer: ActLayer = "relu",
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: Callable[[], nn.Module] | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_channels, num_groups, eps, affine, device, dtype, bias=bias)
        self._add_act(apply_act, act_layer, act_kwargs, inplace, drop_layer)


class LayerNormAct(_NormAct, LayerNorm):
    """Layer norm over the trailing dims + activation (timm's ``LayerNormAct``); arguments as
    :class:`LayerNorm` and :class:`BatchNormAct2d`."""

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...] | list[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        apply_act: bool = True,
        act_layer: ActLayer = "relu",
        act_kwargs: dict[str, Any] | None = None,
        inplace: bool = True,
        drop_layer: Callable[[], nn.Module] | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self._add_act(apply_act, act_layer, act_kwargs, inplace, drop_layer)
