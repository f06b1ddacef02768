"""Optimizers, learning-rate scaling rules and schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from batchlab.train.config import OPTIMIZERS, SCHEDULES

LR_RULES = ("linear", "sqrt", "none")


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
            raise ValueError("weight_decay is not supported with optimizer 'lbfgs'; got weight_decay={weight_decay}")
        return torch.optim.LBFGS(params, lr=lr, max_iter=lbfgs_max_iter, history_size=20, line_search_fn="strong_wolfe")
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")


def scale_lr(lr: float, from_batch: int, to_batch: int, rule: str = "linear") -> float:
    """The learning rate for ``to_batch`` given one tuned for ``from_batch``.

    ``"linear"``: lr * to/from (Goyal et al. 2017, for SGD); ``"sqrt"``: lr * sqrt(to/from)
    (Malladi et al. 2022, for Adam); ``"none"``: unchanged.
    """
    if rule not in LR_RULES:
        raise ValueError(f"rule must be one of {', '.join(LR_RULES)}; got {rule!r}")
    for name, b in (("from_batch", from_batch), ("to_batch", to_batch)):
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise ValueError(f"{name} must be a positive integer, got {b!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    ratio = to_batch / from_batch
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    return lr


def default_lr_rule(optimizer: str) -> str:
    """Linear scaling for SGD variants, square-root for Adam variants, none for L-BFGS."""
    if optimizer in ("adam", "adamw"):
        return "sqrt"
    if optimizer == "lbfgs":
        return "none"
    return "linear"


def lr_factor(
    schedule: str,
    progress: float,
    step: int,
    *,
    warmup_steps: int = 0,
    milestones: tuple[float, ...] = (),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base LR.

    Args:
        schedule: one of :data:`SCHEDULES`.
        progress: fraction of the budget consumed, in [0, 1].
        step: optimizer steps taken so far (for warmup).
        warmup_steps: linear warmup length; the factor rises from 1/warmup_steps to 1.
        milestones: for "step", fractions of the budget at which the LR is multiplied by gamma.
    """
    if schedule == "constant":
        f = 1.0
    elif schedule == "step":
        f = gamma ** sum(1 for m in milestones if progress >= m)
    elif schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    else:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if warmup_steps and step < warmup_steps:
        f *= (step + 1) / warmup_steps
    return f


def batch_factor(progress: float, milestones: tuple[float, ...], factor: int) -> int:
    """Batch-size multiplier after the growth milestones passed at ``progress`` (Smith et al. 2018)."""
    return factor ** sum(1 for m in milestones if progress >= m)
