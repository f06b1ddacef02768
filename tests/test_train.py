"""fit(): budgets, determinism, schedules, accumulation, statuses, AMP rollback."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from batchlab.tasks import TaskError
from batchlab.train import Callback, RunResult, StepContext, TrainConfig, fit, lr_factor, scale_lr
from batchlab.train.oom import is_oom


def _no_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if "time" not in k} for row in history]


def test_same_seed_same_history(toy_task):
    cfg = TrainConfig(batch_size=32, epochs=3, seed=7)
    a, b = fit(toy_task, cfg), fit(toy_task, cfg)
    assert a.status == b.status == "ok"
    assert _no_time(a.history) == _no_time(b.history)
    c = fit(toy_task, cfg.replace(seed=8))
    assert _no_time(c.history) != _no_time(a.history)


def test_fit_does_not_touch_the_callers_rng(toy_task):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(toy_task, TrainConfig(batch_size=32, epochs=1))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "budget,steps,examples",
    [
        ({"epochs": 2}, 16, 512),  # 256 examples / 32 = 8 steps per epoch
        ({"epochs": 0.5}, 4, 128),
        ({"max_steps": 5}, 5, 160),
        ({"max_examples": 100}, 4, 100),  # the last batch is cut to the budget
    ],
)
def test_budgets(toy_task, budget, steps, examples):
    r = fit(toy_task, TrainConfig(batch_size=32, **budget))
    assert (r.steps, r.examples) == (steps, examples)


def test_eval_every_epoch_and_every_n_steps(toy_task):
    r = fit(toy_task, TrainConfig(batch_size=32, epochs=3))
    assert [row["step"] for row in r.history] == [8, 16, 24]
    r = fit(toy_task, TrainConfig(batch_size=32, max_steps=10, eval_every=4))
    assert [row["step"] for row in r.history] == [0, 4, 8, 10]
    for key in ("val_acc", "val_loss", "train_acc", "train_loss", "batch_loss", "lr", "examples", "wall_time"):
        assert key in r.history[-1]
    assert r.final["val_acc"] > 0.8


def test_partial_last_batch_and_drop_last(toy_task):
    # 256 examples with batch 100: two full batches and one of 56 per epoch unless drop_last
    r = fit(toy_task, TrainConfig(batch_size=100, epochs=1))
    assert (r.steps, r.examples) == (3, 256)
    r = fit(toy_task, TrainConfig(batch_size=100, max_steps=4, drop_last=True))
    assert r.examples == 400


def test_accumulation_matches_the_big_batch_without_bn(toy_task):
    """Two micro-batches of 16 give the gradient of one batch of 32 (same examples, same order)."""
    base = TrainConfig(batch_size=32, max_steps=6, norm="none", optimizer="sgd", lr=0.1)
    m1, m2 = toy_task.make_model(norm="none"), toy_task.make_model(norm="none")
    m2.load_state_dict(m1.state_dict())
    fit(toy_task, base, model=m1)
    fit(toy_task, base.replace(batch_size=16, accumulation=2), model=m2)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p1, p2, atol=1e-6), (p1 - p2).abs().max()


def test_schedules():
    assert lr_factor("constant", 0.7, 100) == 1.0
    assert lr_factor("step", 0.49, 0, milestones=(0.5, 0.75), gamma=0.1) == 1.0
    assert lr_factor("step", 0.8, 0, milestones=(0.5, 0.75), gamma=0.1) == pytest.approx(0.01)
    assert lr_factor("cosine", 0.5, 0) == pytest.approx(0.5)
    assert lr_factor("cosine", 1.0, 0) == pytest.approx(0.0)
    assert lr_factor("constant", 0.0, 0, warmup_steps=4) == pytest.approx(0.25)
    assert lr_factor("constant", 0.0, 3, warmup_steps=4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor("exp", 0.0, 0)


def test_scale_lr_rules():
    assert scale_lr(0.1, 256, 1024, "linear") == pytest.approx(0.4)
    assert scale_lr(0.1, 256, 1024, "sqrt") == pytest.approx(0.2)
    assert scale_lr(0.1, 256, 1024, "none") == 0.1
    with pytest.raises(ValueError, match="rule must be one of linear, sqrt, none; got 'cubic'"):
        scale_lr(0.1, 1, 2, "cubic")
    with pytest.raises(ValueError, match="to_batch must be a positive integer, got 0"):
        scale_lr(0.1, 1, 0)


def test_step_schedule_and_batch_growth_in_history(toy_task):
    r = fit(toy_task, TrainConfig(batch_size=16, epochs=4, schedule="step", milestones=(0.5,), gamma=0.1))
    assert [row["lr"] for row in r.history] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    r = fit(toy_task, TrainConfig(batch_size=16, epochs=4, batch_growth=(0.5,), growth_factor=2))
    assert [row["batch_size"] for row in r.history] == [16, 16, 32, 32]
    assert r.steps == 16 + 16 + 8 + 8
    assert r.examples == 4 * 256


def test_history_batch_size_is_the_setting_not_a_short_last_step(toy_task):
    # 100 examples at batch 16 end with a step of 4: the row says the batch trained with (16) and
    # how many examples its last step had (4)
    r = fit(toy_task, TrainConfig(batch_size=16, max_examples=100, eval_every=0))
    assert r.history[-1]["batch_size"] == 16 and r.history[-1]["step_examples"] == 4
    r = fit(toy_task, TrainConfig(batch_size=8, accumulation=2, max_examples=100, eval_every=0))
    assert r.history[-1]["batch_size"] == 16 and r.history[-1]["step_examples"] == 4


def test_divergence_is_a_status_not_an_exception(toy_task):
    r = fit(toy_task, TrainConfig(batch_size=32, lr=1e6, epochs=3, norm="none"))
    assert r.status == "diverged"
    assert r.failed_step is not None and r.failed_step < 24
    assert "training loss became" in r.error


class _OOMAbove(nn.Module):
    def __init__(self, inner: nn.Module, limit: int, msg: str) -> None:
        super().__init__()
        self.inner, self.limit, self.msg = inner, limit, msg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] > self.limit:
            raise RuntimeError(self.msg)
        return self.inner(x)


@pytest.mark.parametrize(
    "msg",
    ["CUDA out of memory. Tried to allocate 2.00 GiB", "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"],
)
def test_oom_is_a_status_not_an_exception(toy_task, msg):
    model = _OOMAbove(toy_task.make_model(), 16, msg)
    r = fit(toy_task, TrainConfig(batch_size=32, epochs=1), model=model)
    assert r.status == "oom" and r.failed_step == 0
    assert is_oom(RuntimeError(msg))


def test_other_errors_raise_or_are_recorded(toy_task):
    model = _OOMAbove(toy_task.make_model(), 16, "shape mismatch")
    with pytest.raises(TaskError, match="task 'toy': training failed at step 0 .*RuntimeError: shape mismatch") as info:
        fit(toy_task, TrainConfig(batch_size=32, epochs=1), model=model)
    assert isinstance(info.value.__cause__, RuntimeError)
    r = fit(toy_task, TrainConfig(batch_size=32, epochs=1), model=model, raise_errors=False)
    assert r.status == "failed" and "shape mismatch" in r.error


def test_invalid_config_values_are_named():
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 2.5"):
        TrainConfig(batch_size=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="optimizer must be one of .*; got 'rmsprop'"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="lr must be a positive finite number, got -1"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"batch": 3})


def test_batch_larger_than_training_set(toy_task):
    with pytest.raises(ValueError, match=r"batch_size \(1000\) is larger than the training set of task 'toy' \(256 examples\)"):
        fit(toy_task, TrainConfig(batch_size=1000))


@pytest.mark.parametrize("opt", ["sgd", "momentum", "nesterov", "adam", "adamw", "lbfgs"])
def test_every_optimizer_trains(toy_task, opt):
    lr = {"adam": 0.01, "adamw": 0.01, "lbfgs": 0.5}.get(opt, 0.1)
    r = fit(toy_task, TrainConfig(batch_size=64, epochs=3, optimizer=opt, lr=lr))
    assert r.status == "ok"
    assert r.final["val_acc"] > 0.8, r.final


def test_result_round_trips_json(toy_task):
    r = fit(toy_task, TrainConfig(batch_size=32, epochs=1))
    back = RunResult.from_json(r.to_json())
    assert back == r
    assert TrainConfig.from_dict(r.config) == TrainConfig(batch_size=32, epochs=1)


def test_callbacks_see_micro_batches_and_can_stop(toy_task):
    seen: list[tuple[int, int, int]] = []

    class Spy(Callback):
        def on_micro_batch_end(self, ctx: StepContext) -> None:
            seen.append((ctx.step, ctx.micro_batch, ctx.micro_batch_size))

        def on_step_end(self, ctx: StepContext) -> None:
            ctx.logs["custom"] = 1.0
            if ctx.step == 3:
                ctx.stop = True

    r = fit(toy_task, TrainConfig(batch_size=8, accumulation=2, epochs=1), callbacks=[Spy()])
    assert r.steps == 3
    assert seen == [(s, m, 8) for s in range(3) for m in range(2)]
    assert r.history[-1]["custom"] == 1.0


def test_bf16_autocast_trains(toy_task):
    r = fit(toy_task, TrainConfig(batch_size=32, epochs=2, amp=True))
    assert r.status == "ok" and r.final["val_acc"] > 0.8
    assert r.config["amp_dtype"] is None and r.extra["amp_dtype"] == "bfloat16"  # the dtype used is recorded


def test_skipped_fp16_step_rolls_back_bn_statistics(toy_task):
    """A GradScaler step skipped for inf gradients must not move BN running statistics."""
    model = toy_task.make_model(norm="batch")
    bn = model[1]
    after_step: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    class PoisonStep2(Callback):
        def on_before_step(self, ctx: StepContext) -> None:
            if ctx.step == 2:
                next(ctx.model.parameters()).grad.fill_(math.inf)

        def on_step_end(self, ctx: StepContext) -> None:
            after_step[ctx.step] = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))

    weights_before: list[torch.Tensor] = []

    class Weights(Callback):
        def on_before_step(self, ctx: StepContext) -> None:
            if ctx.step == 2:
                weights_before.extend(p.detach().clone() for p in ctx.model.parameters())

    r = fit(toy_task, TrainConfig(batch_size=32, max_steps=4, amp=True, amp_dtype="float16"), model=model,
            callbacks=[PoisonStep2(), Weights()])
    assert r.status == "ok"
    assert r.extra["skipped_steps"] == 1
    # step index 2 was skipped: statistics after it (key 3) equal those after step index 1 (key 2)
    mean2, var2, n2 = after_step[2]
    mean3, var3, n3 = after_step[3]
    assert torch.equal(mean2, mean3) and torch.equal(var2, var3) and n2 == n3
    # and the statistics did move on a normal step
    assert not torch.equal(after_step[4][0], mean3)


def test_no_one_example_batches(toy_task):
    """BatchNorm cannot train on one example: neither an epoch's tail nor a budget's tail may make one."""
    sizes: list[int] = []

    class Sizes(Callback):
        def on_micro_batch_end(self, ctx: StepContext) -> None:
            sizes.append(ctx.micro_batch_size)

    r = fit(toy_task, TrainConfig(batch_size=51, epochs=2), callbacks=[Sizes()])  # 256 = 5 * 51 + 1
    assert r.status == "ok" and min(sizes) >= 2 and r.examples == 512
    assert sizes[:5] == [51, 51, 51, 51, 52]
    sizes.clear()
    r = fit(toy_task, TrainConfig(batch_size=4, max_examples=9), callbacks=[Sizes()])
    assert r.status == "ok" and sizes == [4, 4] and r.examples == 8


def test_evaluation_builds_no_autograd_graph_and_results_record_the_optimizer(toy_task):
    from batchlab.train import evaluate

    seen = []
    model = toy_task.make_model()
    model.register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled()))
    evaluate(model, toy_task.val_source, toy_task)
    assert seen and not any(seen)
    r = fit(toy_task, TrainConfig(batch_size=32, max_steps=2, optimizer="adamw", lr=1e-3, weight_decay=0.05))
    assert r.extra["optimizer_class"] == "AdamW"
    (g,) = r.extra["param_groups"]
    assert g["weight_decay"] == 0.05 and g["betas"] == [0.9, 0.999] and g["params"] == sum(
        p.numel() for p in toy_task.make_model().parameters())


def test_training_a_fresh_model_with_frozen_batch_norms_is_warned(toy_task):
    with pytest.warns(UserWarning, match="norm 'frozen' on a model whose batch norms hold their initial statistics"):
        r = fit(toy_task, TrainConfig(batch_size=16, max_steps=2, norm="frozen"))
    assert "meant for pretrained weights" in r.extra["warning"]


def test_schedule_settings_that_would_change_nothing_are_refused_or_warned(toy_task) -> None:
    with pytest.raises(ValueError, match="milestones apply to schedule='step' only"):
        TrainConfig(batch_size=16, epochs=1, milestones=(0.5,))
    with pytest.raises(ValueError, match="schedule='step' needs milestones"):
        TrainConfig(batch_size=16, epochs=1, schedule="step")
    with pytest.warns(UserWarning, match="warmup_steps=1000 is longer than the run"):
        fit(toy_task, TrainConfig(batch_size=16, max_steps=4, warmup_steps=1000))


def test_accumulation_pools_padded_token_losses_as_one_batch() -> None:
    # a padded LM's micro-batches hold different numbers of tokens: 8 x 2 and 4 x 4 must take the step
    # 16 x 1 takes (the mean over all the step's tokens, as the Hugging Face Trainer's
    # num_items_in_batch does), not a mean of micro-batch means weighted by examples
    from batchlab.tasks import Task

    vocab, length = 11, 12

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(x))

    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(64):
        keep = int(torch.randint(3, length + 1, (1,), generator=g))
        x = torch.randint(1, vocab, (length,), generator=g)
        y = x.roll(-1).clone()
        y[keep:] = -100  # padding
        data.append((x, y))
    task = Task.from_torch(name="padded-lm", model=LM, train=data, val=data[:32], metric="loss")
    runs = [fit(task, TrainConfig(batch_size=b, accumulation=a, max_steps=2, optimizer="sgd", lr=1.0, eval_every=0))
            for b, a in ((16, 1), (8, 2), (4, 4))]
    for r in runs[1:]:
        assert r.final["val_loss"] == pytest.approx(runs[0].final["val_loss"], rel=1e-6, abs=1e-6)
        assert r.history[-1]["batch_loss"] == pytest.approx(runs[0].history[-1]["batch_loss"], rel=1e-6)


def test_a_per_batch_callable_metric_is_scored_on_the_tasks_batch_size_whatever_the_run_trains_with() -> None:
    # F1-like metrics depend on the chunk they see: scored on chunks of the training batch, runs at
    # batch 4 and 64 were compared on different scales (0.9375 against 0.5 for the same weights)
    from batchlab.tasks import Task

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, generator=g), int(i % 2)) for i in range(96)]
    chunk = lambda out, batch: float(len(batch[1]))  # noqa: E731 - the size of the chunk it was given
    task = Task.from_torch(name="chunky", model=lambda: torch.nn.Linear(4, 2), train=data, val=data[:40],
                           metric=chunk, higher_is_better=True, batch_size=16)
    got = {b: fit(task, TrainConfig(batch_size=b, max_steps=1, eval_every=0)).final["val_metric"] for b in (4, 64)}
    assert got[4] == got[64] == pytest.approx((16 * 16 + 16 * 16 + 8 * 8) / 40)  # chunks of 16, 16, 8


def test_a_pooled_metric_that_needs_both_classes_passes_the_check_on_a_sorted_validation_set() -> None:
    # like sklearn's roc_auc_score, compute() raises with one class; the check's first 4 validation
    # examples (sorted by class, as ImageFolder sets are) held one class, and the task was refused
    from batchlab.tasks import Task

    class MeanScoreGap:
        name, higher_is_better = "score_gap", True

        def reset(self) -> None:
            self.pos: list[float] = []
            self.neg: list[float] = []

        def update(self, out, batch) -> None:  # type: ignore[no-untyped-def]
            s = out[:, 1] - out[:, 0]
            self.pos += s[batch[1] == 1].tolist()
            self.neg += s[batch[1] == 0].tolist()

        def compute(self) -> float:
            if not self.pos or not self.neg:
                raise ValueError("Only one class present in y_true")
            return sum(self.pos) / len(self.pos) - sum(self.neg) / len(self.neg)

    g = torch.Generator().manual_seed(0)
    data = sorted(((torch.randn(4, generator=g), int(i % 2)) for i in range(64)), key=lambda p: p[1])
    task = Task.from_torch(name="sorted", model=lambda: torch.nn.Linear(4, 2), train=data, val=data,
                           metric=MeanScoreGap(), higher_is_better=True)
    task.check()
    r = fit(task, TrainConfig(batch_size=8, max_steps=2, eval_every=0))
    assert r.status == "ok" and math.isfinite(r.final["val_metric"])

    class Typo(MeanScoreGap):
        def compute(self) -> float:
            return float(self.vv)  # type: ignore[attr-defined]  # a bug: fails on any data

    from batchlab.tasks import TaskError

    broken = Task.from_torch(name="typo", model=lambda: torch.nn.Linear(4, 2), train=data, val=data, metric=Typo(),
                             higher_is_better=True)
    with pytest.raises(TaskError, match=r"the metric 'score_gap' failed on 64 validation examples spread over the set: "
                                        r"compute\(\) raised AttributeError"):
        broken.check()  # refused before any trial, not after every run of a search failed
