"""Module swapping without knowing any norm layer: replace matching submodules in place and copy
the parameters and buffers two modules share. The one home of both for ``convert_norm``,
``freeze_bn`` and ``convert_sync_batchnorm`` (a leaf: imports torch only)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

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
    """

    def swap(name: str, old: nn.Module) -> nn.Module:
        return make(name, old).train(old.training)

    if predicate(model):
        return swap("", model)

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            full = f"{prefix}.{name}" if prefix else name
            if predicate(child):
                setattr(parent, name, swap(full, child))
            else:
                visit(child, full)

    visit(model, "")
    return model


def copy_state(old: nn.Module, new: nn.Module) -> None:
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
