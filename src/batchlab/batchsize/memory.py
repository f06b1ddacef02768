"""The largest batch whose whole training step (forward, backward, optimizer step) fits in memory,
and, separately, the largest evaluation batch (forward only, no gradients).

Three parts (STYLE.md lesson 6):

- :func:`batchlab.train.is_oom` recognises an out-of-memory error by type and message;
- :func:`search_max_batch` is a pure search over ``try_fn(batch) -> bool`` that returns every
  size it tried;
- :class:`batchlab.batchsize.state.Snapshot` / :func:`~batchlab.batchsize.state.preserved_state`
  restore model, optimizer and RNG state.

:func:`max_batch_size` wires them: it measures the step's memory at two or three small batches,
fits ``memory = fixed + per_sample * B``, predicts the largest batch within the budget, verifies it
with a real step and backs off by binary search over the powers of two when that step does not fit.
It works on any task (:meth:`batchlab.Task.from_torch` included): batches come from the task's
sources, go through :meth:`~batchlab.Task.forward_batch` and :meth:`~batchlab.Task.loss_of`.

What makes the answer safe to train with (the complaints about Lightning's finder: an OOM on the
first real step after tuning, a search past the data set size):

- **Safety margin.** A trial fits only when its measured memory is at most ``(1 - margin)`` of the
  limit (default 10%): the allocator's fragmentation, a DataLoader's pinned buffers, the CUDA
  context of a later evaluation. The budget is reported (``budget_bytes``).
- **The longest examples.** For variable-length data (padded token batches, images of several
  sizes) every trial batch is made of the *longest* examples: up to ``scan`` examples (all of a
  smaller data set) are read one at a time, sized by the bytes of their tensors, and a trial batch
  of ``B`` takes the ``B`` largest (repeating them when ``B`` exceeds the scan). A padding collate
  then pads to the longest length: the worst batch training can meet. The ratio of the largest to
  the mean example is reported (``longest``).
- **Never past the data set.** Candidates stop at the size of the split measured (under DDP at each
  rank's share of it: a ``DistributedSampler`` gives a rank no more per epoch).
- **Evaluation separately** (``mode="eval"``): forward only, in eval mode, without gradients, on
  the validation split; such a batch is usually several times larger, and an evaluation OOM says
  nothing about the training batch.
- **The caller's RNG** (torch, CUDA, NumPy, Python) is untouched: the model is built, the data
  scanned and the trials run inside one snapshot of every generator (issue 13: building the model
  used to advance it).

Data parallel (``torchrun``): when ``torch.distributed`` is initialised with more than one rank,
every trial's outcome is agreed by an all-reduce of a failure flag (the maximum over ranks of
0 = fits, 1 = OOM or over budget, 2 = another error), so one rank's OOM fails the trial everywhere
and every rank takes the same next step of the same deterministic search: no rank waits in a
collective the others never reach, and every rank returns the same batch. The prediction is agreed
by a minimum. A trial runs the local step only (no DDP collective inside it: a rank that OOMs in
the middle of a backward would leave the others waiting in the gradient all-reduce); DDP's
gradient buckets (one more copy of the gradients) are added to the measured bytes instead.

How memory is measured:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` around one step: the
  allocator's true peak. Without ``memory_limit`` the limit is what this process can hold when the
  search starts (free memory plus what it already holds).
- CPU: torch's CPU allocator has no peak counter that works without the profiler, ``tracemalloc``
  does not see torch allocations and a process' RSS is polluted by everything else the process
  holds. batchlab therefore *accounts* the step: bytes of parameters + gradients + optimizer state
  (measured after the step) + the input batch + every tensor autograd saves for the backward pass
  (counted once per storage through ``torch.autograd.graph.saved_tensors_hooks``) + the output.
  Saved activations are what grows with the batch, so the slope of the fit is right; transient
  buffers that live only inside one kernel are not seen, which is why the limit is a fraction of the
  available RAM (default 50%). An evaluation step saves nothing; it is accounted as parameters,
  buffers, input, output and twice the largest output of any single layer (a layer's input and
  output alive together). Deterministic and identical from run to run, which the search needs.
- CPU on Linux, in addition: the process's peak resident memory over the step (``VmHWM`` after
  resetting it through ``/proc/self/clear_refs``, after ``malloc_trim`` has given back what earlier
  trials freed), on top of what the step starts with (parameters, buffers, optimizer state, the
  batch). That sees what the accounting cannot: a convolution's temporary buffers (a three-conv
  net on 64x64 images at batch 32: 146 MB accounted, 260-307 MB resident peak in a fresh process),
  activations that gradient checkpointing recomputes in the backward pass (a checkpointed tiny
  GPT-2 at batch 64: 5.9 MB accounted, 60 MB measured). It is used when it exceeds the accounted
  bytes by more than 10% and 8 MiB (below that the reading is the allocator's noise), so small
  models keep the deterministic figure.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from batchlab.batchsize.state import preserved_state
from batchlab.data.sources import ArraySource, Source, move_to_device
from batchlab.tasks import Task, get_task
from batchlab.train import is_oom
from batchlab.train.oom import free_memory

DEFAULT_RAM_FRACTION = 0.5  # CPU limit: this fraction of psutil's available memory
DEFAULT_MARGIN = 0.1  # a trial fits within (1 - margin) of the limit: fragmentation, later allocations
SCAN_EXAMPLES = 1024  # examples sized to find the longest (all of a smaller data set)
MODES = ("train", "eval")


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
        memory_limit: the limit in bytes (the caller's, the CPU default, or on CUDA without one
            None: what the process could hold when the search started, see ``budget_bytes``).
        fixed_bytes, per_sample_bytes: the linear fit ``memory = fixed + per_sample * B`` (NaN when
            the probes failed).
        probes: ``[batch, bytes]`` measured at small batches for the fit.
        tried: every ``[batch, fits, bytes]`` of the search, in order (bytes NaN after an OOM;
            under DDP ``fits`` is the agreed outcome, ``bytes`` this rank's measurement).
        predicted: the fit's prediction of the largest fitting batch (None without a fit).
        capped_by: "data" (the split's size), "high" (the caller's cap) or "memory".
        mode: "train" (forward, backward, optimizer step) or "eval" (forward without gradients).
        margin: the safety margin: a trial fits within ``(1 - margin) * limit``.
        budget_bytes: that budget in bytes (None on CUDA when it could not be read).
        n_examples: the size of the split measured (None for a data set without a length); under DDP
            each rank's share, ``ceil(size / world_size)``.
        longest: how trial batches were made: ``scanned`` examples sized, the ``max`` and ``mean``
            bytes of one example and their ``ratio`` (1.0 for fixed-size data).
        world_size: ranks that agreed on every trial (1 without ``torch.distributed``).
        examples_processed: examples pushed through the model by the trials.
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
    mode: str = "train"
    margin: float = DEFAULT_MARGIN
    budget_bytes: float | None = None
    n_examples: int | None = None
    longest: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    examples_processed: int = 0

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
    """Bytes of the distinct tensor storages in ``obj`` (tensors nested in mappings, lists, tuples,
    objects with tensor attributes such as a model output)."""
    if isinstance(obj, torch.Tensor):
        key, nb = _storage_key(obj)
        if key in seen:
            return 0
        seen.add(key)
        return nb
    if isinstance(obj, Mapping):
        return sum(_tensor_tree_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_tree_bytes(v, seen) for v in obj)
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict) and not isinstance(obj, (nn.Module, type)):
        return sum(_tensor_tree_bytes(v, seen) for v in attrs.values() if isinstance(v, (torch.Tensor, Mapping, list, tuple)))
    return 0


def _tensor_keys(obj: object, keys: set[int]) -> None:
    if isinstance(obj, torch.Tensor):
        keys.add(_storage_key(obj)[0])
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _tensor_keys(v, keys)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensor_keys(v, keys)


def _as_batch(batch: Any, y: torch.Tensor | None) -> Any:
    return batch if y is None else (batch, y)


def training_step(
    task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, y: torch.Tensor | None = None
) -> torch.Tensor:
    """One plain step (forward, backward, optimizer step) on ``batch`` (or the pair ``(batch, y)``);
    returns the loss. The batch goes through :meth:`Task.forward_batch` and :meth:`Task.loss_of`."""
    batch = _as_batch(batch, y)
    optimizer.zero_grad(set_to_none=True)
    loss = task.loss_of(task.forward_batch(model, batch), batch)
    loss.backward()
    optimizer.step()
    return loss.detach()


def accounted_step_bytes(
    task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, y: torch.Tensor | None = None
) -> int:
    """Run one training step and return its accounted memory (see the module docstring, CPU)."""
    batch = _as_batch(batch, y)
    param_keys = {_storage_key(p)[0] for p in model.parameters()}
    input_keys: set[int] = set()
    _tensor_keys(batch, input_keys)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nb = _storage_key(t)
        if key not in param_keys and key not in input_keys:
            saved[key] = max(saved.get(key, 0), nb)
        return t

    optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = task.forward_batch(model, batch)
        loss = task.loss_of(out, batch)
    loss.backward()
    optimizer.step()
    seen: set[int] = set()
    params = sum(_tensor_tree_bytes(p, seen) for p in model.parameters())
    grads = sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    buffers = sum(_tensor_tree_bytes(b, seen) for b in model.buffers())
    opt_state = _tensor_tree_bytes(list(optimizer.state.values()), seen)
    batch_bytes = _tensor_tree_bytes(batch, seen)
    return params + grads + buffers + opt_state + batch_bytes + sum(saved.values()) + _tensor_tree_bytes(out, seen)


#: a resident-memory reading counts when it exceeds the accounted bytes by this fraction and this many bytes
RSS_OVER_FRACTION = 0.10
RSS_OVER_BYTES = 8 << 20


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def peak_rss_over(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """``(fn(), bytes)``: how far the process's resident memory peaked above where it stood when
    ``fn`` started (Linux: the peak is reset through ``/proc/self/clear_refs`` and read from
    ``VmHWM``); ``None`` where that is not available."""
    _trim_heap()  # memory a larger earlier trial freed, still resident, would hide this one's growth
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS:")
    except OSError:
        return fn(), None
    out = fn()
    try:
        return out, max(0, _status_bytes("VmHWM:") - before)
    except OSError:
        return out, None


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``; nothing elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _with_resident_peak(accounted: int, start_bytes: int, rss_delta: int | None) -> int:
    """The accounted bytes, or what the step really held (the bytes it started with plus the
    resident peak above them) where that is clearly more (see the module docstring)."""
    if rss_delta is None:
        return accounted
    real = start_bytes + rss_delta
    return real if real > accounted * (1 + RSS_OVER_FRACTION) and real - accounted > RSS_OVER_BYTES else accounted


def cpu_step_bytes(task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> int:
    """One training step's memory on CPU: accounted, or the resident peak where clearly more (read on
    the step's one run at that shape: what stays allocated for the shape, kernel primitives and their
    scratch space, counts, as training at that batch holds it too)."""
    seen: set[int] = set()
    start = sum(_tensor_tree_bytes(t, seen) for t in [*model.parameters(), *model.buffers()])
    start += _tensor_tree_bytes(list(optimizer.state.values()), seen) + _tensor_tree_bytes(batch, seen)
    accounted, delta = peak_rss_over(lambda: accounted_step_bytes(task, model, optimizer, batch))
    return _with_resident_peak(accounted, start, delta)


def cpu_eval_bytes(task: Task, model: nn.Module, batch: Any) -> int:
    """One evaluation step's memory on CPU: accounted, or the resident peak where clearly more."""
    seen: set[int] = set()
    start = sum(_tensor_tree_bytes(t, seen) for t in [*model.parameters(), *model.buffers()])
    start += _tensor_tree_bytes(batch, seen)
    accounted, delta = peak_rss_over(lambda: accounted_eval_bytes(task, model, batch))
    return _with_resident_peak(accounted, start, delta)


