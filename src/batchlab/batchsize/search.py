"""Pivot search over batch sizes (claim C14): start at a pivot, halve or double while it helps.

The procedure, in the words of the claim: train at the pivot (128 by default) and at its
neighbours x0.5 and x2, each with the learning rate scaled from the task's by the optimizer's rule
(linear for SGD, Goyal et al. 2017; square root for Adam, Malladi et al. 2022) and the same budget
in examples, over at least two seeds. If a neighbour beats the pivot by more than the seed-to-seed
noise, keep moving in that direction (x0.5 or x2) while each move improves by more than the noise.
Bounded by ``[low, high]``, the training-set size and the memory maximum.

A trial that diverges, runs out of memory or fails counts as a failure of that batch size (score
-inf) and the search goes on. Every trial goes through the results store, so a rerun (or a resumed,
interrupted search) runs nothing twice.

The walk itself is the pure function :func:`pivot_walk` over ``run_batch(batch) -> [Trial]``. It
works on any task: the metric is ``fit``'s ``val_metric`` in the direction of the task's
``higher_is_better`` (a loss is compared as a loss, never negated), and a model with BatchNorm is
scored after its running statistics are recomputed (:func:`fit_trial`, precise BN).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from batchlab.batchsize._store import open_store, run_trials
from batchlab.batchsize.batches import BatchRange, Split, budget_in_examples, check_positive_int
from batchlab.tasks import Task, get_task
from batchlab.train import TrainConfig, default_lr_rule, evaluate, fit, iterate_batches, scale_lr

TrialFn = Callable[[Task, TrainConfig], dict[str, Any]]

PRECISE_BN_EXAMPLES = 1024  # training examples (at most one epoch) whose statistics replace BN's running ones
PRECISE_BN_BATCH = 64


@dataclass
class Trial:
    """One training run of the search."""

    batch_size: int
    seed: int
    metric: float  # final validation metric (NaN when the run did not end "ok")
    status: str  # "ok", "diverged", "oom" or "failed"
    examples: int  # training examples processed
    time: float  # seconds of training the run took (when it ran; a stored run reports its original time)
    lr: float
    steps: int = 0
    error: str | None = None
    accumulation: int = 1  # micro-batches per step (batch_size = micro-batch * accumulation)


@dataclass
class PivotResult:
    """Outcome of :func:`pivot_search` (plain data).

    Attributes:
        best_batch: the batch the walk ended at (None when every visited size failed).
        best_lr: its scaled learning rate.
        trials: every trial, in the order run.
        path: batch sizes visited, in order.
        means, stds: per batch size, the mean and the seed-to-seed standard deviation of the metric
            (NaN when a seed failed).
        noise: the pooled seed-to-seed standard deviation used as the improvement threshold.
        stop_reason: why the walk stopped.
        pivot, low, high: the (possibly lowered, see ``notes``) pivot and the bounds used.
        budget_examples: training examples per trial.
        metric, higher_is_better: the task's metric and its direction.
    """

    best_batch: int | None
    best_lr: float | None
    trials: list[Trial]
    path: list[int]
    means: dict[str, float]
    stds: dict[str, float]
    noise: float
    stop_reason: str
    pivot: int
    low: int
    high: int
    budget_examples: int
    rule: str
    seeds: list[int]
    notes: list[str] = field(default_factory=list)
    metric: str = "accuracy"
    higher_is_better: bool = True

    @property
    def examples(self) -> int:
        return sum(t.examples for t in self.trials)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["examples"] = self.examples
        return d


def _mean(trials: Sequence[Trial]) -> float:
    """Seed-mean metric; NaN when any seed failed."""
    if not trials or any(t.status != "ok" or not math.isfinite(t.metric) for t in trials):
        return math.nan
    return statistics.fmean(t.metric for t in trials)


def _pooled_std(groups: Sequence[Sequence[Trial]]) -> float:
    """Pooled sample standard deviation of the metric across seeds, over successful batch sizes."""
    num, den = 0.0, 0
    for trials in groups:
        vals = [t.metric for t in trials if t.status == "ok" and math.isfinite(t.metric)]
        if len(vals) == len(trials) and len(vals) >= 2:
            num += statistics.variance(vals) * (len(vals) - 1)
            den += len(vals) - 1
    return math.sqrt(num / den) if den else 0.0


def check_range(pivot: int, low: int, high: int) -> None:
    """Validate the search range; ValueError naming the argument, the allowed range and the value."""
    check_positive_int("pivot", pivot)
    rng = BatchRange(low, high)
    if not rng.low <= pivot <= rng.high:
        raise ValueError(f"pivot must be in [low, high] = [{low}, {high}], got {pivot}")


def pivot_walk(
    run_batch: Callable[[int], list[Trial]], pivot: int, low: int, high: int, min_delta: float = 0.0,
    higher_is_better: bool = True,
) -> tuple[int | None, list[int], dict[int, list[Trial]], float, str]:
    """The pure walk of claim C14 (see the module docstring).

    Args:
        run_batch: runs every seed at one batch size and returns the trials.
        pivot, low, high: start and bounds (``low <= pivot <= high``).
        min_delta: an improvement must also exceed this (in metric units).
        higher_is_better: the metric's direction (False for a loss).

    Returns:
        ``(best, path, trials_by_batch, noise, stop_reason)``.
    """
    check_range(pivot, low, high)
    done: dict[int, list[Trial]] = {}
    path: list[int] = []

    def ev(b: int) -> float:
        if b not in done:
            done[b] = list(run_batch(b))
            path.append(b)
        return _mean(done[b])

    def gain(new: float, old: float) -> float:
        """How much ``new`` improves on ``old`` (a failed size never improves; anything beats one)."""
        if not math.isfinite(new):
            return -math.inf
        if not math.isfinite(old):
            return math.inf
        return new - old if higher_is_better else old - new

    def noise() -> float:
        return max(_pooled_std(list(done.values())), min_delta)

    ev(pivot)
    neighbours = [b for b in (pivot // 2, pivot * 2) if low <= b <= high and b != pivot and b >= 1]
    for b in neighbours:
        ev(b)
    cur = pivot
    best_nb = max(neighbours, key=lambda b: gain(_mean(done[b]), _mean(done[pivot])), default=None)
    reason = "neighbours do not beat the pivot by more than the seed-to-seed noise"
    if best_nb is not None and gain(_mean(done[best_nb]), _mean(done[pivot])) > noise():
        up = best_nb > pivot
        cur = best_nb
        while True:
            nxt = cur * 2 if up else cur // 2
            if not low <= nxt <= high or nxt == cur:
                reason = f"reached the {'upper' if up else 'lower'} bound"
                break
            if gain(ev(nxt), _mean(done[cur])) > noise():
                cur = nxt
            else:
                reason = f"x{'2' if up else '0.5'} from {cur} did not improve by more than the noise"
                break
    if not math.isfinite(_mean(done[cur])):
        ok = [b for b in done if math.isfinite(_mean(done[b]))]
        if not ok:
            return None, path, done, noise(), "every trial failed (diverged, out of memory or error)"
        cur = (max if higher_is_better else min)(ok, key=lambda b: _mean(done[b]))
        reason += "; the walk ended on a failed size, the best successful one is returned"
    return cur, path, done, noise(), reason


def has_batchnorm(model: nn.Module) -> bool:
    """True when any module is a batch norm with running statistics (torch's or a subclass, as
    batchlab's all are)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None for m in model.modules())


class _TaskForward(nn.Module):
    """``model`` behind the task's own forward rule, so precise BN and BN health see any batch type."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.task, self.model = task, model

    def forward(self, batch: Any) -> Any:
        return self.task.forward_batch(self.model, batch)


def precise_bn_on_task(model: nn.Module, task: Task, seed: int = 0, device: Any = "cpu",
                       examples: int = PRECISE_BN_EXAMPLES, batch_size: int = PRECISE_BN_BATCH) -> int:
    """Recompute ``model``'s BatchNorm running statistics (:func:`batchlab.norm.precise_bn`) over
    ``examples`` training examples (at most one epoch) of ``task`` in batches of ``batch_size``,
    drawn with ``seed``; any batch structure (pairs, tuples, mappings). Returns the examples used."""
    from batchlab.norm import precise_bn

    n = task.n_train
    bs = max(2, min(batch_size, n))
    num = max(1, min(examples, n) // bs)
    batches = iterate_batches(task, bs, seed=seed, device=device)
    try:
        precise_bn(_TaskForward(task, model), ((b,) for b in batches), num_batches=num)
    finally:
        batches.close()
    return num * bs


def _bn_health_summary(model: nn.Module, task: Task, seed: int, device: Any) -> dict[str, Any] | None:
    """:func:`batchlab.norm.bn_health` on one training batch through the task's own forward rule
    (a model without ``forward`` of its own, dict batches, several inputs), as plain data."""
    from batchlab.norm.health import bn_health

    batch = task.sample_batch(min(64, task.n_train), seed=seed, device=device)
    h = bn_health(model, batch, forward=task.forward_batch)
    return {"ok": h.ok, "problems": h.problems[:8], "output_gap": h.output_gap}


def fit_trial(task: Task, config: TrainConfig, *, precise: bool = True, health: bool = True) -> dict[str, Any]:
    """Default trial: ``fit``, then score the final model by the task's metric (``val_metric``).

    A model with BatchNorm is scored after its running statistics are recomputed over training
    batches (precise BN, Wu & Johnson 2021): after a short run the running averages lag the weights,
    most for the few-step runs of large batches, and would score those runs unfairly. The metric
    with the stale statistics is kept as ``metric_stale``. Errors become status "failed".
    ``health``: add a :func:`batchlab.norm.bn_health` summary of the final model (one batch, cheap).
    """
    device = config.device
    task.check(device)
    with torch.random.fork_rng(devices=[]):  # the same initial weights fit() would draw for this seed
        torch.manual_seed(config.seed)
        model = task.make_model(norm=config.norm, activation=config.activation)
    r = fit(task, config, model=model, raise_errors=False)
    metric = r.final.get("val_metric", math.nan) if r.ok else math.nan
    out: dict[str, Any] = {
        "status": r.status, "metric": float(metric), "examples": r.examples, "time": r.train_time, "steps": r.steps,
        "error": None if r.error is None else r.error[-2000:], "final": r.final,
        "param_groups": r.extra.get("param_groups"),  # what the trial's optimizer trained with
        "first_step_time": r.extra.get("first_step_time"),
    }
    if r.ok and precise and has_batchnorm(model):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            # at most one epoch and PRECISE_BN_EXAMPLES, and no more than half of what the run trained on
            # (at least one batch): forward passes only, a fraction of the run's cost
            use = min(PRECISE_BN_EXAMPLES, max(PRECISE_BN_BATCH, r.examples // 2))
            out["precise_bn_examples"] = precise_bn_on_task(model, task, seed=config.seed, device=device, examples=use)
            _, m = evaluate(model, task.val_source, task, device=device)
            out["metric_stale"], out["metric"] = out["metric"], float(m)
            if health:
                out["bn_health"] = _bn_health_summary(model, task, config.seed, device)
    return out


def pivot_search(
    task: Task | str,
    pivot: int = 128,
    low: int = 2,
    high: int = 512,
    *,
    seeds: Sequence[int] = (0, 1),
    budget_epochs: float | None = None,
    budget_examples: int | None = None,
    lr: float | None = None,
    lr_batch: int | None = None,
    optimizer: str | None = None,
    rule: str | None = None,
    max_batch: int | None = None,
    accumulate: bool = False,
    min_delta: float = 0.0,
    norm: str | None = None,
    device: str = "cpu",
    store: Any = None,
    trial_fn: TrialFn | None = None,
    progress: bool = False,
    kind: str = "batchsize-pivot",
    backend: Any = None,
    runner: Any = None,
) -> PivotResult:
    """Run the pivot search of claim C14 on ``task``.

    Args:
        task: a Task or registered name (any task, e.g. ``Task.from_torch``).
        pivot, low, high: start and bounds; ``low <= pivot <= high`` or ValueError.
        seeds: at least two seeds; the seed-to-seed spread is the noise threshold.
        budget_epochs, budget_examples: the fixed per-trial budget (one of them; default the task's
            epochs).
        lr, lr_batch: the learning rate and the batch it is tuned for (default the task's);
            each trial's LR is ``scale_lr(lr, lr_batch, batch, rule)``.
        optimizer: default the task's.
        rule: "linear", "sqrt" or "none" (default by optimizer: ``default_lr_rule``).
        max_batch: the memory maximum (e.g. ``max_batch_size(task).batch_size``); the search never
            goes above it. A pivot above it is halved until it fits (noted in ``notes``).
        accumulate: when True, sizes above ``max_batch`` are still tried, as gradient accumulation
            of micro-batches of the largest power of two <= ``max_batch`` (same gradient; BN sees
            the micro-batch).
        min_delta: an improvement must also exceed this.
        norm, device: passed to the training config.
        store: a ``batchlab.store.Store``, a path or None; trials are looked up there first.
        trial_fn: ``trial_fn(task, config) -> {"status", "metric", "examples", "time"}``
            (default: :func:`fit_trial`); for tests and custom training loops.
        progress: progress bar over trials.
        backend: run the seeds of each batch size as parallel trials with ``backend.run(trials,
            store, kind=...)`` (e.g. ``RayBackend``); None: in this process. Results land in the same
            store either way.
        kind: the store's label for these trials.
        runner: a trial runner (``run(trials, store, kind=)``, :mod:`batchlab.runs`); a test passes a
            fake one. Default: ``backend``, else :class:`batchlab.runs.LocalRunner`.
    """
    task = get_task(task)
    n = task.n_train
    check_range(pivot, low, high)
    if pivot > n:
        raise ValueError(f"pivot must be <= the training-set size ({n} examples), got {pivot}")
    seeds = [int(s) for s in seeds]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must hold at least two distinct seeds (the noise needs them), got {seeds!r}")
    budget_examples = budget_in_examples(n, budget_epochs, budget_examples, default_epochs=task.epochs)
    if max_batch is not None:
        check_positive_int("max_batch", max_batch)
    opt = optimizer or task.optimizer
    rule = rule or default_lr_rule(opt)
    base_lr = float(lr if lr is not None else task.lr)
    base_batch = int(lr_batch if lr_batch is not None else task.batch_size)
    notes: list[str] = []
    micro_max = max_batch if accumulate else None
    rng, note = BatchRange(low, high).capped(n, max_batch, accumulate)
    if note:
        notes.append(note)
    eff_high = rng.high
    p = pivot
    while p > eff_high:
        p //= 2
    if p < low:
        p = eff_high
    if p != pivot:
        notes.append(f"pivot {pivot} is above the bound {eff_high}; started at {p}")
    st = open_store(store)
    run = trial_fn or fit_trial
    trials: list[Trial] = []
    from tqdm.auto import tqdm

    bar = tqdm(desc=f"pivot search {task.name}", unit="trial", disable=not progress, leave=False)

    def run_batch(b: int) -> list[Trial]:
        out = []
        trial_lr = scale_lr(base_lr, base_batch, b, rule)
        split = Split.of(b, micro_max)
        cfgs = {
            s: TrainConfig(
                batch_size=split.micro, accumulation=split.accumulation, lr=trial_lr, optimizer=opt,
                max_examples=budget_examples, seed=s, norm=norm, device=device, eval_train=False,
            )
            for s in seeds
        }
        got = run_trials(task, [cfgs[s] for s in seeds], run, st, kind=kind, runner=runner, backend=backend)
        for s, d in zip(seeds, got):
            t = Trial(
                batch_size=b, seed=s, metric=float(d.get("metric", math.nan)), status=str(d.get("status", "failed")),
                examples=int(d.get("examples", 0)), time=float(d.get("time", 0.0)), lr=trial_lr,
                steps=int(d.get("steps", 0)), error=d.get("error"), accumulation=split.accumulation,
            )
            trials.append(t)
            out.append(t)
            bar.update(1)
            bar.set_postfix(batch=b, seed=s, metric=f"{t.metric:.4f}", refresh=False)
        return out

    try:
        best, path, done, noise, reason = pivot_walk(run_batch, p, low, eff_high, min_delta=min_delta,
                                                     higher_is_better=task.higher_is_better)
    finally:
        bar.close()
    means = {str(b): _mean(ts) for b, ts in done.items()}
    stds = {
        str(b): (statistics.stdev([t.metric for t in ts]) if math.isfinite(_mean(ts)) and len(ts) > 1 else math.nan)
        for b, ts in done.items()
    }
    return PivotResult(
        best_batch=best, best_lr=None if best is None else scale_lr(base_lr, base_batch, best, rule), trials=trials,
        path=path, means=means, stds=stds, noise=noise, stop_reason=reason, pivot=p, low=low, high=eff_high,
        budget_examples=budget_examples, rule=rule, seeds=seeds, notes=notes, metric=task.metric_name,
        higher_is_better=task.higher_is_better,
    )
