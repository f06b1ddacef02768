"""Gradient noise scale B_simple (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training").

With gradient estimates at two batch sizes ``b_small < b_big`` (their squared norms
``|G_small|^2`` and ``|G_big|^2``), unbiased estimates of the true gradient's squared norm and of
the trace of the per-example gradient covariance are (appendix A of the paper)::

    |G|^2     ~ (b_big * |G_big|^2 - b_small * |G_small|^2) / (b_big - b_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big)

and ``B_simple = tr(Sigma) / |G|^2``. One step's estimates are very noisy (|G|^2 is often
negative), so numerator and denominator are smoothed by *separate* exponential moving averages and
B_simple is the ratio of the averages, never an average of ratios. Both EMAs start at zero with the
same beta, so their bias corrections cancel in the ratio.

Cheap sources of the two sizes, needing no extra forward/backward pass:

- gradient accumulation: each micro-batch's gradient (small) vs the step's mean gradient (big);
- data parallelism: each rank's gradient before the all-reduce (small) vs after it (big).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from batchlab.tasks import Task, get_task
from batchlab.train import Callback, StepContext, TrainConfig, default_lr_rule, fit, scale_lr


def unbiased_norms(small_sqnorm: float, big_sqnorm: float, b_small: float, b_big: float) -> tuple[float, float]:
    """One step's unbiased estimates ``(|G|^2, tr(Sigma))`` from the two squared norms.

    Args:
        small_sqnorm: mean of ``|g|^2`` over the gradients computed on ``b_small`` examples each.
        big_sqnorm: ``|g|^2`` of the gradient computed on ``b_big`` examples.
        b_small, b_big: the two batch sizes, ``0 < b_small < b_big``.
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small!r}, b_big={b_big!r}")
    g2 = (b_big * big_sqnorm - b_small * small_sqnorm) / (b_big - b_small)
    tr_sigma = (small_sqnorm - big_sqnorm) / (1.0 / b_small - 1.0 / b_big)
    return g2, tr_sigma


def noise_from_ranks(rank_sqnorms: Sequence[float], allreduced_sqnorm: float, per_rank_batch: int) -> tuple[float, float]:
    """``(|G|^2, tr(Sigma))`` under data parallelism, from per-rank norms and the all-reduced one.

    Each of the R ranks computes a gradient on ``per_rank_batch`` examples (the small batch); the
    all-reduced mean gradient covers ``R * per_rank_batch`` (the big batch). Costs one extra
    all-reduce of R scalars, no extra backward pass.

    Args:
        rank_sqnorms: ``|g_r|^2`` of each rank's local gradient (before the all-reduce).
        allreduced_sqnorm: ``|mean_r g_r|^2`` after the all-reduce.
        per_rank_batch: examples per rank.
    """
    r = len(rank_sqnorms)
    if r < 2:
        raise ValueError(f"rank_sqnorms needs at least 2 ranks, got {r}")
    if not isinstance(per_rank_batch, int) or per_rank_batch < 1:
        raise ValueError(f"per_rank_batch must be a positive integer, got {per_rank_batch!r}")
    small = sum(float(s) for s in rank_sqnorms) / r
    return unbiased_norms(small, float(allreduced_sqnorm), per_rank_batch, r * per_rank_batch)


@dataclass
class NoisePoint:
    """One update of the tracker."""

    step: int
    g2: float  # this step's |G|^2 estimate
    tr_sigma: float  # this step's tr(Sigma) estimate
    b_simple: float  # EMA(tr Sigma) / EMA(|G|^2) after this update


