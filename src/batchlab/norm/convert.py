"""Swap normalization layers in a model: ``convert_norm`` (e.g. BN -> GroupNorm), ``freeze_bn``
(BN -> FrozenBatchNorm) and ``unfreeze_bn`` (back).

What a converted layer inherits from the batch norm it replaces comes from the registry entry
of the target name (:attr:`batchlab.norm.registry.NormEntry.inherits`), or, for a class or a
partial, from its constructor's parameters.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from batchlab.norm import _swap
from batchlab.norm._swap import replace_modules
from batchlab.norm.interop import to_caffe_layer
from batchlab.norm.layers import FrozenBatchNorm, batchnorm_dims, is_batchnorm
from batchlab.norm.norm_act import is_norm_act
from batchlab.norm.registry import INHERITABLE, NormSpec, create_norm, norm_entry

__all__ = ["convert_norm", "freeze_bn", "unfreeze_bn", "replace_modules", "batchnorm_dims"]


def _inherited_keys(to: NormSpec) -> tuple[str, ...]:
    """Settings of the old layer that the new one takes over (those its constructor accepts)."""
    if to is None:
        return ()
    if isinstance(to, str):
        return norm_entry(to).inherits
    target = to.func if isinstance(to, functools.partial) else to
    is_bn = isinstance(target, type) and issubclass(target, nn.modules.batchnorm._BatchNorm)
    keys = INHERITABLE if is_bn else ("eps", "affine", "bias")
    try:
        params = inspect.signature(to).parameters
    except (TypeError, ValueError):
        return ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return keys
    return tuple(k for k in keys if k in params)


def _refuse_lazy(verb: str, name: str, old: nn.Module) -> None:
    """A lazy norm (``nn.LazyBatchNorm2d``) before its first forward has no channel count yet."""
    if isinstance(getattr(old, "weight", None), nn.parameter.UninitializedParameter) or isinstance(
            getattr(old, "running_mean", None), nn.parameter.UninitializedBuffer):
        raise ValueError(f"cannot {verb} {name or 'model'} ({type(old).__name__}): a lazy module not initialized yet; "
                         "run one forward pass first so that its num_features is known")


def _plain_norm(m: nn.Module) -> bool:
    """A batch norm whose output is the norm's: norm+activation layers (``BatchNormAct2d``) are
    left alone by default, since a replacement without the activation would change the model."""
    return is_batchnorm(m) and not is_norm_act(m)


def _setting(old: nn.Module, key: str) -> tuple[bool, Any]:
    """``(present, value)`` of one inheritable setting; defaults (tracking on, a learned shift)
    are not passed, so targets without the keyword still build."""
    if key == "bias":
        if not getattr(old, "affine", False) or getattr(old, "bias", None) is not None:
            return False, None
        return True, False
    if not hasattr(old, key) or (key == "track_running_stats" and getattr(old, key)):
        return False, None
    return True, getattr(old, key)


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
    (:func:`batchnorm_dims`). The old layer's settings listed by the target's registry entry
    (``NormEntry.inherits``: e.g. eps, affine and ``bias=False`` for "group"; also momentum and
    ``track_running_stats=False`` for the batch family) are inherited unless given in ``kw``; for
    a class or a partial, those of eps, affine, bias (and, for a batch-norm class, momentum and
    track_running_stats) that its constructor accepts. With ``copy_state`` every parameter and buffer
    present in both layers with the same shape is copied (so BN -> SyncBN/Renorm keeps running
    statistics, BN -> GroupNorm keeps gamma and beta). Device, dtype, ``requires_grad`` and
    train/eval mode are kept.

    Args:
        model: the module tree (modified in place).
        to: a registered norm name, a class or a partial taking the channel count first.
        predicate: which modules to replace (default: every batch norm except norm+activation
            layers such as ``BatchNormAct2d``, whose activation a replacement would drop).
        copy_state: copy matching parameters and buffers.
        kw: passed to the new layers (e.g. ``num_groups=32``).

    Returns:
        ``model`` (a new module when ``model`` itself is replaced).
    """
    pred = predicate or _plain_norm
    target = to.lower() if isinstance(to, str) else None
    if target is not None and target.endswith("_act") and "act_layer" not in kw and "apply_act" not in kw:
        raise ValueError(
            f"convert_norm(model, {to!r}) would put an activation (ReLU by default) after every converted norm, "
            "on top of the model's own activations: pass act_layer= (e.g. act_layer=None for none, or the activation "
            "that follows the norm, which you then remove from the model yourself); nothing was converted")

    def make(name: str, old: nn.Module) -> nn.Module:
        _refuse_lazy("convert", name, old)
        if target in ("frozen", "caffe"):
            return _with_statistics(name, old)
        last_dim = isinstance(old, (nn.LayerNorm, nn.RMSNorm))
        new = _for_last_dim_norm(name, old) if last_dim else _for_batch_norm(name, old)
        ref = next(iter(list(old.parameters()) + list(old.buffers())), None)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        if copy_state:
            _swap.copy_state(old, new, name)
        return new

    def _for_batch_norm(name: str, old: nn.Module) -> nn.Module:
        num = getattr(old, "num_features", None) or getattr(old, "num_channels", None)
        if num is None:
            raise ValueError(
                f"cannot convert {name or 'model'} ({type(old).__name__}): convert_norm replaces batch norms (which "
                "have num_features) and nn.LayerNorm / nn.RMSNorm over the last dimension, and this layer is neither; "
                "for a norm class of your own use batchlab.norm.replace_modules(model, predicate, make)")
        args = dict(kw)
        for key in _inherited_keys(to):
            present, value = _setting(old, key)
            if present:
                args.setdefault(key, value)
        # track_running_stats switched off after construction: torch's layer keeps its buffers and still
        # normalizes with them in eval mode; build the new layer with them, then switch it off the same way
        switched_off = (getattr(old, "track_running_stats", True) is False and getattr(old, "running_mean", None) is not None
                        and args.get("track_running_stats") is False and "track_running_stats" not in kw)
        if switched_off:
            args["track_running_stats"] = True
        new = create_norm(to, num, dims=batchnorm_dims(old), **args)
        if switched_off and hasattr(new, "track_running_stats"):
            new.track_running_stats = False
        if getattr(old, "track_running_stats", True) is False and getattr(new, "track_running_stats", False) is True:
            raise ValueError(
                f"cannot convert {name or 'model'} ({type(old).__name__} with track_running_stats=False, which "
                f"normalizes with batch statistics in eval mode) to {to!r}: the new layer keeps running statistics "
                "and normalizes with them in eval mode, which would change the model's eval outputs"
            )
        return new

    def _for_last_dim_norm(name: str, old: nn.Module) -> nn.Module:
        # a LayerNorm / RMSNorm over the last dimension (a transformer's): only a norm of the
        # same dimension can replace it ("layer", "rms")
        where = f"{name or 'model'} ({type(old).__name__})"
        for base in (nn.LayerNorm, nn.RMSNorm):
            if isinstance(old, base) and type(old).forward is not base.forward:
                raise ValueError(f"cannot convert {where}: it has its own forward (e.g. a channels-first LayerNorm2d "
                                 "that permutes), which a replacement would drop")
        shape = tuple(old.normalized_shape)
        if len(shape) != 1:
            raise ValueError(f"cannot convert {where}: it normalizes over {shape}, more than the last dimension")
        args = dict(kw)
        args.setdefault("affine", bool(old.elementwise_affine))
        if "eps" in _inherited_keys(to) and getattr(old, "eps", None) is not None:
            args.setdefault("eps", old.eps)
        if "bias" in _inherited_keys(to) and old.elementwise_affine and getattr(old, "bias", None) is None:
            args.setdefault("bias", False)
        new = create_norm(to, shape[0], dims=0, **args)
        if not isinstance(new, (nn.LayerNorm, nn.RMSNorm)):
            raise ValueError(f"cannot convert {where} to {to!r}: it normalizes the last dimension of its input, "
                             f"which only 'layer' and 'rms' do (got {type(new).__name__})")
        return new

    def _with_statistics(name: str, old: nn.Module) -> nn.Module:
        # "frozen" and "caffe" normalize with the old layer's running statistics (and, frozen, its
        # affine): build them from that state, whose buffers have other names than a BatchNorm's
        where = f"{name or 'model'} ({type(old).__name__})"
        if not is_batchnorm(old) or getattr(old, "running_mean", None) is None:
            raise ValueError(f"cannot convert {where} to {to!r}: it needs a batch norm with running statistics "
                             "(track_running_stats=True), which it normalizes with")
        if target == "frozen":
            return FrozenBatchNorm.from_batchnorm(old, kw.get("eps"))
        layer, gamma, beta = to_caffe_layer(old)
        if not (bool((gamma == 1).all()) and bool((beta == 0).all())):
            raise ValueError(
                f"cannot convert {where} to 'caffe': Caffe's BatchNorm has no affine (gamma and beta live in a "
                "following Scale layer), and this layer's gamma/beta are not 1/0; use "
                "batchlab.norm.interop.to_caffe_layer(bn), which returns the layer and the Scale's gamma and beta")
        ref = old.running_mean
        return layer.to(device=ref.device).train(old.training)

    _refuse_in_torch_transformer_layers(model, pred, to, _for_last_dim_norm)  # before anything is replaced
    trained = [n for n, m in model.named_modules() if pred(m) and _has_trained_statistics(m)]
    out = replace_modules(model, pred, make)
    if trained and not (isinstance(to, str) and to.lower() in _KEEPS_OUTPUTS):
        warnings.warn(f"convert_norm: {len(trained)} trained batch norm(s) ({', '.join(trained[:3])}"
                      f"{', ...' if len(trained) > 3 else ''}) replaced by {to!r}, another normalization: the model's "
                      "outputs change, so train or fine-tune it after the conversion", stacklevel=2)
    return out


