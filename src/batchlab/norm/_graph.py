"""Which module feeds which: torch.fx tracing with a fall back to ``nn.Sequential`` adjacency.

Used by ``fold_bn`` (conv/linear -> BN pairs) and ``bn_health`` (the activation after a BN).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["direct_successors", "activation_after"]

# Activation name for modules and functions.
_ACT_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Hardtanh: "hardtanh",
    nn.LeakyReLU: "leaky_relu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.ELU: "elu",
    nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Mish: "mish",
}
_ACT_FUNCS = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    F.hardtanh: "hardtanh",
    F.leaky_relu: "leaky_relu",
    F.gelu: "gelu",
    F.silu: "silu",
    F.elu: "elu",
    F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid",
    F.mish: "mish",
}
_ACT_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}


class _Tracer(fx.Tracer):
    """Keeps batchlab's normalization layers as leaves (their forwards branch on the mode)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m).__module__.startswith("batchlab.norm") or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> fx.Graph | None:
    try:
        return _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - untraceable models (data-dependent control flow) fall back
        return None


def direct_successors(model: nn.Module) -> tuple[dict[str, tuple[str, str] | None], str]:
    """For each module called exactly once, what consumes its output when that is a single
    consumer: ``("module", name)``, ``("function", name)`` for known activations, or None.

    Returns:
        ``(mapping, method)`` with method "fx" or "sequential" (adjacency inside
        ``nn.Sequential`` containers, used when tracing fails).
    """
    graph = _trace(model)
    out: dict[str, tuple[str, str] | None] = {}
    if graph is not None:
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        modules = dict(model.named_modules())
        for node in graph.nodes:
            if node.op != "call_module" or calls[node.target] != 1:
                continue
            users = list(node.users)
            nxt: tuple[str, str] | None = None
            if len(users) == 1:
                u = users[0]
                # a stateless activation module may be called at several places (torchvision's
                # BasicBlock calls one self.relu twice): it is still what this output goes through
                reused_act = u.op == "call_module" and activation_name(modules.get(str(u.target))) is not None
                if u.op == "call_module" and (calls[u.target] == 1 or reused_act) and u.args and u.args[0] is node:
                    nxt = ("module", str(u.target))
                elif u.op == "call_function" and u.target in _ACT_FUNCS and u.args and u.args[0] is node:
                    nxt = ("function", _ACT_FUNCS[u.target])
                elif u.op == "call_method" and u.target in _ACT_METHODS and u.args and u.args[0] is node:
                    nxt = ("function", _ACT_METHODS[str(u.target)])
            out[str(node.target)] = nxt
        return out, "fx"
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            kids = list(mod.named_children())
            for (a, _), (b, _) in zip(kids, kids[1:]):
                pa = f"{name}.{a}" if name else a
                pb = f"{name}.{b}" if name else b
                out[pa] = ("module", pb)
    return out, "sequential"


def activation_name(module: nn.Module | None) -> str | None:
    """The activation kind of a module, or None."""
    for cls, name in _ACT_MODULES.items():
        if isinstance(module, cls):
            return name
    return None


def activation_after(model: nn.Module, successors: dict[str, tuple[str, str] | None], name: str) -> tuple[str | None, nn.Module | None]:
    """The activation applied to module ``name``'s output: ``(kind, module or None)``."""
    nxt = successors.get(name)
    if nxt is None:
        return None, None
    kind, target = nxt
    if kind == "function":
        return target, None
    mod = model.get_submodule(target)
    return activation_name(mod), mod
