"""An Accelerate-style decorator that finds the largest batch that runs, keeps the effective batch
and restores state between tries: ``batchlab.executable_batch_size``.

Same calling convention as Accelerate's ``find_executable_batch_size`` (the decorated function
takes ``batch_size`` as its first argument and is called without it)::

    @batchlab.executable_batch_size(starting_batch_size=128, model=model, optimizer=optimizer)
    def train(batch_size, gradient_accumulation_steps, learning_rate):
        ...

    train()                      # runs with the largest batch that fits
    train.result                 # ExecutableBatch: batch, accumulation, LR and every try

What it does that Accelerate's does not (its users' reports: a x0.9 back-off that needs a dozen
tries, nothing restored between tries, neither the LR nor the accumulation adjusted, an OOM in
evaluation that shrinks the training batch):

- **Few tries.** Sizes come from the powers of two below the starting batch (and the starting
  batch itself), largest first: from 128 with room for 40, a batch of 32 is found on the third try,
  where x0.9 needs twelve (to 36). With ``probe=`` (one training step at a given batch, returning its bytes or None) the
  size is *predicted* before the function runs: probes at small batches fit ``memory = fixed +
  per_sample * B`` (the bytes the probe returns, or the CUDA peak), the prediction is checked and
  refined by the pure search of :func:`batchlab.batchsize.search_max_batch` over cheap probe steps,
  and the function then runs once at the answer.
- **The effective batch is kept.** With micro-batch ``b`` below the wanted ``effective_batch_size``
  (default: the starting batch) the function gets ``gradient_accumulation_steps = ceil(E / b)``
  and a micro-batch of ``ceil(E / k)`` (so ``b * k == E`` whenever the sizes divide), when its
  signature has a ``gradient_accumulation_steps`` parameter; the values are on ``.result``
  either way.
- **The LR follows the effective batch** only when that has to change (no accumulation parameter,
  or sizes that do not divide): ``learning_rate`` is scaled by ``lr_rule`` (linear for SGD, square
  root for Adam, as :func:`batchlab.train.scale_lr`), passed as ``learning_rate`` when the function
  takes it and written into ``optimizer``'s param groups when one is given.
- **State is restored after every failed try**: the model's parameters, buffers, gradients and
  mode, the optimizer's state and every RNG (torch, CUDA, NumPy, Python), via
  :class:`batchlab.batchsize.state.Snapshot` (pass ``model=`` and ``optimizer=``; the RNGs are
  restored regardless).
- **An OOM in evaluation does not shrink the training batch.** An error raised inside
  :func:`evaluation` (or while ``model``, when given, is in eval mode) is an evaluation OOM: the
  evaluation batch is halved when the function takes ``eval_batch_size``; otherwise the error is
  raised with a message saying so. The training batch stays.

OOMs are recognized by :func:`batchlab.train.is_oom`. The function is re-run from the start after
a failed try, as with Accelerate: put the model's and optimizer's creation inside it, or pass them
here to have them restored.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from batchlab.batchsize.memory import DEFAULT_MARGIN, check_margin, check_memory_limit, fit_line, power_candidates, predict_max_batch, search_max_batch
from batchlab.batchsize.state import Snapshot, preserved_state
from batchlab.train import default_lr_rule, is_oom, scale_lr
from batchlab.train.config import LR_RULES
from batchlab.train.oom import free_memory
from batchlab.train.optim import lr_schedulers, optimizer_name

__all__ = ["ExecutableBatch", "evaluation", "executable_batch_size"]

_phase = threading.local()


@contextlib.contextmanager
def evaluation() -> Iterator[None]:
    """Mark the body as evaluation: an out-of-memory error raised in it shrinks the evaluation
    batch, never the training batch."""
    before = getattr(_phase, "eval", False)
    _phase.eval = True
    try:
        yield
    except BaseException as e:
        if is_oom(e):
            try:
                e.batchlab_phase = "eval"  # type: ignore[attr-defined]
            except AttributeError:  # pragma: no cover - exceptions with __slots__
                pass
        raise
    finally:
        _phase.eval = before


@dataclass
class ExecutableBatch:
    """What :func:`executable_batch_size` settled on (plain data).

    Attributes:
        batch_size: the micro-batch passed as ``batch_size``.
        gradient_accumulation_steps: micro-batches per optimizer step.
        effective_batch_size: ``batch_size * gradient_accumulation_steps``.
        target_batch_size: the effective batch wanted.
        learning_rate: the LR for the effective batch (None when no LR was given or found).
        lr_factor: ``learning_rate / the LR given`` (1.0 when the effective batch was kept).
        eval_batch_size: the evaluation batch passed (None when the function takes none).
        tried: every try in order: ``[batch, eval_batch, phase, outcome]`` with phase "probe" or
            "run" and outcome "ok", "oom" or "eval-oom".
        probes: ``[batch, bytes]`` the memory fit used (probe path only).
        predicted: the fit's prediction (probe path with memory figures only).
    """

    batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    target_batch_size: int
    learning_rate: float | None
    lr_factor: float
    eval_batch_size: int | None = None
    tried: list[list[Any]] = field(default_factory=list)
    probes: list[list[float]] = field(default_factory=list)
    predicted: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _plan(micro: int, target: int, can_accumulate: bool) -> tuple[int, int]:
    """``(micro-batch, accumulation)`` for a fitting micro-batch ``micro`` and the wanted ``target``."""
    if micro >= target:
        return target, 1
    if not can_accumulate:
        return micro, 1
    k = math.ceil(target / micro)
    return math.ceil(target / k), k


def _default_rule(optimizer: torch.optim.Optimizer | None) -> str:
    """The LR rule for ``optimizer`` (square root for Adam/AdamW, none for L-BFGS, else linear)."""
    return default_lr_rule(optimizer_name(optimizer) or "sgd") if optimizer is not None else "linear"


def _is_eval_oom(e: BaseException, model: nn.Module | None) -> bool:
    if getattr(e, "batchlab_phase", None) == "eval":
        return True
    return model is not None and not model.training


def executable_batch_size(
    function: Callable[..., Any] | None = None,
    starting_batch_size: int = 128,
    *,
    effective_batch_size: int | None = None,
    low: int = 1,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    learning_rate: float | None = None,
    lr_rule: str | None = None,
    starting_eval_batch_size: int | None = None,
    probe: Callable[[int], float | None] | None = None,
    probe_batches: Sequence[int] = (2, 4, 8),
    memory_limit: int | None = None,
    margin: float = DEFAULT_MARGIN,
    scheduler: Any = None,
) -> Any:
    """Decorate ``function(batch_size, ...)`` to run it with the largest batch that fits.

    Args:
        function: the function (``batch_size`` first); None when used as ``@executable_batch_size(...)``.
        starting_batch_size: the first (largest) batch tried, as Accelerate's.
        effective_batch_size: examples per optimizer step to keep (default: ``starting_batch_size``).
        low: the smallest micro-batch considered.
        model, optimizer: restored after each failed try (and ``optimizer``'s LR co-scaled).
        learning_rate: the LR for ``effective_batch_size`` (default: ``optimizer``'s first group's
            configured LR, its ``initial_lr`` when an LR scheduler has already scaled ``lr``).
        lr_rule: "linear", "sqrt" or "none" (default: "sqrt" for Adam/AdamW, else "linear").
        starting_eval_batch_size: the first evaluation batch, when the function takes
            ``eval_batch_size`` (default: ``starting_batch_size``).
        probe: ``probe(batch)`` runs one training step at ``batch`` and returns its bytes (or None:
            the CUDA peak is read when CUDA is in use); then the batch is found by probes and the
            function runs once. Without it the function itself is each try.
        probe_batches: the small batches probed for the memory fit.
        memory_limit: bytes a probe may use (default on CUDA: what the device can hold).
        margin: a probe fits within ``(1 - margin) * memory_limit``.
        scheduler: the torch LR scheduler driving ``optimizer``, if any: its base LRs are co-scaled
            with the optimizer's (else its next ``step()`` would undo the co-scaling), and its position
            is restored after a failed try, as the model and optimizer are.

    Returns:
        The wrapped function; it returns ``function``'s value, and ``wrapper.result`` is the
        :class:`ExecutableBatch` of its last call.
    """
    if function is None:
        return functools.partial(
            executable_batch_size, starting_batch_size=starting_batch_size, effective_batch_size=effective_batch_size,
            low=low, model=model, optimizer=optimizer, learning_rate=learning_rate, lr_rule=lr_rule,
            starting_eval_batch_size=starting_eval_batch_size, probe=probe, probe_batches=probe_batches,
            memory_limit=memory_limit, margin=margin, scheduler=scheduler,
        )
    if not callable(function):
        raise TypeError(f"function must be callable, got {type(function).__name__}")
    for name, v in (("starting_batch_size", starting_batch_size), ("low", low)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if low > starting_batch_size:
        raise ValueError(f"low must be <= starting_batch_size ({starting_batch_size}), got {low}")
    target = starting_batch_size if effective_batch_size is None else effective_batch_size
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(f"effective_batch_size must be a positive integer, got {effective_batch_size!r}")
    rule = lr_rule if lr_rule is not None else _default_rule(optimizer)
    if rule not in LR_RULES:
        raise ValueError(f"lr_rule must be one of {', '.join(LR_RULES)}, got {lr_rule!r}")
    check_margin(margin)
    check_memory_limit(memory_limit)
    params = inspect.signature(function).parameters
    names = list(params)
    if not names:
        raise TypeError(f"{function.__name__} must take batch_size as its first argument")
    takes = {k: k in params for k in ("gradient_accumulation_steps", "learning_rate", "eval_batch_size")}
    base_lr = learning_rate
    if base_lr is None and optimizer is not None:  # torch's schedulers keep the configured LR as "initial_lr"
        base_lr = float(optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"]))
    scheds = lr_schedulers(scheduler)
    sched_bases = [list(sch.base_lrs) for sch in scheds]
    applied = [1.0]  # the LR factor the last call left in the optimizer's param groups

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if len(names) < len(args) + 1:
            raise TypeError(f"batch_size is passed to {function.__name__} by the decorator; call it without it: "
                            f"{function.__name__}({', '.join(names[1:])})")
        for k in ("batch_size", *(k for k, v in takes.items() if v)):
            if k in kwargs:
                raise TypeError(f"{k} is set by the decorator; do not pass it to {function.__name__}")
        tried: list[list[Any]] = []
        probes: list[list[float]] = []
        predicted: int | None = None
        sched_states = [copy.deepcopy(sch.state_dict()) for sch in scheds]  # position, last LRs: restored per try

        def restore_schedulers() -> None:
            for sch, state in zip(scheds, sched_states):
                sch.load_state_dict(copy.deepcopy(state))

        # a micro-batch above the effective batch is never needed
        candidates = power_candidates(low, max(low, min(starting_batch_size, target)))
        if probe is not None:
            best, probes, predicted = _probe_search(probe, candidates, tried, probe_batches, memory_limit, margin,
                                                    model, optimizer, restore_schedulers)
            if best is None:
                raise RuntimeError(f"no executable batch size: a probe at batch {low} (low) ran out of memory")
            candidates = [c for c in candidates if c <= best]
        eval_cands = power_candidates(1, starting_eval_batch_size or starting_batch_size) if takes["eval_batch_size"] else [None]
        # the optimizer's LRs as configured for the effective batch: a factor an earlier call applied is taken
        # out (a loop calling the function once per epoch would otherwise scale the LR again every time);
        # every try sets the groups from these
        group_lrs = [(g["lr"] / applied[0], g["initial_lr"] / applied[0] if "initial_lr" in g else None)
                     for g in optimizer.param_groups] if optimizer is not None else []
        snap = Snapshot(model, optimizer)
        i, j = len(candidates) - 1, len(eval_cands) - 1
        while True:
            restore_schedulers()
            micro, acc = _plan(candidates[i], target, takes["gradient_accumulation_steps"])
            effective = micro * acc
            factor = 1.0 if effective == target else scale_lr(1.0, target, effective, rule)
            lr = None if base_lr is None else base_lr * factor
            if optimizer is not None:  # from the configured LRs on every try
                for g, (glr, ginit) in zip(optimizer.param_groups, group_lrs):
                    g["lr"] = glr * factor
                    if ginit is not None:
                        g["initial_lr"] = ginit * factor
                applied[0] = factor
            for sch, bases in zip(scheds, sched_bases):  # from the original bases on every try
                sch.base_lrs = [b * factor for b in bases]
            call_kw = dict(kwargs)
            if takes["gradient_accumulation_steps"]:
                call_kw["gradient_accumulation_steps"] = acc
            if takes["learning_rate"]:
                call_kw["learning_rate"] = lr
            if takes["eval_batch_size"]:
                call_kw["eval_batch_size"] = eval_cands[j]
            wrapper.result = ExecutableBatch(  # type: ignore[attr-defined]
                batch_size=micro, gradient_accumulation_steps=acc, effective_batch_size=effective,
                target_batch_size=target, learning_rate=lr, lr_factor=factor, eval_batch_size=eval_cands[j],
                tried=tried, probes=probes, predicted=predicted)
            try:
                out = function(micro, *args, **call_kw)
            except Exception as e:  # noqa: BLE001 - only OOM is retried
                if not is_oom(e):
                    raise
                in_eval = _is_eval_oom(e, model)
                tried.append([micro, eval_cands[j], "run", "eval-oom" if in_eval else "oom"])
                del e
                snap.restore()
                free_memory()
                if in_eval:
                    if not takes["eval_batch_size"]:
                        raise RuntimeError(
                            f"{function.__name__} ran out of memory during evaluation at training batch {micro}; the "
                            "training batch is kept (an evaluation OOM says nothing about it). Give the function an "
                            "eval_batch_size parameter to have it searched, or lower the evaluation batch") from None
                    if j == 0:
                        raise RuntimeError(f"no executable evaluation batch size: evaluation ran out of memory at "
                                           f"eval_batch_size=1 (training batch {micro})") from None
                    j -= 1
                    continue
                if i == 0:
                    raise RuntimeError(f"no executable batch size: {function.__name__} ran out of memory at "
                                       f"batch {candidates[0]} (low={low})") from None
                i -= 1
                continue
            tried.append([micro, eval_cands[j], "run", "ok"])
            return out

    wrapper.result = None  # type: ignore[attr-defined]
    return wrapper


def _probe_search(
    probe: Callable[[int], float | None], candidates: list[int], tried: list[list[Any]],
    probe_batches: Sequence[int], memory_limit: int | None, margin: float,
    model: nn.Module | None, optimizer: torch.optim.Optimizer | None, restore_schedulers: Callable[[], None],
) -> tuple[int | None, list[list[float]], int | None]:
    """Find the largest candidate whose probe step fits: a memory fit from small probes predicts
    it, :func:`search_max_batch` checks it. Every probe runs inside restored state (the LR
    schedulers' positions too)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    budget = None
    if memory_limit is not None:
        budget = memory_limit * (1 - margin)
    elif cuda:
        free, _ = torch.cuda.mem_get_info()
        budget = (free + torch.cuda.memory_allocated()) * (1 - margin)

    def run(b: int) -> float | None:
        """Bytes of one probe step (NaN when unknown); None on OOM."""
        try:
            with preserved_state(model, optimizer):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                used = probe(b)
                if used is None and cuda:
                    torch.cuda.synchronize()
                    used = float(torch.cuda.max_memory_allocated())
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            free_memory()
            return None
        finally:
            restore_schedulers()
        return math.nan if used is None else float(used)

    points: list[tuple[int, float]] = []
    for b in sorted({min(max(p, candidates[0]), candidates[-1]) for p in probe_batches}):
        used = run(b)
        tried.append([b, None, "probe", "oom" if used is None else "ok"])
        if used is None:
            break
        if math.isfinite(used):
            points.append((b, used))
    predicted = predict_max_batch(points, budget, candidates[-1])
    fixed, slope = fit_line(points)

    def try_fn(b: int) -> bool:
        used = run(b)
        ok = used is not None and (budget is None or not math.isfinite(used) or used <= budget)
        tried.append([b, None, "probe", "ok" if ok else "oom"])
        return ok

    guess = candidates[-1] if predicted is None else max(predicted, candidates[0])
    best, _ = search_max_batch(try_fn, candidates, guess=guess)
    return best, [[b, m] for b, m in points], predicted
