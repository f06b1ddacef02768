"""batchlab.executable_batch_size: a fake OOM above a threshold; the sizes tried, the accumulation
and LR it settles on, and the state restored between tries."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn

import batchlab
from batchlab.integrations.accelerate import evaluation, executable_batch_size

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt


def _train(model, opt, batch_size: int, steps: int = 2, accumulation: int = 1, threshold: int | None = None) -> float:
    """A few SGD steps on random data; raises a fake OOM *after* changing the state when the batch
    is above ``threshold`` (as a real OOM in the middle of training would)."""
    total = 0.0
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulation):
            x = torch.randn(batch_size, 4)
            y = (x[:, 0] > 0).long()
            loss = nn.functional.cross_entropy(model(x), y) / accumulation
            loss.backward()
            total += float(loss.detach())
        np.random.rand()
        random.random()
        opt.step()
        if threshold is not None and batch_size > threshold:
            raise RuntimeError(OOM)
    return total


def _state(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for i, s in opt.state_dict()["state"].items()},
            [g["lr"] for g in opt.param_groups])


def _same(a, b) -> None:
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        assert all(torch.equal(a[1][i][k], b[1][i][k]) if torch.is_tensor(a[1][i][k]) else a[1][i][k] == b[1][i][k]
                   for k in a[1][i])
    assert a[2] == b[2]


def test_finds_the_batch_keeps_the_effective_batch_and_restores_state() -> None:
    model, opt = _setup()
    calls: list[tuple[int, int, float]] = []

    @batchlab.executable_batch_size(starting_batch_size=128, model=model, optimizer=opt)
    def train(batch_size: int, gradient_accumulation_steps: int, learning_rate: float) -> float:
        calls.append((batch_size, gradient_accumulation_steps, learning_rate))
        return _train(model, opt, batch_size, accumulation=gradient_accumulation_steps, threshold=40)

    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    loss = train()
    rng_after = (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    r = train.result
    # powers of two below the start, largest first: 3 tries where x0.9 steps need 12 (128, 115, ..., 41, 36)
    assert [(t[0], t[3]) for t in r.tried] == [(128, "oom"), (64, "oom"), (32, "ok")]
    assert calls == [(128, 1, 0.1), (64, 2, 0.1), (32, 4, 0.1)]
    assert (r.batch_size, r.gradient_accumulation_steps, r.effective_batch_size) == (32, 4, 128)
    assert r.learning_rate == 0.1 and r.lr_factor == 1.0  # the effective batch was kept: LR unchanged

    # the state after the call is exactly that of one clean run at 32 x 4 from the original state and RNG
    ref_model, ref_opt = _setup()
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    ref_loss = _train(ref_model, ref_opt, 32, accumulation=4)
    assert loss == ref_loss
    _same(_state(model, opt), _state(ref_model, ref_opt))
    # every RNG was put back after each failed try: it ends where the clean run leaves it
    ref_rng = (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert torch.equal(rng_after[0], ref_rng[0]) and (rng_after[1] == ref_rng[1]).all() and rng_after[2] == ref_rng[2]


def test_lr_co_scaled_when_the_effective_batch_must_change() -> None:
    model, opt = _setup()

    @executable_batch_size(starting_batch_size=128, model=model, optimizer=opt)
    def train(batch_size: int, learning_rate: float) -> int:  # no accumulation parameter
        assert opt.param_groups[0]["lr"] == pytest.approx(learning_rate)
        _train(model, opt, batch_size, threshold=40)
        return batch_size

    assert train() == 32
    r = train.result
    assert (r.batch_size, r.gradient_accumulation_steps, r.effective_batch_size) == (32, 1, 32)
    assert r.lr_factor == pytest.approx(0.25) and r.learning_rate == pytest.approx(0.025)  # linear rule for SGD
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)

    adam_model = nn.Linear(4, 2)
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3)

    @executable_batch_size(starting_batch_size=96, optimizer=adam, model=adam_model)
    def train_adam(batch_size: int, gradient_accumulation_steps: int) -> None:
        if batch_size > 40:
            raise torch.OutOfMemoryError(OOM)

    train_adam()
    r = train_adam.result
    # 96 itself, then the powers of two below it as micro-batches of 96: 64 -> 2 x 48, 32 -> 3 x 32
    assert [t[0] for t in r.tried] == [96, 48, 32]
    assert (r.batch_size, r.gradient_accumulation_steps, r.lr_factor) == (32, 3, 1.0)  # 3 x 32 = 96 exactly

    @executable_batch_size(starting_batch_size=100, optimizer=adam, model=adam_model)
    def train_odd(batch_size: int, gradient_accumulation_steps: int) -> None:
        if batch_size > 40:
            raise torch.OutOfMemoryError(OOM)

    train_odd()
    r = train_odd.result
    # 32 fits; 100 = 4 x 25 keeps the effective batch with a smaller micro-batch (25 <= 32 fits)
    assert (r.batch_size, r.gradient_accumulation_steps, r.effective_batch_size, r.lr_factor) == (25, 4, 100, 1.0)


def test_probes_predict_the_batch_and_the_function_runs_once() -> None:
    runs: list[int] = []
    probed: list[int] = []

    def probe(b: int) -> float:
        probed.append(b)
        if b > 40:
            raise RuntimeError(OOM)
        return 1000.0 + 100.0 * b  # the bytes this step used

    @executable_batch_size(starting_batch_size=256, probe=probe, memory_limit=1000 + 100 * 45, margin=0.0)
    def train(batch_size: int, gradient_accumulation_steps: int) -> None:
        runs.append(batch_size)

    train()
    r = train.result
    assert r.probes == [[2, 1200.0], [4, 1400.0], [8, 1800.0]] and r.predicted == 45
    assert probed == [2, 4, 8, 32, 64]  # the prediction (45 -> 32) checked, and its double refused
    assert runs == [32] and (r.batch_size, r.gradient_accumulation_steps) == (32, 8)


def test_an_evaluation_oom_does_not_shrink_the_training_batch() -> None:
    model, opt = _setup()

    @executable_batch_size(starting_batch_size=64, model=model, optimizer=opt)
    def train(batch_size: int, gradient_accumulation_steps: int, eval_batch_size: int) -> tuple[int, int]:
        _train(model, opt, batch_size, steps=1, accumulation=gradient_accumulation_steps, threshold=40)
        with evaluation(), torch.no_grad():
            if eval_batch_size > 16:
                raise RuntimeError(OOM)
        return batch_size, eval_batch_size

    assert train() == (32, 16)
    assert [(t[0], t[1], t[3]) for t in train.result.tried] == [
        (64, 64, "oom"), (32, 64, "eval-oom"), (32, 32, "eval-oom"), (32, 16, "ok")]

    # without an eval_batch_size parameter: an error that says so; found from the model's eval mode
    model2, opt2 = _setup()

    @executable_batch_size(starting_batch_size=64, model=model2, optimizer=opt2)
    def train2(batch_size: int) -> None:
        model2.eval()
        raise RuntimeError(OOM)

    with pytest.raises(RuntimeError, match="out of memory during evaluation at training batch 64; the training batch is kept"):
        train2()
    assert [t[3] for t in train2.result.tried] == ["eval-oom"]


def test_errors() -> None:
    with pytest.raises(ValueError, match="starting_batch_size must be a positive integer, got 0"):
        executable_batch_size(lambda batch_size: None, starting_batch_size=0)
    with pytest.raises(ValueError, match="lr_rule must be one of linear, sqrt, none, got 'cubic'"):
        executable_batch_size(lambda batch_size: None, lr_rule="cubic")

    @executable_batch_size(starting_batch_size=8)
    def f(batch_size: int, x: int) -> int:
        return x

    with pytest.raises(TypeError, match="batch_size is passed to f by the decorator"):
        f(4, 5)

    @executable_batch_size(starting_batch_size=8)
    def never(batch_size: int) -> None:
        raise RuntimeError(OOM)

    with pytest.raises(RuntimeError, match="no executable batch size: never ran out of memory at batch 1"):
        never()
    assert [t[0] for t in never.result.tried] == [8, 4, 2, 1]

    @executable_batch_size(starting_batch_size=8)
    def other(batch_size: int) -> None:
        raise ValueError("not an OOM")

    with pytest.raises(ValueError, match="not an OOM"):
        other()


def test_a_prepared_optimizer_keeps_its_own_scaling_rule() -> None:
    accelerate = pytest.importorskip("accelerate", reason="the 'hf' extra is not installed")
    from batchlab.train import optimizer_hparams, scale_hparams
    from batchlab.train.optim import optimizer_name

    acc = accelerate.Accelerator(cpu=True)
    model = nn.Linear(4, 2)
    _, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert type(opt).__name__ == "AcceleratedOptimizer" and optimizer_name(opt) == "adamw"
    hp = scale_hparams(opt, optimizer_hparams(opt), 32, 64)  # Adam's default rule, not SGD's linear one
    assert hp["lr"] == pytest.approx(1e-3 * 2**0.5) and hp["betas"] == pytest.approx((0.9, 0.999**2))
    assert optimizer_name(torch.optim.NAdam(model.parameters())) == "adam"


def test_a_user_lr_scheduler_keeps_the_co_scaled_lr_and_the_base_is_the_configured_lr() -> None:
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW([{"params": [model.weight], "lr": 1e-3}, {"params": [model.bias], "lr": 5e-4}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.25)  # a warmup has cut the LR to a quarter

    @executable_batch_size(starting_batch_size=128, model=model, optimizer=opt, scheduler=sched)
    def train(batch_size: int, learning_rate: float) -> int:  # no accumulation: the effective batch must shrink
        if batch_size > 32:
            raise torch.OutOfMemoryError(OOM)
        return batch_size

    assert train() == 32
    r = train.result
    # the base is the configured 1e-3 (initial_lr), not the warmup's 2.5e-4; sqrt rule 128 -> 32 halves it
    assert r.lr_factor == pytest.approx(0.5) and r.learning_rate == pytest.approx(5e-4)
    assert sched.base_lrs == pytest.approx([5e-4, 2.5e-4])  # co-scaled once, not once per try
    opt.step()
    sched.step()  # the scheduler's next step keeps the co-scaled base and the groups' ratio
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.25e-4, 6.25e-5])
    with pytest.raises(TypeError, match="scheduler must be a torch LR scheduler"):
        executable_batch_size(lambda batch_size: None, scheduler=object())


def test_a_failed_try_puts_the_users_lr_scheduler_back_where_it_was() -> None:
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 5))  # 5-step warmup
    seen: list[list[float]] = []

    @executable_batch_size(starting_batch_size=64, effective_batch_size=64, model=model, optimizer=opt, scheduler=sched)
    def train(batch_size: int, gradient_accumulation_steps: int) -> None:
        lrs = []
        for step in range(4):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            if step == 2 and batch_size > 16:  # OOM after three scheduler steps
                raise torch.OutOfMemoryError(OOM)
        seen.append(lrs)

    train()
    # the try that ran starts the warmup from its first step again: 0.2, 0.4, 0.6, 0.8 of 1e-3
    assert seen[-1] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4])
    assert train.result.batch_size == 16 and train.result.gradient_accumulation_steps == 4


def test_calling_the_function_again_does_not_scale_the_lr_again() -> None:
    # a loop calling the decorated function once per epoch: the same batch every time, and the LR
    # co-scaled once from the configured one (it used to be multiplied by the factor on every call)
    model, opt = _setup()

    @executable_batch_size(starting_batch_size=128, model=model, optimizer=opt)
    def train(batch_size, learning_rate):  # type: ignore[no-untyped-def]
        if batch_size > 40:
            raise RuntimeError(OOM)
        return learning_rate, opt.param_groups[0]["lr"]

    first = train()
    assert first == (pytest.approx(0.1 * 32 / 128), pytest.approx(0.1 * 32 / 128))
    assert train() == first and train() == first


def test_probes_leave_the_users_lr_scheduler_where_it_was() -> None:
    # a probe is one training step, scheduler step included: the function must start at the warmup's
    # first step, not after the probes' steps
    model, opt = _setup()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))

    def probe(b: int) -> float:
        _train(model, opt, b, steps=1)
        sched.step()
        return 1000.0 + 100.0 * b

    seen = []

    @executable_batch_size(starting_batch_size=64, model=model, optimizer=opt, scheduler=sched, probe=probe,
                           memory_limit=8000)
    def train(batch_size, gradient_accumulation_steps):  # type: ignore[no-untyped-def]
        seen.append((sched.last_epoch, opt.param_groups[0]["lr"]))

    train()
    assert sum(t[2] == "probe" for t in train.result.tried) >= 3
    assert seen == [(0, pytest.approx(0.1 / 10))]
