"""Time per training step and examples per second across batch sizes, and the knee of that curve."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from batchlab.batchsize.batches import check_positive_int
from batchlab.batchsize.state import preserved_state
from batchlab.data.sources import ArraySource, batch_size_of
from batchlab.tasks import Task, get_task
from batchlab.train import is_oom
from batchlab.train.oom import free_memory

KNEE_FRACTION = 0.9  # the knee: smallest batch reaching this fraction of the peak examples/s


def find_knee(batch_sizes: Sequence[int], examples_per_sec: Sequence[float], fraction: float = KNEE_FRACTION) -> int | None:
    """Smallest batch whose throughput reaches ``fraction`` of the best measured throughput.

    Beyond the knee a bigger batch buys little speed (the device is saturated), while it still
    costs statistical efficiency (McCandlish et al. 2018). Non-finite entries (failed sizes) are
    ignored; None when nothing was measured.
    """
    if len(batch_sizes) != len(examples_per_sec):
        raise ValueError(
            f"batch_sizes and examples_per_sec must have the same length, got {len(batch_sizes)} and {len(examples_per_sec)}"
        )
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    pts = sorted((b, r) for b, r in zip(batch_sizes, examples_per_sec) if math.isfinite(r) and r > 0)
    if not pts:
        return None
    peak = max(r for _, r in pts)
    return next(b for b, r in pts if r >= fraction * peak)


SETTLE_TOLERANCE = 1.25  # a timed step within this factor of a size's minimum confirms that minimum


def _settled(times: Sequence[float], need: int = 2) -> bool:
    """True when at least ``need`` timed steps lie within SETTLE_TOLERANCE of their minimum."""
    if not times:
        return False
    lo = min(times)
    return sum(t <= SETTLE_TOLERANCE * lo for t in times) >= min(need, len(times)) and len(times) >= need


def monotone_step_times(batch_sizes: Sequence[int], step_time: Sequence[float]) -> list[float]:
    """Repair a step-time curve so that a smaller batch never takes longer than a larger one.

    A step on B examples does a subset of the work of a step on B' > B examples, so its true time
    is at most the larger one's; a measured smaller-batch time above it is contention (a descheduled
    thread, another process), not the model. Each time becomes the minimum over its own and every
    larger size's time (NaN entries are skipped and stay NaN).
    """
    order = sorted(range(len(batch_sizes)), key=lambda i: batch_sizes[i], reverse=True)
    out = list(step_time)
    best = math.inf
    for i in order:
        t = step_time[i]
        if math.isfinite(t):
            best = min(best, t)
            out[i] = best
    return out


def task_step(task: Task, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> torch.Tensor:
    """One plain training step on any task (the task's forward and loss, backward, optimizer step);
    returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = task.loss_of(task.forward_batch(model, batch), batch)
    loss.backward()
    optimizer.step()
    return loss.detach()


@dataclass
class ThroughputResult:
    """Per batch size: seconds per step (minimum over interleaved timed steps), examples per second, seconds per epoch.

    Lists are aligned with ``batch_sizes``; a size that ran out of memory has NaN entries and
    ``status`` "oom"; one whose step raised anything else has NaN entries, ``status`` "failed" and
    the error in ``errors`` (the other sizes are still measured).
    """

    batch_sizes: list[int]
    step_time: list[float]
    examples_per_sec: list[float]
    epoch_time: list[float]
    status: list[str]
    knee: int | None
    n_train: int | None
    device: str
    warmup: int
    repeats: int
    examples_processed: int = 0  # training examples pushed through forward/backward while measuring
    step_times_all: list[list[float]] = field(default_factory=list)
    step_time_median: list[float] = field(default_factory=list)
    step_time_raw: list[float] = field(default_factory=list)  # per-size minimum before the monotone repair
    errors: list[str | None] = field(default_factory=list)  # per size: the error of a "failed" step, else None
    #: examples/s the task's data pipeline delivers (its Dataset, collate_fn and DataLoader workers), read
    #: at ``data_batch``; None for in-memory arrays. Step times above exclude it: a step faster than
    #: ``data_batch / data_examples_per_sec`` waits for data in a real run.
    data_examples_per_sec: float | None = None
    data_batch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def data_bound(self) -> list[int]:
        """The sizes whose steps alone run faster than the data pipeline delivers (a real run waits for data)."""
        if self.data_examples_per_sec is None:
            return []
        return [b for b, e in zip(self.batch_sizes, self.examples_per_sec)
                if math.isfinite(e) and e > self.data_examples_per_sec]

    def time_per_step(self, batch: int) -> float:
        """Measured seconds per step at ``batch`` (log-log interpolation between measured sizes)."""
        pts = [(b, t) for b, t in zip(self.batch_sizes, self.step_time) if math.isfinite(t)]
        if not pts:
            return math.nan
        pts.sort()
        for b, t in pts:
            if b == batch:
                return t
        if batch <= pts[0][0]:
            return pts[0][1]
        if batch >= pts[-1][0]:
            (b0, t0), (b1, t1) = (pts[-2], pts[-1]) if len(pts) > 1 else (pts[-1], pts[-1])
        else:
            i = next(i for i, (b, _) in enumerate(pts) if b > batch)
            (b0, t0), (b1, t1) = pts[i - 1], pts[i]
        if b0 == b1:
            return t1 * batch / b1
        w = (math.log(batch) - math.log(b0)) / (math.log(b1) - math.log(b0))
        return math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0)))


