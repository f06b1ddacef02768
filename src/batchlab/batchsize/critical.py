"""The critical batch size measured by branching (Merrill et al. 2025), beside B_simple.

Definition (Merrill, Arora, Groeneveld, Hajishirzi 2025, "Critical Batch Size Revisited",
arXiv 2505.23971): at a point of training, the critical batch is the largest batch ``B'`` such that
training on from there for a fixed number of examples at ``B'`` (its LR and optimizer settings
scaled from ``B`` by the optimizer's rule) reaches a loss within a tolerance of training those same
examples at the original batch ``B``. Below it a larger batch costs no examples (fewer steps for the
same progress); above it, it does. Merrill et al. find it near zero at initialization, rising fast,
then plateauing, and the gradient noise scale an unreliable proxy for it.

How :func:`critical_batch` measures it:

1. A base run at batch ``B`` saves the model and the optimizer state at each checkpoint (fractions
   of the training budget).
2. From each checkpoint, short branches at ``k x B`` for each factor k and seed: the checkpoint's
   model *and* optimizer state (Adam's moments, momentum buffers), hyperparameters co-scaled by
   :func:`batchlab.train.scale_hparams`; each branch trains ``branch_examples`` examples and
   its validation loss is recorded.
3. The critical batch is the largest ``k x B`` whose seed-mean loss, and that of every smaller
   factor, stays within the tolerance of the base branch's (k = 1). The tolerance is a fraction
   of the base branch's loss decrease over the branch: ``loss_k <= loss_1 + tolerance *
   (loss_checkpoint - loss_1)``, i.e. the larger batch makes at least ``1 - tolerance`` of the
   progress on the same examples, with the seed noise as a floor (on a plateau the base branch's
   progress is itself within the noise: a batch whose loss differs from the base branch's by less
   than the standard error of the difference of the seed means passes). This makes it scale-free (no dependence on the loss's floor)
   and ties it to McCandlish et al.'s model ``E = E_min (1 + B / B_noise)``: at a fixed number of
   examples the progress at batch B is about ``(1 + B_0/B_noise) / (1 + B/B_noise)`` of that at
   a small B_0, so a tolerance of 0.5 puts the critical batch near B_noise, and the default 0.2
   where a larger batch costs about 25% more examples (Zhang et al. 2025 take a 20% overhead).
   Stopping at the first failure keeps one lucky large branch from counting. The same rule on each seed's losses alone
   gives per-seed estimates, whose smallest and largest are the reported range (``critical_low``,
   ``critical_high``); the base branch's seed-to-seed spread (``base_loss_std``) is the branch noise.
4. B_simple (McCandlish et al. 2018) at the checkpoint's weights, with the
   :class:`~batchlab.batchsize.noise.GradientNoiseScale` estimator: ``gns_groups`` groups of
   ``gns_accumulation`` micro-batches (small = one micro-batch, big = the group's mean), no
   optimizer step in between.

The result is plain data (dataclasses -> JSON); :meth:`CriticalBatchResult.plot` draws both over
training. :meth:`batchlab.batchsize.BatchSizeSchedule.from_critical_batch` turns it into a
batch-size warmup.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import numbers
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from batchlab.batchsize.noise import GradientNoiseScale
from batchlab.runs import open_store, trial_key
from batchlab.tasks import Task, get_task
from batchlab.train import (
    Callback,
    StepContext,
    TrainConfig,
    default_hparam_rule,
    default_lr_rule,
    evaluate,
    fit,
    group_hparams,
    iterate_batches,
    last_error_line,
    scale_group_hparams,
    scale_hparams,
    scale_lr,
    set_hparams,
)

DEFAULT_CHECKPOINTS = (0.0, 0.1, 0.25, 0.5)
DEFAULT_FACTORS = (1, 2, 4, 8, 16)
QUICK_CHECKPOINTS = (0.0, 0.25)
QUICK_FACTORS = (1, 2, 4, 8)


@dataclass
class CriticalPoint:
    """The measurement at one checkpoint (plain data)."""

    examples: int  # training examples the base run had seen
    step: int  # its optimizer steps
    val_loss: float  # validation loss at the checkpoint
    batches: list[int]  # branch batches k x B
    losses: list[list[float]]  # losses[i][s]: validation loss after the branch at batches[i], seed s
    mean_losses: list[float]  # seed means of losses
    critical_batch: int  # from the seed-mean losses
    critical_low: int  # smallest per-seed estimate
    critical_high: int  # largest per-seed estimate
    base_loss_std: float  # seed-to-seed std of the base branch (k = 1): the branch noise
    noise: float  # the tolerance's noise floor for the seed means: base_loss_std * sqrt(2 / seeds)
    b_simple: float  # gradient noise scale at the checkpoint
    ratio: float  # critical_batch / b_simple (NaN when B_simple is not positive)
    capped: bool  # the largest batch tried was within tolerance: the critical batch is at least this
    #: branches that did not end "ok" with a finite loss: "batch B seed S: status (error)"; a failed larger
    #: branch counts as not within tolerance
    failed: list[str] = field(default_factory=list)
    #: False when a base-batch branch failed: there is nothing to compare with, so no critical batch
    #: (critical_batch is then the base batch, and schedules skip the point)
    defined: bool = True


@dataclass
class CriticalBatchResult:
    """Outcome of :func:`critical_batch` (plain data: JSON and back)."""

    task: str
    batch_size: int  # the base batch B
    optimizer: str
    rule: str  # hyperparameter co-scaling rule of the branches
    hparams: dict[str, Any]  # the base batch's hyperparameters (lr, betas, eps)
    tolerance: float
    branch_examples: int
    factors: list[int]
    seeds: list[int]
    budget_examples: int  # the training budget the checkpoint fractions refer to
    points: list[CriticalPoint] = field(default_factory=list)
    examples_processed: int = 0  # every example through a forward/backward (base run, branches, B_simple)
    wall_time: float = 0.0
    notes: list[str] = field(default_factory=list)  # what was changed from the request, and why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), allow_nan=True, **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CriticalBatchResult:
        """From :meth:`to_dict`, or the ``critical_batch.json`` the command writes (keys that are
        not fields, such as its ``schedule``, are ignored)."""
        names = {f.name for f in fields(cls)}
        point_names = {f.name for f in fields(CriticalPoint)}
        d = {k: v for k, v in d.items() if k in names}
        d["points"] = [CriticalPoint(**{k: v for k, v in p.items() if k in point_names}) for p in d.get("points", [])]
        return cls(**d)

    def table(self, markdown: bool = False) -> str:
        """One row per checkpoint: examples, loss, critical batch (range), B_simple, ratio."""
        head = ["examples", "val loss", "critical batch", "per-seed range", "B_simple", "critical / B_simple"]
        rows = []
        for p in self.points:
            crit = f">={p.critical_batch}" if p.capped else str(p.critical_batch)
            if not p.defined:
                crit = "none (base branch failed)"
            rows.append([str(p.examples), f"{p.val_loss:.4f}", crit, f"{p.critical_low}-{p.critical_high}",
                         f"{p.b_simple:.3g}", f"{p.ratio:.3g}"])
        if markdown:
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
            return "\n".join(lines)
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in rows])

    def plot(self, ax: Any = None) -> Any:
        """Critical batch (with its per-seed range) and B_simple over training; returns the figure."""
        import matplotlib

        if ax is None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = ax.figure if ax is not None else plt.figure(figsize=(5.5, 3.8))
        ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
        points = [p for p in self.points if p.defined]  # a point whose base branch failed has no critical batch
        x = [p.examples for p in points]
        crit = [p.critical_batch for p in points]
        lo = [p.critical_batch - p.critical_low for p in points]
        hi = [p.critical_high - p.critical_batch for p in points]
        ax.errorbar(x, crit, yerr=[lo, hi], marker="o", capsize=3, label="critical batch (branches; seed range)")
        capped = [(xi, c) for xi, c, p in zip(x, crit, points) if p.capped]
        if capped:
            ax.scatter(*zip(*capped), marker="^", s=60, color="C0", label="largest tried (lower bound)")
        bs = [(xi, p.b_simple) for xi, p in zip(x, self.points) if math.isfinite(p.b_simple) and p.b_simple > 0]
        if bs:
            ax.plot(*zip(*bs), marker="s", ls="--", color="C3", label="B_simple (noise scale)")
        ax.set_yscale("log", base=2)
        ax.set_xlabel("training examples seen")
        ax.set_ylabel("batch size")
        ax.set_title(f"{self.task}: critical batch over training (B={self.batch_size}, {self.rule})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


def critical_from_losses(batches: Sequence[int], losses: Sequence[float], start_loss: float,
                         tolerance: float, noise: float = 0.0) -> tuple[int, bool]:
    """The largest batch whose loss, and that of every smaller batch, is within ``tolerance`` of the first's.

    The tolerance is a fraction of the base branch's progress: a batch passes when its loss is
    at most ``losses[0] + max(tolerance * (start_loss - losses[0]), noise)``, i.e. it made at least
    ``1 - tolerance`` of the base branch's loss decrease on the same examples, or is within the
    branch noise of it (on a plateau the base branch's progress is itself within the noise, and a
    fraction of it would be no tolerance at all).

    Args:
        batches: increasing batch sizes; the first is the base batch.
        losses: the loss after the branch at each batch (NaN or inf: fails).
        start_loss: the loss at the branch point (the checkpoint).
        tolerance: in [0, 1).
        noise: the loss difference that seed noise alone makes (>= 0; 0: none).

    Returns:
        ``(critical batch, capped)``; capped is True when every batch passed (the critical batch is
        then at least the largest tried, a lower bound).
    """
    if len(batches) != len(losses) or not batches:
        raise ValueError(f"batches and losses must be non-empty and of equal length, got {len(batches)} and {len(losses)}")
    base = losses[0]
    limit = base + max(tolerance * max(start_loss - base, 0.0), noise)
    best = batches[0]
    for b, loss in zip(batches[1:], losses[1:]):
        if not (math.isfinite(loss) and loss <= limit):
            return best, False
        best = b
    return best, True


class _Checkpointer(Callback):
    """Saves model and optimizer state the first time the examples seen reach each threshold."""

    def __init__(self, thresholds: Sequence[int]) -> None:
        self.thresholds = sorted(thresholds)
        self.saved: list[dict[str, Any]] = []

    def _save_due(self, ctx: StepContext) -> None:
        while len(self.saved) < len(self.thresholds) and ctx.examples >= self.thresholds[len(self.saved)]:
            self.saved.append({
                "examples": ctx.examples, "step": ctx.step, "model": copy.deepcopy(ctx.model),
                "optimizer": copy.deepcopy(ctx.optimizer.state_dict()),
            })
        if len(self.saved) == len(self.thresholds):
            ctx.stop = True

    def on_train_begin(self, ctx: StepContext) -> None:
        self._save_due(ctx)

    def on_step_end(self, ctx: StepContext) -> None:
        self._save_due(ctx)


class _ResumeOptimizer(Callback):
    """Loads a saved optimizer state at the start of a branch, then sets the branch's scaled
    hyperparameters (loading restores the saved ones)."""

    def __init__(self, state: dict[str, Any], hparams: dict[str, Any] | list[dict[str, Any]]) -> None:
        self.state, self.hparams = state, hparams  # one mapping, or one per parameter group

    def on_train_begin(self, ctx: StepContext) -> None:
        ctx.optimizer.load_state_dict(copy.deepcopy(self.state))
        set_hparams(ctx.optimizer, self.hparams)


def _b_simple_at(task: Task, model: torch.nn.Module, batch: int, accumulation: int, groups: int, seed: int,
                 device: str) -> tuple[float, int]:
    """B_simple at ``model``'s weights (no optimizer step): returns (B_simple, examples used)."""
    model = copy.deepcopy(model).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    gns = GradientNoiseScale(beta=1.0 - 1.0 / max(groups, 2))
    batches = iterate_batches(task, batch, seed=seed, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(groups):
            total = None
            small = 0.0
            for _ in range(accumulation):
                b = next(batches)
                model.zero_grad(set_to_none=True)
                task.loss_of(task.forward_batch(model, b), b).backward()
                g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().double()
                               for p in params])
                small += float(g @ g)
                total = g if total is None else total + g
            mean = total / accumulation
            gns.update(small / accumulation, float(mean @ mean), batch, batch * accumulation)
    return gns.b_simple, groups * accumulation * batch


