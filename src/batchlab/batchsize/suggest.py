"""``suggest(task) -> Suggestion``: which batch size, learning rate and accumulation to train with.

The objective is explicit (:mod:`batchlab.batchsize.objective`) and stated in the report: by default
the batch (its LR scaled by the optimizer's rule) that reaches the best validation metric within
the time of one full training run at the task's own batch; ``objective="epochs"``: the best metric
after a fixed number of examples. Candidates tied within the seed noise: the fastest.

Five stages, each a function returning a dataclass the report renders:

1. :func:`measure`: memory maximum (when the task can be probed), seconds per step at every
   candidate batch (:func:`throughput`), the gradient noise scale B_noise measured *until stable*
   (:func:`noise_scale` with ``until_stable``), and a trivial baseline (the untrained model's metric;
   for accuracy also the majority-class rate, for other metrics the best constant prediction).
   Each measurement's cost is capped at a fraction of
   the cost budget, so it shrinks with the model and the budget.
2. :func:`predict`: McCandlish et al.'s ``S = S_min (1 + B_noise / B)`` steps times the measured
   step time ranks the candidates (Pollux's goodput in other words). The ranking only orders and
   selects the candidates; it is never the answer.
3. :func:`search`: successive halving (:mod:`batchlab.batchsize.halving`) over the candidates:
   many cheap runs, the better half promoted to twice the budget, rung by rung; equal examples per
   rung for "epochs", equal time for "time". A batch too large for a rung's budget (fewer than
   ``MIN_STEPS`` steps) waits for a rung that gives it enough steps instead of being judged on one
   or two. Every run of a model with BatchNorm is scored after precise BN (its running statistics
   recomputed), so stale statistics do not penalise few-step, large-batch runs.
4. :func:`confirm`: on the last rung (all seeds), the candidates within one standard error of the
   difference from the best are tied; the fastest of them is recommended and the report says
   whether the candidates were separable at all. If the recommendation does not beat the trivial
   baseline by more than its seed noise, it is marked not supported. Then :func:`climb`: the
   recommendation's double, at the last rung's budget and seeds, replaces it while the two are not
   separable (halving leaves two batches, so the fastest of the tied may never have been compared).
5. :func:`advise`: LR by the optimizer's rule, as the trials ran it (for Adam, the beta2 that keeps
   its half-life in examples, :func:`~batchlab.train.scale_hparams`, is offered apart, as not
   measured), micro-batch x accumulation when the batch does not
   fit, ``bn_health`` of the recommendation's final model, and for a small per-device batch with
   BatchNorm the alternatives (GroupNorm, Batch Renorm) measured at the last rung's budget, with
   advice only when that budget separates them from BatchNorm.

Cost: everything (measurements, search, advice) is bounded by ``cost_budget`` examples, by
default one full training run (``budget_examples``), and reported per stage.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from batchlab.batchsize._store import open_store, run_trials, trial_key
from batchlab.batchsize.batches import BatchRange, Split, budget_in_examples, pow2_floor
from batchlab.batchsize.halving import RungTrial, batch_stats, plan_rungs, successive_halving
from batchlab.batchsize.noise import noise_scale
from batchlab.batchsize.objective import OBJECTIVES, Objective, SeedStats, se_of_difference
from batchlab.batchsize.search import PRECISE_BN_BATCH, fit_trial, has_batchnorm
from batchlab.batchsize.state import preserved_state
from batchlab.batchsize.throughput import ThroughputResult, throughput
from batchlab.data.sources import move_to_device
from batchlab.tasks import Task, TaskError, get_task
from batchlab.tasks.task import shifts_labels
from batchlab.train import (
    TrainConfig,
    default_hparam_rule,
    default_lr_rule,
    eval_batch_size,
    evaluate,
    last_error_line,
    optimizer_hparams,
    scale_hparams,
    scale_lr,
)

SMALL_BATCH = 8  # a per-device batch at or below this with BatchNorm triggers the normalization check
MIN_STEPS = 4  # a candidate is run at a rung only when the rung gives it at least this many steps
NOISE_TOLERANCE = 0.2  # B_noise is stable when its last values lie within 20% of their median
SHARE_MEMORY = 0.05  # at most this fraction of the cost budget for verifying memory with real steps
SHARE_THROUGHPUT = 0.10  # ... for timing steps
SHARE_NOISE = 0.15  # ... and for the noise-scale run
NORM_RESERVE = 1 / 4  # of the search budget, kept for the normalization check (BatchNorm, small batches possible)


@dataclass
class Candidate:
    """One row of the prediction table."""

    batch_size: int
    micro_batch: int
    accumulation: int
    step_time: float  # seconds per optimizer step (accumulation included)
    examples_per_sec: float
    epoch_time: float
    predicted_steps: float  # S_min (1 + B_noise / B)
    predicted_examples: float  # E_min (1 + B / B_noise)
    predicted_time: float  # predicted_steps * step_time
    fits: bool  # the whole batch fits in memory without accumulation


@dataclass
class Measurements:
    """Stage 1."""

    memory: dict[str, Any] | None  # MaxBatchResult.to_dict(), None when not measured
    micro_max: int | None  # largest per-device batch (None: not capped)
    throughput: dict[str, Any]
    noise: dict[str, Any]
    b_noise: float
    baseline: float  # the trivial baseline's metric
    baseline_kind: str  # what the baseline is
    examples: dict[str, int]
    notes: list[str] = field(default_factory=list)


@dataclass
class Prediction:
    """Stage 2: the candidates, their predicted cost, and the order they enter the search."""

    objective: dict[str, Any]
    candidates: list[dict[str, Any]]  # Candidate rows
    ranked: list[int]  # every candidate, best predicted first
    selected: list[int]  # those the search starts with
    notes: list[str] = field(default_factory=list)
    #: examples/s of every run of the search, by batch (data loading included, the first step left out),
    #: filled rung by rung
    speed_samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def measured_speed(self) -> dict[str, float]:
        """Each searched batch's median speed over its runs so far; preferred to the throughput
        measurement where present."""
        return {b: statistics.median(v) for b, v in self.speed_samples.items() if v}

    def speed(self, b: int) -> float:
        """Examples per second of batch ``b``: as measured in the search's runs, else as the throughput
        measurement (timed or extrapolated) predicts, times the median ratio of measured to predicted
        speed of the batches measured so far (the throughput measurement leaves data loading out, so an
        unmeasured batch must not look faster than it will run next to measured ones)."""
        measured = self.measured_speed
        if str(b) in measured:
            return measured[str(b)]
        predicted = {c["batch_size"]: c["examples_per_sec"] for c in self.candidates}
        ratios = [v / predicted[int(k)] for k, v in measured.items()
                  if math.isfinite(predicted.get(int(k), math.nan)) and predicted[int(k)] > 0]
        return predicted.get(b, math.nan) * (statistics.median(ratios) if ratios else 1.0)


@dataclass
class SearchResult:
    """Stage 3: successive halving."""

    plan: list[list[float]]  # per rung: [candidates, budget per trial]
    unit: str  # "examples" or "seconds"
    rungs: list[dict[str, Any]]
    trials: list[dict[str, Any]]
    survivors: list[int]  # the last rung's candidates, best first
    examples: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    searched: list[int] = field(default_factory=list)  # the batches the rungs started with


@dataclass
class Confirmation:
    """Stage 4: the decision on the last rung."""

    batch: int | None
    best: int | None  # best seed-mean on the last rung
    tied: list[int]  # within one standard error of the difference from the best
    separable: bool  # the best is separated from every other last-rung candidate
    supported: bool  # the best beats the trivial baseline by more than its seed noise
    means: dict[str, float]
    ses: dict[str, float]
    budget: float
    message: str


@dataclass
class Advice:
    """Stage 5."""

    lr: float | None
    micro_batch: int | None
    accumulation: int
    bn_health: dict[str, Any] | None
    norm_advice: dict[str, Any] | None
    critical: dict[str, Any] | None
    lines: list[str]
    examples: int = 0
    hparams: dict[str, Any] | None = None  # lr/betas/eps at the batch as the trials ran them; "alternative": Adam's half-life beta2


@dataclass
class Suggestion:
    """The recommendation and the stages behind it. Plain data: ``to_json`` / ``from_dict``."""

    task: str
    status: str  # "ok", "not supported" (no better than a trivial baseline) or "failed"
    batch_size: int | None  # examples per optimizer step
    micro_batch: int | None  # examples per forward/backward (per device)
    accumulation: int  # micro-batches per step
    lr: float | None
    optimizer: str
    rule: str
    headline: str  # the recommendation in one line
    objective: dict[str, Any]
    measure: Measurements
    predict: Prediction
    search: SearchResult
    confirm: Confirmation
    advise: Advice
    cost_budget: int  # examples everything may process (one full run unless the user says)
    examples_processed: dict[str, int] = field(default_factory=dict)
    wall_time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Suggestion:
        d = dict(d)
        for name, typ in (("measure", Measurements), ("predict", Prediction), ("search", SearchResult),
                          ("confirm", Confirmation), ("advise", Advice)):
            d[name] = typ(**d[name])
        return cls(**d)

    @property
    def total_examples(self) -> int:
        return int(sum(self.examples_processed.values()))

    @property
    def b_noise(self) -> float:
        return self.measure.b_noise

    @property
    def budget_examples(self) -> int:
        return int(self.objective["budget_examples"])

    @property
    def rationale(self) -> list[str]:
        """The evidence, one line each, in stage order."""
        return [*self.measure.notes, *self.predict.notes, *self.search.notes, self.confirm.message, *self.advise.lines]

    def summary(self) -> str:
        """The recommendation and the evidence in a few lines of plain text."""
        return "\n".join([self.headline, *("  - " + r for r in self.rationale)])


# ------------------------------------------------------------------------------------ stage 1
def _baseline(task: Task, device: str, seed: int) -> tuple[float, str]:
    """The bar a recommendation must clear: the best of the untrained model's validation metric,
    for accuracy the majority-class rate, and for any other metric a constant prediction (the
    training targets' mean for a regression, the most common class for a classifier) scored by the
    task's own loss and metric."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = task.make_model().to(device)
    bs = eval_batch_size(task, task.batch_size)  # the chunks the trials are scored on
    better = (lambda a, b: a > b) if task.higher_is_better else (lambda a, b: a < b)
    try:
        _, untrained = evaluate(model, task.val_source, task, device=device, batch_size=bs)
        best, kind = float(untrained), f"the untrained model's validation {task.metric_name} ({untrained:.4g})"
    except Exception as e:  # noqa: BLE001 - the user's model failing here fails its trials' evaluation too
        best = -math.inf if task.higher_is_better else math.inf
        kind = f"none: the untrained model could not be evaluated ({last_error_line(str(e))})"
    if task.metric_name == "accuracy":
        rate = _majority_rate(task, model, device)
        if rate is not None and rate > best:
            best, kind = rate, f"the majority-class rate ({rate:.4g})"
    else:
        const = _constant_prediction(task, model, device, bs)
        if const is not None and math.isfinite(const[0]) and better(const[0], best):
            best, kind = const[0], f"{const[1]} ({const[0]:.4g})"
    return best, kind


class _Constant(torch.nn.Module):
    """The wrapped model's output (a tensor) replaced by one constant row: a trivial predictor that
    the task's own forward, loss and metric score as they score the model. A jitter of 1e-6 of the
    row's scale (a fixed generator) breaks ties at random, as a rank metric (AUC) would otherwise
    order equal scores by position and could call a constant perfect on a class-sorted set."""

    def __init__(self, inner: torch.nn.Module, row: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.row = inner, row
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError("a constant prediction needs a tensor output")
        scale = 1e-6 * (float(self.row.abs().mean()) + 1e-3)
        jitter = torch.randn(out.shape, generator=self.gen, dtype=torch.float64) * scale
        return (self.row.double().expand_as(out) + jitter.to(out.device)).to(out.dtype)


def _constant_prediction(task: Task, model: torch.nn.Module, device: str, bs: int,
                         scan: int = 4096) -> tuple[float, str] | None:
    """The validation metric of the best constant prediction, or None where it cannot be built (an
    output that is not a tensor, targets of another shape, a forward that reaches into the model's
    parts). Float targets of the output's shape: the training targets' mean (per output). Class
    indices with (N, C) logits: the most common training class."""
    try:
        sums: torch.Tensor | None = None
        counts: dict[int, int] = {}
        n = 0
        for batch in task.train_source.ordered(min(bs, scan), scan):
            y = task.targets_of(batch)
            if y.is_floating_point():
                flat = y.reshape(y.shape[0], -1).double()
                sums = flat.sum(0) if sums is None else sums + flat.sum(0)
                n += y.shape[0]
            else:
                for v, c in zip(*torch.unique(y[y != -100], return_counts=True)):
                    counts[int(v)] = counts.get(int(v), 0) + int(c)
        first = move_to_device(next(iter(task.val_source.ordered(bs, bs))), device)
        with torch.no_grad():
            out = task.forward_batch(model.eval(), first)
        if not isinstance(out, torch.Tensor):
            return None
        y = task.targets_of(first)
        if sums is not None and n and out.numel() == y.numel() and out.shape[0] == y.shape[0]:
            row = (sums / n).to(out.dtype).reshape(1, *out.shape[1:]).to(out.device)
            what = "a constant prediction of the training targets' mean"
        elif counts and out.dim() == 2 and out.shape[0] == y.shape[0] and y.dim() == 1:
            # the class frequencies' logarithms: the best constant under cross-entropy, and the most
            # common class under arg-max
            freq = torch.full((out.shape[1],), 1e-6, dtype=torch.float64)
            for c, k in counts.items():
                if 0 <= c < out.shape[1]:
                    freq[c] += k
            row = (freq / freq.sum()).log().to(out.dtype).reshape(1, -1).to(out.device)
            what = "a constant prediction of the training classes' frequencies"
        else:
            return None
        _, value = evaluate(_Constant(model, row), task.val_source, task, device=device, batch_size=bs)
        return float(value), what
    except Exception:  # noqa: BLE001 - no constant baseline for this task; the others stand
        return None


def _majority_rate(task: Task, model: torch.nn.Module, device: str) -> float | None:
    """The share of the validation targets (not -100) that are the most common class: what always
    predicting it scores. A causal LM that shifts its labels is scored against the next token, so
    its labels are counted after the shift. None for targets that are not class indices."""
    counts: dict[int, int] = {}
    shift: bool | None = None
    try:
        for batch in task.val_source.ordered(1024, None):
            y = task.targets_of(batch)
            if shift is None:
                shift = y.dim() >= 2 and _shifts_labels_on(task, model, batch, device)
            y = (y[..., 1:] if shift else y).reshape(-1)
            for v, c in zip(*torch.unique(y[y != -100], return_counts=True)):
                counts[int(v)] = counts.get(int(v), 0) + int(c)
    except Exception:  # noqa: BLE001 - a task without plain targets keeps the untrained baseline
        return None
    return max(counts.values()) / sum(counts.values()) if counts else None


def _shifts_labels_on(task: Task, model: torch.nn.Module, batch: Any, device: str) -> bool:
    """Whether ``model``'s output on ``batch`` shifts its labels itself (a Hugging Face causal LM);
    False when the forward fails (the evaluation says why elsewhere)."""
    try:
        with torch.no_grad():
            return shifts_labels(task.forward_batch(model.eval(), move_to_device(batch, device)))
    except Exception:  # noqa: BLE001
        return False


def _memory(task: Task, device: str, memory_limit: int | None, rng: BatchRange,
            cap: float) -> tuple[dict[str, Any] | None, int | None, int, str]:
    """The memory maximum, with real steps only up to what ``cap`` examples afford; above that the
    memory fit's prediction (``fixed + per_sample x B``) decides."""
    from batchlab.batchsize.memory import max_batch_size

    high = min(rng.high, max(rng.low, pow2_floor(cap / 3)))
    try:
        # one process measures (under torchrun, rank 0 for all: the other ranks are not in this search, so
        # no rank agreement, which would wait for them)
        mem = max_batch_size(task, device=device, memory_limit=memory_limit, low=rng.low, high=high, distributed=False)
    except (AttributeError, TypeError, NotImplementedError) as e:  # a task the memory probe cannot feed
        return None, None, 0, (f"memory maximum not measured ({type(e).__name__}: {str(e)[:120]}); a trial that runs "
                               "out of memory counts as a failure of its batch")
    except Exception as e:  # noqa: BLE001 - the user's model failing at a probed batch: its trials will fail too
        return None, None, 0, (f"memory maximum not measured: a probe step failed ({last_error_line(str(e))}); a "
                               "trial that fails or runs out of memory counts as a failure of its batch")
    if mem.batch_size is None:
        raise ValueError(f"not even a batch of low={rng.low} fits in memory ({mem.memory_limit} bytes); lower low or "
                         "raise memory_limit")
    used = int(mem.examples_processed)
    micro_max: int | None = mem.batch_size
    why = "training-set size" if mem.capped_by == "data" else mem.capped_by
    line = f"memory: the largest batch whose whole step fits is {mem.batch_size} ({why})"
    if mem.capped_by == "high" and high < rng.high:
        budget_bytes = getattr(mem, "budget_bytes", None) or mem.memory_limit
        slope = mem.per_sample_bytes
        if budget_bytes is None or not math.isfinite(slope):
            micro_max = None
        else:
            fits = [b for b in rng.sizes() if mem.fixed_bytes + slope * b <= budget_bytes]
            micro_max = max([mem.batch_size, *fits])
        line = (f"memory: steps verified up to batch {mem.batch_size} (larger ones cost more than the measurement's share "
                f"of the budget); " + ("the memory fit predicts no cap within the range" if micro_max is None or
                                       micro_max >= rng.high else f"the memory fit predicts a maximum of {micro_max}"))
        if micro_max is not None and micro_max >= rng.high:
            micro_max = None
    return mem.to_dict(), micro_max, used, line


def measure(task: Task, rng: BatchRange, cost_budget: int, *, device: str, memory_limit: int | None, quick: bool,
            store: Any, progress: bool, seed: int) -> Measurements:
    """Stage 1 (see the module docstring); every cost is a share of ``cost_budget``."""
    notes: list[str] = []
    share = 0.5 if quick else 1.0  # quick: half the measurement shares
    mem, micro_max, mem_examples, line = _memory(task, device, memory_limit, rng, SHARE_MEMORY * share * cost_budget)
    notes.append(line)
    sizes = rng.sizes()
    fits = [b for b in sizes if micro_max is None or b <= micro_max] or [pow2_floor(micro_max or rng.low)]
    # throughput: one warm-up and one or two timed steps per size, the largest sizes dropped (their
    # time is extrapolated) when timing them would cost more than SHARE_THROUGHPUT of the budget
    passes = 2 if quick else 3
    cap = SHARE_THROUGHPUT * share * cost_budget
    timed: list[int] = []
    for b in fits:
        if len(timed) >= 2 and (sum(timed) + b) * (passes + 0.25) > cap:
            break
        timed.append(b)
    if len(timed) < len(fits):
        notes.append(f"throughput timed at {', '.join(map(str, timed))} (larger sizes extrapolated: timing them would "
                     f"exceed {SHARE_THROUGHPUT:.0%} of the cost budget)")
    tcfg = {"batch_sizes": timed, "device": device, "warmup": 1, "repeats": passes - 1,
            "time_limit": 5.0 if quick else 15.0}
    # stored like every run: a rerun reads the same speeds, so it ranks and searches the same candidates
    tp = ThroughputResult(**open_store(store).run_or_load(
        trial_key(task, tcfg, kind="batchsize-throughput"),
        lambda: {"status": "ok", "result": throughput(task, progress=progress, **tcfg).to_dict()},
        kind="batchsize-throughput")["result"])
    if tp.data_examples_per_sec is not None:
        bound = tp.data_bound()
        notes.append(f"data pipeline: {tp.data_examples_per_sec:.4g} examples/s at batch {tp.data_batch}"
                     + (f", slower than the steps at batch {', '.join(map(str, bound))}: there the runs wait for data "
                        "(the rungs use the speeds their runs measured)" if bound else ""))
    for b, err in zip(tp.batch_sizes, tp.errors):
        if err:
            notes.append(f"throughput: batch {b} failed ({err}); it is not a candidate")
    # noise scale, measured until stable within SHARE_NOISE of the budget
    n = task.n_train
    micro, acc = max(1, min(16, pow2_floor(n // 8), pow2_floor(micro_max or 16))), 4
    max_steps = int(SHARE_NOISE * share * cost_budget // (micro * acc))
    while max_steps < 30 and micro > 2:
        micro //= 2
        max_steps = int(SHARE_NOISE * share * cost_budget // (micro * acc))
    max_steps = max(5, min(max_steps, 400))
    ncfg = {"micro_batch": micro, "accumulation": acc, "steps": max_steps, "device": device,
            "until_stable": NOISE_TOLERANCE * (1.5 if quick else 1.0), "window": 8 if quick else 10,
            "min_steps": min(max_steps, 10), "seed": seed}
    def measure_noise() -> dict[str, Any]:
        try:
            return noise_scale(task, progress=progress, **ncfg)
        except TaskError as e:  # the user's model failing at this batch is a result, stored like a failed trial
            return {"status": "failed", "error": str(e)[-500:], "b_simple": math.nan, "steps": 0, "examples_processed": 0}

    noise = open_store(store).run_or_load(trial_key(task, ncfg, kind="batchsize-noise-v2"), measure_noise,
                                          kind="batchsize-noise-v2")
    b_noise = float(noise.get("b_simple", math.nan))
    if noise.get("status", "ok") != "ok":  # diverged or failed: an estimate from before that is not used
        b_noise = math.nan
    if math.isfinite(b_noise) and b_noise > 0:
        how = (f"stable within {ncfg['until_stable']:.0%} after {noise.get('stable_at')} steps" if noise.get("stable")
               else f"not yet stable after {noise.get('steps')} steps (the cost cap); it only orders the candidates")
        notes.append(f"gradient noise scale B_simple ~ {b_noise:.3g} at {micro} x {acc} (McCandlish et al. 2018), {how}")
    else:
        why = (f"the estimate came out {b_noise:.3g} after {noise.get('steps')} steps, not a usable positive number"
               if noise.get("status", "ok") == "ok" else
               f"its run at {micro} x {acc} ended {noise.get('status')!r}: {last_error_line(noise.get('error'))}")
        notes.append(f"the gradient noise scale could not be measured ({why}); candidates "
                     "are ordered by their distance from the task's own batch")
    baseline, kind = _baseline(task, device, seed)
    notes.append(f"trivial baseline: {kind}")
    return Measurements(
        memory=mem, micro_max=micro_max, throughput=tp.to_dict(), noise=noise, b_noise=b_noise, baseline=baseline,
        baseline_kind=kind,
        examples={"memory": mem_examples, "throughput": tp.examples_processed,
                  "noise": int(noise.get("examples_processed", 0))},
        notes=notes,
    )


# ------------------------------------------------------------------------------------ stage 2
def _time_per_step(tp: dict[str, Any], batch: int) -> float:
    return ThroughputResult(**tp).time_per_step(batch)


def predict_candidates(sizes: Sequence[int], tp: dict[str, Any], micro_max: int | None, b_noise: float,
                       budget_examples: int, ref_batch: int) -> list[Candidate]:
    """The prediction table: ``S = S_min (1 + B_noise/B)`` steps x measured seconds per step, with
    S_min anchored by assuming the task's own batch reaches the target in ``budget_examples``."""
    out = []
    finite = math.isfinite(b_noise) and b_noise > 0
    e_min = budget_examples / (1 + ref_batch / b_noise) if finite else math.nan
    s_min = e_min / b_noise if finite else math.nan
    for b in sizes:
        sp = Split.of(b, micro_max)
        t = sp.accumulation * _time_per_step(tp, sp.micro)
        steps = s_min * (1 + b_noise / b) if finite else math.nan
        out.append(Candidate(
            batch_size=b, micro_batch=sp.micro, accumulation=sp.accumulation, step_time=t,
            examples_per_sec=b / t if t > 0 else math.nan, epoch_time=math.ceil(tp["n_train"] / b) * t,
            predicted_steps=steps, predicted_examples=e_min * (1 + b / b_noise) if finite else math.nan,
            predicted_time=steps * t, fits=sp.accumulation == 1,
        ))
    return out


def predict(task: Task, rng: BatchRange, m: Measurements, objective: Objective, max_candidates: int) -> Prediction:
    """Stage 2: rank every candidate by predicted time to target; keep the ``max_candidates`` best
    (always with the task's own batch, the incumbent, when it is in range)."""
    tp = m.throughput
    failed = {b for b, st in zip(tp.get("batch_sizes", []), tp.get("status", [])) if st == "failed"}
    sizes = [b for b in rng.sizes() if Split.of(b, m.micro_max).micro not in failed]  # (the measure notes say why)
    cands = predict_candidates(sizes, m.throughput, m.micro_max, m.b_noise, objective.budget_examples, task.batch_size)
    incumbent = rng.clamp(pow2_floor(task.batch_size))
    if all(math.isfinite(c.predicted_time) for c in cands):
        ranked = [c.batch_size for c in sorted(cands, key=lambda c: (c.predicted_time, -c.batch_size))]
        why = "ordered by predicted time to target S_min (1 + B_noise/B) x t(B)"
    else:
        ranked = sorted(sizes, key=lambda b: (abs(math.log2(b) - math.log2(incumbent)), -b))
        why = "ordered by distance from the task's own batch (no usable noise scale)"
    selected = ranked[:max_candidates]
    if incumbent in sizes and incumbent not in selected:
        selected[-1] = incumbent
    notes = [f"candidates {', '.join(map(str, ranked))} {why}; the search starts with {', '.join(map(str, sorted(selected)))}"]
    return Prediction(objective=objective.to_dict(), candidates=[asdict(c) for c in cands], ranked=ranked,
                      selected=selected, notes=notes)


# ------------------------------------------------------------------------------------ stage 3
def _rung_size(rung: dict[str, Any], objective: Objective) -> float:
    """A rung's run length as the objective counts it: examples, or in "time" mode the seconds its
    runs took (the median of its batches' mean run times; the planned seconds are rescaled to the
    measured speeds)."""
    if objective.kind != "time":
        return float(rung["budget"])
    secs = [st["seconds"] for st in rung["stats"].values() if math.isfinite(st.get("seconds", math.nan))]
    return statistics.median(secs) if secs else float(rung["budget"])


def _tie_note(r: Any) -> str:
    """Said when a rung's cut fell inside an exact tie (equal means, e.g. every candidate still at the
    majority-class rate): the promoted ones were taken in the predicted order, not by their metric."""
    if not r.tested or set(r.promoted) >= set(r.tested):
        return ""
    means = {b: r.stats[str(b)]["mean"] for b in r.tested if not r.stats[str(b)]["failed"]}
    shared = {means[b] for b in means if b not in r.promoted} & {means[b] for b in means if b in r.promoted}
    tied = sorted(b for b in means if means[b] in shared)
    if not tied:
        return ""
    return (f" ({', '.join(map(str, tied))} tied exactly at {means[tied[0]]:.4g}: the cut among them followed the "
            "predicted order, not the metric)")


def _rung_text(rung: dict[str, Any], objective: Objective) -> str:
    """A rung's run length for the report: examples; in "time" mode the seconds planned per run (the
    ``budget`` suggestion.json keeps) and, when they differ, the training seconds the runs took (the
    first step and a DataLoader's worker start-up included, which the plan's step times leave out)."""
    if objective.kind != "time":
        return f"{float(rung['budget']):.3g} examples per run"
    took = _rung_size(rung, objective)
    planned = float(rung["budget"])
    if not math.isfinite(took) or abs(took - planned) <= 0.1 * planned:
        return f"{planned:.3g} s per run"
    return f"{planned:.3g} s planned per run, {took:.3g} s taken"


def _examples_at(p: Prediction, objective: Objective, b: int, budget: float, max_speed: float = math.inf,
                 group: Sequence[int] = ()) -> int:
    """Training examples a run of batch ``b`` gets at a rung's ``budget``: the budget itself (examples),
    or in "time" mode seconds at b's speed (:meth:`Prediction.speed`). ``max_speed``: the speed the
    cost plan turned its examples into seconds with; with it, the seconds are rescaled so that the
    fastest of ``group`` (the rung's batches) gets exactly the planned examples when the speeds
    measured in the runs differ from the prediction (all slower: the same examples, more seconds)."""
    if objective.kind != "time":
        return int(budget)
    speed = p.speed(b)
    if not math.isfinite(speed) or speed <= 0:
        return 0  # no speed known for b: it cannot be given a time (so it is not testable)
    ref = max([v for v in map(p.speed, group) if math.isfinite(v)] or [speed])
    if math.isfinite(max_speed) and math.isfinite(ref) and ref > 0:
        return int(budget * max_speed * min(speed, ref) / ref)
    return int(budget * speed)


def _trial_speed(t: RungTrial) -> float:
    """Examples per second of one run, its first step (warm-up, DataLoader start) left out when recorded."""
    first = t.extra.get("first_step_time")
    per_step = t.examples / max(1, t.steps)
    if first is not None and t.steps >= 2 and t.seconds > first:
        return (t.examples - per_step) / (t.seconds - first)
    return t.examples / t.seconds if t.seconds > 0 else math.nan


def _rung_runner(task: Task, p: Prediction, m: Measurements, objective: Objective, *, device: str, store: Any,
                 runner: Any, backend: Any, trial_fn: Any, max_speed: float = math.inf) -> Any:
    """``run(batches, budget, seeds, rung) -> [RungTrial]``: short runs at a rung's budget, each batch at
    the LR the optimizer's rule scales to it, split into micro-batches where memory needs it. Each
    batch's speed in each run goes into ``p.speed_samples`` (``p.measured_speed``: their medians), so
    in "time" mode the next rung's examples and the fastest-of-tied choice use what the runs took."""
    rule = default_lr_rule(task.optimizer)
    fn = trial_fn or fit_trial

    def run(batches: list[int], budget: float, rung_seeds: list[int], k: int,
            examples: dict[int, int] | None = None) -> list[RungTrial]:
        cfgs, meta = [], []
        for b in batches:
            sp = Split.of(b, m.micro_max)
            lr = scale_lr(task.lr, task.batch_size, b, rule)
            ex = examples[b] if examples and b in examples else _examples_at(p, objective, b, budget, max_speed, batches)
            for s in rung_seeds:
                cfgs.append(TrainConfig(batch_size=sp.micro, accumulation=sp.accumulation, lr=lr,
                                        optimizer=task.optimizer, max_examples=max(1, ex),
                                        seed=s, device=device, eval_train=False))
                meta.append((b, s, lr, sp.accumulation))
        payloads = run_trials(task, cfgs, fn, store, kind="batchsize-halving", runner=runner, backend=backend)
        out = []
        for (b, s, lr, acc), c, d in zip(meta, cfgs, payloads):
            extra = {k: d[k] for k in ("metric_stale", "bn_health", "error", "precise_bn_examples", "first_step_time")
                     if d.get(k) is not None}
            out.append(RungTrial(batch=b, seed=s, rung=k, metric=float(d.get("metric", math.nan)),
                                 status=str(d.get("status", "failed")), examples=int(d.get("examples", 0)),
                                 seconds=float(d.get("time", 0.0)), steps=int(d.get("steps", 0)), lr=lr,
                                 accumulation=acc, budget_examples=c.max_examples, extra=extra))
        for t in out:
            v = _trial_speed(t) if t.status == "ok" else math.nan
            if math.isfinite(v) and v > 0:
                p.speed_samples.setdefault(str(t.batch), []).append(v)
        return out

    return run


def search(task: Task, p: Prediction, m: Measurements, objective: Objective, available: float, seeds: Sequence[int], *,
           device: str, store: Any, runner: Any, backend: Any, trial_fn: Any, eta: int = 2,
           precise: bool = False, climb_trials: int = 0) -> SearchResult:
    """Stage 3: successive halving over ``p.selected`` within ``available`` examples (``precise``:
    each run is followed by a precise-BN pass over up to half as many examples, a third of the cost;
    ``climb_trials``: trials at the last rung's budget kept for :func:`climb`)."""
    cands = {c["batch_size"]: c for c in p.candidates}
    eps = {b: c["examples_per_sec"] for b, c in cands.items()}
    time_mode = objective.kind == "time"
    top_eps = math.inf  # in "time" mode: the fastest selected candidate's predicted speed, which the plan is made with

    def examples_at(b: int, budget: float) -> int:  # (whether a rung can give b its steps; the searched as the group)
        return _examples_at(p, objective, b, budget, top_eps, selected)

    def testable(b: int, budget: float) -> bool:
        return examples_at(b, budget) >= MIN_STEPS * b

    # plan in examples; in "time" mode a rung's seconds are its examples at the fastest candidate's speed.
    # Candidates come from the prediction's order, restricted to batches the last rung can give
    # MIN_STEPS steps; fewer candidates when the budget cannot hold them.
    notes: list[str] = []
    pool = [b for b in p.ranked if b in p.selected] + [b for b in p.ranked if b not in p.selected]
    n = len(p.selected)
    plan: list[tuple[int, float]] = []
    selected: list[int] = []
    for _ in range(4 * len(pool) + 4):
        selected = pool[:n]
        plan = plan_rungs(len(selected), available / 1.5 if precise else available, eta=eta, seeds_last=len(seeds),
                          seeds_early=1, per_trial_overhead=PRECISE_BN_BATCH / 1.5 if precise else 0,
                          extra_last=climb_trials)
        if not plan:
            if n <= 2:
                break
            n -= 1
            continue
        last = plan[-1][1]
        fit = [b for b in pool if last >= MIN_STEPS * b]
        if all(b in fit for b in selected):
            break
        left = [b for b in pool if b not in fit]
        pool = fit
        notes.append(f"batches {', '.join(map(str, sorted(left)))} left out of the halving: the last rung ({last:.0f} "
                     f"examples per run) would give them fewer than {MIN_STEPS} steps within the cost budget (the "
                     "climb may still compare one, at the last rung's final budget)")
        if len(pool) < 2:
            plan = []
            break
    if selected and set(selected) != set(p.selected) and plan:
        notes.append(f"searched {', '.join(map(str, sorted(selected)))} (the best predicted that the cost budget can run)")
    if not plan:
        return SearchResult(plan=[], unit="examples", rungs=[], trials=[], survivors=[], examples=0, seconds=0.0,
                            searched=[], notes=[f"the cost budget ({available:.0f} examples after the measurements) leaves nothing to "
                                   "search with; give a larger cost budget (--cost-budget, cost_budget=, in examples)"])
    if time_mode:  # seconds at the fastest candidate's speed: no candidate can exceed the planned examples
        top_eps = max(eps[b] for b in selected if math.isfinite(eps[b]))
        budgets = [ex / top_eps for _, ex in plan]
    else:
        budgets = [ex for _, ex in plan]
    trial_seeds = [[seeds[0]]] * (len(plan) - 1) + [list(seeds)]
    run = _rung_runner(task, p, m, objective, device=device, store=store, runner=runner, backend=backend,
                       trial_fn=trial_fn, max_speed=top_eps)

    rungs, trials, survivors = successive_halving(sorted(selected, key=p.ranked.index), budgets, run, objective,
                                                  trial_seeds, testable=testable, eta=eta,
                                                  counts=[c for c, _ in plan])
    examples = sum(t.examples + int(t.extra.get("precise_bn_examples", 0)) for t in trials)
    unit = "seconds" if time_mode else "examples"
    notes.append(
        f"successive halving over {', '.join(map(str, sorted(selected)))}: "
        + "; ".join(f"rung {r.index} ({_rung_text(r.to_dict(), objective)}, seeds {r.seeds}): "
                    + (", ".join(f"{b} {r.stats[str(b)]['mean']:.4g}" if not r.stats[str(b)]["failed"] else
                                 f"{b} {r.stats[str(b)].get('ended') or 'failed'}" for b in r.tested) if r.tested
                       else "none run")
                    + (f" ({', '.join(map(str, r.byes))} {'go' if len(r.byes) > 1 else 'goes'} on to the next rung "
                       "untested: too few steps at this budget)" if r.byes else "")
                    + _tie_note(r)
                    for r in rungs)
        + (" (BatchNorm models scored after precise BN)" if any("metric_stale" in t.extra for t in trials) else "")
    )
    return SearchResult(plan=[[c, b] for c, b in zip([c for c, _ in plan], budgets)], unit=unit,
                        rungs=[r.to_dict() for r in rungs], trials=[asdict(t) for t in trials], survivors=survivors,
                        examples=examples, seconds=sum(t.seconds for t in trials), notes=notes,
                        searched=sorted(selected))


# ------------------------------------------------------------------------------------ stage 4
def confirm(s: SearchResult, m: Measurements, p: Prediction, objective: Objective) -> Confirmation:
    """Stage 4: ties on the last rung within one standard error of the difference; the fastest
    of the tied is recommended; the best must beat the trivial baseline."""
    if not s.rungs or not s.survivors:
        return Confirmation(None, None, [], False, False, {}, {}, 0.0, "no candidate could be run within the cost budget")
    last = next(r for r in reversed(s.rungs) if r["tested"])
    st = {int(b): v for b, v in last["stats"].items()}
    ok = [b for b in s.survivors if math.isfinite(st[b]["mean"]) and not st[b]["failed"]]
    means = {str(b): st[b]["mean"] for b in st}
    ses = {str(b): st[b]["se"] for b in st}
    if not ok:
        return Confirmation(None, None, [], False, False, means, ses, last["budget"],
                            "every run of the last rung failed (diverged, out of memory or error)")
    best = objective.best_of({b: st[b]["mean"] for b in ok})
    stats = {b: SeedStats(st[b]["mean"], st[b]["se"], int(st[b]["n"]), int(st[b]["failed"])) for b in ok}
    ses_ok = [stats[b].se for b in ok if math.isfinite(stats[b].se)]
    # the seed noise for a batch with one usable seed: the median of the others' (one blown-up seed
    # elsewhere must not inflate it); with no batch at two usable seeds there is no noise to separate by
    floor = statistics.median(ses_ok) if ses_ok else math.inf
    tied = [b for b in ok if objective.gap(stats[best].mean, stats[b].mean) <= se_of_difference(stats[best], stats[b], floor)]
    pick = max(tied, key=lambda b: (p.speed(b) if math.isfinite(p.speed(b)) else 0.0, b))
    separable = len(tied) == 1 and len(ok) > 1
    # the recommendation itself (the fastest of the tied, not necessarily the best) must beat the baseline
    margin = objective.gap(stats[pick].mean, m.baseline)  # > 0: it beats the baseline
    noise = stats[pick].se if math.isfinite(stats[pick].se) else 0.0
    supported = margin > noise
    per_run = _rung_text(last, objective)
    if len(ok) == 1:
        msg = f"only batch {best} reached the last rung ({per_run})"
    elif separable:
        msg = (f"last rung ({per_run}, seeds {last['seeds']}): batch {best} is better than "
               f"{', '.join(str(b) for b in ok if b != best)} by more than the seed noise")
    else:
        msg = (f"last rung ({per_run}, seeds {last['seeds']}): batches "
               f"{', '.join(map(str, sorted(tied)))} are not separable by more than their seed noise (one standard "
               f"error of the difference); the fastest of them, {pick}, is recommended")
    msg += "; " + ", ".join(f"batch {b}: {objective.metric} {stats[b].mean:.4g} +- {stats[b].se:.2g}" for b in ok)
    if not supported:
        msg += (f". Recommendation not supported: batch {pick}'s validation {objective.metric} {stats[pick].mean:.4g} does not "
                f"beat the trivial baseline, {m.baseline_kind}, by more than its seed noise. The last rung's runs "
                f"({per_run}, cut to fit the cost bound) may be too short to learn; a larger "
                "--cost-budget (cost_budget=) lengthens them")
    return Confirmation(pick, best, sorted(tied), separable, supported, means, ses, last["budget"], msg)


def climb(task: Task, s: SearchResult, c: Confirmation, m: Measurements, p: Prediction, objective: Objective,
          available: float, high: int, *, device: str, store: Any, runner: Any, backend: Any, trial_fn: Any,
          precise: bool) -> Confirmation:
    """Stage 4b: look for a faster batch tied with the recommendation. Successive halving leaves two
    batches on its last rung, so a larger batch as good as the winner may never meet it there. While
    ``available`` examples allow, the recommendation's double runs at the last rung's budget and
    seeds (the same comparison as the rung's); when the two are not separable by the seed noise, the
    double (the faster) is recommended and the climb goes on. At a budget shorter than the full run
    the larger batch has taken fewer steps, so a tie there is conservative. Updates ``s`` (the last
    rung's ``stats`` and ``climbed`` gain the batches; their trials and examples are the search's)
    and returns the new confirmation."""
    if c.batch is None or not s.rungs:
        return c
    run = _rung_runner(task, p, m, objective, device=device, store=store, runner=runner, backend=backend,
                       trial_fn=trial_fn)
    used = 0
    while c.batch is not None:
        last = next(r for r in reversed(s.rungs) if r["tested"])
        up = c.batch * 2
        if up > high or not math.isfinite(p.speed(up)) or str(up) in last["stats"]:
            break  # past the range, not measured, or already compared on the last rung
        examples = _examples_at(p, objective, up, last["budget"])
        if objective.kind == "time":  # the time the recommendation's runs took on the last rung, at up's speed
            mine = [t for t in s.trials if t["batch"] == c.batch and t["rung"] == last["index"] and t["status"] == "ok"]
            if mine and math.isfinite(p.speed(up)) and math.isfinite(p.speed(c.batch)) and p.speed(c.batch) > 0:
                examples = int(statistics.fmean(t["examples"] for t in mine) * p.speed(up) / p.speed(c.batch))
        if examples < MIN_STEPS * up:
            s.notes.append(f"climb: batch {up} would get fewer than {MIN_STEPS} steps at the last rung's budget")
            break
        cost = len(last["seeds"]) * examples * (1.5 if precise else 1.0)
        if used + cost > available:
            s.notes.append(f"climb: no budget left to compare batch {up} with {c.batch} ({cost:.0f} examples needed, "
                           f"{available - used:.0f} left)")
            break
        trials = run([up], last["budget"], list(last["seeds"]), int(last["index"]), examples={up: examples})
        spent = sum(t.examples + int(t.extra.get("precise_bn_examples", 0)) for t in trials)
        used += spent
        st, last["stats"][str(up)] = batch_stats(trials)
        last.setdefault("climbed", []).append(up)  # compared on the last rung after the halving
        s.trials.extend(asdict(t) for t in trials)
        s.survivors.append(up)
        s.examples += spent
        s.seconds += sum(t.seconds for t in trials)
        prev = c.batch
        c = confirm(s, m, p, objective)
        if c.batch != up:
            outcome = f"{c.batch} stays recommended"
        elif up in c.tied and prev in c.tied:
            outcome = f"not separable from {prev}, so the faster {up} is recommended"
        else:
            outcome = f"better than {prev} by more than the seed noise, so {up} is recommended"
        bad = [t for t in trials if t.status != "ok"]
        got = (f"{objective.metric} {st.mean:.4g} +- {st.se:.2g}" if not bad else
               f"{len(bad)} of {len(trials)} runs ended {bad[0].status!r} ({last_error_line(bad[0].extra.get('error'))})")
        s.notes.append(f"climb: batch {up} at the last rung's budget, seeds {last['seeds']}: {got}; {outcome}")
        if c.batch != up:
            break
    return c


# ------------------------------------------------------------------------------------ stage 5
def _critical(task: Task, batch: int, budget: int, max_batch: int, device: str, enabled: bool) -> tuple[dict[str, Any] | None, int, str]:
    """The critical batch over training (issue 16, Merrill et al. 2025) at the recommendation, and a
    batch-size warmup following it when it is predicted to save steps. Returns (record, examples, line)."""
    if not enabled:
        return None, 0, ("critical batch over training: not measured (critical=True / --critical measures it by branching "
                         "short runs, at extra cost)")
    from batchlab.batchsize.critical import critical_batch
    from batchlab.batchsize.schedule import BatchSizeSchedule

    r = critical_batch(task, batch_size=batch, budget_examples=budget, quick=True, device=device)
    sched = BatchSizeSchedule.from_critical_batch(r, base=batch, max_batch=max_batch)
    bounds = [e for e, _ in sched.stages] + [budget]
    steps = bounds[0] / batch + sum((bounds[i + 1] - e) / b for i, (e, b) in enumerate(sched.stages))
    constant = budget / batch
    rec = {"points": [{"examples": pt.examples, "critical_batch": pt.critical_batch, "b_simple": pt.b_simple,
                       "capped": pt.capped} for pt in r.points],
           "stages": [list(st) for st in sched.stages], "steps_constant": constant, "steps_warmup": steps}
    pts = ", ".join(f"{pt.critical_batch}{'+' if pt.capped else ''} after {pt.examples} examples" for pt in r.points)
    line = f"critical batch over training (branching, Merrill et al. 2025): {pts}"
    if sched.stages and steps < constant:
        line += (f"; option: a batch-size warmup from {batch} with stages {sched.stages} (BatchSizeSchedule."
                 f"from_critical_batch) is predicted to take {steps:.0f} instead of {constant:.0f} steps")
        rec["warmup"] = True
    else:
        line += "; a batch-size warmup is not predicted to save steps"
        rec["warmup"] = False
    return rec, int(r.examples_processed), line


def advise(task: Task, c: Confirmation, s: SearchResult, m: Measurements, objective: Objective, seeds: Sequence[int],
           remaining: float, *, device: str, store: Any, runner: Any, backend: Any, small_batch: int,
           check_norms: bool, critical: bool = False, max_batch: int = 512) -> Advice:
    """Stage 5: LR, split, BN health and the normalization check (see the module docstring)."""
    if c.batch is None:
        return Advice(None, None, 1, None, None, None, [])
    rule = default_lr_rule(task.optimizer)
    b = c.batch
    sp = Split.of(b, m.micro_max)
    lr = scale_lr(task.lr, task.batch_size, b, rule)
    lines = [f"learning rate {lr:.4g}: the task's {task.lr:g} at batch {task.batch_size}, {rule} scaling"]
    hparams = _co_scaled(task, b)
    alt = (hparams or {}).get("alternative")
    if alt is not None:
        (_, b2), (_, b2n) = hparams["from"]["betas"], alt["betas"]
        lines.append(f"Adam's betas as the trials ran them (beta2 {b2:g}); keeping beta2's half-life in examples "
                     f"(Marek et al. 2025, rule {alt['rule']}) would give beta2 {b2n:.6g} at batch {b}, not measured here")
    if sp.accumulation > 1:
        lines.append(f"batch {b} does not fit: {sp.accumulation} micro-batches of {sp.micro} (gradient accumulation)")
    mine = [t for t in s.trials if t["batch"] == b and t["rung"] == max(tt["rung"] for tt in s.trials if tt["batch"] == b)]
    health = next((t["extra"]["bn_health"] for t in mine if t["extra"].get("bn_health")), None)
    if health is not None:
        lines.append("bn_health on the recommendation's final model: "
                     + ("no problem found" if health["ok"] else "; ".join(health["problems"][:3])))
    norm_advice, examples = None, 0
    bn = any("metric_stale" in t["extra"] for t in mine)
    if sp.micro <= small_batch and bn and check_norms:
        norm_advice, examples = _norm_check(task, b, sp, lr, mine, objective, seeds, remaining, device, store, runner,
                                            backend)
        lines.append(norm_advice["message"])
    crit, crit_examples, line = _critical(task, b, objective.budget_examples, max_batch, device, critical)
    lines.append(line)
    return Advice(lr, sp.micro, sp.accumulation, health, norm_advice, crit, lines, examples + crit_examples, hparams)


def _co_scaled(task: Task, batch: int) -> dict[str, Any] | None:
    """The task's optimizer hyperparameters (lr, betas, eps, as its optimizer is built) at ``batch`` as
    the search's trials ran them (``to``: the LR by the optimizer's LR rule, the rest unchanged), and for
    Adam-like optimizers the ``alternative`` that also keeps beta2's half-life in examples (not measured)."""
    try:
        opt = task.build_optimizer(task.make_model(), task.lr)
    except Exception:  # noqa: BLE001 - advice only: without a model there is no optimizer to read
        return None
    base = optimizer_hparams(opt)
    rule = default_lr_rule(task.optimizer)
    out: dict[str, Any] = {"rule": rule, "from_batch": task.batch_size, "to_batch": batch, "from": base,
                           "to": scale_hparams(task.optimizer, base, task.batch_size, batch, rule)}
    full = default_hparam_rule(task.optimizer)
    if full != rule and "betas" in base:
        alt = scale_hparams(task.optimizer, base, task.batch_size, batch, full)
        if alt.get("betas") != base["betas"]:
            out["alternative"] = {**alt, "rule": full}
    return out


def _norm_check(task: Task, b: int, sp: Split, lr: float, bn_trials: list[dict[str, Any]], objective: Objective,
                seeds: Sequence[int], remaining: float, device: str, store: Any, runner: Any,
                backend: Any) -> tuple[dict[str, Any], int]:
    """GroupNorm (Wu & He 2018) and Batch Renormalization (Ioffe 2017), the two made for small
    batches, at the recommendation's last-rung budget, against its (precise-BN) BatchNorm runs;
    advice only when the difference exceeds one standard error. (Ghost BN is for large batches: at a
    per-device batch at or below its virtual batch it is BatchNorm itself.)"""
    from batchlab.norm import known_norms

    alts = [nm for nm in ("group", "renorm") if nm in known_norms()]
    budget = max(t["budget_examples"] for t in bn_trials)
    cost = len(alts) * len(seeds) * budget
    bn = SeedStats.of([t["metric"] if t["status"] == "ok" else math.nan for t in bn_trials])
    out: dict[str, Any] = {"per_device_batch": sp.micro, "batchnorm": bn.mean, "alternatives": {}, "budget_examples": budget}
    head = f"the per-device batch {sp.micro} is small for BatchNorm (Wu & He 2018)"
    if cost > remaining:
        out["message"] = (f"{head}; GroupNorm/Batch Renorm not measured: the cost budget has {remaining:.0f} examples left, "
                          f"{cost} needed at the last rung's budget; no normalization advice")
        return out, 0
    examples = 0
    better = []
    for nm in alts:
        cfgs = [TrainConfig(batch_size=sp.micro, accumulation=sp.accumulation, lr=lr, optimizer=task.optimizer,
                            max_examples=budget, seed=s, norm=nm, device=device, eval_train=False) for s in seeds]
        ds = run_trials(task, cfgs, fit_trial, store, kind=f"batchsize-norm-{nm}", runner=runner, backend=backend)
        examples += sum(int(d.get("examples", 0)) for d in ds)
        st = SeedStats.of([float(d.get("metric", math.nan)) if d.get("status") == "ok" else math.nan for d in ds])
        out["alternatives"][nm] = {"mean": st.mean, "se": st.se}
        gap = objective.gap(bn.mean, st.mean) if st.ok and bn.ok else math.nan  # > 0: BatchNorm is better
        se = se_of_difference(bn, st) if st.ok and bn.ok else math.nan
        verdict = "failed" if not st.ok else ("better" if -gap > se else ("worse" if gap > se else "tied"))
        out["alternatives"][nm]["verdict"] = verdict
        if verdict == "better":
            better.append(nm)
    parts = ", ".join(f"{k} {v['mean']:.4g} ({v['verdict']})" for k, v in out["alternatives"].items())
    if better:
        out["message"] = (f"{head}; at {budget} examples per run {', '.join(better)} beat BatchNorm with precise BN "
                          f"({bn.mean:.4g}) by more than the seed noise ({parts}): consider {better[0]}")
    else:
        out["message"] = (f"{head}; at {budget} examples per run no alternative beats BatchNorm with precise BN "
                          f"({bn.mean:.4g}) beyond the seed noise ({parts}): no normalization advice")
    out["advised"] = better
    return out, examples


# ------------------------------------------------------------------------------------ suggest
def suggest(
    task: Task | str | None = None,
    *,
    model: Any = None,
    train: Any = None,
    val: Any = None,
    loss: Any = None,
    device: str = "cpu",
    low: int = 2,
    high: int = 512,
    seeds: Sequence[int] = (0, 1),
    objective: str = "time",
    budget_epochs: float | None = None,
    budget_examples: int | None = None,
    time_budget: float | None = None,
    cost_budget: int | None = None,
    max_candidates: int = 4,
    eta: int = 2,
    memory_limit: int | None = None,
    small_batch: int = SMALL_BATCH,
    check_norms: bool = True,
    critical: bool = False,
    store: Any = None,
    quick: bool = False,
    progress: bool = False,
    backend: Any = None,
    runner: Any = None,
    trial_fn: Any = None,
    **from_torch: Any,
) -> Suggestion:
    """Recommend a batch size, learning rate and accumulation for ``task`` (see the module docstring).

    Args:
        task: a Task or registered name; None: ``Task.from_torch(model=model, train=train, val=val,
            loss=loss, **from_torch)`` (``name`` defaults to "model").
        model, train, val, loss, from_torch: the notebook shortcut (see :meth:`Task.from_torch`).
        device: "cpu" or "cuda[:N]".
        low, high: range of batch sizes considered (its powers of two).
        seeds: seeds of the last rung (at least two; the earlier rungs use the first).
        objective: "time" (best metric within ``time_budget``) or "epochs" (best metric after the budget
            in examples); both prefer the fastest of the batches tied within the seed noise.
        budget_epochs, budget_examples: one full training run (default: the task's epochs).
        time_budget: seconds of one full training run ("time"; default: the measured time of
            ``budget_examples`` at the task's own batch).
        cost_budget: examples all of suggest may process (default: one full run, ``budget_examples``).
        max_candidates: batches the search starts with (the best predicted, plus the task's own).
        eta: successive halving keeps 1/eta per rung and multiplies the budget by eta.
        memory_limit: bytes a step may use (see :func:`max_batch_size`).
        small_batch: a per-device batch at or below this with BatchNorm triggers the normalization check.
        check_norms: run that check.
        critical: also measure the critical batch over training at the recommendation (issue 16,
            :func:`batchlab.batchsize.critical.critical_batch`, quick settings; its cost is reported
            and not bounded by ``cost_budget``) and offer the batch-size warmup following it when
            that is predicted to save steps.
        store: a Store, a path or None; every training run is looked up there first.
        quick: half the measurements' shares of the cost budget (fewer timed steps, a looser stability
            test), at most 4 candidates: more of the budget goes to the search.
        progress: progress bars.
        backend: a parallel trial backend (``map_trials``), e.g. Ray.
        runner: a trial runner (``run(trials, store, kind=)``, :class:`batchlab.runs.LocalRunner`); a
            test passes a fake one.
        trial_fn: ``trial_fn(task, config) -> {"status", "metric", "examples", "time", ...}`` for the
            search's runs (default :func:`batchlab.batchsize.search.fit_trial`).

    Returns:
        A :class:`Suggestion`. The caller's random generators are left as they were.
    """
    t_start = time.perf_counter()
    if task is None:
        if model is None or train is None or val is None:
            raise ValueError("give task=, or model=, train= and val= (and optionally loss=) to build one with "
                             f"Task.from_torch; got model={type(model).__name__}, train={type(train).__name__}, "
                             f"val={type(val).__name__}")
        task = Task.from_torch(from_torch.pop("name", "model"), model, train, val, loss=loss, **from_torch)
    elif from_torch or model is not None or train is not None or val is not None or loss is not None:
        extra = sorted(from_torch) + [k for k, v in (("model", model), ("train", train), ("val", val), ("loss", loss))
                                      if v is not None]
        raise ValueError(f"task= was given, so {', '.join(extra)} must not be (they build a task when task is None)")
    task = get_task(task)
    try:
        n = task.n_train
    except TaskError as e:
        raise TaskError(f"task {task.name!r}: suggest needs the size of the training set (it caps the candidate batches "
                        f"at it and states budgets in epochs), but {type(task.train_set).__name__} has no __len__; give "
                        "the IterableDataset a __len__ (the examples one pass yields)") from e
    rng = BatchRange(low, high)
    rng.check_data(n)
    rng, cap_note = rng.capped(n)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    seeds = [int(s) for s in seeds]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must hold at least two distinct seeds (the noise needs them), got {seeds!r}")
    budget = budget_in_examples(n, budget_epochs, budget_examples, default_epochs=task.epochs)
    if time_budget is not None and not (isinstance(time_budget, (int, float)) and time_budget > 0):
        raise ValueError(f"time_budget must be a positive number of seconds, got {time_budget!r}")
    if time_budget is not None and objective != "time":
        raise ValueError(f"time_budget needs objective='time', got objective={objective!r}")
    if cost_budget is not None and (not isinstance(cost_budget, int) or cost_budget < 1):
        raise ValueError(f"cost_budget must be a positive number of examples, got {cost_budget!r}")
    if not isinstance(eta, int) or eta < 2:
        raise ValueError(f"eta must be an integer >= 2, got {eta!r}")
    if quick:
        max_candidates = min(max_candidates, 4)
    with preserved_state():
        return _suggest(task, rng, cap_note, seeds, objective, budget, time_budget, cost_budget, max_candidates, eta,
                        device, memory_limit, small_batch, check_norms, critical, store, quick, progress, backend,
                        runner, trial_fn, t_start)


def _suggest(task: Task, rng: BatchRange, cap_note: str | None, seeds: list[int], kind: str, budget: int,
             time_budget: float | None, cost_budget: int | None, max_candidates: int, eta: int, device: str,
             memory_limit: int | None, small_batch: int, check_norms: bool, critical: bool, store: Any, quick: bool,
             progress: bool, backend: Any, runner: Any, trial_fn: Any, t_start: float) -> Suggestion:
    st = open_store(store)
    task.check(device)
    cost = cost_budget if cost_budget is not None else budget
    m = measure(task, rng, cost, device=device, memory_limit=memory_limit, quick=quick, store=st, progress=progress,
                seed=seeds[0])
    if cap_note:
        m.notes.insert(0, cap_note)
    # the objective: "time" converts the budget to seconds at the task's own batch (measured speed)
    own = rng.clamp(pow2_floor(task.batch_size))
    sp = Split.of(own, m.micro_max)
    t_own = sp.accumulation * _time_per_step(m.throughput, sp.micro)
    data_eps = m.throughput.get("data_examples_per_sec")
    if data_eps:  # a step cannot be faster than its data arrives (the throughput's step times leave loading out)
        t_own = max(t_own, own / data_eps)
    if kind == "time":
        if time_budget is None:
            time_budget = budget * t_own / own
        else:
            budget = max(1, int(time_budget * own / t_own))
            if cost_budget is None:
                cost = budget
    obj = Objective(kind, budget, time_budget if kind == "time" else None, task.metric_name, task.higher_is_better)
    p = predict(task, rng, m, obj, max_candidates)
    used = sum(m.examples.values())
    bn = has_batchnorm(task.make_model())
    precise = bn and trial_fn is None  # each run is scored after a precise-BN pass (search.fit_trial)
    # a BatchNorm model that may end at a small per-device batch: a quarter of what is left is kept for
    # measuring the normalization alternatives at the last rung's budget
    reserve = NORM_RESERVE if bn and check_norms and min(p.selected) <= small_batch else 0.0
    left = max(0.0, cost - used)
    search_budget = left * (1 - reserve)
    s = search(task, p, m, obj, search_budget, seeds, device=device, store=st, runner=runner, backend=backend,
               trial_fn=trial_fn, eta=eta, precise=precise, climb_trials=len(seeds))
    if reserve:
        s.notes.append(f"{reserve:.0%} of the search budget was kept for the normalization check a small batch with "
                       "BatchNorm triggers")
    c = confirm(s, m, p, obj)
    c = climb(task, s, c, m, p, obj, search_budget - s.examples, rng.high, device=device, store=st, runner=runner,
              backend=backend, trial_fn=trial_fn, precise=precise)
    if p.measured_speed:  # after the climb: every run of the search and the climb counted
        predicted = {r["batch_size"]: r["examples_per_sec"] for r in p.candidates}
        use = "the rungs' time budgets and the fastest of the tied" if kind == "time" else "the fastest of the tied"
        s.notes.append(f"speeds in the search's runs (examples/s, median over a batch's runs, data loading included, "
                       f"first step left out; the throughput measurement's in brackets), used for {use}: "
                       + ", ".join(f"{b}: {v:.4g} ({predicted.get(int(b), math.nan):.4g})"
                                   for b, v in sorted(p.measured_speed.items(), key=lambda kv: int(kv[0]))))
    a = advise(task, c, s, m, obj, seeds, cost - used - s.examples, device=device, store=st, runner=runner,
               backend=backend, small_batch=small_batch, check_norms=check_norms, critical=critical, max_batch=rng.high)
    status = "failed" if c.batch is None else ("ok" if c.supported else "not supported")
    if c.batch is None:
        headline = f"{task.name}: no batch size could be recommended ({c.message})"
    else:
        acc = f" as {a.accumulation} x {a.micro_batch} (gradient accumulation)" if a.accumulation > 1 else ""
        tie = "" if c.separable or len(c.tied) < 2 else f", fastest of the tied {', '.join(map(str, c.tied))}"
        warn = "" if c.supported else " - NOT SUPPORTED: no better than a trivial baseline"
        headline = (f"{task.name}: batch size {c.batch}{acc}, learning rate {a.lr:.4g} ({task.optimizer}, "
                    f"{default_lr_rule(task.optimizer)} scaling){tie}{warn}")
    examples = {**m.examples, "search": s.examples, "advice": a.examples}
    return Suggestion(
        task=task.name, status=status, batch_size=c.batch, micro_batch=a.micro_batch, accumulation=a.accumulation,
        lr=a.lr, optimizer=task.optimizer, rule=default_lr_rule(task.optimizer), headline=headline,
        objective=obj.to_dict(), measure=m, predict=p, search=s, confirm=c, advise=a, cost_budget=int(cost),
        examples_processed=examples, wall_time=time.perf_counter() - t_start,
    )