class GradientNoiseScale(Callback):
    """Track B_simple during training: as a :class:`batchlab.train.Callback` or by hand.

    As a callback (``fit(task, TrainConfig(batch_size=b, accumulation=k), callbacks=[gns])`` with
    k >= 2): after each micro-batch backward it recovers that micro-batch's gradient as the
    difference of the accumulated ``.grad`` before and after (one copy of the gradients, foreach
    kernels, no extra backward), and before the optimizer step it takes the norm of the step's mean
    gradient. Steps whose micro-batches differ in size (the short tail of an epoch) are skipped.
    The current value is logged as ``b_simple`` into the training history.

    By hand, in any loop: ``gns.update(small_sqnorm, big_sqnorm, b_small, b_big)`` or
    ``gns.update_from_ranks(rank_sqnorms, allreduced_sqnorm, per_rank_batch)``; save
    ``gns.state_dict()`` with a checkpoint and ``load_state_dict`` it to resume.

    Args:
        beta: EMA factor of both accumulators (0.99 in the paper; smaller for short runs).
        every: measure on every ``every``-th step only (the other steps cost nothing).
        params: parameters to include (default: all parameters of the trained model).
        small: which micro-batches give the small-batch estimate |g_small|^2. ``"first"`` (default):
            the first micro-batch of the step, read straight from ``.grad`` after its backward (no
            gradient copy; two norms per step; each step's estimate is unbiased, the EMA averages
            the extra variance away). ``"all"``: every micro-batch, recovered as the difference of
            the accumulated gradients (one gradient copy; lower variance per step, more overhead).
    """

    def __init__(self, beta: float = 0.99, every: int = 1, params: Sequence[torch.nn.Parameter] | None = None,
                 small: str = "first") -> None:
        if small not in ("first", "all"):
            raise ValueError(f"small must be 'first' or 'all', got {small!r}")
        self.small = small
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.beta = beta
        self.every = every
        self._params = list(params) if params is not None else None
        self.ema_g2 = 0.0
        self.ema_tr_sigma = 0.0
        self.updates = 0
        self.history: list[NoisePoint] = []
        self._prev: list[torch.Tensor] | None = None
        self._small: list[torch.Tensor] = []
        self._sizes: list[int] = []
        self._active = False

    # ------------------------------------------------------------------ plain object
    @property
    def b_simple(self) -> float:
        """EMA(tr Sigma) / EMA(|G|^2); NaN before the first update or while EMA(|G|^2) <= 0."""
        if self.updates == 0 or not self.ema_g2 > 0:
            return math.nan
        return self.ema_tr_sigma / self.ema_g2

    def update(self, small_grad_sqnorm: float, big_grad_sqnorm: float, b_small: float, b_big: float, step: int | None = None) -> float:
        """Add one pair of gradient norms; returns the updated B_simple."""
        g2, trs = unbiased_norms(float(small_grad_sqnorm), float(big_grad_sqnorm), b_small, b_big)
        return self._add(g2, trs, step)

    def update_from_ranks(self, rank_sqnorms: Sequence[float], allreduced_sqnorm: float, per_rank_batch: int, step: int | None = None) -> float:
        """Add one data-parallel step (see :func:`noise_from_ranks`); returns the updated B_simple."""
        g2, trs = noise_from_ranks(rank_sqnorms, allreduced_sqnorm, per_rank_batch)
        return self._add(g2, trs, step)

    def _add(self, g2: float, trs: float, step: int | None) -> float:
        if not (math.isfinite(g2) and math.isfinite(trs)):
            return self.b_simple
        self.ema_g2 = self.beta * self.ema_g2 + (1 - self.beta) * g2
        self.ema_tr_sigma = self.beta * self.ema_tr_sigma + (1 - self.beta) * trs
        self.updates += 1
        b = self.b_simple
        self.history.append(NoisePoint(step=self.updates if step is None else int(step), g2=g2, tr_sigma=trs, b_simple=b))
        return b

    def state(self) -> dict[str, Any]:
        """Plain data: EMAs, B_simple and the history."""
        return {
            "beta": self.beta, "every": self.every, "ema_g2": self.ema_g2, "ema_tr_sigma": self.ema_tr_sigma,
            "updates": self.updates, "b_simple": self.b_simple, "history": [asdict(p) for p in self.history],
        }

    def state_dict(self) -> dict[str, Any]:
        """The EMAs, the update count and the history (plain data), to save with a checkpoint."""
        return {"beta": self.beta, "every": self.every, "ema_g2": self.ema_g2, "ema_tr_sigma": self.ema_tr_sigma,
                "updates": self.updates, "history": [asdict(p) for p in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Go on from :meth:`state_dict`: a resumed run's B_simple equals an uninterrupted one's. The
        tracker's own settings must match (another ``beta`` or ``every`` is refused, naming it)."""
        if not isinstance(state, Mapping) or not {"ema_g2", "ema_tr_sigma", "updates"} <= set(state):
            raise ValueError(f"state must be a mapping from GradientNoiseScale.state_dict(), got {state!r}")
        for key in ("beta", "every"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"the checkpoint's tracker has {key}={state[key]!r}, this one {getattr(self, key)!r}")
        self.ema_g2, self.ema_tr_sigma = float(state["ema_g2"]), float(state["ema_tr_sigma"])
        self.updates = int(state["updates"])
        self.history = [NoisePoint(**p) for p in state.get("history", [])]

    # ------------------------------------------------------------------ callback
    def on_train_begin(self, ctx: StepContext) -> None:
        self._plist = self._params if self._params is not None else list(ctx.model.parameters())

    def _grads(self, ctx: StepContext) -> list[torch.Tensor]:
        params = getattr(self, "_plist", None)
        if params is None:
            params = self._params if self._params is not None else list(ctx.model.parameters())
        return [p.grad for p in params if p.grad is not None]

    @staticmethod
    def _sqnorm(ts: list[torch.Tensor]) -> float:
        """Squared L2 norm of a list of tensors: one foreach kernel, one norm of the norms."""
        if not ts:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ts)).float())) ** 2

    def on_micro_batch_end(self, ctx: StepContext) -> None:
        if ctx.micro_batch == 0:
            self._active = ctx.accumulation >= 2 and ctx.step % self.every == 0
            self._prev, self._small, self._sizes = None, [], []
        if not self._active:
            return
        if self.small == "first" and ctx.micro_batch > 0:
            return
        grads = self._grads(ctx)
        weight = ctx.micro_weight  # fit() scales each micro-batch's mean loss by this
        last = ctx.micro_batch == ctx.accumulation - 1 or self.small == "first"
        if self._prev is None:
            diff = grads
        else:
            torch._foreach_sub_(self._prev, grads)  # in place: prev - now = -(this micro-batch's gradient)
            diff = self._prev
        self._small.append(self._sqnorm(diff) / (weight * weight))
        self._sizes.append(ctx.micro_batch_size)
        if not last:
            if self._prev is None:
                self._prev = [g.detach().clone() for g in grads]
            else:
                torch._foreach_copy_(self._prev, grads)

    def on_before_step(self, ctx: StepContext) -> None:
        if not self._active:
            return
        self._active = False
        sizes = self._sizes
        if self.small == "first":  # the step's other micro-batches were not read: only check they match
            if ctx.batch_size != sizes[0] * ctx.accumulation:
                return
            sizes = sizes * ctx.accumulation
        if len(sizes) < 2 or len(set(sizes)) != 1:
            return
        big = self._sqnorm(self._grads(ctx))
        small = sum(self._small) / len(self._small)
        b = self.update(small, big, sizes[0], sizes[0] * len(sizes), step=ctx.step)
        ctx.logs["b_simple"] = b

    def on_train_end(self, ctx: StepContext, result: Any) -> None:
        self._prev, self._small = None, []