#: targets that normalize with a batch norm's statistics the same way (a trained model's eval outputs stay)
_KEEPS_OUTPUTS = ("batch", "batch_act", "ghost", "renorm", "sync", "frozen", "caffe")


def _has_trained_statistics(m: nn.Module) -> bool:
    """A batch norm that has seen training batches (its running statistics are no longer a fresh layer's)."""
    n = getattr(m, "num_batches_tracked", None)
    return is_batchnorm(m) and n is not None and int(n) > 0


def _refuse_in_torch_transformer_layers(model: nn.Module, pred: Callable[[nn.Module], bool], to: NormSpec,
                                        build: Callable[[str, nn.Module], nn.Module]) -> None:
    """torch's TransformerEncoderLayer / DecoderLayer compute LayerNorm from their norms' weight and
    bias themselves on the fused inference path: a norm of another kind there would not be what runs."""
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, nn.LayerNorm) and pred(child):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                new = build(name, child)
                if not isinstance(new, nn.LayerNorm):
                    raise ValueError(
                        f"cannot convert {name} (LayerNorm) to {to!r}: torch's {type(parent).__name__} computes "
                        "LayerNorm from its norms' weight and bias itself on its fused inference path, so another "
                        "norm there would not be what runs; leave those norms out (predicate=) or write the block "
                        "with the norm you want (nothing was converted)")


