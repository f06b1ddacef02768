"""Fold batch norms into the preceding convolution or linear layer for inference.

For a BN after a layer with weight W and bias b (torch/nn/utils/fusion.py):
``W' = W * gamma / sqrt(var + eps)`` per output channel and
``b' = (b - mean) * gamma / sqrt(var + eps) + beta``. Valid only with running statistics, i.e.
in eval mode.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
from torch import Tensor

from batchlab.norm._graph import direct_successors
from batchlab.norm.layers import CaffeBatchNorm, FrozenBatchNorm, is_batchnorm

__all__ = ["fold_bn", "find_foldable_pairs", "bn_scale_shift"]

_FOLDABLE_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                  nn.Linear)


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
    # a weight or bias tied to another module (shared Parameter): folding would change that module too
    owners: dict[int, int] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    pairs = []
    for name, nxt in succ.items():
        if nxt is None or nxt[0] != "module":
            continue
        a, b = modules.get(name), modules.get(nxt[1])
        if a is not None and any(owners.get(id(p), 0) > 1 for p in a.parameters(recurse=False)):
            continue
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
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        # weight (in, out / groups, *k): output channel g * (out / groups) + j is column j of group g's rows
        groups = layer.groups
        per = w.shape[1]
        s = scale.view(groups, 1, per, *(1,) * (w.dim() - 2))
        new_w = (w.double().view(groups, w.shape[0] // groups, per, *w.shape[2:]) * s).view(w.shape)
    else:
        shape = (-1,) + (1,) * (w.dim() - 1)
        new_w = w.double() * scale.view(shape)
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    new_b = b * scale + shift
    w.copy_(new_w.to(w.dtype))
    if layer.bias is None:  # a new bias follows the weight's requires_grad (a frozen model stays frozen)
        layer.bias = nn.Parameter(new_b.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(new_b.to(layer.bias.dtype))


def _tensors(out: object) -> list[Tensor]:
    """Every tensor in a model output (a tensor, a tuple/list, a dict or an object with fields)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    fields = getattr(out, "__dict__", None)
    return [t for o in fields.values() for t in _tensors(o)] if isinstance(fields, dict) else []


def _same_outputs(a: object, b: object) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        return False
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            return False
        if not x.numel():
            continue
        if x.is_floating_point():
            x, y = x.double(), y.double()
            if float((x - y).abs().max()) > 1e-4 * (1.0 + float(y.abs().max())):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def _run(model: nn.Module, example_input: object) -> object:
    if isinstance(example_input, tuple):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


def _bake_weight(layer: nn.Module) -> None:
    """Make a parametrized ``layer.weight`` (``torch.nn.utils.parametrizations.weight_norm`` /
    ``spectral_norm``, any ``torch.nn.utils.parametrize``) a plain parameter holding the weight it
    computes now. Folding writes into the weight, which a parametrization would recompute. (The
    deprecated hook-based ``torch.nn.utils.weight_norm`` never gets here: torch cannot copy such a
    model, see :func:`fold_bn`.)"""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(layer, "weight"):
        # a deep copy shares the class torch made for the parametrized original, and removing a
        # parametrization deletes the property from that class: give this layer its own first
        cls = type(layer)
        layer.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)


def _fold_pair(new: nn.Module, layer_name: str, bn_name: str) -> bool:
    bn = new.get_submodule(bn_name)
    ss = bn_scale_shift(bn)
    if ss is None:
        return False
    layer = new.get_submodule(layer_name)
    _bake_weight(layer)
    scale, shift = (t.to(layer.weight.device) for t in ss)
    _fold_into(layer, scale, shift)
    _set_submodule(new, bn_name, getattr(bn, "act", None) or nn.Identity())  # a norm+act layer leaves its activation
    return True


