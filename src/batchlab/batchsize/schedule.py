"""Batch-size schedules and LR warmup.

- :class:`BatchSizeSchedule`: the batch as a step function of training progress, in one of two
  forms. *Milestones* (fractions of the budget, one growth factor): grow the batch instead of
  decaying the LR (Smith et al. 2018, "Don't Decay the Learning Rate, Increase the Batch Size":
  multiplying B by a factor where the LR would be divided by it gives the same curves with fewer
  parameter updates). *Stages* (examples seen, batch): a batch-size warmup that follows the measured
  critical batch (Merrill et al. 2025, "Critical Batch Size Revisited": OLMo-1B reached slightly
  better loss with 43% fewer gradient steps), the LR and Adam hyperparameters co-scaled by
  :func:`batchlab.train.scale_hparams` (:meth:`BatchSizeSchedule.from_critical_batch`).
- :func:`warmup_factor` / :func:`goyal_warmup_steps`: linear warmup of the scaled LR
  (Goyal et al. 2017 use 5 epochs when scaling the LR linearly with the batch).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from batchlab.train import SCALE_RULES, TrainConfig, scale_group_hparams, scale_hparams, scale_lr, set_hparams  # noqa: F401  (scale_lr re-exported by the package)
from batchlab.train.optim import scheduled_batch

_SMITH_MILESTONES = (0.5, 0.75)


@dataclass
class BatchSizeSchedule:
    """The batch as a step function of progress; the hyperparameters co-scaled with it.

    Two forms (give one):

    - ``milestones``: batch ``base * factor ** k`` after the k-th milestone, fractions of the
      training budget (default ``(0.5, 0.75)`` when no stages are given);
    - ``stages``: ``(examples seen, batch)`` pairs; from that many examples on, the batch is the
      pair's (``base`` before the first). Built from a measurement by :meth:`from_critical_batch`.

    Use it three ways:

    - with :func:`batchlab.train.fit`: ``schedule.apply(config)`` sets ``batch_growth`` /
      ``growth_factor`` (milestones) or ``batch_schedule`` / ``batch_scale_rule`` (stages) of a
      :class:`TrainConfig`; ``fit`` then co-scales LR, Adam betas and eps at every switch;
    - as pure functions: ``batch_at(examples)``, ``hparams_at(examples, hparams, optimizer)``,
      ``schedule(progress)``, ``at_step(step, total_steps)``;
    - in your own loop, with its position: ``schedule.batch`` is the next step's batch,
      ``schedule.apply_to(optimizer, base_hparams)`` sets its LR/betas/eps, ``schedule.step(n)``
      counts the ``n`` examples the step consumed; ``state_dict()`` / ``load_state_dict()`` save
      and restore the position with a checkpoint, so a resumed run takes the same batches and
      hyperparameters as an uninterrupted one (the hyperparameters are a function of the batch
      alone, each time scaled from ``base``, so nothing accumulates).

    Attributes:
        base: the initial batch, the one the given hyperparameters were tuned for.
        milestones: increasing fractions in (0, 1) where the batch grows by ``factor``.
        factor: growth factor at each milestone (e.g. 2, or 5 = 1/gamma for a step LR schedule
            with gamma 0.2); for stages, the factor :meth:`from_critical_batch` grows by.
        max_batch: optional cap (e.g. the memory maximum or the training-set size).
        stages: ``(examples, batch)`` pairs, examples increasing, batches integer multiples of
            ``base`` (non-decreasing).
        rule: co-scaling rule for LR and Adam hyperparameters (one of ``SCALE_RULES``; None: the
            optimizer's default, see :func:`batchlab.train.scale_hparams`).
        examples: position of a user's loop (training examples consumed so far).
    """

    base: int
    milestones: tuple[float, ...] | None = None
    factor: int = 2
    max_batch: int | None = None
    stages: tuple[tuple[int, int], ...] = ()
    rule: str | None = None
    examples: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.base, numbers.Integral) or isinstance(self.base, bool) or self.base < 1:
            raise ValueError(f"base must be a positive integer, got {self.base!r}")
        if not isinstance(self.factor, numbers.Integral) or isinstance(self.factor, bool) or self.factor < 1:
            raise ValueError(f"factor must be a positive integer, got {self.factor!r}")
        stages = _check_stages(self.stages, self.base)
        if self.milestones is None:
            ms: tuple[float, ...] = () if stages else _SMITH_MILESTONES
        else:
            if isinstance(self.milestones, (str, bytes)) or not isinstance(self.milestones, Sequence):
                raise ValueError(f"milestones must be increasing fractions in (0, 1), got {self.milestones!r}")
            ms = tuple(float(m) for m in self.milestones)
            if any(not 0 < m < 1 for m in ms) or list(ms) != sorted(ms):
                raise ValueError(f"milestones must be increasing fractions in (0, 1), got {self.milestones!r}")
        if ms and stages:
            raise ValueError(f"give milestones (fractions of the budget) or stages (examples seen), not both; "
                             f"got milestones={ms!r} and stages={stages!r}")
        self.milestones, self.stages = ms, stages
        if self.max_batch is not None and (not isinstance(self.max_batch, numbers.Integral) or self.max_batch < self.base):
            raise ValueError(f"max_batch must be an integer >= base ({self.base}), got {self.max_batch!r}")
        if self.max_batch is not None and stages and max(b for _, b in stages) > self.max_batch:
            raise ValueError(f"stages' largest batch ({max(b for _, b in stages)}) exceeds max_batch={self.max_batch}")
        if self.rule is not None and self.rule not in SCALE_RULES:
            raise ValueError(f"rule must be one of {', '.join(SCALE_RULES)} or None (the optimizer's default); got {self.rule!r}")
        if not isinstance(self.examples, numbers.Integral) or isinstance(self.examples, bool) or self.examples < 0:
            raise ValueError(f"examples must be an integer >= 0, got {self.examples!r}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_lr_decay(cls, base: int, milestones: tuple[float, ...], gamma: float, max_batch: int | None = None) -> BatchSizeSchedule:
        """The batch schedule replacing a step LR decay by ``gamma`` at ``milestones`` (factor 1/gamma)."""
        if not 0 < gamma < 1:
            raise ValueError(f"gamma must be in (0, 1), got {gamma!r}")
        factor = round(1 / gamma)
        if abs(factor - 1 / gamma) > 1e-6:
            raise ValueError(f"1/gamma must be an integer to grow the batch by it, got gamma={gamma!r}")
        return cls(base=base, milestones=milestones, factor=factor, max_batch=max_batch)

    @classmethod
    def from_critical_batch(
        cls,
        measured: Any,
        base: int,
        *,
        factor: int = 2,
        max_batch: int | None = None,
        rule: str | None = None,
        use: str = "critical_batch",
        lookahead: bool = True,
    ) -> BatchSizeSchedule:
        """A batch-size warmup that follows a measured critical batch (Merrill et al. 2025).

        At each measurement point the batch becomes the largest ``base * factor ** j`` that is at
        most the measured critical batch (and ``max_batch``); it never shrinks and never goes
        below ``base``. The stage starts at the examples where it was measured. Since a warmup
        never shrinks, a stage runs for the rest of training: with ``lookahead`` (default) the
        batch at a point is at most the critical batch measured at *every later* point too (the
        running minimum from the end), so one high reading followed by lower ones (measurement
        noise, or a critical batch that falls) does not start a stage that later points say is
        too large. Without it, a later lower measurement only keeps the batch where it is.

        Args:
            measured: a :class:`~batchlab.batchsize.critical.CriticalBatchResult` (its ``points``),
                its ``to_dict()`` / the ``critical_batch.json`` that ``batchlab critical-batch --out``
                writes, or a sequence of ``(examples seen, critical batch)`` pairs.
            base: the first batch (where the LR and other hyperparameters were tuned).
            factor: integer growth factor between stages (>= 2).
            max_batch: cap (memory maximum, training-set size).
            rule: co-scaling rule (see :func:`batchlab.train.scale_hparams`); default: the rule the
                measurement's branches ran with (a ``CriticalBatchResult``'s ``rule``), else the
                optimizer's default.
            use: which estimate of a point to follow: ``"critical_batch"`` (from the seed-mean
                losses) or ``"critical_low"`` (the smallest per-seed estimate: more cautious).
            lookahead: bound each point by the later measurements (see above).
        """
        if not isinstance(factor, numbers.Integral) or isinstance(factor, bool) or factor < 2:
            raise ValueError(f"factor must be an integer >= 2, got {factor!r}")
        if use not in ("critical_batch", "critical_low"):
            raise ValueError(f"use must be 'critical_batch' or 'critical_low', got {use!r}")
        if isinstance(measured, Mapping) and "points" in measured:  # the saved JSON (critical_batch.json, to_dict())
            from batchlab.batchsize.critical import CriticalBatchResult

            measured = CriticalBatchResult.from_dict(measured)
        points = getattr(measured, "points", None)
        if rule is None:  # the rule the branches were measured with: the critical batch holds for it
            rule = getattr(measured, "rule", None)
        if points is not None:
            pairs = [(int(p.examples), getattr(p, use)) for p in points if getattr(p, "defined", True)]
        else:
            if isinstance(measured, (str, bytes)) or not isinstance(measured, Sequence):
                raise ValueError("measured must be a CriticalBatchResult, its dict (critical_batch.json) or a sequence of (examples, critical batch) "
                                 f"pairs; got {type(measured).__name__}")
            pairs = []
            for i, pair in enumerate(measured):
                if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
                    raise ValueError(f"measured[{i}] must be an (examples, critical batch) pair; got {pair!r}")
                pairs.append((pair[0], pair[1]))
        pairs = [(e, c) for e, c in sorted(pairs, key=lambda p: p[0])
                 if c is not None and isinstance(c, numbers.Real) and math.isfinite(c)]
        if lookahead:
            for i in range(len(pairs) - 2, -1, -1):
                pairs[i] = (pairs[i][0], min(pairs[i][1], pairs[i + 1][1]))
        stages: list[tuple[int, int]] = []
        current = base
        for examples, crit in pairs:
            b = base
            while b * factor <= crit and (max_batch is None or b * factor <= max_batch):
                b *= factor
            if b > current:
                current = b
                if stages and stages[-1][0] == examples:
                    stages[-1] = (int(examples), b)
                else:
                    stages.append((int(examples), b))
        # milestones=(): no stages means a constant batch, not the default milestone schedule
        return cls(base=base, milestones=(), stages=tuple(stages), factor=factor, max_batch=max_batch, rule=rule)

    @classmethod
    def from_config(cls, config: TrainConfig) -> BatchSizeSchedule:
        """The schedule of a :class:`TrainConfig` (``batch_schedule`` or ``batch_growth``)."""
        if config.batch_schedule:
            return cls(base=config.batch_size, stages=config.batch_schedule, rule=config.batch_scale_rule)
        return cls(base=config.batch_size, milestones=config.batch_growth, factor=config.growth_factor)

    # ------------------------------------------------------------------ pure functions
    def __call__(self, progress: float) -> int:
        """The batch at ``progress`` (fraction of the budget consumed; milestone schedules)."""
        if self.stages:
            raise ValueError("this schedule's stages are in examples seen: call batch_at(examples)")
        b = self.base * self.factor ** sum(1 for m in self.milestones if progress >= m)
        return b if self.max_batch is None else min(b, self.max_batch)

    def at_step(self, step: int, total_steps: int) -> int:
        if total_steps < 1:
            raise ValueError(f"total_steps must be positive, got {total_steps!r}")
        return self(step / total_steps)

    def batch_at(self, examples: int, total_examples: int | None = None) -> int:
        """The batch after ``examples`` training examples (milestone schedules need ``total_examples``)."""
        if not isinstance(examples, numbers.Integral) or isinstance(examples, bool) or examples < 0:
            raise ValueError(f"examples must be an integer >= 0, got {examples!r}")
        if self.stages or not self.milestones:
            return scheduled_batch(self.base, self.stages, int(examples))
        if not isinstance(total_examples, numbers.Integral) or total_examples < 1:
            raise ValueError("this schedule's milestones are fractions of the budget: give total_examples "
                             f"(a positive integer), got {total_examples!r}")
        return self(examples / total_examples)

    def hparams_at(
        self,
        examples: int,
        hparams: Mapping[str, Any],
        optimizer: str | torch.optim.Optimizer | None,
        total_examples: int | None = None,
    ) -> dict[str, Any]:
        """``hparams`` (tuned for ``base``) co-scaled to the batch after ``examples`` examples,
        by :func:`batchlab.train.scale_hparams` with this schedule's ``rule``."""
        return scale_hparams(optimizer, hparams, self.base, self.batch_at(examples, total_examples), self.rule)

    @property
    def final_batch(self) -> int:
        if self.stages:
            return self.stages[-1][1]
        b = self.base * self.factor ** len(self.milestones)
        return b if self.max_batch is None else min(b, self.max_batch)

    def apply(self, config: TrainConfig) -> TrainConfig:
        """``config`` with this schedule (fit's ``batch_growth`` has no cap: ``max_batch`` must not bind)."""
        if self.stages:
            return config.replace(batch_size=self.base, batch_schedule=self.stages, batch_scale_rule=self.rule,
                                  batch_growth=(), growth_factor=1)
        if self.max_batch is not None and self.base * self.factor ** len(self.milestones) > self.max_batch:
            raise ValueError(
                f"the final batch {self.base * self.factor ** len(self.milestones)} exceeds max_batch={self.max_batch}; "
                "fit() cannot cap growth, lower factor or milestones"
            )
        return config.replace(batch_size=self.base, batch_growth=self.milestones, growth_factor=self.factor,
                              batch_schedule=())

    # ------------------------------------------------------------------ a user's own loop
    def _needs_budget(self, where: str) -> ValueError:
        return ValueError(f"{where}: this schedule's milestones {list(self.milestones)} are fractions of a training "
                          "budget it does not know; in your own loop call batch_at(examples, total_examples) and "
                          "hparams_at(..., total_examples), pass apply_to(..., total_examples=N), or build a stage "
                          "schedule (BatchSizeSchedule(base, stages=[(examples, batch), ...]))")

    @property
    def batch(self) -> int:
        """The batch of the next step, at the current position (stage schedules; a milestone
        schedule needs the budget: :meth:`batch_at`)."""
        if not self.stages and self.milestones:
            raise self._needs_budget("BatchSizeSchedule.batch")
        return self.batch_at(self.examples)

    def step(self, examples: int) -> None:
        """Count ``examples`` consumed by a step (advance the position)."""
        if not isinstance(examples, numbers.Integral) or isinstance(examples, bool) or examples < 0:
            raise ValueError(f"examples must be an integer >= 0, got {examples!r}")
        self.examples += int(examples)

    def apply_to(self, optimizer: torch.optim.Optimizer, hparams: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                 total_examples: int | None = None, ratios: Sequence[float] | None = None,
                 scheduler: Any = None) -> dict[str, Any]:
        """Set ``optimizer``'s lr/betas/eps to ``hparams`` (tuned for ``base``) co-scaled to the
        current batch; returns them. ``lr`` is the first parameter group's; the others keep their
        LR ratio to it (``ratios``: one per group, default the current ones, which a first group at
        LR 0, e.g. at the start of a warmup, cannot give: pass ``batchlab.train.optim.lr_ratios`` taken
        earlier). ``total_examples``: the budget a milestone schedule's fractions refer to (stage
        schedules ignore it). ``scheduler``: the torch LR scheduler driving the optimizer, if any; then
        ``hparams["lr"]`` is its base LR and the co-scaled LR becomes the scheduler's base, so its
        warmup and decay go on multiplying it (without it, the scheduler's next ``step()`` would
        overwrite the co-scaled LR; see :func:`batchlab.train.optim.set_hparams`). ``hparams`` may be
        one mapping per parameter group (``batchlab.train.group_hparams(optimizer)`` taken at the
        start), so groups with their own betas or eps keep them, each co-scaled; with one mapping its
        betas and eps go to every group."""
        if not self.stages and self.milestones and total_examples is None:
            raise self._needs_budget("BatchSizeSchedule.apply_to")
        if isinstance(hparams, Sequence) and not isinstance(hparams, (str, bytes)):  # one per parameter group
            hps = scale_group_hparams(optimizer, hparams, self.base, self.batch_at(self.examples, total_examples),
                                      self.rule)  # a group at LR 0 stays at 0
            set_hparams(optimizer, hps, scheduler=scheduler)
            return hps[0]
        hp = self.hparams_at(self.examples, hparams, optimizer, total_examples)
        set_hparams(optimizer, hp, ratios, scheduler)
        return hp

    def state_dict(self) -> dict[str, Any]:
        """The schedule and its position, plain data (JSON)."""
        return {"base": self.base, "milestones": list(self.milestones), "factor": self.factor,
                "max_batch": self.max_batch, "stages": [list(p) for p in self.stages], "rule": self.rule,
                "examples": self.examples}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the position saved by :meth:`state_dict`; the schedule itself must be the same
        (a checkpoint from a different schedule is refused, naming what differs)."""
        if not isinstance(state, Mapping) or "examples" not in state:
            raise ValueError(f"state must be a mapping from state_dict() with an 'examples' entry, got {state!r}")
        mine = self.state_dict()
        unknown = sorted(str(k) for k in state if k not in mine)
        if unknown:
            raise ValueError(f"state has keys a BatchSizeSchedule does not save: {', '.join(unknown)} "
                             f"(allowed: {', '.join(mine)})")
        differ = [k for k in mine if k != "examples" and k in state and _plain(state[k]) != _plain(mine[k])]
        if differ:
            raise ValueError("the checkpoint's schedule differs from this one in " + ", ".join(
                f"{k} (saved {state[k]!r}, here {mine[k]!r})" for k in differ))
        ex = state["examples"]
        if not isinstance(ex, numbers.Integral) or isinstance(ex, bool) or ex < 0:
            raise ValueError(f"state['examples'] must be an integer >= 0, got {ex!r}")
        self.examples = int(ex)


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _check_stages(stages: Any, base: int) -> tuple[tuple[int, int], ...]:
    """Stages as int pairs: examples increasing, batches non-decreasing integer multiples of ``base``.
    The pair format is TrainConfig's ``batch_schedule``, checked there first."""
    try:
        checked = TrainConfig(batch_schedule=stages).batch_schedule
    except ValueError as e:
        raise ValueError(f"stages: {e}".replace("batch_schedule", "stages")) from None
    for i, (_, b) in enumerate(checked):
        if b % base or (i and b < checked[i - 1][1]):
            raise ValueError(f"stages[{i}] batch {b} must be an integer multiple of base ({base}) and no smaller "
                             f"than the stage before; got stages={checked!r}")
    return checked


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup multiplier: ``(step + 1) / warmup_steps`` for the first steps, then 1."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
    if warmup_steps == 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def goyal_warmup_steps(batch_size: int, n_train: int, warmup_epochs: float = 5.0, reference_batch: int = 256) -> int:
    """Warmup length in steps: ``warmup_epochs`` epochs when the batch exceeds ``reference_batch``.

    Goyal et al. (2017) warm up over 5 epochs for batches above 256 (below it the linearly scaled LR
    is no larger than the tuned one and needs no warmup).
    """
    if batch_size <= reference_batch:
        return 0
    return int(math.ceil(warmup_epochs * n_train / batch_size))
