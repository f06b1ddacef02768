"""Module swapping without knowing any norm layer: replace matching submodules in place and copy
the parameters and buffers two modules share. The one home of both for ``convert_norm``,
``freeze_bn`` and ``convert_sync_batchnorm`` (a leaf: imports torch only)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

__all__ = ["copy_state", "replace_modules"]


def replace_modules(model: nn.Module, predicate: Callable[[nn.Module], bool], make: Callable[[str, nn.Module], nn.Module]) -> nn.Module:
    """Replace, in place, every submodule for which ``predicate`` holds by ``make(name, module)``.

    Args:
        model: the module tree (modified in place).
        predicate: which modules to replace (their children are not visited).
        make: builds the replacement from the qualified name and the old module.

    Returns:
        ``model``, or the replacement when ``model`` itself matches. A replacement takes the old
        module's mode (train or eval), so a converted model in eval mode stays in eval mode.

    All or nothing: every replacement is made before the first is put in, so when ``make`` raises
    for one layer the model is left exactly as it was. A module that appears at several places
    (one layer shared by two branches) gets one replacement, shared the same way.
    """

    def swap(name: str, old: nn.Module) -> nn.Module:
        return make(name, old).train(old.training)

    if predicate(model):
        return swap("", model)
    made: dict[int, nn.Module] = {}
    plan: list[tuple[nn.Module, str, nn.Module]] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent._modules.items()):  # every place, not named_children's first of each module
            if child is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            if predicate(child):
                if id(child) not in made:
                    made[id(child)] = swap(full, child)
                plan.append((parent, name, made[id(child)]))
            else:
                visit(child, full)

    visit(model, "")
    for parent, name, new in plan:
        setattr(parent, name, new)
    return model


def copy_state(old: nn.Module, new: nn.Module, where: str = "") -> None:
    """Give ``new`` every parameter and buffer of ``old`` with the same name and shape.

    A layer with a ``torch.nn.utils.parametrize`` parametrization is refused (its weight lives in
    ``parametrizations.weight.original`` and would silently be left at its initial value), naming
    ``where`` (the layer's qualified name) and the way out.

    A parameter whose dtype and device also match is the same ``nn.Parameter`` object afterwards
    (as torch's ``SyncBatchNorm.convert_sync_batchnorm`` does), so an optimizer built before the
    conversion goes on updating it; otherwise, and for buffers, the values are copied, and the new
    parameter takes the old one's ``requires_grad``.
    """
    if parametrize.is_parametrized(old):
        names = ", ".join(old.parametrizations.keys())  # type: ignore[union-attr]
        raise ValueError(
            f"cannot convert {where or 'model'} ({type(old).__name__}): its {names} is parametrized "
            "(torch.nn.utils.parametrize), which the new layer would not carry over; remove the parametrization "
            "first (parametrize.remove_parametrizations(layer, name, leave_parametrized=True)) and register it "
            "again on the converted layer; nothing was converted")
    old_params = dict(old.named_parameters())
    for key, p in list(new.named_parameters()):
        src = old_params.get(key)
        if src is not None and src.shape == p.shape and src.dtype == p.dtype and src.device == p.device:
            owner, _, leaf = key.rpartition(".")
            setattr(new.get_submodule(owner) if owner else new, leaf, src)
    old_sd = old.state_dict()
    with torch.no_grad():
        for key, value in new.state_dict().items():
            src = old_sd.get(key)
            if src is not None and src.shape == value.shape and src.data_ptr() != value.data_ptr():
                value.copy_(src)
    for key, p in new.named_parameters():
        if key in old_params:
            p.requires_grad_(old_params[key].requires_grad)