def eval_step(task: Task, model: nn.Module, batch: Any) -> torch.Tensor:
    """One evaluation step: forward and loss in eval mode without gradients (the mode is restored)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return task.loss_of(task.forward_batch(model, batch), batch)
    finally:
        model.train(was)


def accounted_eval_bytes(task: Task, model: nn.Module, batch: Any) -> int:
    """Run one evaluation step and return its accounted memory (see the module docstring, CPU)."""
    largest = [0]

    def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
        largest[0] = max(largest[0], _tensor_tree_bytes(out, set()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if next(m.children(), None) is None]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = task.forward_batch(model, batch)
            task.loss_of(out, batch)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    seen: set[int] = set()
    fixed = sum(_tensor_tree_bytes(p, seen) for p in model.parameters()) + sum(
        _tensor_tree_bytes(b, seen) for b in model.buffers())
    return fixed + _tensor_tree_bytes(batch, seen) + _tensor_tree_bytes(out, seen) + 2 * largest[0]


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


def fit_line(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
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


_fit_line = fit_line  # the old private name


def predict_max_batch(points: Sequence[tuple[int, float]], budget: float | None, cap: int) -> int | None:
    """The largest batch the line through ``points`` keeps within ``budget`` (capped at ``cap``);
    None without two points or a budget."""
    fixed, slope = fit_line(points)
    if budget is None or len(points) < 2 or not math.isfinite(slope):
        return None
    # a hair of tolerance: a batch that lands exactly on the budget must not lose one to rounding
    return cap if slope <= 0 else int(min(cap, max(0.0, (budget - fixed) / slope + 1e-6)))


# ------------------------------------------------------------------ the trial batches
def longest_first(source: Source, scan: int = SCAN_EXAMPLES, seed: int = 0) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Indices of ``source`` ordered by example size, largest first, and how they were found.

    In-memory arrays hold examples of one size: their order is ``0..n-1``. Any other indexable
    source has up to ``scan`` examples (all when the data set is no larger; else a random sample
    drawn with ``seed``) read one at a time and sized by the bytes of their tensors, as collated
    on their own (unpadded). A data set without indices (an ``IterableDataset``) returns None: its
    first examples are used.
    """
    if isinstance(source, ArraySource):
        return torch.arange(len(source)), {"scanned": 0, "ratio": 1.0, "how": "fixed-size arrays"}
    if not source.indexable:
        return None, {"scanned": 0, "ratio": math.nan, "how": "an iterable data set: its first examples"}
    n = len(source)
    if n <= scan:
        idx = torch.arange(n)
    else:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:scan]
    sizes = torch.tensor([float(_tensor_tree_bytes(source.fetch(i.view(1)), set())) for i in idx], dtype=torch.float64)
    order = torch.argsort(sizes, descending=True, stable=True)
    mx, mean = float(sizes.max()), float(sizes.mean())
    info = {"scanned": int(idx.numel()), "max_example_bytes": mx, "mean_example_bytes": mean,
            "ratio": mx / mean if mean > 0 else 1.0,
            "how": "the longest examples" + ("" if n <= scan else f" of a random sample of {scan}")}
    return idx[order], info


