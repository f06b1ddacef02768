"""Batch arithmetic, in one place: a validated batch range, micro-batch x accumulation, a budget in
examples and the power-of-two floor. Every tool in :mod:`batchlab.batchsize` uses these instead of
validating and capping ranges itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_positive_int(name: str, value: Any) -> int:
    """``value`` when it is a positive integer; else ValueError naming ``name``, allowed and given."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def pow2_floor(x: float) -> int:
    """The largest power of two <= ``x`` (1 for anything below 2, NaN included)."""
    if not (isinstance(x, (int, float)) and math.isfinite(x)) or x < 2:
        return 1
    return 1 << int(math.floor(math.log2(x)))


def powers_of_two(low: int, high: int) -> list[int]:
    """The powers of two in ``[low, high]`` (empty when there are none)."""
    return [1 << k for k in range(0, 40) if low <= 1 << k <= high]


@dataclass(frozen=True)
class BatchRange:
    """Batch sizes ``low..high`` a tool may use, validated once.

    ``BatchRange(low, high)`` checks both bounds; :meth:`capped` lowers ``high`` to the training-set
    size (and a memory maximum unless larger batches may be reached by accumulation) and says why.
    """

    low: int = 2
    high: int = 512

    def __post_init__(self) -> None:
        check_positive_int("low", self.low)
        check_positive_int("high", self.high)
        if self.low > self.high:
            raise ValueError(f"low must be <= high, got low={self.low} > high={self.high}")

    def check_data(self, n_train: int) -> None:
        """ValueError when not even ``low`` examples fit in the training set."""
        if self.low > n_train:
            raise ValueError(f"low must be <= the training-set size ({n_train} examples), got {self.low}")

    def capped(self, n_train: int, memory_max: int | None = None, accumulate: bool = False) -> tuple[BatchRange, str | None]:
        """The range with ``high`` capped at ``n_train`` (and at ``memory_max`` unless ``accumulate``),
        and a note naming the cap (None when nothing changed)."""
        self.check_data(n_train)
        high, why = self.high, None
        if n_train < high:
            high, why = n_train, "training-set size"
        if memory_max is not None and not accumulate and memory_max < high:
            high, why = memory_max, "memory maximum"
        if high < self.low:
            raise ValueError(f"no batch size fits: low={self.low} but the {why} is {high}")
        out = BatchRange(self.low, high)
        return out, (None if why is None else f"upper bound lowered from {self.high} to {high} ({why})")

    def sizes(self) -> list[int]:
        """The powers of two in the range (``[high]`` when there is none)."""
        return powers_of_two(self.low, self.high) or [self.high]

    def clamp(self, b: int) -> int:
        return min(max(b, self.low), self.high)


@dataclass(frozen=True)
class Split:
    """A batch of ``batch`` examples per optimizer step as ``accumulation`` micro-batches of ``micro``."""

    micro: int
    accumulation: int = 1

    @property
    def batch(self) -> int:
        return self.micro * self.accumulation

    @classmethod
    def of(cls, batch: int, micro_max: int | None = None) -> Split:
        """``batch`` split so that no micro-batch exceeds ``micro_max`` (None: no cap). Powers of two
        split exactly; ValueError when ``batch`` is not a multiple of the micro-batch it would need."""
        check_positive_int("batch", batch)
        if micro_max is None or batch <= micro_max:
            return cls(batch, 1)
        micro = pow2_floor(micro_max)
        acc = math.ceil(batch / micro)
        if batch % acc:
            raise ValueError(f"batch {batch} is not a multiple of the micro-batch {micro}; use powers of two")
        return cls(batch // acc, acc)


def budget_in_examples(n_train: int, epochs: float | None = None, examples: int | None = None,
                       default_epochs: float = 1.0) -> int:
    """A training budget in examples from one of ``epochs`` and ``examples`` (default
    ``default_epochs`` passes over ``n_train``); ValueError naming the argument otherwise."""
    if epochs is not None and examples is not None:
        raise ValueError("give one of budget_epochs and budget_examples, not both")
    if examples is not None:
        return check_positive_int("budget_examples", examples)
    e = default_epochs if epochs is None else epochs
    if isinstance(e, bool) or not isinstance(e, (int, float)) or not (math.isfinite(e) and e > 0):
        raise ValueError(f"budget_epochs must be a positive number, got {epochs!r}")
    return max(1, round(e * n_train))
