"""Fold batch norms into the preceding convolution or linear layer for inference.

For a BN after a layer with weight W and bias b (torch/nn/utils/fusion.py):
``W' = W * gamma / sqrt(var + eps)`` per output channel and
``b' = (b - mean) * gamma / sqrt(var + eps) + beta``. Valid only with running statistics, i.e.
in eval mode.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch import Tensor

from batchlab.norm._graph import direct_successors
from batchlab.norm.layers import CaffeBatchNorm, FrozenBatchNorm, is_batchnorm

__all__ = ["fold_bn", "find_foldable_pairs", "bn_scale_shift"]

_FOLDABLE_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def bn_scale_shift(bn: nn.Module) -> tuple[Tensor, Tensor] | None:
    """Eval-mode per-channel ``(scale, shift)`` in float64 with ``bn(x) = x * scale + shift``,
    or None when the layer normalizes with batch statistics in eval mode."""
    if isinstance(bn, CaffeBatchNorm):
        if bn.use_global_stats is False:
            return None
        mean, var = bn.global_stats()
        w = b = None
    elif is_batchnorm(bn) or isinstance(bn, FrozenBatchNorm):
        if getattr(bn, "running_mean", None) is None:
            return None
        mean, var = bn.running_mean, bn.running_var
        w, b = bn.weight, bn.bias
    else:
        return None
    inv = torch.rsqrt(var.detach().double() + bn.eps)
    scale = inv if w is None else w.detach().double() * inv
    shift = -mean.detach().double() * scale
    if b is not None:
        shift = shift + b.detach().double()
    return scale, shift


def _is_bn_like(m: nn.Module) -> bool:
    return is_batchnorm(m) or isinstance(m, (FrozenBatchNorm, CaffeBatchNorm))


def find_foldable_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], str]:
    """``(conv or linear name, BN name)`` pairs where the BN consumes the layer's output and
    nothing else does, found by torch.fx tracing (fall back: ``nn.Sequential`` adjacency).

    Returns:
        ``(pairs, method)`` with method "fx" or "sequential".
    """
    succ, method = direct_successors(model)
    modules = dict(model.named_modules())
    pairs = []
    for name, nxt in succ.items():
        if nxt is None or nxt[0] != "module":
            continue
        a, b = modules.get(name), modules.get(nxt[1])
        if isinstance(a, _FOLDABLE_INTO) and b is not None and _is_bn_like(b):
            out_features = a.out_features if isinstance(a, nn.Linear) else a.out_channels
            if out_features == getattr(b, "num_features", None):
                pairs.append((name, nxt[1]))
    return pairs, method


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def _fold_into(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    w = layer.weight
    shape = (-1,) + (1,) * (w.dim() - 1)
    new_w = w.double() * scale.view(shape)
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    new_b = b * scale + shift
    w.copy_(new_w.to(w.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b.to(device=w.device, dtype=w.dtype))
    else:
        layer.bias.copy_(new_b.to(layer.bias.dtype))


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every batch norm that directly follows a Conv1d/2d/3d or
    Linear (and is the only consumer of its output) is folded into it and replaced by
    ``nn.Identity`` (by its activation, for a norm+activation layer such as ``BatchNormAct2d``). Eval outputs agree with the original within float rounding.

    Pairs are found by tracing with torch.fx; models that cannot be traced fall back to
    adjacency inside ``nn.Sequential`` containers. Layers that normalize with batch statistics
    in eval mode (no running statistics) are left as they are.

    Args:
        model: the network, in eval mode (``model.eval()``); it is not modified.

    Returns:
        The folded copy, in eval mode.

    Raises:
        ValueError: the model is in training mode (folding uses running statistics, so it is
            only valid for inference).
    """
    if model.training:
        raise ValueError("fold_bn needs a model in eval mode (folding uses running statistics); call model.eval() first, got model.training=True")
    training_bns = [n for n, m in model.named_modules() if _is_bn_like(m) and m.training]
    if training_bns:
        raise ValueError(f"fold_bn needs every batch norm in eval mode; call model.eval() first, got training layers {training_bns[:5]}")
    new = copy.deepcopy(model)
    pairs, _ = find_foldable_pairs(new)
    for layer_name, bn_name in pairs:
        bn = new.get_submodule(bn_name)
        ss = bn_scale_shift(bn)
        if ss is None:
            continue
        layer = new.get_submodule(layer_name)
        scale, shift = (t.to(layer.weight.device) for t in ss)
        _fold_into(layer, scale, shift)
        _set_submodule(new, bn_name, getattr(bn, "act", None) or nn.Identity())  # a norm+act layer leaves its activation
    return new.eval()
