"""``suggest(task) -> Suggestion``: which batch size, learning rate and accumulation to train with.

The recommendation combines four measurements, each cheap next to a grid of full training runs:

1. **Memory** (:func:`max_batch_size`): the largest per-device batch whose step fits.
2. **Speed** (:func:`throughput`): seconds per step at each power of two that fits.
3. **Statistics** (:func:`noise_scale`): the gradient noise scale B_simple ~ B_noise from a short
   run with gradient accumulation (McCandlish et al. 2018).
4. **A generalization check** in two stages, like successive halving with a final full-budget rung:

   a. *Screen* (:func:`pivot_search`, claim C14): short runs (``check_fraction``, 4% of the full
      budget, two or more seeds) at the predicted batch and its neighbours, walking x0.5 / x2 while
      the validation metric improves by more than the seed noise.
   b. *Confirm*: the screen's best batch and its x2 neighbour (x0.5 at the upper bound) are trained
      at the **full** budget with the first seed; the better one is recommended, the larger one when
      they differ by less than the screen's seed noise.

   Why both: short runs favour small batches (with few examples the larger batch's fewer steps
   are what limits it; over the full budget the loss falls, B_noise grows and larger batches catch
   up), so the screen alone lands one or two powers of two too low; and a full-budget comparison of
   three or more sizes would cost a third of a 9-size x 2-seed grid. Two full-budget runs cost 2/18
   = 11% of that grid, the screen and the measurements ~2-4% more.

Prediction. McCandlish et al.'s model: the steps and examples needed to reach a given loss trade
off as ``S = S_min (1 + B_noise / B)`` and ``E = E_min (1 + B / B_noise)``. With ``t(B)`` the
measured seconds per step (``acc * t(micro)`` when B is reached by accumulation), the predicted
time to target is ``S_min (1 + B_noise / B) t(B)``. S_min is anchored by assuming the task's default
batch reaches the target in the full budget: ``E_min = E_budget / (1 + B_ref / B_noise)``,
``S_min = E_min / B_noise``. This is Pollux's goodput criterion (throughput x statistical
efficiency) in other words.

Pivot. The check starts at the smaller of (a) the batch of least predicted time and (b) the
largest batch whose statistical efficiency ``E_min / E(B) = 1 / (1 + B / B_noise)`` is at least
``efficiency`` (0.9, the same 90% rule as the throughput knee): with a fixed budget of examples,
every batch above (b) spends its examples less efficiently (McCandlish et al. sec. 2.2; at the
critical batch B_noise itself the examples double). On a CPU where the step time hardly depends on
B, (a) alone would always pick the largest batch and waste examples.

Normalization. If the per-device (micro-)batch is small (``small_batch`` = 8 or less) and the model
has BatchNorm, its batch statistics are unreliable (Wu & He 2018); the suggestion says so and
measures GroupNorm, Ghost BN (when registered) and precise BN statistics (BN retrained, then its
running statistics recomputed over the training set) at the same batch with the same short budget.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

from batchlab.batchsize._store import key_for, open_store
from batchlab.batchsize.memory import max_batch_size
from batchlab.batchsize.noise import noise_scale
from batchlab.batchsize.search import fit_trial, pivot_search
from batchlab.batchsize.throughput import throughput
from batchlab.tasks import Task, get_task
from batchlab.train import TrainConfig, default_lr_rule, scale_lr

SMALL_BATCH = 8  # a per-device batch at or below this triggers the normalization advice


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
class Suggestion:
    """The recommendation and the measurements behind it. Plain data: ``to_json`` / ``from_dict``."""

    task: str
    status: str  # "ok" or "failed" (every checked batch diverged / ran out of memory)
    batch_size: int | None  # examples per optimizer step
    micro_batch: int | None  # examples per forward/backward (per device)
    accumulation: int  # micro-batches per step
    lr: float | None
    optimizer: str
    rule: str
    rationale: list[str]
    b_noise: float
    budget_examples: int  # the full training budget the prediction is anchored to
    check_examples: int  # per-trial budget of the pivot search
    seeds: list[int]
    memory: dict[str, Any]
    throughput: dict[str, Any]
    noise: dict[str, Any]
    candidates: list[dict[str, Any]]
    search: dict[str, Any]
    norm_advice: dict[str, Any] | None = None
    examples_processed: dict[str, int] = field(default_factory=dict)
    wall_time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Suggestion:
        return cls(**d)

    @property
    def total_examples(self) -> int:
        return int(sum(self.examples_processed.values()))

    def summary(self) -> str:
        """The recommendation in a few lines of plain text."""
        if self.batch_size is None:
            head = f"{self.task}: no batch size could be recommended (status {self.status})."
        else:
            acc = f" as {self.accumulation} x {self.micro_batch} (gradient accumulation)" if self.accumulation > 1 else ""
            head = f"{self.task}: batch size {self.batch_size}{acc}, learning rate {self.lr:.4g} ({self.optimizer}, {self.rule} scaling)"
        return "\n".join([head, *("  - " + r for r in self.rationale)])


def has_batchnorm(model: nn.Module) -> bool:
    """True when any module is a batch norm (torch's or a subclass, as batchlab's all are)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def precise_bn_trial(task: Task, config: TrainConfig) -> dict[str, Any]:
    """Train with BN, then recompute population statistics (precise BN, Wu & Johnson 2021) and evaluate."""
    from batchlab.norm import precise_bn
    from batchlab.train import evaluate, fit

    model = task.make_model(norm=config.norm)
    r = fit(task, config, model=model, raise_errors=False)
    if not r.ok:
        return {"status": r.status, "metric": math.nan, "examples": r.examples, "time": r.wall_time, "error": r.error}
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        batches = [x for x, _ in task.train_set.batches(256, generator=torch.Generator().manual_seed(config.seed))]
        precise_bn(model, batches, num_batches=len(batches))
    _, metric = evaluate(model, task.val_set.x, task.val_set.y, task)
    return {"status": "ok", "metric": float(metric), "examples": r.examples + len(task.train_set), "time": r.wall_time}


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def predict_candidates(
    sizes: Sequence[int], tp: Any, max_micro: int, b_noise: float, budget_examples: int, ref_batch: int
) -> list[Candidate]:
    """The prediction table (see the module docstring); ``tp`` is a ThroughputResult."""
    out = []
    finite = math.isfinite(b_noise) and b_noise > 0
    e_min = budget_examples / (1 + ref_batch / b_noise) if finite else math.nan
    s_min = e_min / b_noise if finite else math.nan
    for b in sizes:
        micro = b if b <= max_micro else max_micro
        acc = math.ceil(b / micro)
        t = acc * tp.time_per_step(micro)
        steps = s_min * (1 + b_noise / b) if finite else math.nan
        out.append(Candidate(
            batch_size=b, micro_batch=micro, accumulation=acc, step_time=t, examples_per_sec=b / t if t > 0 else math.nan,
            epoch_time=math.ceil(tp.n_train / b) * t, predicted_steps=steps,
            predicted_examples=e_min * (1 + b / b_noise) if finite else math.nan,
            predicted_time=steps * t, fits=b <= max_micro,
        ))
    return out