def fold_bn(model: nn.Module, example_input: object = None) -> nn.Module:
    """A copy of ``model`` in which every batch norm that directly follows a Conv1d/2d/3d or
    Linear (and is the only consumer of its output) is folded into it and replaced by
    ``nn.Identity`` (by its activation, for a norm+activation layer such as ``BatchNormAct2d``). Eval outputs agree with the original within float rounding.

    Pairs are found by tracing with torch.fx, which sees every use of a layer's output. A model
    fx cannot trace (data- or shape-dependent control flow) only offers adjacency inside
    ``nn.Sequential`` containers, which cannot see a convolution's output also used elsewhere
    (a feature tap, a layer called twice): there each candidate pair is folded only if the
    model's outputs on ``example_input`` stay the same, and without ``example_input`` fold_bn
    refuses rather than guess. Layers that normalize with batch statistics in eval mode (no
    running statistics) are left as they are.

    A layer whose weight is parametrized (``torch.nn.utils.parametrizations.weight_norm`` or
    ``spectral_norm``) gets its current weight as a plain parameter in the copy, then the fold.
    A layer whose weight or bias is tied to another module (one shared Parameter) is not folded.
    A Linear folds into a following BatchNorm1d only if the BN normalizes the Linear's output
    features, i.e. on ``(N, F)`` inputs (on ``(N, L, F)`` BatchNorm1d normalizes ``L``): with
    ``example_input`` every fold is checked on it, and one that changes the outputs is not made.

    Args:
        model: the network, in eval mode (``model.eval()``); it is not modified.
        example_input: an input for the model (a tensor, a tuple of positional arguments or a
            dict of keyword arguments), needed when fx cannot trace it; when given, the folds
            are checked on it.

    Returns:
        The folded copy, in eval mode.

    Raises:
        ValueError: the model is in training mode (folding uses running statistics, so it is
            only valid for inference), fx cannot trace it and no ``example_input`` was given, or
            torch cannot copy it (the deprecated ``torch.nn.utils.weight_norm``).
    """
    if model.training:
        raise ValueError("fold_bn needs a model in eval mode (folding uses running statistics); call model.eval() first, got model.training=True")
    training_bns = [n for n, m in model.named_modules() if _is_bn_like(m) and m.training]
    if training_bns:
        raise ValueError(f"fold_bn needs every batch norm in eval mode; call model.eval() first, got training layers {training_bns[:5]}")
    try:
        new = copy.deepcopy(model)
    except RuntimeError as e:
        raise ValueError(
            f"fold_bn works on a copy, and torch cannot copy this {type(model).__name__} ({e.args[0].split('.')[0]}): "
            "it holds a tensor that is not a leaf of the autograd graph, as a model does that keeps an activation "
            "of a training forward as an attribute (delete it, or run the forward under torch.no_grad()) or uses "
            "the deprecated torch.nn.utils.weight_norm (use torch.nn.utils.parametrizations.weight_norm, or "
            "remove_weight_norm first)"
        ) from e
    pairs, method = find_foldable_pairs(new)
    unchecked = [a for a, _ in pairs if isinstance(new.get_submodule(a), nn.Linear)] if example_input is None else []
    if unchecked:  # shapes are not known without an input: on (N, L, F) with L == F the fold would be silently wrong
        warnings.warn(f"fold_bn: Linear + BatchNorm1d folded without example_input ({', '.join(unchecked[:3])}"
                      f"{', ...' if len(unchecked) > 3 else ''}), assuming (N, F) inputs; on (N, L, F) inputs "
                      "BatchNorm1d normalizes L, not the Linear's features, and the fold is wrong: pass "
                      "example_input= to have every fold checked", stacklevel=2)
    if method == "fx" or not pairs:
        folded = copy.deepcopy(new) if example_input is not None and pairs else new
        for layer_name, bn_name in pairs:
            _fold_pair(folded, layer_name, bn_name)
        if folded is new:
            return new.eval()
        with torch.no_grad():  # checked on the example: a Linear + BatchNorm1d pair on (N, L, F) inputs is not a fold
            if _same_outputs(_run(folded.eval(), example_input), _run(model, example_input)):
                return folded.eval()
    if example_input is None:  # (the fx path with an example whose check failed goes on pair by pair below)
        raise ValueError(
            f"fold_bn: torch.fx cannot trace {type(model).__name__}, so it cannot tell whether the outputs of "
            f"{', '.join(a for a, _ in pairs)} are used anywhere but by their batch norms; give example_input= "
            "(an input for the model) and each fold is kept only if the outputs stay the same"
        )
    with torch.no_grad():
        reference = _run(model, example_input)
        for layer_name, bn_name in pairs:
            trial = copy.deepcopy(new)
            if _fold_pair(trial, layer_name, bn_name) and _same_outputs(_run(trial.eval(), example_input), reference):
                new = trial
    return new.eval()
