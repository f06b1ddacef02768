"""Normalization layer registry: ``create_norm("group", 64)``.

Every factory takes the channel count first, then ``dims`` (spatial dimensions of the input:
0 for ``(N, C)``, 1 for ``(N, C, L)``, 2 for images, 3 for volumes), then keywords for the layer.
``create_norm`` also accepts a class or a partial; unknown names fail with the known ones.

Each entry also says which settings a layer built under its name takes over from a batch norm
it replaces (:attr:`NormEntry.inherits`, used by :func:`batchlab.norm.convert_norm`), so a norm
a user registers converts as properly as the built-in ones.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any, Tuple

import torch
import torch.nn as nn

from batchlab.norm import layers as L
from batchlab.norm import norm_act as A
from batchlab.norm.sync import SyncBatchNorm

__all__ = ["INHERITABLE", "NormEntry", "NormSpec", "create_norm", "known_norms", "norm_entry", "register_norm"]

NormSpec = str | type | Callable[..., nn.Module] | None

_DIMS = (0, 1, 2, 3)

# the batch-norm settings a converted layer can take over (``bias`` means "learns a shift")
INHERITABLE = ("eps", "momentum", "affine", "track_running_stats", "bias")
_BN_KEYS = INHERITABLE


@dataclasses.dataclass(frozen=True)
class NormEntry:
    """A registered norm: how to build it and what it inherits when it replaces a batch norm."""

    factory: Callable[..., nn.Module]  # factory(num_features, dims=..., **kw)
    inherits: tuple[str, ...] = ("eps",)  # settings taken over by convert_norm (subset of INHERITABLE)

    def __post_init__(self) -> None:
        bad = [k for k in self.inherits if k not in INHERITABLE]
        if bad:
            raise ValueError(f"inherits must name settings from {', '.join(INHERITABLE)}, got {bad}")


def _by_dims(kind: str, classes: dict[int, type], dims: int) -> type:
    if dims not in classes:
        raise ValueError(f"norm {kind!r} supports dims in {sorted(classes)}, got dims={dims}")
    return classes[dims]


def _bn_family(kind: str, c1: type, c2: type, c3: type) -> Callable[..., nn.Module]:
    def make(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
        return _by_dims(kind, {0: c1, 1: c1, 2: c2, 3: c3}, dims)(num_features, **kw)

    return make


# Forward pre-hooks (TorchScript-compatible) for a norm in a BatchNorm1d's place (dims 1), which may
# be given (N, C) as well as (N, C, L): refuse the 2-D input where the norm would not normalize it.
def _refuse_batch_as_positions(module, args: Tuple[torch.Tensor]) -> None:  # noqa: ANN001, UP006 - TorchScript hook
    if args[0].dim() == 2:
        raise ValueError(
            "an InstanceNorm1d that replaced a BatchNorm1d got a 2-D input: that is (N, C), with no positions for "
            "instance norm to normalize over (InstanceNorm1d would take it as one unbatched sample); convert only "
            "the BatchNorm1d layers that see (N, C, L) inputs (convert_norm's predicate=)"
        )


def _refuse_single_values(module, args: Tuple[torch.Tensor]) -> None:  # noqa: ANN001, UP006 - TorchScript hook
    if args[0].dim() == 2:
        raise ValueError(
            "a GroupNorm with one channel per group got a 2-D (N, C) input: each group holds one value, so it "
            "would output a constant (its bias); use fewer groups (num_groups=) or 'layer' for (N, C) features"
        )


def _group(num_features: int, dims: int = 2, num_groups: int | None = None, **kw: Any) -> nn.Module:
    # Default: 8 groups, or the largest divisor of C below 8; an explicit num_groups must divide.
    # For features without positions ((N, C) MLP features, dims 0; a BatchNorm1d's (N, C) or (N, C, L),
    # dims 1) a group is normalized over its own channels alone, so groups get at least 4 channels where
    # C allows (BatchNorm1d(8) -> 2 groups of 4, not 8 groups of one value each, whose output is constant).
    if num_groups is None and dims <= 1:
        num_groups = L.default_num_groups(num_features, max(1, min(8, num_features // 4)))
    if num_groups is not None and num_groups == num_features and dims <= 1:
        if dims == 0:
            raise ValueError(f"GroupNorm with num_groups={num_groups} on {num_features} features without positions "
                             "normalizes single values (a constant output); use fewer groups or 'layer'")
        norm = L.GroupNorm(num_features, num_groups, **kw)
        norm.register_forward_pre_hook(_refuse_single_values)  # (N, C, L) inputs are fine; (N, C) are not
        return norm
    return L.GroupNorm(num_features, num_groups, **kw)


def _group_act(num_features: int, dims: int = 2, num_groups: int | None = None, **kw: Any) -> nn.Module:
    return A.GroupNormAct(num_features, num_groups, **kw)


def _layer(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    # (N, C): LayerNorm over C. With spatial dims: per sample over (C, spatial), which is
    # GroupNorm with one group (per-channel affine, independent of the spatial size).
    if dims == 0:
        affine = kw.pop("affine", True)
        return L.LayerNorm(num_features, elementwise_affine=affine, **kw)
    return L.GroupNorm(num_features, 1, **kw)


def _layer_act(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    if dims == 0:
        affine = kw.pop("affine", True)
        return A.LayerNormAct(num_features, elementwise_affine=affine, **kw)
    return A.GroupNormAct(num_features, 1, **kw)


def _rms(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    if dims != 0:
        raise ValueError(f"norm 'rms' normalizes the trailing (feature) dimension of a transformer's (..., C) "
                         f"activations (dims=0, how convert_norm replaces an nn.LayerNorm); a batch norm's layer (dims="
                         f"{dims}) is not one, even a BatchNorm1d on (N, C): use 'layer' or 'group' there")
    affine = kw.pop("affine", True)
    return L.RMSNorm(num_features, elementwise_affine=affine, **kw)


def _instance(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    if dims == 0:
        raise ValueError("norm 'instance' needs spatial dimensions (dims >= 1), got dims=0")
    cls = _by_dims("instance", {1: L.InstanceNorm1d, 2: L.InstanceNorm2d, 3: L.InstanceNorm3d}, dims)
    kw.setdefault("affine", True)  # as a model building block, learnable (torch's class default is False)
    norm = cls(num_features, **kw)
    if dims == 1:  # (N, C) would be read as one unbatched (C, L) sample, normalizing across the batch
        norm.register_forward_pre_hook(_refuse_batch_as_positions)
    return norm


def _sync(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    return SyncBatchNorm(num_features, **kw)


def _caffe(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    return L.CaffeBatchNorm(num_features, **kw)


def _frozen(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    kw.setdefault("dims", max(dims, 1))
    return L.FrozenBatchNorm(num_features, **kw)


def _none(num_features: int, dims: int = 2, **kw: Any) -> nn.Module:
    return nn.Identity()


_REGISTRY: dict[str, NormEntry] = {
    "batch": NormEntry(_bn_family("batch", L.BatchNorm1d, L.BatchNorm2d, L.BatchNorm3d), _BN_KEYS),
    "batch_act": NormEntry(_bn_family("batch_act", A.BatchNormAct1d, A.BatchNormAct2d, A.BatchNormAct3d), _BN_KEYS),
    "group": NormEntry(_group, ("eps", "affine", "bias")),
    "group_act": NormEntry(_group_act, ("eps", "affine", "bias")),
    "layer": NormEntry(_layer, ("eps", "affine", "bias")),
    "layer_act": NormEntry(_layer_act, ("eps", "affine", "bias")),
    "rms": NormEntry(_rms, ("eps", "affine")),
    "instance": NormEntry(_instance, ("eps", "affine", "bias")),
    "none": NormEntry(_none, ()),
    "renorm": NormEntry(_bn_family("renorm", L.BatchRenorm1d, L.BatchRenorm2d, L.BatchRenorm3d), ("eps", "affine", "momentum", "bias")),
    "ghost": NormEntry(_bn_family("ghost", L.GhostBatchNorm1d, L.GhostBatchNorm2d, L.GhostBatchNorm3d), _BN_KEYS),
    "sync": NormEntry(_sync, _BN_KEYS),
    "caffe": NormEntry(_caffe, ("eps",)),
    "frozen": NormEntry(_frozen, ("eps",)),
}


def known_norms() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def norm_entry(name: str) -> NormEntry:
    """The registry entry of ``name`` (any case); unknown names fail with the known ones."""
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown norm {name!r}; known norms: {', '.join(known_norms())}")
    return _REGISTRY[key]


def register_norm(name: str, factory: Callable[..., nn.Module], *, inherits: Iterable[str] = ("eps",)) -> None:
    """Register ``factory(num_features, dims=..., **kw)`` under ``name`` (lower case).

    Args:
        name: the new name; must not be registered yet.
        factory: builds the layer.
        inherits: the settings of a batch norm that a layer built under this name takes over
            when :func:`batchlab.norm.convert_norm` replaces one (from :data:`INHERITABLE`:
            eps, momentum, affine, track_running_stats, bias); the factory must accept them.
    """
    key = name.lower()
    if key in _REGISTRY:
        raise ValueError(f"norm name {name!r} is already registered; known norms: {', '.join(known_norms())}")
    _REGISTRY[key] = NormEntry(factory, tuple(inherits))


def create_norm(kind: NormSpec, num_features: int, *, dims: int = 2, **kw: Any) -> nn.Module:
    """Build a normalization layer for ``num_features`` channels.

    Args:
        kind: a registered name (see :func:`known_norms`: "batch", "batch_act", "group",
            "group_act", "layer", "layer_act", "rms", "instance", "none", "renorm", "ghost",
            "sync", "caffe", "frozen"), a class or a callable (e.g. ``functools.partial``)
            taking ``num_features`` first; None means "none".
        num_features: channel count (features for an MLP).
        dims: spatial dimensions of the input: 0 for (N, C), 1 for (N, C, L), 2 for images,
            3 for volumes. Used by names only (a class is called as ``kind(num_features, **kw)``).
        kw: passed to the layer (``eps``, ``momentum``, ``affine``, ``num_groups``,
            ``virtual_batch_size``, ``rmax``, ``act_layer`` ...).

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
        return norm_entry(kind).factory(num_features, dims=dims, **kw)
    if isinstance(kind, (type, functools.partial)) or callable(kind):
        return kind(num_features, **kw)
    raise TypeError(f"norm must be a name, a class or a callable, got {type(kind).__name__}: {kind!r}")