def is_stable(values: Sequence[float], window: int, tolerance: float) -> bool:
    """True when the last ``window`` values are finite, positive and within ``tolerance`` of their
    median ((max - min) / median <= tolerance)."""
    if window < 2 or len(values) < window:
        return False
    last = list(values)[-window:]
    if not all(math.isfinite(v) and v > 0 for v in last):
        return False
    mid = sorted(last)[window // 2]
    return (max(last) - min(last)) / mid <= tolerance


class _StopWhenStable(Callback):
    """Ends training once B_simple has been stable for ``window`` updates (see :func:`is_stable`)."""

    def __init__(self, gns: GradientNoiseScale, window: int, tolerance: float, min_steps: int) -> None:
        self.gns, self.window, self.tolerance, self.min_steps = gns, window, tolerance, min_steps
        self.stable_at: int | None = None

    def on_step_end(self, ctx: StepContext) -> None:
        if ctx.step < self.min_steps:
            return
        if is_stable([p.b_simple for p in self.gns.history], self.window, self.tolerance):
            self.stable_at = ctx.step
            ctx.stop = True


@dataclass
class NoiseScaleResult:
    """Outcome of :func:`noise_scale` (plain data)."""

    b_simple: float  # final EMA ratio
    micro_batch: int  # the small batch
    accumulation: int  # micro-batches per step; the big batch is micro_batch * accumulation
    steps: int
    lr: float
    beta: float
    status: str  # the training run's status ("ok", "diverged", ...)
    examples_processed: int
    history: list[dict[str, float]] = field(default_factory=list)  # per update: step, g2, tr_sigma, b_simple
    error: str | None = None
    stable: bool | None = None  # None: run for a fixed number of steps; else whether B_simple settled
    stable_at: int | None = None  # the step at which it was declared stable

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def noise_scale(
    task: Task | str,
    *,
    micro_batch: int = 16,
    accumulation: int = 4,
    steps: int = 100,
    beta: float = 0.95,
    lr: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    norm: str | None = None,
    progress: bool = False,
    until_stable: float | None = None,
    window: int = 10,
    min_steps: int = 10,
) -> NoiseScaleResult:
    """Train ``task`` for ``steps`` steps and measure B_simple from micro-batch gradient norms.

    With ``until_stable`` (a relative tolerance, e.g. 0.2), training stops as soon as the last
    ``window`` values of B_simple lie within that tolerance of their median (and at least
    ``min_steps`` steps ran); ``steps`` is then the most it may take. B_simple from a fixed 20
    steps is unstable (3 at 20 steps, ~20 at 100 on a character LM): stopping on stability instead
    spends the steps where the estimate still moves.

    The step batch is ``micro_batch * accumulation``; the LR is the task's, scaled to that batch by
    the optimizer's default rule (``batchlab.train.default_lr_rule``). B_simple changes during
    training (it usually grows as the loss falls, McCandlish et al. fig. 5); the history records it.

    Args:
        task: a Task or registered name.
        micro_batch: the small batch (examples per micro-batch).
        accumulation: micro-batches per step (>= 2).
        steps: optimizer steps to train.
        beta: EMA factor (0.95 suits runs of ~100 steps; the paper's 0.99 needs thousands).
        lr: learning rate for the step batch (default: scaled from the task's).
        seed, device, norm: passed to the training config.
        progress: show a progress bar.
        until_stable, window, min_steps: stop early once B_simple is stable (see above).
    """
    task = get_task(task)
    n = task.size("train")  # None: a stream without a length (the run is bounded by ``steps``)
    if not isinstance(accumulation, int) or accumulation < 2:
        raise ValueError(f"accumulation must be an integer >= 2 (B_simple needs two batch sizes), got {accumulation!r}")
    if not isinstance(micro_batch, int) or not 1 <= micro_batch * accumulation <= (n if n is not None else micro_batch * accumulation):
        raise ValueError(
            f"micro_batch * accumulation must be in [1, {n}] (the training-set size), got {micro_batch!r} * {accumulation}"
        )
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    big = micro_batch * accumulation
    step_lr = lr if lr is not None else scale_lr(task.lr, task.batch_size, big, default_lr_rule(task.optimizer))
    # a dedicated measurement run: use every micro-batch (lower variance; the copy's cost does not matter here)
    gns = GradientNoiseScale(beta=beta, small="all")
    cfg = TrainConfig(
        batch_size=micro_batch, accumulation=accumulation, lr=step_lr, max_steps=steps, seed=seed, device=device,
        norm=norm, eval_train=False, drop_last=True,
    )
    if until_stable is not None and not (isinstance(until_stable, (int, float)) and until_stable > 0):
        raise ValueError(f"until_stable must be None or a positive relative tolerance, got {until_stable!r}")
    callbacks: list[Callback] = [gns]
    stopper = None
    if until_stable is not None:
        stopper = _StopWhenStable(gns, window, float(until_stable), min_steps)
        callbacks.append(stopper)
    result = fit(task, cfg, callbacks=callbacks, progress=progress)
    return NoiseScaleResult(
        b_simple=gns.b_simple, micro_batch=micro_batch, accumulation=accumulation, steps=result.steps, lr=step_lr,
        beta=beta, status=result.status, examples_processed=result.examples, history=[asdict(p) for p in gns.history],
        error=result.error, stable=None if stopper is None else stopper.stable_at is not None,
        stable_at=None if stopper is None else stopper.stable_at,
    )
