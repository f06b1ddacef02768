"""Swap normalization layers in a model: ``convert_norm`` (e.g. BN -> GroupNorm) and
``freeze_bn`` (BN -> FrozenBatchNorm)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from batchlab.norm.layers import FrozenBatchNorm, _BatchNormBase, is_batchnorm
from batchlab.norm.registry import NormSpec, create_norm

__all__ = ["convert_norm", "freeze_bn", "replace_modules", "batchnorm_dims"]

_BN_KEYS = ("eps", "affine", "momentum", "track_running_stats")
# Which settings of the old layer each registered name inherits.
_INHERIT: dict[str, tuple[str, ...]] = {
    "batch": _BN_KEYS,
    "sync": _BN_KEYS,
    "renorm": ("eps", "affine", "momentum"),
    "ghost": _BN_KEYS,
    "group": ("eps", "affine"),
    "layer": ("eps", "affine"),
    "instance": ("eps", "affine"),
    "caffe": ("eps",),
    "frozen": ("eps",),
    "none": (),
}


def replace_modules(model: nn.Module, predicate: Callable[[nn.Module], bool], make: Callable[[str, nn.Module], nn.Module]) -> nn.Module:
    """Replace, in place, every submodule for which ``predicate`` holds by ``make(name, module)``.

    Args:
        model: the module tree (modified in place).
        predicate: which modules to replace (their children are not visited).
        make: builds the replacement from the qualified name and the old module.

    Returns:
        ``model``, or the replacement when ``model`` itself matches.
    """
    if predicate(model):
        return make("", model)

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            full = f"{prefix}.{name}" if prefix else name
            if predicate(child):
                setattr(parent, name, make(full, child))
            else:
                visit(child, full)

    visit(model, "")
    return model


def batchnorm_dims(module: nn.Module) -> int:
    """Spatial dims that a batch-norm layer expects, for :func:`create_norm`: 1 for
    ``*1d`` (also right for ``(N, C)`` inputs), 2 for ``*2d`` (and unknown), 3 for ``*3d``."""
    name = type(module).__name__
    if name.endswith("1d"):
        return 1
    if name.endswith("3d"):
        return 3
    return 2


def _copy_state(old: nn.Module, new: nn.Module) -> None:
    """Copy every parameter/buffer that both modules have with the same name and shape."""
    old_sd = old.state_dict()
    with torch.no_grad():
        for key, value in new.state_dict().items():
            src = old_sd.get(key)
            if src is not None and src.shape == value.shape:
                value.copy_(src)
    old_params = dict(old.named_parameters())
    for key, p in new.named_parameters():
        if key in old_params:
            p.requires_grad_(old_params[key].requires_grad)


def _inherited_keys(to: NormSpec) -> tuple[str, ...]:
    """Settings of the old layer that the new one takes over (those its constructor accepts)."""
    if to is None:
        return ()
    if isinstance(to, str):
        return _INHERIT.get(to.lower(), ("eps",))
    keys = ("eps", "affine")
    target = to.func if isinstance(to, functools.partial) else to
    if isinstance(target, type) and issubclass(target, (_BatchNormBase, nn.modules.batchnorm._BatchNorm)):
        keys = _BN_KEYS
    try:
        params = inspect.signature(to).parameters
    except (TypeError, ValueError):
        return ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return keys
    return tuple(k for k in keys if k in params)


def convert_norm(
    model: nn.Module,
    to: NormSpec = "group",
    *,
    predicate: Callable[[nn.Module], bool] | None = None,
    copy_state: bool = True,
    **kw: Any,
) -> nn.Module:
    """Replace the batch-norm layers of ``model`` by another normalization, in place.

    Each replacement is ``create_norm(to, C, dims=d, **kw)`` with ``d`` from the layer's type
    (:func:`batchnorm_dims`). The old layer's ``eps`` and ``affine`` are inherited unless given
    in ``kw`` (only those the new layer accepts); for batch-family targets ("batch", "sync",
    "renorm", "ghost" or a batch-norm class) ``momentum`` and ``track_running_stats=False`` too. With ``copy_state`` every parameter and buffer
    present in both layers with the same shape is copied (so BN -> SyncBN/Renorm keeps running
    statistics, BN -> GroupNorm keeps gamma and beta). Device, dtype, ``requires_grad`` and
    train/eval mode are kept.

    Args:
        model: the module tree (modified in place).
        to: a registered norm name, a class or a partial taking the channel count first.
        predicate: which modules to replace (default :func:`is_batchnorm`).
        copy_state: copy matching parameters and buffers.
        kw: passed to the new layers (e.g. ``num_groups=32``).

    Returns:
        ``model`` (a new module when ``model`` itself is replaced).
    """
    pred = predicate or is_batchnorm

    def make(name: str, old: nn.Module) -> nn.Module:
        num = getattr(old, "num_features", None) or getattr(old, "num_channels", None)
        if num is None:
            raise ValueError(f"cannot convert {name or 'model'} ({type(old).__name__}): no num_features attribute")
        args = dict(kw)
        for key in _inherited_keys(to):
            if hasattr(old, key) and not (key == "track_running_stats" and getattr(old, key)):
                args.setdefault(key, getattr(old, key))
        new = create_norm(to, num, dims=batchnorm_dims(old), **args)
        ref = next(iter(list(old.parameters()) + list(old.buffers())), None)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        if copy_state:
            _copy_state(old, new)
        new.train(old.training)
        return new

    return replace_modules(model, pred, make)


def freeze_bn(model: nn.Module) -> nn.Module:
    """Freeze every batch-norm layer: statistics and affine fixed, eval-mode normalization,
    also after ``model.train()`` (each layer becomes a :class:`FrozenBatchNorm`, whose weight
    and bias are buffers and whose forward ignores the mode), in place.

    Args:
        model: the module tree (modified in place).

    Returns:
        ``model`` (a new module when ``model`` itself is a batch norm).

    Raises:
        ValueError: a batch norm has no running statistics (``track_running_stats=False``).
    """

    def make(name: str, old: nn.Module) -> nn.Module:
        if getattr(old, "running_mean", None) is None:
            raise ValueError(
                f"freeze_bn needs running statistics; {name or 'model'} ({type(old).__name__}) has track_running_stats=False"
            )
        return FrozenBatchNorm.from_batchnorm(old)

    return replace_modules(model, is_batchnorm, make)
