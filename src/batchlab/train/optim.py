"""Optimizers, learning-rate scaling rules and schedules."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from batchlab.tasks.optimizers import OPTIMIZERS, make_optimizer, optimizer_name, unwrap_optimizer  # noqa: F401  (re-exported)
from batchlab.train.config import ADAM_RULES, LR_RULES, SCALE_RULES, SCHEDULES


def scale_lr(lr: float, from_batch: int, to_batch: int, rule: str = "linear") -> float:
    """The learning rate for ``to_batch`` given one tuned for ``from_batch``.

    The LR part of :func:`scale_hparams` (one home for the rules), for a rule in
    :data:`LR_RULES`: ``"linear"``: lr * to/from (Goyal et al. 2017, for SGD); ``"sqrt"``:
    lr * sqrt(to/from) (Malladi et al. 2022, for Adam); ``"none"``: unchanged.
    """
    if rule not in LR_RULES:
        raise ValueError(f"rule must be one of {', '.join(LR_RULES)}; got {rule!r}")
    return scale_hparams(None, {"lr": lr}, from_batch, to_batch, rule)["lr"]


def default_lr_rule(optimizer: str) -> str:
    """Linear scaling for SGD variants, square-root for Adam variants, none for L-BFGS."""
    if optimizer in ("adam", "adamw"):
        return "sqrt"
    if optimizer == "lbfgs":
        return "none"
    return "linear"


def default_hparam_rule(optimizer: str) -> str:
    """The co-scaling rule :func:`scale_hparams` uses when none is given: Adam(W) keeps beta2's
    half-life in examples (``"adam-halflife"``, Marek et al. 2025), the others as :func:`default_lr_rule`."""
    if optimizer in ("adam", "adamw"):
        return "adam-halflife"
    return default_lr_rule(optimizer)


def scale_hparams(
    optimizer: str | torch.optim.Optimizer | None,
    hparams: Mapping[str, Any],
    from_batch: int,
    to_batch: int,
    rule: str | None = None,
) -> dict[str, Any]:
    """The optimizer hyperparameters for ``to_batch`` given ones tuned for ``from_batch``.

    With ``k = to_batch / from_batch``:

    - ``"linear"`` (Goyal et al. 2017, "Accurate, Large Minibatch SGD"; for SGD): lr * k.
    - ``"sqrt"``: lr * sqrt(k), nothing else (OLMo's batch-size warmup, Merrill et al. 2025).
    - ``"adam-sde"`` (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
      Algorithms"; Adam(W) only): lr * sqrt(k), ``(1 - beta) * k`` for both betas and eps / sqrt(k).
      For large k, ``(1 - beta) * k`` would pass 1; it is clipped there (beta' >= 0: no averaging,
      the rule's limit), which is far outside where the SDE approximation holds.
    - ``"adam-halflife"`` (Marek et al. 2025, arXiv 2507.07101; Adam(W) only): lr * sqrt(k) and
      ``beta2' = beta2 ** k``, so the second-moment average keeps its half-life in *examples*
      (``beta2 ** (1/B)`` per example); beta1 and eps unchanged.
    - ``"none"``: unchanged.

    Args:
        optimizer: a name from :data:`OPTIMIZERS`, a torch optimizer (its class decides), or None
            (only the LR rules then).
        hparams: ``{"lr": ...}`` and, for Adam, optionally ``"betas"`` (a pair) and ``"eps"``;
            other keys (weight decay, momentum) are copied unchanged.
        from_batch, to_batch: positive integers.
        rule: one of :data:`SCALE_RULES`; None: :func:`default_hparam_rule` of the optimizer
            (``"linear"`` when the optimizer is unknown).

    Returns:
        A new plain dict (``betas`` as a tuple); the input is not modified. ``k = 1`` returns the
        same values.
    """
    name = optimizer_name(optimizer)
    if rule is None:
        rule = default_hparam_rule(name) if name is not None else "linear"
    if rule not in SCALE_RULES:
        raise ValueError(f"rule must be one of {', '.join(SCALE_RULES)}; got {rule!r}")
    if rule in ADAM_RULES and name not in ("adam", "adamw"):
        raise ValueError(f"rule {rule!r} is for Adam(W) (optimizer 'adam' or 'adamw'); got optimizer {name!r}")
    for arg, b in (("from_batch", from_batch), ("to_batch", to_batch)):
        if not isinstance(b, numbers.Integral) or isinstance(b, bool) or b < 1:
            raise ValueError(f"{arg} must be a positive integer, got {b!r}")
    if not isinstance(hparams, Mapping) or "lr" not in hparams:
        raise ValueError(f"hparams must be a mapping with an 'lr' entry, got {hparams!r}")
    lr = hparams["lr"]
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    out = dict(hparams)
    if "betas" in out:
        betas = out["betas"]
        if (isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2
                or not all(isinstance(b, numbers.Real) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        out["betas"] = (float(betas[0]), float(betas[1]))
    if "eps" in out:
        eps = out["eps"]
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (eps >= 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    k = to_batch / from_batch
    if rule == "none" or k == 1:
        return out
    out["lr"] = float(lr) * (k if rule == "linear" else math.sqrt(k))
    if rule == "adam-sde":
        if "betas" in out:
            out["betas"] = tuple(max(0.0, 1.0 - (1.0 - b) * k) for b in out["betas"])
        if "eps" in out:
            out["eps"] = float(out["eps"]) / math.sqrt(k)
    elif rule == "adam-halflife" and "betas" in out:
        b1, b2 = out["betas"]
        out["betas"] = (b1, b2**k)
    return out


def optimizer_hparams(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The scalable hyperparameters of ``optimizer``'s first parameter group: lr and, where the
    optimizer has them, betas and eps (the input :func:`scale_hparams` takes)."""
    return group_hparams(optimizer)[0]


def group_hparams(optimizer: torch.optim.Optimizer | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every parameter group's lr and, where it has them, betas and eps (per-group values, e.g. a
    head with its own Adam betas): what :func:`scale_group_hparams` scales and :func:`set_hparams`
    takes back. ``optimizer``: a torch optimizer, or its ``param_groups`` (a saved state_dict's)."""
    groups = getattr(optimizer, "param_groups", optimizer)  # wrapped optimizers (Accelerate's, Lightning's) too
    return [{k: (tuple(g[k]) if k == "betas" else g[k]) for k in ("lr", "betas", "eps") if k in g} for g in groups]


def scale_group_hparams(optimizer: str | torch.optim.Optimizer | None, groups: Sequence[Mapping[str, Any]],
                        from_batch: int, to_batch: int, rule: str | None = None) -> list[dict[str, Any]]:
    """:func:`scale_hparams` applied to each parameter group's own values (``groups``, as
    :func:`group_hparams` gives them), so a group with other betas keeps its own, co-scaled; a group
    at LR 0 (frozen, or at the start of a warmup) stays at 0."""
    out = []
    for g in groups:
        lr = g.get("lr", 0.0)
        hp = scale_hparams(optimizer, {**g, "lr": lr if lr and lr > 0 else 1.0}, from_batch, to_batch, rule)
        if not (lr and lr > 0):
            hp["lr"] = lr
        out.append(hp)
    return out


def lr_ratios(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each parameter group's LR relative to the first group's (1.0 for every group when the
    first group's LR is 0): what :func:`set_hparams` keeps."""
    groups = optimizer.param_groups
    ref = float(groups[0]["lr"]) if groups else 0.0
    return [float(g["lr"]) / ref if ref else 1.0 for g in groups]


def lr_schedulers(scheduler: Any) -> list[Any]:
    """``scheduler`` and, for ``SequentialLR`` / ``ChainedScheduler``, the schedulers inside it, that
    keep ``base_lrs`` (the LRs their factors multiply); none for None.

    Raises:
        TypeError: ``scheduler`` is neither None nor a torch LR scheduler.
    """
    if scheduler is None:
        return []
    if isinstance(scheduler, (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)):
        raise TypeError(f"scheduler: {type(scheduler).__name__} computes its LR from max_lr/base_lr of its own, not "
                        "from base_lrs, so batchlab cannot co-scale it; build it again with the co-scaled LR as "
                        "max_lr (e.g. schedule.hparams_at(...)['lr']) at each batch switch")
    inner = getattr(scheduler, "_schedulers", None)
    out = [scheduler] if hasattr(scheduler, "base_lrs") else []
    out += [s for sub in (inner or []) for s in lr_schedulers(sub)]
    if not out:
        raise TypeError(f"scheduler must be a torch LR scheduler (with base_lrs), got {type(scheduler).__name__}")
    return out


def set_hparams(optimizer: torch.optim.Optimizer, hparams: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                ratios: Sequence[float] | None = None, scheduler: Any = None) -> None:
    """Write lr, betas and eps of ``hparams`` into every parameter group that has them. ``lr`` is
    the first group's (as :func:`optimizer_hparams` reads it); other groups keep their LR ratio to
    it (``ratios``, default :func:`lr_ratios` now), so per-group learning rates (a smaller LR
    for a pretrained backbone, layer-wise decay) are scaled, not overwritten.

    With a torch LR ``scheduler`` driving the optimizer, ``lr`` is the base LR the schedule's factor
    multiplies (what the scheduler was built with): each group's ``base_lrs`` entry and
    ``initial_lr`` become the new base (ratios default to the scheduler's base ratios) and the
    current LR is rescaled by new base / old base, so the warmup or decay goes on from the new base
    instead of the scheduler's next ``step()`` overwriting it.

    ``hparams`` may also be one mapping per parameter group (:func:`scale_group_hparams`): each
    group then gets its own lr, betas and eps, and ``ratios`` is not used."""
    groups = optimizer.param_groups
    if isinstance(hparams, Sequence) and not isinstance(hparams, (str, bytes)):
        per = list(hparams)
        if len(per) != len(groups):
            raise ValueError(f"hparams: one mapping per parameter group ({len(groups)}), got {len(per)}")
        first = per[0].get("lr")
        if first:  # the LRs through the one-mapping path (schedulers' bases), each group's ratio to the first
            set_hparams(optimizer, {"lr": first}, [p.get("lr", first) / first for p in per], scheduler)
        for group, hp in zip(groups, per):
            if not first and "lr" in hp and "lr" in group:
                group["lr"] = hp["lr"]
            if "betas" in hp and "betas" in group:
                group["betas"] = tuple(hp["betas"])
            if "eps" in hp and "eps" in group:
                group["eps"] = hp["eps"]
        return
    scheds = lr_schedulers(scheduler)
    if "lr" in hparams:
        if ratios is None and scheds and scheds[0].base_lrs and scheds[0].base_lrs[0]:
            ratios = [b / scheds[0].base_lrs[0] for b in scheds[0].base_lrs]
        if ratios is None and groups and not groups[0].get("lr") and any(g.get("lr") for g in groups[1:]):
            raise ValueError("the first parameter group's LR is 0 and another's is not, so their ratio to it is "
                             "unknown (a frozen first group would be unfrozen): pass ratios= (lr_ratios taken "
                             "earlier) or one mapping per group (group_hparams(optimizer))")
        ratios = lr_ratios(optimizer) if ratios is None else list(ratios)
        if len(ratios) != len(groups):
            raise ValueError(f"ratios must have one entry per parameter group ({len(groups)}), got {len(ratios)}")
    for i, group in enumerate(groups):
        if "lr" in hparams and "lr" in group and scheds:
            new = hparams["lr"] * ratios[i]
            old = scheds[0].base_lrs[i]
            group["lr"] = group["lr"] * (new / old) if old else new
            group["initial_lr"] = new
            for sch in scheds:
                sch.base_lrs[i] = new
        elif "lr" in hparams and "lr" in group:
            group["lr"] = hparams["lr"] * ratios[i]
        if "betas" in hparams and "betas" in group:
            group["betas"] = tuple(hparams["betas"])
        if "eps" in hparams and "eps" in group:
            group["eps"] = hparams["eps"]


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


def scheduled_batch(base: int, stages: Sequence[tuple[int, int]], examples: int) -> int:
    """The batch of a batch-size schedule after ``examples`` training examples: ``base`` before the
    first stage, then the batch of the last ``(threshold, batch)`` stage with threshold <= examples."""
    b = base
    for threshold, batch in stages:
        if examples < threshold:
            break
        b = batch
    return b
