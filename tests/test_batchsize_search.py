"""Pivot search (claim C14) on deterministic fake trials; store resume; failures; bad input."""

from __future__ import annotations

import math

import pytest

from batchlab.batchsize import pivot_search
from batchlab.store import Store
from batchlab.train import TrainConfig
from conftest import make_toy_task


class Curve:
    """Deterministic metric-vs-batch curve peaking at ``peak``; seeds add +-``spread``."""

    def __init__(self, peak: int = 32, slope: float = 0.02, spread: float = 0.001, fail_at: int | None = None, status: str = "diverged") -> None:
        self.peak, self.slope, self.spread, self.fail_at, self.status = peak, slope, spread, fail_at, status
        self.calls: list[tuple[int, int, float]] = []

    def __call__(self, task, cfg: TrainConfig) -> dict:
        b = cfg.batch_size * cfg.accumulation
        self.calls.append((b, cfg.seed, cfg.lr))
        if self.fail_at is not None and b >= self.fail_at:
            return {"status": self.status, "metric": math.nan, "examples": 0, "time": 0.0}
        metric = 0.9 - self.slope * abs(math.log2(b) - math.log2(self.peak)) + (self.spread if cfg.seed % 2 else -self.spread)
        return {"status": "ok", "metric": metric, "examples": cfg.max_examples, "time": 0.01}


TASK = make_toy_task(n_train=1024)


def test_walks_down_to_the_peak() -> None:
    curve = Curve(peak=32)
    r = pivot_search(TASK, pivot=128, low=2, high=512, trial_fn=curve, budget_examples=1000)
    assert r.path == [128, 64, 256, 32, 16]
    assert r.best_batch == 32
    assert [(t.batch_size, t.seed) for t in r.trials] == [(b, s) for b in r.path for s in (0, 1)]
    assert r.noise == pytest.approx(math.sqrt(2) * 0.001)
    # LR scaled linearly (momentum SGD) from the task's lr=0.1 at batch 32
    assert {t.batch_size: t.lr for t in r.trials}[128] == pytest.approx(0.4)
    assert r.best_lr == pytest.approx(0.1)
    assert r.examples == 10 * 1000
    assert "did not improve" in r.stop_reason


def test_walks_up_and_stops_at_bound() -> None:
    r = pivot_search(TASK, pivot=128, low=2, high=512, trial_fn=Curve(peak=4096), budget_examples=100)
    assert r.path == [128, 64, 256, 512] and r.best_batch == 512 and "upper bound" in r.stop_reason
    r = pivot_search(TASK, pivot=128, low=2, high=512, max_batch=200, trial_fn=Curve(peak=4096), budget_examples=100)
    assert r.path == [128, 64] and r.best_batch == 128 and r.high == 200  # 256 does not fit


def test_flat_curve_keeps_pivot() -> None:
    r = pivot_search(TASK, pivot=64, trial_fn=Curve(peak=64, slope=0.0005, spread=0.01), budget_examples=100)
    assert r.path == [64, 32, 128] and r.best_batch == 64


def test_failures_count_and_search_goes_on() -> None:
    r = pivot_search(TASK, pivot=128, trial_fn=Curve(peak=512, fail_at=256), budget_examples=100)
    assert math.isnan(r.means["256"]) and r.best_batch == 128  # a failed size has no mean
    assert {t.status for t in r.trials if t.batch_size == 256} == {"diverged"}
    r = pivot_search(TASK, pivot=128, trial_fn=Curve(fail_at=1), budget_examples=100)
    assert r.best_batch is None and r.best_lr is None and "every trial failed" in r.stop_reason


def test_store_resume_runs_nothing(tmp_path) -> None:
    store = Store(tmp_path)
    first = Curve(peak=32)
    a = pivot_search(TASK, pivot=128, trial_fn=first, budget_examples=500, store=store)
    again = Curve(peak=32)
    b = pivot_search(TASK, pivot=128, trial_fn=again, budget_examples=500, store=Store(tmp_path))
    assert len(first.calls) == 10 and again.calls == []
    assert a.best_batch == b.best_batch == 32 and [t.metric for t in a.trials] == [t.metric for t in b.trials]
    other_budget = Curve(peak=32)
    pivot_search(TASK, pivot=128, trial_fn=other_budget, budget_examples=501, store=store)
    assert len(other_budget.calls) == 10  # a different budget is a different run


def test_real_training_small() -> None:
    task = make_toy_task(n_train=256)
    r = pivot_search(task, pivot=32, low=16, high=64, budget_examples=256)
    assert r.best_batch in (16, 32, 64)
    assert all(t.status == "ok" and 0 <= t.metric <= 1 and t.examples == 256 for t in r.trials)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pivot": 1024, "low": 2, "high": 512}, r"pivot must be in \[low, high\] = \[2, 512\], got 1024"),
        ({"pivot": 1, "low": 2, "high": 512}, r"pivot must be in \[low, high\] = \[2, 512\], got 1"),
        ({"pivot": 64, "low": 600, "high": 512}, r"low must be <= high, got low=600 > high=512"),
        ({"pivot": 2048, "low": 2, "high": 4096}, r"pivot must be <= the training-set size \(1024 examples\), got 2048"),
        ({"pivot": 64, "seeds": (0,)}, r"seeds must hold at least two distinct seeds"),
        ({"pivot": 64, "low": 0}, r"low must be a positive integer, got 0"),
    ],
)
def test_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pivot_search(TASK, trial_fn=Curve(), budget_examples=100, **kwargs)


def test_a_loss_metric_walks_towards_the_lower_loss() -> None:
    """A task whose metric is a loss (lower is better): the walk compares losses as losses."""
    import copy

    task = copy.copy(TASK)
    task.metric_name, task.higher_is_better = "loss", False

    def trial(t, cfg: TrainConfig) -> dict:
        b = cfg.batch_size * cfg.accumulation
        loss = 1.0 + 0.1 * abs(math.log2(b) - math.log2(16)) + (0.001 if cfg.seed % 2 else -0.001)
        return {"status": "ok", "metric": loss, "examples": cfg.max_examples, "time": 0.0}

    r = pivot_search(task, pivot=128, low=2, high=512, trial_fn=trial, budget_examples=1000)
    assert r.best_batch == 16 and r.higher_is_better is False and r.metric == "loss"
    assert r.means["16"] == pytest.approx(1.0) and r.means["16"] < r.means["128"]
