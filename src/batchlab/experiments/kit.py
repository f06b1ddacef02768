"""The small kit every experiment shares: pyplot, a per-seed loop, one paired-difference rule.

One home each, so the experiments stop growing their own copies:

- :func:`pyplot` returns ``matplotlib.pyplot`` on the non-interactive Agg backend (imported only
  when an experiment draws).
- :func:`seeded_model` builds a model from a seed without touching the global RNG.
- :func:`per_seed` runs ``fn(seed)`` for every seed of the context (one torch thread on the CPU)
  and returns ``{"seeds": {"0": ..., "1": ...}}``, the layout most experiments' data use;
  :func:`seed_keys` lists those keys in seed order.
- :func:`paired_rule` is the one non-inferiority / equivalence rule: a t-interval on paired
  per-seed differences against a margin, decided before the data (Schuirmann's two one-sided
  tests for equivalence, the one-sided test for non-inferiority).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from batchlab.experiments.base import ExperimentContext, one_thread


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def per_seed(ctx: ExperimentContext, fn: Callable[[int], Any], seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """``{"seeds": {str(seed): fn(seed)}}`` over ``seeds`` (default: the context's), on one CPU thread."""
    out: dict[str, Any] = {"seeds": {}}
    with one_thread(ctx.device):
        for seed in ctx.seeds if seeds is None else seeds:
            out["seeds"][str(seed)] = fn(int(seed))
    return out


def seeded_model(seed: int, build: Callable[[], Any]) -> Callable[[], Any]:
    """A model_fn whose weights are drawn from ``seed`` (as fit() does for the models it builds), leaving
    the global RNG as it was."""

    def make() -> Any:
        import torch

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return build()

    return make


def seed_keys(data: dict[str, Any]) -> list[str]:
    """The keys of ``data["seeds"]`` in seed order."""
    return sorted(data["seeds"], key=int)


@dataclass(frozen=True)
class PairedTest:
    """The outcome of :func:`paired_rule`.

    Attributes:
        outcome: ``"supported"`` (within the margin), ``"refuted"`` (beyond it) or ``"inconclusive"``.
        mean, lo, hi: the mean paired difference and its two-sided ``1 - 2 * alpha`` t-interval.
        n: number of finite differences.
        margin: the margin the interval was compared with.
        kind: ``"equivalence"`` or ``"noninferiority"``.
    """

    outcome: Literal["supported", "refuted", "inconclusive"]
    mean: float
    lo: float
    hi: float
    n: int
    margin: float
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self, what: str = "difference") -> str:
        level = "90%" if self.kind == "equivalence" else "one-sided 95%"
        bound = f"[-{self.margin:g}, +{self.margin:g}]" if self.kind == "equivalence" else f">= -{self.margin:g}"
        return (f"mean paired {what} {self.mean:+.4g} ({level} CI [{self.lo:+.4g}, {self.hi:+.4g}], n={self.n}) "
                f"against the margin {bound}")


def paired_rule(diffs: Sequence[float], margin: float, kind: Literal["equivalence", "noninferiority"] = "equivalence",
                alpha: float = 0.05) -> PairedTest:
    """Equivalence or non-inferiority of paired per-seed differences ``a - b`` with a margin.

    The interval is ``mean +- t_{1-alpha, n-1} * sd / sqrt(n)`` (a two-sided ``1 - 2 alpha`` interval,
    i.e. 90% for ``alpha = 0.05``: Schuirmann's two one-sided tests).

    - equivalence: supported if the interval lies inside ``[-margin, margin]``; refuted if it lies
      entirely outside (the difference is beyond the margin, one way or the other); else inconclusive.
    - non-inferiority (``a`` no worse than ``b`` by more than ``margin``): supported if the lower end
      is ``>= -margin``; refuted if the upper end is ``< -margin``; else inconclusive.

    With fewer than 2 finite differences the interval is infinite and the outcome inconclusive.

    Raises:
        ValueError: for a negative margin, an unknown ``kind`` or ``alpha`` outside (0, 0.5).
    """
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    if kind not in ("equivalence", "noninferiority"):
        raise ValueError(f"kind must be 'equivalence' or 'noninferiority', got {kind!r}")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha!r}")
    vals = [float(d) for d in diffs if d is not None and math.isfinite(float(d))]
    n = len(vals)
    if n < 2:
        m = vals[0] if vals else math.nan
        return PairedTest("inconclusive", m, -math.inf, math.inf, n, margin, kind)
    from scipy.stats import t as student_t

    m = statistics.fmean(vals)
    half = float(student_t.ppf(1 - alpha, n - 1)) * statistics.stdev(vals) / math.sqrt(n)
    lo, hi = m - half, m + half
    if kind == "equivalence":
        if -margin <= lo and hi <= margin:
            outcome = "supported"
        elif hi < -margin or lo > margin:
            outcome = "refuted"
        else:
            outcome = "inconclusive"
    else:
        outcome = "supported" if lo >= -margin else "refuted" if hi < -margin else "inconclusive"
    return PairedTest(outcome, m, lo, hi, n, margin, kind)  # type: ignore[arg-type]


def final_metric(result: Any, key: str) -> float | None:
    """A final metric of a :class:`~batchlab.train.config.RunResult`; None when the run did not end ``ok``
    or the value is not finite."""
    if result.status != "ok":
        return None
    v = result.final.get(key)
    return float(v) if v is not None and math.isfinite(float(v)) else None


def nan_if_none(v: Any) -> float:
    """``float(v)``, NaN for None."""
    return math.nan if v is None else float(v)