def suggest(
    task: Task | str,
    *,
    device: str = "cpu",
    low: int = 2,
    high: int = 512,
    seeds: Sequence[int] = (0, 1),
    budget_epochs: float | None = None,
    budget_examples: int | None = None,
    check_fraction: float = 0.04,
    confirm: bool = True,
    memory_limit: int | None = None,
    noise_steps: int = 20,
    noise_micro_batch: int = 16,
    noise_accumulation: int = 4,
    repeats: int = 2,
    efficiency: float = 0.9,
    small_batch: int = SMALL_BATCH,
    check_norms: bool = True,
    store: Any = None,
    quick: bool = False,
    progress: bool = False,
    backend: Any = None,
) -> Suggestion:
    """Recommend a batch size, learning rate and accumulation for ``task``.

    Args:
        task: a Task or registered name.
        device: "cpu" or "cuda[:N]".
        low, high: range of batch sizes considered (powers of two within it).
        seeds: seeds of the pivot-search trials (at least two).
        budget_epochs, budget_examples: the full training budget (default: the task's epochs).
        check_fraction: the screening walk's per-trial budget as a fraction of the full budget.
        confirm: train the screen's candidate (the largest batch within the seed noise of the
            screen's best) and the task's own batch size (or, when they are the same, the
            candidate's x2 neighbour) at the full budget (first seed only) and recommend the
            better. False: recommend where the screen's walk ended (cheaper, biased towards small
            batches).
        memory_limit: bytes a step may use (see :func:`max_batch_size`).
        noise_steps, noise_micro_batch, noise_accumulation: the B_simple measurement run.
        repeats: timed steps per batch size.
        efficiency: the check starts no higher than the largest batch whose statistical efficiency
            ``1 / (1 + B / B_noise)`` is at least this (0.9: examples within 10% of E_min).
        small_batch: a per-device batch at or below this with BatchNorm triggers the norm check.
        check_norms: measure the normalization alternatives when triggered.
        store: a Store, a path or None; every training run is looked up there first.
        quick: halve the measurement effort (fewer noise steps, repeats and a smaller check budget).
        progress: progress bars.
        backend: a parallel trial backend for the screening walk (see ``pivot_search``).

    Returns:
        A :class:`Suggestion`.
    """
    t_start = time.perf_counter()
    task = get_task(task)
    n = len(task.train_set)
    for name, v in (("low", low), ("high", high)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if low > high:
        raise ValueError(f"low must be <= high, got low={low} > high={high}")
    if low > n:
        raise ValueError(f"low must be <= the training-set size ({n} examples), got {low}")
    if not 0 < efficiency < 1:
        raise ValueError(f"efficiency must be in (0, 1), got {efficiency!r}")
    if not 0 < check_fraction <= 1:
        raise ValueError(f"check_fraction must be in (0, 1], got {check_fraction!r}")
    if budget_epochs is not None and budget_examples is not None:
        raise ValueError("give one of budget_epochs and budget_examples, not both")
    if budget_examples is None:
        epochs = task.epochs if budget_epochs is None else budget_epochs
        if not (isinstance(epochs, (int, float)) and epochs > 0):
            raise ValueError(f"budget_epochs must be a positive number, got {budget_epochs!r}")
        budget_examples = max(1, round(epochs * n))
    if quick:
        noise_steps, repeats, check_fraction = max(10, noise_steps // 2), max(1, repeats - 1), check_fraction / 2
    check_examples = max(1, round(check_fraction * budget_examples))
    high = min(high, n)
    st = open_store(store)
    fp = task.fingerprint()
    rationale: list[str] = []
    opt = task.optimizer
    rule = default_lr_rule(opt)

    # 1. memory
    mem = max_batch_size(task, device=device, memory_limit=memory_limit, low=low, high=high)
    if mem.batch_size is None:
        raise ValueError(f"not even a batch of low={low} fits in memory ({mem.memory_limit} bytes); lower low or raise memory_limit")
    max_b = mem.batch_size
    max_micro = _pow2_floor(max_b)
    mem_examples = int(sum(p[0] for p in mem.probes) + sum(t[0] for t in mem.tried))

    # 2. speed at every power of two that fits
    sizes = [b for b in (1 << k for k in range(0, 31)) if low <= b <= high]
    if not sizes:
        sizes = [high]
    timed = [b for b in sizes if b <= max_micro] or [max_micro]
    tp = throughput(task, timed, device=device, warmup=1, repeats=repeats, progress=progress)

    # 3. noise scale (stored: a rerun does not train again)
    micro = max(1, min(noise_micro_batch, max_micro, n // noise_accumulation))
    ncfg = {"micro_batch": micro, "accumulation": noise_accumulation, "steps": noise_steps, "device": device}
    noise = st.run_or_load(
        key_for(fp, ncfg, kind="batchsize-noise"), lambda: noise_scale(task, progress=progress, **ncfg),
        kind="batchsize-noise",
    )
    b_noise = float(noise.get("b_simple", math.nan))
    if not math.isfinite(b_noise) or b_noise <= 0:
        rationale.append(
            f"the gradient noise scale could not be measured (training status {noise.get('status')!r}); "
            f"the check starts at the task's batch {task.batch_size}"
        )

    # 4. prediction table and pivot
    cands = predict_candidates(sizes, tp, max_micro, b_noise, budget_examples, task.batch_size)
    usable = [c for c in cands if math.isfinite(c.predicted_time)]
    if usable:
        fastest = min(usable, key=lambda c: c.predicted_time)
        b_eff = _pow2_floor(b_noise * (1 / efficiency - 1))
        pivot = min(fastest.batch_size, max(b_eff, low))
        rationale.append(
            f"gradient noise scale B_simple ~ {b_noise:.0f} (McCandlish et al. 2018): batches well below it use "
            f"examples efficiently, batches above it mostly save steps"
        )
        rationale.append(
            f"least predicted time to target: batch {fastest.batch_size} ({fastest.predicted_time:.3g} s predicted, "
            f"{fastest.step_time * 1e3:.3g} ms per step); largest batch with >= {efficiency:.0%} statistical efficiency "
            f"E_min/E = 1/(1 + B/B_noise): {b_eff}; the check starts at the smaller, {pivot}"
        )
    else:
        pivot = min(max(_pow2_floor(task.batch_size), low), high)
    pivot = min(max(pivot, sizes[0]), sizes[-1])
    if tp.knee is not None:
        rationale.append(f"throughput saturates (90% of the peak examples/s) at batch {tp.knee}")
    accumulate = max_micro < high
    rationale.append(
        f"memory: the largest batch whose whole step fits is {max_b} "
        f"({'training-set size' if mem.capped_by == 'data' else mem.capped_by}); "
        + ("larger batches are checked as gradient accumulation" if accumulate else "every batch considered fits")
    )

    # 5. the check: pivot search with short runs
    search = pivot_search(
        task, pivot=pivot, low=sizes[0], high=sizes[-1], seeds=seeds, budget_examples=check_examples,
        max_batch=max_micro, accumulate=accumulate, device=device, store=st, progress=progress, backend=backend,
    )
    best = search.best_batch
    status = "ok" if best is not None else "failed"
    acc = 1
    micro_best: int | None = None
    confirmed: dict[str, Any] = {}
    confirm_examples = 0
    if best is not None:
        rationale.append(
            f"screened {len(search.path)} batch sizes ({', '.join(map(str, search.path))}) with {len(search.seeds)} seeds "
            f"and {check_examples} examples each ({check_fraction:.0%} of the budget): {search.stop_reason}; "
            f"best validation metric {search.means[str(best)]:.4f} at batch {best} (seed noise {search.noise:.4f})"
        )
        if confirm:
            challenger = _challenger(search.means, search.noise)
            best, confirmed, confirm_examples, line = _confirm(
                task, search, challenger, sizes, max_micro, accumulate, budget_examples, device, st, fp,
            )
            rationale.append(line)
        acc = _accumulation(best, max_micro if accumulate else None)
        micro_best = best // acc
        if acc > 1:
            rationale.append(f"batch {best} does not fit: use {acc} micro-batches of {micro_best} (gradient accumulation)")
        best_lr = scale_lr(task.lr, task.batch_size, best, rule)
        rationale.append(f"learning rate {best_lr:.4g}: the task's {task.lr:g} at batch {task.batch_size}, {rule} scaling")
    else:
        best_lr = None
        rationale.append(f"every checked batch failed ({search.stop_reason}); see the trials for the errors")
    search_d = search.to_dict()
    search_d["confirm"] = confirmed

    # 6. normalization advice for small per-device batches
    norm_advice = None
    norm_examples = 0
    if micro_best is not None and micro_best <= small_batch and has_batchnorm(task.make_model()):
        norm_advice, norm_examples = _norm_check(task, micro_best, acc, best_lr, search, check_examples, device, st, fp, check_norms)
        rationale.append(norm_advice["message"])

    examples = {
        "memory": mem_examples, "throughput": tp.examples_processed, "noise": int(noise.get("examples_processed", 0)),
        "search": search.examples, "confirm": confirm_examples, "norm": norm_examples,
    }
    return Suggestion(
        task=task.name, status=status, batch_size=best, micro_batch=micro_best, accumulation=acc, lr=best_lr,
        optimizer=opt, rule=rule, rationale=rationale, b_noise=b_noise, budget_examples=budget_examples,
        check_examples=check_examples, seeds=list(search.seeds), memory=mem.to_dict(), throughput=tp.to_dict(),
        noise=noise, candidates=[asdict(c) for c in cands], search=search_d, norm_advice=norm_advice,
        examples_processed=examples, wall_time=time.perf_counter() - t_start,
    )


def _accumulation(batch: int, micro_max: int | None) -> int:
    """Micro-batches per step for ``batch`` when micro-batches are capped at ``micro_max`` (None: no cap)."""
    return 1 if micro_max is None or batch <= micro_max else math.ceil(batch / micro_max)


def _challenger(means: dict[str, float], noise: float) -> int:
    """The screen's candidate for the full-budget comparison: the largest batch whose screen mean
    is within the seed noise of the best screen mean. Short runs favour small batches (fewer
    examples leave the larger batch short of steps), so among batches the screen cannot tell
    apart, the largest is the one least hurt by that bias."""
    ok = {int(b): v for b, v in means.items() if v > -math.inf}
    top = max(ok.values())
    tol = noise if math.isfinite(noise) else 0.0
    return max(b for b, v in ok.items() if v >= top - tol)


def _confirm(
    task: Task, search: Any, screened: int, sizes: Sequence[int], max_micro: int, accumulate: bool,
    budget_examples: int, device: str, st: Any, fp: dict[str, Any],
) -> tuple[int, dict[str, Any], int, str]:
    """Full-budget comparison of the screen's candidate with the task's own batch size.

    The screen's short runs favour small batches: with few examples the larger batch's fewer
    steps are what limits it, while at the full budget it catches up. The other candidate is the
    incumbent, the task's configured batch size (the one its learning rate was set for, so its
    run needs no scaling rule): a change of batch size is recommended only when it beats what
    the user already has at the budget they will train with. When the screen already chose the
    incumbent, the other candidate is its x2 neighbour (x0.5 at the upper bound). Both run at the
    full budget with the first seed; the higher validation metric wins, the larger batch on a tie.
    Returns ``(batch, record, examples, rationale line)``.
    """
    def usable(b: int) -> bool:
        return sizes[0] <= b <= sizes[-1] and (accumulate or b <= max_micro)

    incumbent = task.batch_size
    if incumbent != screened and usable(incumbent):
        other, role = incumbent, f"the task's own batch size {incumbent}"
    else:
        up = screened * 2
        other = up if usable(up) else screened // 2
        role = f"its neighbour {other}"
    if not usable(other) or other == screened:
        return screened, {"candidates": [screened], "metrics": {}}, 0, (
            f"no other batch to confirm {screened} against within the range; kept it"
        )
    seed = search.seeds[0]
    rule = search.rule
    metrics: dict[int, float] = {}
    examples = 0
    for b in sorted({screened, other}):
        acc = _accumulation(b, max_micro if accumulate else None)
        cfg = TrainConfig(
            batch_size=b // acc, accumulation=acc, lr=scale_lr(task.lr, task.batch_size, b, rule), optimizer=task.optimizer,
            max_examples=budget_examples, seed=seed, device=device, eval_train=False,
        )
        d = st.run_or_load(key_for(fp, cfg.to_dict(), kind="batchsize-confirm", trial_fn="fit_trial"),
                           lambda cfg=cfg: fit_trial(task, cfg), kind="batchsize-confirm")
        examples += int(d.get("examples", 0))
        metrics[b] = float(d["metric"]) if d.get("status") == "ok" and math.isfinite(float(d.get("metric", math.nan))) else -math.inf
    lo, hi = min(metrics), max(metrics)
    if metrics[hi] == -math.inf and metrics[lo] == -math.inf:
        pick, why = screened, "both full-budget runs failed; kept the screen's choice"
    elif metrics[hi] >= metrics[lo]:
        pick, why = hi, f"{hi} is as good or better"
    else:
        pick, why = lo, f"{lo} is better"
    record = {"candidates": sorted(metrics), "metrics": {str(b): v for b, v in metrics.items()}, "seed": seed,
              "budget_examples": budget_examples, "incumbent": incumbent, "screened": screened, "batch": pick}
    line = (f"confirmed the screen's candidate {screened} (the largest batch within the seed noise of the screen's best) against {role} "
            f"at the full budget ({budget_examples} examples, "
            f"seed {seed}): " + ", ".join(f"batch {b} {v:.4f}" for b, v in sorted(metrics.items())) + f"; {why}")
    return pick, record, examples, line


def _norm_check(
    task: Task, micro: int, acc: int, lr: float, search: Any, check_examples: int, device: str, st: Any, fp: dict[str, Any], run: bool
) -> tuple[dict[str, Any], int]:
    """Measure GroupNorm, Ghost BN and precise BN at the suggested per-device batch."""
    from batchlab.norm import known_norms

    alternatives = [nm for nm in ("group", "ghost") if nm in known_norms()] + ["precise"]
    bn = [t.metric for t in search.trials if t.batch_size == micro * acc and t.status == "ok"]
    out: dict[str, Any] = {
        "per_device_batch": micro, "batchnorm": statistics.fmean(bn) if bn else math.nan, "alternatives": {},
        "message": (
            f"the per-device batch {micro} is small and the model uses BatchNorm, whose batch statistics are noisy "
            f"at this size (Wu & He 2018); consider GroupNorm, Ghost BN or precise BN statistics"
        ),
    }
    examples = 0
    if not run:
        return out, 0
    for nm in alternatives:
        vals = []
        trial = precise_bn_trial if nm == "precise" else fit_trial
        for s in search.seeds:
            cfg = TrainConfig(
                batch_size=micro, accumulation=acc, lr=lr, optimizer=task.optimizer,
                max_examples=check_examples, seed=s, norm="batch" if nm == "precise" else nm, device=device,
                eval_train=False,
            )
            kind = f"batchsize-norm-{nm}"
            d = st.run_or_load(key_for(fp, cfg.to_dict(), kind=kind), lambda cfg=cfg, trial=trial: trial(task, cfg), kind=kind)
            examples += int(d.get("examples", 0))
            if d.get("status") == "ok":
                vals.append(float(d["metric"]))
        out["alternatives"][nm] = statistics.fmean(vals) if vals else math.nan
    if out["alternatives"]:
        parts = ", ".join(f"{k} {v:.4f}" for k, v in out["alternatives"].items())
        out["message"] += f"; measured at batch {micro}: batch norm {out['batchnorm']:.4f}, {parts}"
    return out, examples