def _trial_batch(source: Source, order: torch.Tensor | None, b: int) -> Any:
    if order is None:
        return source.fetch(torch.arange(b))
    return source.fetch(order[torch.arange(b) % order.numel()])


# ------------------------------------------------------------------ agreement across ranks
class RankAgreement:
    """All ranks agree on each trial (``torch.distributed``; a no-op for one process).

    :meth:`outcome` all-reduces a status (0 fits, 1 does not fit, 2 error) with MAX, :meth:`minimum`
    an integer with MIN. Every rank calls them the same number of times in the same order because
    the search is a deterministic function of the agreed outcomes.
    """

    def __init__(self, group: Any = None, enabled: bool | None = None) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        active = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if active else 1
        self.enabled = active and self.world_size > 1 if enabled is None else bool(enabled)
        if self.enabled and not active:
            raise ValueError("distributed=True needs an initialised torch.distributed process group (run under torchrun)")
        self.device = torch.device("cpu")
        if self.enabled and dist.get_backend(group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        if not self.enabled:
            self.world_size = 1

    def _reduce(self, value: int, op: Any) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.dist.all_reduce(t, op=op, group=self.group)
        return int(t.item())

    def outcome(self, status: int) -> int:
        return self._reduce(status, self.dist.ReduceOp.MAX)

    def minimum(self, value: int) -> int:
        return self._reduce(value, self.dist.ReduceOp.MIN)


FITS, NO_FIT, ERROR = 0, 1, 2


def check_margin(margin: Any) -> None:
    """``margin``: the fraction of the memory limit kept free, a number in [0, 1)."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise ValueError(f"margin must be a number in [0, 1), got {margin!r}")


def check_memory_limit(memory_limit: Any) -> None:
    """``memory_limit``: None (the device's) or a positive number of bytes."""
    if memory_limit is not None and (isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit <= 0):
        raise ValueError(f"memory_limit must be a positive number of bytes, got {memory_limit!r}")


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
    mode: str = "train",
    margin: float = DEFAULT_MARGIN,
    longest: bool = True,
    scan: int = SCAN_EXAMPLES,
    seed: int = 0,
    distributed: bool | None = None,
    process_group: Any = None,
) -> MaxBatchResult:
    """The largest batch (a power of two, or the split's size) whose full step fits.

    Args:
        task: a Task (built-in or :meth:`Task.from_torch`) or a registered name.
        device: "cpu", "cuda" or "cuda:N".
        memory_limit: bytes the step may use. CPU default: half of the available RAM (psutil).
            CUDA default: None, i.e. what this process can hold when the search starts.
        model, optimizer: measure these (default: a fresh ``task.make_model`` and the task's
            optimizer). Their state is bitwise unchanged afterwards, also after an exception.
        low: smallest batch considered (2 by default: BatchNorm cannot train on one sample).
        high: largest batch considered; always capped at the split's size (per rank under DDP).
        probe_batches: small batches measured for the linear memory fit.
        norm: the model's norm when ``model`` is None (default: the task's).
        mode: "train" (a training step on the training split) or "eval" (forward without
            gradients, eval mode, on the validation split).
        margin: a trial fits within ``(1 - margin)`` of the limit, in [0, 1).
        longest: build trial batches from the longest examples (variable-length data); False: from
            the split's first examples.
        scan: how many examples to size when looking for the longest.
        seed: seeds the model's initialization and the sample of examples scanned.
        distributed: agree on every trial across ranks (None: when ``torch.distributed`` is
            initialised with more than one rank).
        process_group: the ranks that agree (default: the whole job).

    Returns:
        A :class:`MaxBatchResult` with the answer, the fit, the margin and every size tried.

    Raises:
        ValueError: bad arguments (naming the argument, the allowed range and the value).
        Any non-OOM exception of the step propagates (after the state is restored); under DDP the
        other ranks raise a RuntimeError naming the batch, instead of waiting.
    """
    task = get_task(task)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    check_margin(margin)
    if not isinstance(scan, int) or isinstance(scan, bool) or scan < 1:
        raise ValueError(f"scan must be a positive integer, got {scan!r}")
    source = task.train_source if mode == "train" else task.val_source
    split = "training" if mode == "train" else "validation"
    try:
        n: int | None = len(source)
    except TypeError:
        n = None
    if n is None and high is None:
        raise ValueError(f"the {split} set of task {task.name!r} has no length: give high= (the largest batch to consider)")
    agree = RankAgreement(process_group, distributed)
    if n is not None and agree.enabled:
        n = math.ceil(n / agree.world_size)  # each rank's share: a DistributedSampler gives a rank no more per epoch
    top = n if n is not None else high
    assert top is not None
    if not isinstance(low, int) or isinstance(low, bool) or not 1 <= low <= top:
        raise ValueError(f"low must be an integer in [1, {top}] (the {split}-set size), got {low!r}")
    if high is not None and (not isinstance(high, int) or isinstance(high, bool) or high < low):
        raise ValueError(f"high must be an integer >= low ({low}), got {high!r}")
    check_memory_limit(memory_limit)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    cap = top if high is None else min(high, top)
    capped_by = "data" if n is not None and (high is None or high >= n) else "high"
    if dev.type == "cpu" and memory_limit is None:
        memory_limit = default_memory_limit("cpu")

    # one snapshot of every RNG around everything: building the model, scanning (augmented) data, the trials
    with preserved_state():
        torch.manual_seed(seed)
        if model is None:
            model = task.make_model(norm=norm).to(dev)
        else:
            on = {p.device for p in model.parameters()}
            if on and on != {dev} and not (dev.type == "cuda" and dev.index is None and {d.type for d in on} == {"cuda"}):
                raise ValueError(f"model is on {sorted(map(str, on))} but device={device!r}; move it there first")
        if optimizer is None and mode == "train":
            optimizer = task.build_optimizer(model, task.lr)
        if longest:
            order, longest_info = longest_first(source, scan=scan, seed=seed)
        else:
            order, longest_info = None, {"scanned": 0, "ratio": math.nan, "how": "the first examples"}
        # DDP keeps one more copy of the gradients (its buckets); a local trial does not allocate it
        ddp_bytes = sum(_nbytes(p) for p in model.parameters() if p.requires_grad) if agree.enabled and mode == "train" else 0
        if memory_limit is not None:
            budget: float | None = memory_limit * (1 - margin)
        elif dev.type == "cuda":
            free, _total = torch.cuda.mem_get_info(dev)
            budget = (free + torch.cuda.memory_allocated(dev)) * (1 - margin)
        else:
            budget = None

        processed = [0]

        def measure(b: int) -> float:
            """Bytes of one step at batch ``b``; raises on OOM."""
            batch = move_to_device(_trial_batch(source, order, b), dev)
            processed[0] += b
            if mode == "train":
                model.train()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                if mode == "train":
                    assert optimizer is not None
                    training_step(task, model, optimizer, batch)
                else:
                    eval_step(task, model, batch)
                torch.cuda.synchronize(dev)
                return float(torch.cuda.max_memory_allocated(dev)) + ddp_bytes
            if mode == "train":
                assert optimizer is not None
                return float(cpu_step_bytes(task, model, optimizer, batch)) + ddp_bytes
            return float(cpu_eval_bytes(task, model, batch))

        def trial(b: int, within_budget: bool) -> tuple[int, float]:
            """Run one trial and agree on it across ranks: ``(agreed status, this rank's bytes)``.
            With ``within_budget`` a step that ran but used more than the budget does not fit."""
            status, used, error = FITS, math.nan, None
            try:
                used = measure(b)
            except Exception as e:  # noqa: BLE001 - only OOM is swallowed; the rest is re-raised below
                if is_oom(e):
                    free_memory()
                    status = NO_FIT
                else:
                    status, error = ERROR, e
            if status == FITS and within_budget and budget is not None and used > budget:
                status = NO_FIT
            agreed = agree.outcome(status)
            if agreed == ERROR:
                if error is not None:
                    raise error
                raise RuntimeError(f"max_batch_size: another rank failed at batch {b} (see its error); "
                                   "this rank stops too instead of waiting for it")
            return agreed, used

        tried: list[list[Any]] = []

        def try_fn(b: int) -> bool:
            status, used = trial(b, within_budget=True)
            tried.append([b, status == FITS, used])
            return status == FITS

        with preserved_state(model, optimizer):
            probes: list[tuple[int, float]] = []
            if dev.type == "cpu":
                # one unmeasured step first: what a process allocates once (thread pools, the first use of a
                # kernel, the optimizer's state) would otherwise count as the first probe's memory and bend
                # the fit; its outcome is the first probe's to report
                try:
                    measure(min(max(min(probe_batches), low), cap))
                except Exception:  # noqa: BLE001
                    free_memory()
            for b in sorted({min(max(p, low), cap) for p in probe_batches}):
                status, used = trial(b, within_budget=False)
                if status != FITS:  # an OOM on some rank: no larger probe
                    break
                probes.append((b, used))
            fixed, slope = fit_line(probes)
            predicted = predict_max_batch(probes, budget, cap)
            guess = None if predicted is None else max(predicted, low)
            agreed_guess = agree.minimum(guess if guess is not None else 0)
            guess = agreed_guess if agreed_guess > 0 else None
            best, _ = search_max_batch(try_fn, power_candidates(low, cap), guess=guess)
    if best is None or best < cap:  # nothing fits (not even low) is memory's limit too
        capped_by = "memory"
    return MaxBatchResult(
        batch_size=best, device=str(dev), memory_limit=memory_limit, fixed_bytes=fixed, per_sample_bytes=slope,
        probes=[[b, m] for b, m in probes], tried=tried, predicted=predicted, capped_by=capped_by, mode=mode,
        margin=float(margin), budget_bytes=budget, n_examples=n, longest=longest_info, world_size=agree.world_size,
        examples_processed=processed[0],
    )
