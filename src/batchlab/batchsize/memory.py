"""The largest batch whose whole training step (forward, backward, optimizer step) fits in memory.

Three parts (STYLE.md lesson 6):

- :func:`batchlab.train.is_oom` recognises an out-of-memory error by type and message;
- :func:`search_max_batch` is a pure search over ``try_fn(batch) -> bool`` that returns every
  size it tried;
- :func:`batchlab.batchsize.state.preserved_state` restores model, optimizer and RNG state.

:func:`max_batch_size` wires them: it measures the step's memory at two or three small batches,
fits ``memory = fixed + per_sample * B``, predicts the largest batch under the limit, verifies it
with a real step and backs off by binary search over the powers of two when that step does not fit.

How memory is measured:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` around one step: the
  allocator's true peak.
- CPU: torch's CPU allocator has no peak counter that works without the profiler, ``tracemalloc``
  does not see torch allocations and a process' RSS is polluted by everything else the process
  holds. batchlab therefore *accounts* the step: bytes of parameters + gradients + optimizer state
  (measured after the step) + the input batch + every tensor autograd saves for the backward pass
  (counted once per storage through ``torch.autograd.graph.saved_tensors_hooks``) + the output.
  Saved activations are what grows with the batch, so the slope of the fit is right; transient
  buffers that live only inside one kernel are not seen, which is why the limit is a fraction of the
  available RAM (default 50%). Deterministic and identical from run to run, which the search needs.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from batchlab.batchsize.state import preserved_state
from batchlab.tasks import Task, get_task
from batchlab.train import is_oom, make_optimizer
from batchlab.train.oom import free_memory

DEFAULT_RAM_FRACTION = 0.5  # CPU limit: this fraction of psutil's available memory


def power_candidates(low: int, high: int) -> list[int]:
    """Powers of two in ``[low, high]`` (``low`` rounded up to one), plus ``high`` itself.

    ``high`` is included when it is not a power of two because it is usually the training-set size:
    a batch of the whole data set is a legitimate answer and never exceeded.
    """
    if not isinstance(low, int) or low < 1:
        raise ValueError(f"low must be a positive integer, got {low!r}")
    if not isinstance(high, int) or high < low:
        raise ValueError(f"high must be an integer >= low ({low}), got {high!r}")
    b = 1 << max(0, math.ceil(math.log2(low)))
    out = []
    while b <= high:
        out.append(b)
        b *= 2
    if not out or out[-1] != high:
        out.append(high)
    return out


def search_max_batch(
    try_fn: Callable[[int], bool], candidates: Sequence[int], guess: int | None = None
) -> tuple[int | None, list[tuple[int, bool]]]:
    """Largest candidate for which ``try_fn`` is True, assuming success is monotone in the batch.

    Without a guess this is the doubling search of Lightning's ``power`` mode: try candidates in
    increasing order until one fails. With a guess (a memory prediction) it starts at the largest
    candidate not above the guess: on success it keeps doubling, on failure it binary-searches the
    candidates below. Either way it never tries more than ``len(candidates)`` sizes, the worst case
    of the doubling search, and never tries a size twice.

    Args:
        try_fn: ``try_fn(batch) -> bool``; True when a step at ``batch`` fits.
        candidates: the sizes to consider (sorted and de-duplicated here).
        guess: predicted largest fitting batch, or None.

    Returns:
        ``(best, tried)``: the largest fitting candidate (None when even the smallest fails) and
        every ``(batch, fits)`` in the order tried.
    """
    cands = sorted(set(int(c) for c in candidates))
    if not cands:
        raise ValueError("candidates must not be empty")
    tried: list[tuple[int, bool]] = []

    def attempt(i: int) -> bool:
        ok = bool(try_fn(cands[i]))
        tried.append((cands[i], ok))
        return ok

    lo_ok, hi_fail = -1, len(cands)  # invariant: cands[lo_ok] fits, cands[hi_fail] does not
    start = 0 if guess is None else max(0, bisect.bisect_right(cands, guess) - 1)
    if attempt(start):
        lo_ok = start
        while lo_ok + 1 < hi_fail:
            if attempt(lo_ok + 1):
                lo_ok += 1
            else:
                hi_fail = lo_ok + 1
    else:
        hi_fail = start
        while hi_fail - lo_ok > 1:
            mid = (lo_ok + hi_fail) // 2
            if attempt(mid):
                lo_ok = mid
            else:
                hi_fail = mid
    return (cands[lo_ok] if lo_ok >= 0 else None), tried


@dataclass
class MaxBatchResult:
    """Outcome of :func:`max_batch_size` (plain data: ``asdict`` / JSON).

    Attributes:
        batch_size: the largest batch whose step fits (None when even the smallest does not).
        device: where it was measured.
        memory_limit: the budget in bytes the step had to fit in (CUDA without a limit: None).
        fixed_bytes, per_sample_bytes: the linear fit ``memory = fixed + per_sample * B`` (NaN when
            the probes failed).
        probes: ``[batch, bytes]`` measured at small batches for the fit.
        tried: every ``[batch, fits, bytes]`` of the search, in order (bytes NaN after an OOM).
        predicted: the fit's prediction of the largest fitting batch (None without a fit).
        capped_by: "data" (training-set size), "high" (the caller's cap) or "memory".
    """

    batch_size: int | None
    device: str
    memory_limit: int | None
    fixed_bytes: float
    per_sample_bytes: float
    probes: list[list[float]] = field(default_factory=list)
    tried: list[list[Any]] = field(default_factory=list)
    predicted: int | None = None
    capped_by: str = "memory"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def predict_bytes(self, batch: int) -> float:
        return self.fixed_bytes + self.per_sample_bytes * batch


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError):  # sparse / meta tensors
        return id(t), _nbytes(t)


def _tensor_tree_bytes(obj: object, seen: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        key, nb = _storage_key(obj)
        if key in seen:
            return 0
        seen.add(key)
        return nb
    if isinstance(obj, dict):
        return sum(_tensor_tree_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_tree_bytes(v, seen) for v in obj)
    return 0


def training_step(
    task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """One plain step (forward, backward, optimizer step); returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = task.loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def accounted_step_bytes(
    task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> int:
    """Run one step and return its accounted memory (see the module docstring, CPU)."""
    param_keys = {_storage_key(p)[0] for p in model.parameters()}
    input_keys = {_storage_key(x)[0], _storage_key(y)[0]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nb = _storage_key(t)
        if key not in param_keys and key not in input_keys:
            saved[key] = max(saved.get(key, 0), nb)
        return t

    optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        loss = task.loss(out, y)
    loss.backward()
    optimizer.step()
    seen: set[int] = set()
    params = sum(_tensor_tree_bytes(p, seen) for p in model.parameters())
    grads = sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    buffers = sum(_tensor_tree_bytes(b, seen) for b in model.buffers())
    opt_state = _tensor_tree_bytes(list(optimizer.state.values()), seen)
    return params + grads + buffers + opt_state + _nbytes(x) + _nbytes(y) + sum(saved.values()) + _nbytes(out)


def default_memory_limit(device: str = "cpu", fraction: float = DEFAULT_RAM_FRACTION) -> int | None:
    """``fraction`` of the available RAM (CPU, via psutil) or of the free GPU memory (CUDA)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free * fraction)
    import psutil

    return int(psutil.virtual_memory().available * fraction)


def _fit_line(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``bytes = fixed + slope * B`` (slope clipped at >= 0)."""
    if len(points) < 2:
        return (points[0][1] if points else math.nan), math.nan
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(m for _, m in points) / n
    sxx = sum((b - mx) ** 2 for b, _ in points)
    slope = sum((b - mx) * (m - my) for b, m in points) / sxx if sxx else 0.0
    slope = max(slope, 0.0)
    return my - slope * mx, slope


def max_batch_size(
    task: Task | str,
    *,
    device: str = "cpu",
    memory_limit: int | None = None,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    low: int = 2,
    high: int | None = None,
    probe_batches: Sequence[int] = (2, 4, 8),
    norm: str | None = None,
) -> MaxBatchResult:
    """The largest batch (a power of two, or the training-set size) whose full step fits.

    Args:
        task: a Task or a registered name.
        device: "cpu", "cuda" or "cuda:N".
        memory_limit: bytes the step may use. CPU default: half of the available RAM (psutil).
            CUDA default: None, i.e. whatever the device holds (a real OOM decides).
        model, optimizer: measure these (default: a fresh ``task.make_model`` and the task's
            optimizer). Their state is bitwise unchanged afterwards, also after an exception.
        low: smallest batch considered (2 by default: BatchNorm cannot train on one sample).
        high: largest batch considered; always capped at the training-set size.
        probe_batches: small batches measured for the linear memory fit.
        norm: the model's norm when ``model`` is None (default: the task's).

    Returns:
        A :class:`MaxBatchResult` with the answer, the fit and every size tried.

    Raises:
        ValueError: bad arguments (naming the argument, the allowed range and the value).
        Any non-OOM exception of the step propagates (after the state is restored).
    """
    task = get_task(task)
    n = len(task.train_set)
    if not isinstance(low, int) or isinstance(low, bool) or not 1 <= low <= n:
        raise ValueError(f"low must be an integer in [1, {n}] (the training-set size), got {low!r}")
    if high is not None and (not isinstance(high, int) or isinstance(high, bool) or high < low):
        raise ValueError(f"high must be an integer >= low ({low}), got {high!r}")
    if memory_limit is not None and (not isinstance(memory_limit, int) or memory_limit <= 0):
        raise ValueError(f"memory_limit must be a positive number of bytes, got {memory_limit!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    cap = n if high is None else min(high, n)
    capped_by = "data" if high is None or high >= n else "high"
    if dev.type == "cpu" and memory_limit is None:
        memory_limit = default_memory_limit("cpu")

    if model is None:
        model = task.make_model(norm=norm)
        model = model.to(dev)
    else:
        on = {p.device for p in model.parameters()}
        if on and on != {dev} and not (dev.type == "cuda" and dev.index is None and {d.type for d in on} == {"cuda"}):
            raise ValueError(f"model is on {sorted(map(str, on))} but device={device!r}; move it there first")
    if optimizer is None:
        optimizer = make_optimizer(task.optimizer, model.parameters(), task.lr)
    train = task.train_set

    def measure(b: int) -> float:
        """Bytes of one step at batch ``b``; raises on OOM."""
        x = train.x[:b].to(dev)
        y = train.y[:b].to(dev)
        model.train()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            training_step(task, model, optimizer, x, y)
            torch.cuda.synchronize(dev)
            return float(torch.cuda.max_memory_allocated(dev))
        return float(accounted_step_bytes(task, model, optimizer, x, y))

    tried: list[list[Any]] = []

    def try_fn(b: int) -> bool:
        try:
            used = measure(b)
        except Exception as e:  # noqa: BLE001 - only OOM is swallowed
            if not is_oom(e):
                raise
            free_memory()
            tried.append([b, False, math.nan])
            return False
        fits = memory_limit is None or used <= memory_limit
        tried.append([b, fits, used])
        return fits

    with preserved_state(model, optimizer):
        probes: list[tuple[int, float]] = []
        for b in sorted({min(max(p, low), cap) for p in probe_batches}):
            try:
                probes.append((b, measure(b)))
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                free_memory()
                break
        fixed, slope = _fit_line(probes)
        predicted: int | None = None
        if memory_limit is not None and len(probes) >= 2 and math.isfinite(slope):
            predicted = cap if slope <= 0 else int(max(0.0, (memory_limit - fixed) / slope))
        elif memory_limit is None and len(probes) >= 2 and dev.type == "cuda":
            free, _total = torch.cuda.mem_get_info(dev)
            predicted = cap if slope <= 0 else int(max(0.0, (free + probes[-1][1] - fixed) / slope))
        candidates = power_candidates(low, cap)
        guess = None if predicted is None else max(min(predicted, cap), low)
        best, _ = search_max_batch(try_fn, candidates, guess=guess)
    if best is not None and best < cap:
        capped_by = "memory"
    return MaxBatchResult(
        batch_size=best, device=str(dev), memory_limit=memory_limit, fixed_bytes=fixed, per_sample_bytes=slope,
        probes=[[b, m] for b, m in probes], tried=tried, predicted=predicted, capped_by=capped_by,
    )
