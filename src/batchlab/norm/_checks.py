"""Constructor-argument checks shared by every normalization layer.

Each check raises with the argument's name, what is allowed and the value given
(``eps must be a finite number >= 0, got nan``), before torch's constructor allocates anything.
torch itself accepts ``eps=nan`` or ``momentum=5`` silently and fails, if at all, at the first
forward (NaN output) or never (a running average that diverges).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = [
    "check_bool",
    "check_eps",
    "check_momentum",
    "check_positive_int",
    "check_real",
    "check_batchnorm_args",
    "check_normalized_shape",
]


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_real(name: str, value: Any, low: float, high: float = math.inf, *, allow_none: bool = False) -> None:
    """``low <= value <= high``, finite (NaN and infinities refused), or None when allowed."""
    if allow_none and value is None:
        return
    if not (_is_real(value) and math.isfinite(value) and low <= value <= high):
        if high == math.inf:
            allowed = f"a finite number >= {low:g}"
        else:
            allowed = f"in [{low:g}, {high:g}]"
        raise ValueError(f"{name} must be {allowed}{' or None' if allow_none else ''}, got {value!r}")


def check_eps(value: Any, name: str = "eps", *, allow_none: bool = False) -> None:
    """eps: a finite number >= 0 (NaN refused); None only where torch takes None (RMSNorm)."""
    check_real(name, value, 0.0, allow_none=allow_none)


def check_momentum(value: Any) -> None:
    """momentum: in [0, 1], or None for the cumulative moving average."""
    if value is None:
        return
    if not (_is_real(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"momentum must be in [0, 1] or None (cumulative average), got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:  # numpy integers too, as torch
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_batchnorm_args(num_features: Any, eps: Any, momentum: Any, affine: Any, track_running_stats: Any, bias: Any) -> None:
    """The arguments of torch's ``_NormBase`` constructor (batch and instance norm)."""
    check_positive_int("num_features", num_features)
    check_eps(eps)
    check_momentum(momentum)
    check_bool("affine", affine)
    check_bool("track_running_stats", track_running_stats)
    check_bool("bias", bias)


def check_normalized_shape(value: Any) -> tuple[int, ...]:
    """``normalized_shape`` as torch's LayerNorm/RMSNorm take it: a positive int or a non-empty
    sequence of them; returned as a tuple."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        shape: tuple[Any, ...] = (int(value),)
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        shape = tuple(value)
    else:
        shape = ()
    if not shape or any(not isinstance(s, numbers.Integral) or isinstance(s, bool) or s < 1 for s in shape):
        raise ValueError(f"normalized_shape must be a positive int or a tuple of them, got {value!r}")
    return tuple(int(s) for s in shape)
