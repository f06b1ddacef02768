"""Gradient noise scale against the analytic value of linear regression; knee; schedules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from batchlab.batchsize import (
    BatchSizeSchedule,
    GradientNoiseScale,
    find_knee,
    goyal_warmup_steps,
    noise_from_ranks,
    unbiased_norms,
    warmup_factor,
)
from batchlab.batchsize.throughput import ThroughputResult
from batchlab.data.arrays import ArrayDataset
from batchlab.tasks import Task
from batchlab.train import TrainConfig, fit

D, SIGMA = 10, 1.0
# Linear regression y = x.w* + sigma*eps, x ~ N(0, I), loss 0.5 (x.w - y)^2, evaluated at w = w* + d.
# Per-sample gradient g = x (x.d - sigma*eps); G = E[g] = d; E[g g^T] = |d|^2 I + 2 d d^T + sigma^2 I.
# tr(Sigma) = (D + 2)|d|^2 + D sigma^2 - |d|^2, so with |d| = 1: B_simple = (D + 1 + D sigma^2) / 1 = 21.
ANALYTIC = (D + 1) + D * SIGMA**2
TOL = 0.10  # relative; the estimates are deterministic (seeded) and land within 2% of 21; the margin covers sampling error


def _per_sample_grads(n: int, gen: torch.Generator) -> torch.Tensor:
    d = torch.zeros(D, dtype=torch.float64)
    d[0] = 1.0
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, generator=gen, dtype=torch.float64)
    return x * (x @ d - SIGMA * eps)[:, None]


def test_update_matches_analytic() -> None:
    gen = torch.Generator().manual_seed(0)
    gns = GradientNoiseScale(beta=0.999)
    b_small, k = 8, 8
    for _ in range(2000):
        g = _per_sample_grads(b_small * k, gen).view(k, b_small, D).mean(1)  # k micro-batch gradients
        small = float((g**2).sum(1).mean())
        big = float((g.mean(0) ** 2).sum())
        gns.update(small, big, b_small, b_small * k)
    assert abs(gns.b_simple / ANALYTIC - 1) < TOL, f"B_simple {gns.b_simple:.2f} vs analytic {ANALYTIC}"
    assert len(gns.history) == 2000 and gns.history[-1].b_simple == gns.b_simple


@pytest.mark.parametrize("small", ["first", "all"])
def test_callback_in_fit_matches_analytic(small: str) -> None:
    gen = torch.Generator().manual_seed(1)
    n = 20000
    w_star = torch.randn(D, generator=gen)
    x = torch.randn(n, D, generator=gen)
    y = x @ w_star + SIGMA * torch.randn(n, generator=gen)
    d = torch.zeros(D)
    d[0] = 1.0

    def model_fn(norm: object = None, activation: str = "relu") -> nn.Module:
        m = nn.Linear(D, 1, bias=False)
        with torch.no_grad():
            m.weight.copy_((w_star + d)[None])
        return m

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((out.squeeze(-1) - t) ** 2).mean()

    task = Task(name="linreg", model_fn=model_fn, train_set=ArrayDataset(x, y), val_set=ArrayDataset(x[:100], y[:100]),
                num_classes=1, loss=loss, metric=lambda o, t: -float(loss(o, t)), optimizer="sgd", lr=1e-12, batch_size=32)
    gns = GradientNoiseScale(beta=0.99, small=small)
    result = fit(task, TrainConfig(batch_size=16, accumulation=4, max_steps=300, eval_train=False, drop_last=True), callbacks=[gns])
    assert result.ok
    assert gns.updates == 300
    assert abs(gns.b_simple / ANALYTIC - 1) < TOL, f"B_simple {gns.b_simple:.2f} vs analytic {ANALYTIC}"
    assert "b_simple" in result.history[-1]


def test_callback_needs_accumulation_and_every() -> None:
    from conftest import make_toy_task

    task = make_toy_task()
    gns = GradientNoiseScale()
    fit(task, TrainConfig(batch_size=16, max_steps=5), callbacks=[gns])
    assert gns.updates == 0 and math.isnan(gns.b_simple)
    gns = GradientNoiseScale(every=3)
    fit(task, TrainConfig(batch_size=8, accumulation=2, max_steps=9, drop_last=True), callbacks=[gns])
    assert [p.step for p in gns.history] == [0, 3, 6]


def test_unbiased_norms_and_ranks() -> None:
    g2, trs = unbiased_norms(small_sqnorm=3.0, big_sqnorm=1.5, b_small=4, b_big=16)
    assert g2 == pytest.approx((16 * 1.5 - 4 * 3.0) / 12)
    assert trs == pytest.approx((3.0 - 1.5) / (1 / 4 - 1 / 16))
    assert noise_from_ranks([2.0, 4.0], 1.5, per_rank_batch=4) == pytest.approx(unbiased_norms(3.0, 1.5, 4, 8))
    with pytest.raises(ValueError, match="b_small < b_big"):
        unbiased_norms(1.0, 1.0, 8, 8)
    with pytest.raises(ValueError, match="at least 2 ranks"):
        noise_from_ranks([1.0], 1.0, 4)


def test_knee_on_synthetic_timings() -> None:
    sizes = [2, 4, 8, 16, 32, 64]
    step = [1e-3, 1e-3, 1.1e-3, 1.6e-3, 2.9e-3, 5.6e-3]  # overhead-bound, then compute-bound
    eps = [b / t for b, t in zip(sizes, step)]
    assert find_knee(sizes, eps) == 32  # 32/2.9ms = 11034 >= 0.9 * 11428
    assert find_knee(sizes, eps, fraction=0.5) == 8
    assert find_knee([2, 4], [math.nan, 10.0]) == 4
    with pytest.raises(ValueError, match="same length"):
        find_knee([1, 2], [1.0])
    tp = ThroughputResult(batch_sizes=sizes, step_time=step, examples_per_sec=eps, epoch_time=[0.0] * 6,
                          status=["ok"] * 6, knee=32, n_train=1000, device="cpu", warmup=1, repeats=3)
    assert tp.time_per_step(16) == 1.6e-3
    # log-log interpolation between the measured 16 and 32: exp(log t16 + w (log t32 - log t16)), w = log2(24/16)
    w = math.log(24 / 16) / math.log(2)
    assert tp.time_per_step(24) == pytest.approx(math.exp(math.log(1.6e-3) + w * math.log(2.9e-3 / 1.6e-3)), rel=1e-12)
    assert tp.time_per_step(128) == pytest.approx(5.6e-3 * (5.6 / 2.9), rel=1e-6)


def test_batch_size_schedule() -> None:
    s = BatchSizeSchedule(32, milestones=(0.5, 0.75), factor=2)
    assert [s(p) for p in (0.0, 0.49, 0.5, 0.8)] == [32, 32, 64, 128]
    assert s.at_step(80, 100) == 128
    cfg = s.apply(TrainConfig())
    assert (cfg.batch_size, cfg.batch_growth, cfg.growth_factor) == (32, (0.5, 0.75), 2)
    assert BatchSizeSchedule.from_lr_decay(16, (0.5,), gamma=0.2).factor == 5
    assert BatchSizeSchedule(32, (0.5, 0.75), 2, max_batch=64)(0.9) == 64
    with pytest.raises(ValueError, match="milestones must be increasing"):
        BatchSizeSchedule(32, milestones=(0.7, 0.5))
    assert warmup_factor(0, 4) == 0.25 and warmup_factor(4, 4) == 1.0
    assert goyal_warmup_steps(1024, 10240) == 50 and goyal_warmup_steps(128, 10240) == 0


def test_is_stable_rule() -> None:
    from batchlab.batchsize.noise import is_stable

    assert is_stable([5, 100, 20, 21, 19, 20], window=4, tolerance=0.2)
    assert not is_stable([20, 21, 19, 30], window=4, tolerance=0.2)  # spread 11/20 > 0.2
    assert not is_stable([20, 20, math.nan, 20], window=4, tolerance=0.2) and not is_stable([20, 20], 4, 0.2)
    assert not is_stable([-1.0, -1.0, -1.0], window=3, tolerance=0.5)  # B_simple <= 0 is never stable


def test_noise_scale_until_stable_stops_early_and_says_so(toy_task) -> None:
    from batchlab.batchsize import noise_scale
    from batchlab.batchsize.noise import is_stable

    fixed = noise_scale(toy_task, micro_batch=4, accumulation=4, steps=60)
    assert fixed.stable is None and fixed.steps == 60
    loose = noise_scale(toy_task, micro_batch=4, accumulation=4, steps=60, until_stable=10.0, window=5, min_steps=8)
    assert loose.stable and loose.stable_at == loose.steps and 8 <= loose.steps < 60
    values = [h["b_simple"] for h in loose.history]
    assert is_stable(values, 5, 10.0) and not is_stable(values[:-1], 5, 10.0) or loose.steps == 8
    strict = noise_scale(toy_task, micro_batch=4, accumulation=4, steps=30, until_stable=1e-9, window=5)
    assert strict.stable is False and strict.steps == 30
    with pytest.raises(ValueError, match="until_stable must be None or a positive relative tolerance, got -1"):
        noise_scale(toy_task, steps=5, micro_batch=4, until_stable=-1)


def test_a_resumed_tracker_equals_an_uninterrupted_one() -> None:
    # a hand-written loop resumed from a checkpoint: the tracker started again (B_simple 799.5 after
    # 40 updates against 715.7 after 60); state_dict / load_state_dict carry it over
    import json

    from batchlab.batchsize import GradientNoiseScale

    g = torch.Generator().manual_seed(0)
    pairs = [(float(torch.rand(1, generator=g)) * 4 + 1, float(torch.rand(1, generator=g)) + 0.5) for _ in range(60)]
    whole = GradientNoiseScale(beta=0.9)
    for small, big in pairs:
        whole.update(small, big, 8, 32)
    first = GradientNoiseScale(beta=0.9)
    for small, big in pairs[:20]:
        first.update(small, big, 8, 32)
    resumed = GradientNoiseScale(beta=0.9)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for small, big in pairs[20:]:
        resumed.update(small, big, 8, 32)
    assert resumed.b_simple == whole.b_simple and resumed.updates == 60 and len(resumed.history) == 60
    with pytest.raises(ValueError, match="beta=0.9, this one 0.5"):
        GradientNoiseScale(beta=0.5).load_state_dict(first.state_dict())