def _check_int_seq(name: str, value: Any, minimum: int) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value or any(
            not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < minimum for v in value):
        raise ValueError(f"{name} must be a non-empty sequence of integers >= {minimum}, got {value!r}")
    return [int(v) for v in value]


def critical_batch(
    task: Task | str,
    *,
    batch_size: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    rule: str | None = None,
    budget_examples: int | None = None,
    checkpoints: Sequence[float] | None = None,
    factors: Sequence[int] | None = None,
    branch_examples: int | None = None,
    seeds: int | Sequence[int] = 2,
    tolerance: float = 0.2,
    gns_groups: int | None = None,
    gns_accumulation: int = 4,
    gns_batch: int | None = None,
    seed: int = 0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    device: str = "cpu",
    quick: bool = False,
    progress: bool = False,
    store: Any = None,
) -> CriticalBatchResult:
    """Measure the critical batch over training by branching (Merrill et al. 2025), beside B_simple.

    Args:
        task: a Task (``Task.from_torch`` tasks included) or a registered name / entry point.
        batch_size: the base batch B (default: the task's).
        lr: the LR at B (default: the task's LR scaled to B by ``default_lr_rule``).
        optimizer: default: the task's (L-BFGS is refused: its steps are line searches).
        rule: co-scaling rule of the branches' hyperparameters (one of ``SCALE_RULES``; None:
            :func:`batchlab.train.default_hparam_rule` of the optimizer).
        budget_examples: the training budget the checkpoints are fractions of (default: the
            task's epochs x training-set size). The base run stops at the last checkpoint.
        checkpoints: fractions of the budget in [0, 1) (0: initialization). Default
            ``(0, 0.1, 0.25, 0.5)``; quick: ``(0, 0.25)``.
        factors: branch batches as multiples of B, increasing, starting at 1 (default 1..16;
            quick 1..8). Batches larger than the training set are left out.
        branch_examples: examples per branch (default: 8 steps at the largest batch).
        seeds: number of branch seeds (or the seeds themselves); >= 2 gives an uncertainty.
        tolerance: in [0, 1): a branch passes when its loss is at most the base branch's plus
            ``tolerance`` times the base branch's loss decrease (see the module docstring).
        gns_groups, gns_accumulation, gns_batch: the B_simple measurement: ``gns_groups``
            groups (default 16; quick 8) of ``gns_accumulation`` micro-batches of ``gns_batch``
            examples (default ``max(B, 32)``: the small-batch norm of a tiny batch is so noisy
            that the estimate needs many more groups).
        seed: the base run's seed.
        momentum, weight_decay: optimizer settings (as in :class:`TrainConfig`).
        device: "cpu", "cuda", ...
        quick: the cheap mode for ``suggest``: 2 checkpoints, factors up to 8, 8 B_simple groups
            (arguments given explicitly win).
        progress: print one line per checkpoint.
        store: a :class:`batchlab.store.Store` or a path (a folder gets ``batchlab.db``) keeping each
            branch's result, so an interrupted measurement resumes: the base run is repeated (it is
            seeded, so its checkpoints are the same) and the stored branches are loaded, not rerun.
            None keeps nothing.

    Returns:
        A :class:`CriticalBatchResult`.
    """
    t0 = time.perf_counter()
    task = get_task(task) if not isinstance(task, Task) else task
    n = task.n_train if task.train_source.indexable else None
    B = batch_size if batch_size is not None else task.batch_size
    if not isinstance(B, numbers.Integral) or isinstance(B, bool) or B < 1 or (n is not None and B > n):
        raise ValueError(f"batch_size must be an integer in [1, {n}] (the training-set size), got {B!r}")
    opt = optimizer or task.optimizer
    if opt == "lbfgs":
        raise ValueError("optimizer must not be 'lbfgs' (its steps are line searches, not batch-size scalable); got 'lbfgs'")
    base_lr = lr if lr is not None else scale_lr(task.lr, task.batch_size, B, default_lr_rule(opt))
    rule = rule or default_hparam_rule(opt)
    checkpoints = tuple(checkpoints) if checkpoints is not None else (QUICK_CHECKPOINTS if quick else DEFAULT_CHECKPOINTS)
    if not checkpoints or any(isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0 <= c < 1 for c in checkpoints) \
            or list(checkpoints) != sorted(set(checkpoints)):
        raise ValueError(f"checkpoints must be increasing fractions of the budget in [0, 1), got {checkpoints!r}")
    factors = _check_int_seq("factors", list(factors) if factors is not None else list(QUICK_FACTORS if quick else DEFAULT_FACTORS), 1)
    if factors[0] != 1 or factors != sorted(set(factors)) or len(factors) < 2:
        raise ValueError(f"factors must be increasing integers starting at 1 (the base batch), at least two; got {factors!r}")
    notes: list[str] = []
    if n is not None:
        dropped = [k for k in factors if k * B > n]
        factors = [k for k in factors if k * B <= n]
        if dropped and len(factors) >= 2:
            notes.append(f"factors {', '.join(map(str, dropped))} left out: {B} x factor is larger than the training set "
                         f"({n} examples); branches at {', '.join(str(k * B) for k in factors)}")
        if len(factors) < 2:
            raise ValueError(f"batch_size {B} x factors leaves only the base batch within the training set ({n} examples)")
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds must be a positive count or a non-empty sequence of seeds, got {seeds!r}")
        seed_list = list(range(seeds))
    else:
        seed_list = _check_int_seq("seeds", seeds, 0)
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be a number in [0, 1) (a fraction of the base branch's loss decrease), "
                         f"got {tolerance!r}")
    groups = gns_groups if gns_groups is not None else (8 if quick else 16)
    micro = gns_batch if gns_batch is not None else max(B, 32)
    if n is not None and gns_batch is None:
        micro = max(1, min(micro, n // gns_accumulation))
    for name, v, lo in (("gns_groups", groups, 1), ("gns_accumulation", gns_accumulation, 2), ("gns_batch", micro, 1)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if budget_examples is None:
        if n is None:
            raise ValueError(f"budget_examples is needed for task {task.name!r}: its training set has no length")
        budget_examples = max(1, round(task.epochs * n))
    if not isinstance(budget_examples, numbers.Integral) or isinstance(budget_examples, bool) or budget_examples < B:
        raise ValueError(f"budget_examples must be an integer >= the batch size {B} (one step of the base run; the "
                         f"checkpoints are fractions of it), got {budget_examples!r}")
    largest = factors[-1] * B
    if branch_examples is None:
        branch_examples = 8 * largest
    if not isinstance(branch_examples, numbers.Integral) or isinstance(branch_examples, bool) or branch_examples < largest:
        raise ValueError(f"branch_examples must be an integer >= the largest branch batch ({largest}), got {branch_examples!r}")

    common = dict(optimizer=opt, momentum=momentum, weight_decay=weight_decay, device=device, eval_train=False)
    thresholds = [round(c * budget_examples) for c in checkpoints]
    ckpt = _Checkpointer(thresholds)
    # every base step at batch B: the run ends at the first multiple of B past the last checkpoint
    base_cfg = TrainConfig(batch_size=B, lr=base_lr, max_examples=max(math.ceil(thresholds[-1] / B), 1) * B, seed=seed,
                           **common)
    base_run = fit(task, base_cfg, callbacks=[ckpt])
    if base_run.status != "ok" or len(ckpt.saved) < len(thresholds):
        raise ValueError(f"task {task.name!r}: the base run at batch {B} ended {base_run.status!r} at step "
                         f"{base_run.failed_step} before the last checkpoint: {base_run.error}")
    processed = base_run.examples

    result = CriticalBatchResult(
        task=task.name, batch_size=B, optimizer=opt, rule=rule, hparams={}, tolerance=float(tolerance),
        branch_examples=int(branch_examples), factors=factors, seeds=list(seed_list),
        budget_examples=int(budget_examples), notes=notes,
    )
    batches = [k * B for k in factors]
    kept = open_store(store)
    loaded = 0  # branches read back from the store (a resumed measurement)
    for saved in ckpt.saved:
        model, opt_state = saved["model"], saved["optimizer"]
        base_groups = _base_group_hparams(base_lr, opt_state)
        result.hparams = base_groups[0]
        val_loss, _ = evaluate(model, task.val_source, task, device=device)
        losses = []
        failed: list[str] = []
        for b in batches:  # the branches: the checkpoint's model and optimizer state, co-scaled hyperparameters
            hp = scale_hparams(opt, result.hparams, B, b, rule)
            # each parameter group's own betas/eps co-scaled (the first group's are hp's); one group: hp itself
            hp_groups = scale_group_hparams(opt, base_groups, B, b, rule) if len(base_groups) > 1 else hp
            row = []
            for s in seed_list:
                cfg = TrainConfig(batch_size=b, lr=hp["lr"], max_examples=int(branch_examples), seed=int(s), **common)
                key = trial_key(task, cfg, kind="critical-branch", base=base_cfg.to_dict(),
                                checkpoint=int(saved["examples"]), hparams=hp_groups)
                stored = kept.record(key)
                loaded += stored is not None
                r = stored.payload if stored is not None else kept.run_or_load(
                    key, functools.partial(_branch, task, cfg, model, opt_state, hp_groups), kind="critical-branch")
                processed += int(r["examples"])
                loss = float(r["val_loss"]) if r["status"] == "ok" and r["val_loss"] is not None else math.nan
                if not math.isfinite(loss):
                    why = r.get("error") or "validation loss not finite"
                    failed.append(f"batch {b} seed {s}: {r['status'] if r['status'] != 'ok' else 'nan'} ({why})")
                row.append(loss if math.isfinite(loss) else math.inf)  # a failed branch is not within tolerance
            losses.append(row)
        try:
            b_simple, used = _b_simple_at(task, model, micro, gns_accumulation, groups, seed, device)
        except Exception as e:  # noqa: BLE001 - the user's model failed on a batch: B_simple is missing here, the rest stands
            b_simple, used = math.nan, 0
            result.notes.append(f"at {int(saved['examples'])} examples, B_simple could not be measured "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
        processed += used
        point = _decide(saved, float(val_loss), batches, losses, float(tolerance), float(b_simple))
        point.failed = failed
        if not all(math.isfinite(v) for v in losses[0]):
            point.defined = False
            point.critical_batch = point.critical_low = point.critical_high = B
            point.capped, point.ratio = False, math.nan
        if failed:
            result.notes.append(f"at {point.examples} examples, {len(failed)} branch(es) failed"
                                + (" (the base batch's among them: no critical batch there)" if not point.defined else
                                   " (counted as not within tolerance)") + ": " + "; ".join(failed[:4])
                                + (" ..." if len(failed) > 4 else ""))
        result.points.append(point)
        if progress:
            crit = f">={point.critical_batch}" if point.capped else str(point.critical_batch)
            print(f"[critical-batch] {task.name} at {point.examples} examples: critical {crit} "
                  f"({point.critical_low}-{point.critical_high}), B_simple {b_simple:.3g}", flush=True)
    if loaded:
        result.notes.append(f"resumed: {loaded} of {len(ckpt.saved) * len(batches) * len(seed_list)} branches were "
                            "loaded from the store, not rerun (examples_processed counts them as the measurement's cost)")
    result.examples_processed = int(processed)
    result.wall_time = time.perf_counter() - t0
    return result


def _branch(task: Task, cfg: TrainConfig, model: torch.nn.Module, opt_state: dict[str, Any],
            hp: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
    """One branch from a checkpoint: its status, final validation loss and examples (JSON)."""
    r = fit(task, cfg, model=copy.deepcopy(model), callbacks=[_ResumeOptimizer(opt_state, hp)], raise_errors=False)
    loss = float(r.final.get("val_loss", math.nan)) if r.status == "ok" else math.nan
    error = last_error_line(r.error) if r.error else None
    return {"status": r.status, "val_loss": loss if math.isfinite(loss) else None, "examples": int(r.examples),
            "error": error}


def _decide(saved: dict[str, Any], val_loss: float, batches: list[int], losses: list[list[float]], tolerance: float,
            b_simple: float) -> CriticalPoint:
    """One checkpoint's critical batch from its branch losses (seed means and each seed alone)."""
    means = [statistics.fmean(row) for row in losses]
    n_seeds = len(losses[0])
    sd = statistics.stdev(losses[0]) if n_seeds > 1 and math.isfinite(sum(losses[0])) else 0.0
    noise = sd * math.sqrt(2 / n_seeds)  # standard error of a difference of two seed means
    crit, capped = critical_from_losses(batches, means, val_loss, tolerance, noise)
    per_seed = [critical_from_losses(batches, [row[i] for row in losses], val_loss, tolerance, sd * math.sqrt(2))[0]
                for i in range(n_seeds)]
    return CriticalPoint(
        examples=int(saved["examples"]), step=int(saved["step"]), val_loss=val_loss, batches=list(batches),
        losses=losses, mean_losses=means, critical_batch=crit, critical_low=min(per_seed), critical_high=max(per_seed),
        base_loss_std=sd if n_seeds > 1 else math.nan, noise=noise, b_simple=b_simple,
        ratio=crit / b_simple if b_simple > 0 else math.nan, capped=capped,
    )


def _base_group_hparams(lr: float, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every parameter group's base lr/betas/eps (the first group's is the base batch's): the first
    group's lr is the base LR ``lr``, the others keep their ratio to it in the checkpoint; betas and
    eps as saved."""
    groups = group_hparams(state.get("param_groups") or [])
    first = float(groups[0].get("lr", 0.0)) if groups else 0.0
    return [{**g, "lr": float(lr) * (float(g["lr"]) / first if first else 1.0)} for g in groups] or [{"lr": float(lr)}]