def freeze_bn(model: nn.Module, eps: float | None = None) -> nn.Module:
    """Freeze every batch-norm layer: statistics and affine fixed, eval-mode normalization,
    also after ``model.train()`` (each layer becomes a :class:`FrozenBatchNorm`, whose weight
    and bias are buffers and whose forward ignores the mode), in place. Norm+activation layers
    (``BatchNormAct2d``) are left as they are: a frozen layer would drop the activation.

    Args:
        model: the module tree (modified in place).
        eps: None keeps each layer's eps (the one its statistics were used with); a number
            overrides it (e.g. 0.0 for weights trained with torchvision's old frozen layers).

    Returns:
        ``model`` (a new module when ``model`` itself is a batch norm).

    Raises:
        ValueError: a batch norm has no running statistics (``track_running_stats=False``).
    """

    def make(name: str, old: nn.Module) -> nn.Module:
        _refuse_lazy("freeze", name, old)
        if getattr(old, "running_mean", None) is None:
            raise ValueError(
                f"freeze_bn needs running statistics; {name or 'model'} ({type(old).__name__}) has track_running_stats=False"
            )
        return FrozenBatchNorm.from_batchnorm(old, eps)

    return replace_modules(model, _plain_norm, make)


def unfreeze_bn(model: nn.Module, momentum: float | None = 0.1) -> nn.Module:
    """Turn every :class:`FrozenBatchNorm` back into a trainable ``BatchNorm1d/2d/3d`` (see
    :meth:`FrozenBatchNorm.unfreeze`), in place.

    Args:
        model: the module tree (modified in place).
        momentum: momentum of the new layers.

    Returns:
        ``model`` (a new module when ``model`` itself is frozen).
    """
    return replace_modules(model, lambda m: isinstance(m, FrozenBatchNorm), lambda _n, m: m.unfreeze(momentum))