def throughput(
    task: Task | str,
    batch_sizes: Sequence[int],
    *,
    device: str = "cpu",
    warmup: int = 2,
    repeats: int = 5,
    max_repeats: int = 50,
    min_time: float = 0.02,
    time_limit: float = 20.0,
    extra_examples: int | None = None,
    norm: str | None = None,
    model: torch.nn.Module | None = None,
    progress: bool = False,
) -> ThroughputResult:
    """Measure the training step time at each batch size, robustly on a shared machine.

    Each size gets ``warmup`` untimed steps (allocator and kernel caches). The timed steps are then
    taken in *interleaved rounds*: round r times one step at every size in turn, so a burst of
    load from another process hits neighbouring sizes alike instead of one size's whole
    measurement. ``repeats`` rounds are always taken; further rounds are taken only for sizes whose
    timed steps so far add up to less than ``min_time`` seconds (fast steps are the noisiest and the
    cheapest to repeat), up to ``max_repeats`` steps per size, ``time_limit`` seconds in all and
    ``extra_examples`` training examples in all (smallest sizes first, so the extra rounds cost
    little: by default a quarter of ``sum(batch_sizes)``).
    A size whose minimum is not yet confirmed by a second step within 25% of it also gets extra
    rounds (a stalled step is not repeated by chance). The reported step time is the *minimum* over
    the timed steps (contention only ever adds time, so the minimum is the least-disturbed
    estimate; the median is kept in ``step_time_median``), repaired to be non-decreasing in the
    batch size (:func:`monotone_step_times`; the raw minima are kept in ``step_time_raw``).
    CUDA is synchronised around each timed step. Model, optimizer and RNG state are restored
    after every step, so each step starts from the same weights; the caller's random generators
    (torch, CUDA, NumPy, Python) are left as they were. Any task works: batches come from
    ``task.sample_batch`` (pairs, tuples or mappings), the step from ``task.forward_batch`` and
    ``task.loss_of``.

    Args:
        task: a Task or a registered name.
        batch_sizes: sizes to time; each must be in ``[1, len(train_set)]``.
        device: "cpu" or "cuda[:N]".
        warmup: untimed steps per size.
        repeats: timed steps per size that are always taken (at least 1).
        max_repeats: at most this many timed steps per size.
        min_time: keep timing a size while its timed steps add up to less than this (seconds).
        time_limit: no extra rounds after this many seconds of timing in all.
        extra_examples: examples the extra rounds may spend in all (None: ``sum(batch_sizes) // 4``).
        norm: the model's norm when ``model`` is None.
        model: time this model instead of a fresh ``task.make_model``.
        progress: show a progress bar.
    """
    task = get_task(task)
    n = task.size("train")  # None: a stream without a length (any batch it can fill)
    sizes = [int(b) for b in batch_sizes]
    if not sizes:
        raise ValueError("batch_sizes must not be empty")
    for b in sizes:
        if not 1 <= b <= (n if n is not None else b):
            raise ValueError(f"batch_sizes must be in [1, {n}] (the training-set size); got {b}")
    check_positive_int("repeats", repeats)
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    max_repeats = max(int(max_repeats), repeats)
    allowance = sum(sizes) // 4 if extra_examples is None else int(extra_examples)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    with preserved_state():  # building the model and reading (augmented) batches draw random numbers
        return _throughput(task, sizes, dev, warmup, repeats, max_repeats, min_time, time_limit, allowance, norm,
                           model, progress)


