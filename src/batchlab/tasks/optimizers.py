"""The optimizers a task trains with: the named ones batchlab builds, and what kind a user's own
optimizer is (the kind picks the batch-size scaling rules in :mod:`batchlab.train.optim`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

#: the optimizers batchlab builds by name
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "lbfgs")


def make_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    lbfgs_max_iter: int = 5,
) -> torch.optim.Optimizer:
    """Build one of :data:`OPTIMIZERS`.

    ``"sgd"`` is plain SGD, ``"momentum"`` heavy-ball SGD and ``"nesterov"`` Nesterov SGD, all
    with coupled (L2) weight decay; ``"adamw"`` has decoupled weight decay; ``"lbfgs"`` uses a
    strong-Wolfe line search and ``lbfgs_max_iter`` inner iterations per batch.
    """
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "lbfgs":
        if weight_decay:
            raise ValueError(f"weight_decay is not supported with optimizer 'lbfgs' (allowed: 0); got {weight_decay!r}")
        return torch.optim.LBFGS(params, lr=lr, max_iter=lbfgs_max_iter, history_size=20, line_search_fn="strong_wolfe")
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a wrapper: Accelerate's ``AcceleratedOptimizer`` (``.optimizer``),
    Lightning's ``LightningOptimizer`` (``._optimizer``); anything else is returned as it is."""
    for _ in range(4):  # a wrapper of a wrapper, at most a few deep
        inner = next((o for o in (getattr(optimizer, "optimizer", None), getattr(optimizer, "_optimizer", None))
                      if isinstance(o, torch.optim.Optimizer) and o is not optimizer), None)
        if inner is None:
            return optimizer
        optimizer = inner
    return optimizer


def optimizer_name(optimizer: str | torch.optim.Optimizer | None) -> str | None:
    """A name from :data:`OPTIMIZERS` for a name or a torch optimizer (SGD with momentum: "momentum"
    or "nesterov"; an unknown class: None, which the LR-only rules accept)."""
    if optimizer is None or isinstance(optimizer, str):
        if optimizer is not None and optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)} or a torch optimizer; got {optimizer!r}")
        return optimizer
    optimizer = unwrap_optimizer(optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a name ({', '.join(OPTIMIZERS)}) or a torch.optim.Optimizer; "
                        f"got {type(optimizer).__name__}")
    if isinstance(optimizer, torch.optim.AdamW):
        return "adamw"
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax)):
        return "adam"
    cls = type(optimizer).__name__.lower()
    if "adam" in cls:  # FusedAdam, AdamW8bit, DeepSpeedCPUAdam, ...: Adam's rules (lr, betas, eps)
        return "adamw" if "adamw" in cls else "adam"
    if isinstance(optimizer, torch.optim.LBFGS):
        return "lbfgs"
    if isinstance(optimizer, torch.optim.SGD):
        group = optimizer.param_groups[0]
        if group.get("nesterov"):
            return "nesterov"
        return "momentum" if group.get("momentum", 0) else "sgd"
    return None
