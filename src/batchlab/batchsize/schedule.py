"""Batch-size schedules and LR warmup.

- :class:`BatchSizeSchedule`: grow the batch at milestones instead of decaying the LR
  (Smith et al. 2018, "Don't Decay the Learning Rate, Increase the Batch Size": multiplying B by a
  factor where the LR would be divided by it gives the same curves with fewer parameter updates).
- :func:`warmup_factor` / :func:`goyal_warmup_steps`: linear warmup of the scaled LR
  (Goyal et al. 2017 use 5 epochs when scaling the LR linearly with the batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchlab.train import TrainConfig, scale_lr  # noqa: F401  (scale_lr re-exported by the package)


@dataclass(frozen=True)
class BatchSizeSchedule:
    """Batch ``base * factor ** k`` after the k-th milestone (fractions of the training budget).

    Use it two ways:

    - with :func:`batchlab.train.fit`: ``schedule.apply(config)`` sets ``batch_size``,
      ``batch_growth`` and ``growth_factor`` of a :class:`TrainConfig`;
    - in your own loop: ``schedule(progress)`` or ``schedule.at_step(step, total_steps)``.

    Attributes:
        base: the initial batch.
        milestones: increasing fractions of the budget in (0, 1) where the batch grows.
        factor: growth factor at each milestone (e.g. 2, or 5 = 1/gamma for a step LR schedule
            with gamma 0.2).
        max_batch: optional cap (e.g. the memory maximum or the training-set size).
    """

    base: int
    milestones: tuple[float, ...] = (0.5, 0.75)
    factor: int = 2
    max_batch: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.base, int) or self.base < 1:
            raise ValueError(f"base must be a positive integer, got {self.base!r}")
        if not isinstance(self.factor, int) or self.factor < 1:
            raise ValueError(f"factor must be a positive integer, got {self.factor!r}")
        ms = tuple(float(m) for m in self.milestones)
        if any(not 0 < m < 1 for m in ms) or list(ms) != sorted(ms):
            raise ValueError(f"milestones must be increasing fractions in (0, 1), got {self.milestones!r}")
        object.__setattr__(self, "milestones", ms)
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or self.max_batch < self.base):
            raise ValueError(f"max_batch must be an integer >= base ({self.base}), got {self.max_batch!r}")

    @classmethod
    def from_lr_decay(cls, base: int, milestones: tuple[float, ...], gamma: float, max_batch: int | None = None) -> BatchSizeSchedule:
        """The batch schedule replacing a step LR decay by ``gamma`` at ``milestones`` (factor 1/gamma)."""
        if not 0 < gamma < 1:
            raise ValueError(f"gamma must be in (0, 1), got {gamma!r}")
        factor = round(1 / gamma)
        if abs(factor - 1 / gamma) > 1e-6:
            raise ValueError(f"1/gamma must be an integer to grow the batch by it, got gamma={gamma!r}")
        return cls(base=base, milestones=milestones, factor=factor, max_batch=max_batch)

    def __call__(self, progress: float) -> int:
        """The batch at ``progress`` (fraction of the budget consumed)."""
        b = self.base * self.factor ** sum(1 for m in self.milestones if progress >= m)
        return b if self.max_batch is None else min(b, self.max_batch)

    def at_step(self, step: int, total_steps: int) -> int:
        if total_steps < 1:
            raise ValueError(f"total_steps must be positive, got {total_steps!r}")
        return self(step / total_steps)

    def apply(self, config: TrainConfig) -> TrainConfig:
        """``config`` with this schedule (fit's ``batch_growth`` has no cap: ``max_batch`` must not bind)."""
        if self.max_batch is not None and self.base * self.factor ** len(self.milestones) > self.max_batch:
            raise ValueError(
                f"the final batch {self.base * self.factor ** len(self.milestones)} exceeds max_batch={self.max_batch}; "
                "fit() cannot cap growth, lower factor or milestones"
            )
        return config.replace(batch_size=self.base, batch_growth=self.milestones, growth_factor=self.factor)


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
