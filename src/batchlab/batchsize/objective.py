"""What ``suggest`` optimizes, and how seed-averaged metrics are compared.

Two objectives (:class:`Objective`):

- ``"time"`` (default): the batch, with its LR scaled by the optimizer's rule, that reaches the best
  validation metric within the user's time budget (seconds; default: the time one full training
  run at the task's own batch takes, from the throughput measurement). Every candidate gets the
  same *time* per search rung, so a batch that processes more examples per second trains on more.
- ``"epochs"``: the batch with the best validation metric after a fixed number of examples
  (epochs); every candidate gets the same *examples* per rung.

Under both, candidates whose metrics are not separable by more than their seed noise are tied and
the fastest of them (most examples per second) is preferred.

Metrics keep their own sign and name: comparisons go through :meth:`Objective.gap` and the task's
``higher_is_better``, a loss is never negated.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

OBJECTIVES = ("time", "epochs")


@dataclass(frozen=True)
class SeedStats:
    """Mean and standard error of one batch's metric over seeds (NaN when a seed failed)."""

    mean: float
    se: float
    n: int
    failed: int

    @classmethod
    def of(cls, values: Sequence[float]) -> SeedStats:
        ok = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        failed = len(values) - len(ok)
        if failed or not ok:
            return cls(math.nan, math.nan, len(ok), failed)
        se = statistics.stdev(ok) / math.sqrt(len(ok)) if len(ok) > 1 else math.nan
        return cls(statistics.fmean(ok), se, len(ok), 0)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and math.isfinite(self.mean)


def se_of_difference(a: SeedStats, b: SeedStats, floor: float = 0.0) -> float:
    """``sqrt(se_a^2 + se_b^2)``; a side with one seed (no standard error of its own) counts with
    ``floor``, a pooled seed noise. Two sides with their own errors are never floored: one noisy
    batch elsewhere must not make two well-measured ones look tied."""
    parts = [s.se if math.isfinite(s.se) else floor for s in (a, b)]
    return math.sqrt(sum(p * p for p in parts))


@dataclass(frozen=True)
class Objective:
    """The question ``suggest`` answers (see the module docstring).

    Attributes:
        kind: "time" or "epochs".
        budget_examples: examples of one full training run (``"epochs"``: the budget itself;
            ``"time"``: what the task's own batch processes in ``time_budget``).
        time_budget: seconds of one full training run (``"time"``; None for ``"epochs"``).
        metric: the metric's name ("accuracy", "loss", a callable's name).
        higher_is_better: its direction.
    """

    kind: str
    budget_examples: int
    time_budget: float | None
    metric: str
    higher_is_better: bool

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.kind!r}")

    def gap(self, best: float, other: float) -> float:
        """How much worse ``other`` is than ``best`` (>= 0 when ``best`` is at least as good)."""
        return best - other if self.higher_is_better else other - best

    def better(self, a: float, b: float) -> bool:
        """``a`` strictly better than ``b`` (NaN is never better; anything beats NaN)."""
        if not math.isfinite(a):
            return False
        if not math.isfinite(b):
            return True
        return a > b if self.higher_is_better else a < b

    def best_of(self, values: dict[Any, float]) -> Any:
        """The key of the best finite value (None when there is none)."""
        ok = {k: v for k, v in values.items() if math.isfinite(v)}
        if not ok:
            return None
        return (max if self.higher_is_better else min)(ok, key=ok.get)

    def sort_key(self, value: float) -> float:
        """Ascending sort key, best first (NaN last); the metric itself is not changed."""
        if not math.isfinite(value):
            return math.inf
        return -value if self.higher_is_better else value

    def describe(self) -> str:
        direction = "highest" if self.higher_is_better else "lowest"
        if self.kind == "time":
            return (f"the batch (LR scaled by the optimizer's rule) that reaches the {direction} validation {self.metric} "
                    f"within {self.time_budget:.3g} s of training (one full run at the task's own batch); "
                    f"batches tied within the seed noise: the fastest")
        return (f"the batch (LR scaled by the optimizer's rule) with the {direction} validation {self.metric} after "
                f"{self.budget_examples} training examples; batches tied within the seed noise: the fastest")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