def _elements(batch: Any) -> int:
    """Tensor elements in a batch (a padded batch's size: its examples times its longest one)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, Mapping):
        return sum(_elements(v) for v in batch.values())
    if isinstance(batch, (tuple, list)):
        return sum(_elements(v) for v in batch)
    return 0


def _representative_batch(task: Task, b: int, dev: torch.device, tries: int = 5) -> Any:
    """The batch of ``b`` examples a size is timed on. Examples of one shape: the first sample. Of
    varying length (a collate that pads to the longest): one random batch may be padded far less or
    more than is typical at that size, so of ``tries`` samples the one whose padded size is the
    median is taken (the step time is then the minimum over repeats of that one batch)."""
    first = task.sample_batch(b, seed=0, device=dev)
    second = task.sample_batch(b, seed=1, device=dev)
    if _elements(first) == _elements(second):
        return first
    samples = [first, second] + [task.sample_batch(b, seed=s, device=dev) for s in range(2, tries)]
    samples.sort(key=_elements)
    return samples[len(samples) // 2]


def _throughput(task: Task, sizes: list[int], dev: torch.device, warmup: int, repeats: int, max_repeats: int,
                min_time: float, time_limit: float, allowance: int, norm: str | None, model: torch.nn.Module | None,
                progress: bool) -> ThroughputResult:
    n = task.size("train")  # None: a stream without a length (no epoch time)
    task.check(dev)
    model = (model if model is not None else task.make_model(norm=norm)).to(dev)
    optimizer = task.build_optimizer(model, task.lr)
    batches = {b: _representative_batch(task, b, dev) for b in sizes}
    times: dict[int, list[float]] = {b: [] for b in sizes}
    failed: set[int] = set()
    errors: dict[int, str] = {}
    processed = 0

    def one_step(b: int, timed: bool) -> None:
        nonlocal processed
        batch = batches[b]
        try:
            with preserved_state(model, optimizer):
                model.train()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                task_step(task, model, optimizer, batch)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                dt = time.perf_counter() - t0
            processed += b
            if timed:
                times[b].append(dt)
        except Exception as e:  # noqa: BLE001 - a size that fails is recorded; the others are still measured
            if is_oom(e):
                free_memory()
            else:
                errors[b] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            failed.add(b)

    from tqdm.auto import tqdm

    t_begin = time.perf_counter()
    for b in tqdm(sizes, desc="throughput warm-up", unit="size", disable=not progress, leave=False):
        for _ in range(warmup):
            if b not in failed:
                one_step(b, timed=False)
    for r in range(max_repeats):
        if r >= repeats and time.perf_counter() - t_begin > time_limit:
            break
        if r < repeats:
            todo = [b for b in sizes if b not in failed]
        else:
            todo = []
            for b in sorted(b for b in sizes if b not in failed and (sum(times[b]) < min_time or not _settled(times[b]))):
                if b <= allowance:
                    todo.append(b)
                    allowance -= b
        if not todo:
            break
        for b in todo:
            one_step(b, timed=True)
    data_eps, data_b = _data_rate(task, [b for b in sizes if b not in failed] or sizes)
    raw = [min(times[b]) if b not in failed and times[b] else math.nan for b in sizes]
    step_time = monotone_step_times(sizes, raw)
    median = [statistics.median(times[b]) if b not in failed and times[b] else math.nan for b in sizes]
    status = [("failed" if b in errors else "oom") if b in failed else "ok" for b in sizes]
    eps = [b / t if math.isfinite(t) and t > 0 else math.nan for b, t in zip(sizes, step_time)]
    epoch = [math.ceil(n / b) * t if n is not None else math.nan for b, t in zip(sizes, step_time)]
    return ThroughputResult(
        batch_sizes=sizes, step_time=step_time, examples_per_sec=eps, epoch_time=epoch, status=status,
        knee=find_knee(sizes, eps), n_train=n, device=str(dev), warmup=warmup, repeats=repeats,
        examples_processed=processed, step_times_all=[times[b] for b in sizes], step_time_median=median,
        step_time_raw=raw, errors=[errors.get(b) for b in sizes], data_examples_per_sec=data_eps, data_batch=data_b,
    )


def _data_rate(task: Task, sizes: list[int], seconds: float = 2.0, max_batches: int = 20) -> tuple[float | None, int | None]:
    """Examples/s of the task's training data pipeline at the median timed size: batches streamed
    as training reads them (workers, collate), the first left out (worker start-up), for about
    ``seconds`` or ``max_batches`` batches. None for in-memory arrays (nothing to wait for)."""
    source = task.train_source
    if isinstance(source, ArraySource) or not source.indexable:
        return None, None
    b = sorted(sizes)[len(sizes) // 2]
    n = len(source)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    batches = [order[(i * b) % n:(i * b) % n + b] for i in range(max_batches)]
    batches = [idx for idx in batches if idx.numel() == b]
    stream = source.stream(iter(batches))
    try:
        next(stream)  # worker start-up and the first fetch: not the steady rate
        t0, got = time.perf_counter(), 0
        for batch in stream:
            got += batch_size_of(batch)
            if time.perf_counter() - t0 > seconds:
                break
        dt = time.perf_counter() - t0
    except StopIteration:
        return None, None
    finally:
        stream.close()
    return (got / dt if got and dt > 0 else None), b
