"""Batch-size warmup: BatchSizeSchedule stages, TrainConfig.batch_schedule in fit (planner and
co-scaled hyperparameters), resume in a user's own loop, bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from batchlab import Task
from batchlab.batchsize import BatchSizeSchedule
from batchlab.train import Callback, TrainConfig, fit, make_optimizer, optimizer_hparams, scale_hparams
from batchlab.train.loop import _plan_steps, _Sampler


class Record(Callback):
    """Per step: examples before it, its batch, and the optimizer's lr/betas/eps during it."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, dict]] = []
        self._before = 0

    def on_before_step(self, ctx) -> None:
        self.rows.append((ctx.examples, ctx.batch_size, optimizer_hparams(ctx.optimizer)))

    def on_step_end(self, ctx) -> None:
        assert ctx.examples == self.rows[-1][0] + self.rows[-1][1]


def test_schedule_stages_pure_functions_and_config():
    s = BatchSizeSchedule(8, stages=((64, 16), (192, 32)), rule="adam-sde")
    assert s.milestones == ()  # stages given: no default milestones
    assert [s.batch_at(e) for e in (0, 63, 64, 191, 192, 10**6)] == [8, 8, 16, 16, 32, 32]
    hp = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
    assert s.hparams_at(100, hp, "adamw") == scale_hparams("adamw", hp, 8, 16, "adam-sde")
    assert s.hparams_at(0, hp, "adamw") == hp
    cfg = s.apply(TrainConfig(optimizer="adamw"))
    assert (cfg.batch_size, cfg.batch_schedule, cfg.batch_scale_rule) == (8, ((64, 16), (192, 32)), "adam-sde")
    assert BatchSizeSchedule.from_config(cfg) == s
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert s.final_batch == 32
    # the milestone form is unchanged (Smith et al.)
    m = BatchSizeSchedule(32)
    assert m.milestones == (0.5, 0.75) and m(0.8) == 128 and m.batch_at(80, total_examples=100) == 128
    with pytest.raises(ValueError, match="give total_examples"):
        m.batch_at(80)
    with pytest.raises(ValueError, match="call batch_at"):
        s(0.5)


def test_from_critical_batch_integer_factors_monotone_capped():
    measured = [(0, 3), (100, 40), (200, 20), (400, 1000)]
    s = BatchSizeSchedule.from_critical_batch(measured, 8, max_batch=128, lookahead=False)
    # 3 < 8: stay at base; 40 -> 32; 20 (lower) keeps 32; 1000 -> capped at 128
    assert s.stages == ((100, 32), (400, 128))
    s4 = BatchSizeSchedule.from_critical_batch(measured, 8, factor=4, lookahead=False)
    assert s4.stages == ((100, 32), (400, 512))
    # lookahead (default): 40 at 100 is bounded by the 20 measured later: 16 from 100 on
    assert BatchSizeSchedule.from_critical_batch(measured, 8, max_batch=128).stages == ((100, 16), (400, 128))
    assert BatchSizeSchedule.from_critical_batch([(0, 64), (10, 32), (20, 128)], 32).stages == ((20, 128),)
    assert BatchSizeSchedule.from_critical_batch([(0, 64), (10, 32), (20, 128)], 32, lookahead=False).stages == ((0, 64), (20, 128))
    none = BatchSizeSchedule.from_critical_batch([(0, 4)], 8)
    assert none.stages == () and none.milestones == ()  # a constant batch, not the default milestones
    cfg = none.apply(TrainConfig(batch_size=8, lr=0.1, max_examples=1000))
    assert cfg.batch_size == 8 and cfg.batch_growth == () and cfg.batch_schedule == ()
    assert [none.batch_at(e) for e in (0, 500, 10**6)] == [8, 8, 8]
    with pytest.raises(ValueError, match="factor must be an integer >= 2, got 1"):
        BatchSizeSchedule.from_critical_batch(measured, 8, factor=1)
    with pytest.raises(ValueError, match=r"measured\[0\] must be an \(examples, critical batch\) pair"):
        BatchSizeSchedule.from_critical_batch([5], 8)


@pytest.mark.parametrize("kw, message", [
    ({"stages": ((64, 12),)}, "must be an integer multiple of base"),
    ({"stages": ((64, 16), (32, 32))}, "stages examples must increase; got 64 then 32"),
    ({"stages": ((64, 32), (128, 16))}, "no smaller than the stage before"),
    ({"stages": ((64, 0),)}, r"stages\[0\] batch_size must be a positive integer, got 0"),
    ({"stages": ((64, 16),), "milestones": (0.5,)}, "give milestones .* or stages .*, not both"),
    ({"stages": ((64, 16),), "rule": "cubic"}, "rule must be one of linear, sqrt, none, adam-sde, adam-halflife"),
    ({"stages": ((64, 64),), "max_batch": 32}, "exceeds max_batch=32"),
    ({"examples": -1}, "examples must be an integer >= 0, got -1"),
])
def test_schedule_bad_inputs(kw, message):
    with pytest.raises(ValueError, match=message):
        BatchSizeSchedule(8, **kw)


@pytest.mark.parametrize("kw, message", [
    ({"batch_schedule": ((10, 16), (5, 32))}, "batch_schedule examples must increase; got 10 then 5"),
    ({"batch_schedule": ((10,),)}, r"batch_schedule\[0\] must be an \(examples seen, batch_size\) pair"),
    ({"batch_schedule": ((-1, 16),)}, r"batch_schedule\[0\] examples must be an integer >= 0, got -1"),
    ({"batch_schedule": ((10, 2.5),)}, r"batch_schedule\[0\] batch_size must be a positive integer, got 2.5"),
    ({"batch_schedule": "10:16"}, "batch_schedule must be a sequence of"),
    ({"batch_schedule": ((10, 16),), "batch_growth": (0.5,), "growth_factor": 2}, "not both"),
    ({"batch_scale_rule": "cube"}, "batch_scale_rule must be one of linear, sqrt, none, adam-sde, adam-halflife"),
    ({"batch_scale_rule": "adam-sde", "optimizer": "momentum"}, "is for optimizer 'adam' or 'adamw'; got optimizer 'momentum'"),
])
def test_config_batch_schedule_bad_inputs(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


def test_fit_follows_the_schedule_and_coscales_adam(toy_task):
    s = BatchSizeSchedule(8, stages=((64, 16), (192, 32)), rule="adam-sde")
    cfg = s.apply(TrainConfig(optimizer="adamw", lr=1e-3, max_examples=512, eval_train=False))
    rec = Record()
    r = fit(toy_task, cfg, callbacks=[rec])
    assert r.ok and r.examples == 512
    base = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
    for examples, batch, hp in rec.rows:
        assert batch == s.batch_at(examples)
        want = s.hparams_at(examples, base, "adamw")
        assert hp["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert hp["betas"] == pytest.approx(want["betas"], rel=1e-12) and hp["eps"] == pytest.approx(want["eps"])
    assert {b for _, b, _ in rec.rows} == {8, 16, 32}
    assert r.steps == 64 // 8 + (192 - 64) // 16 + (512 - 192) // 32  # 8 + 8 + 10 = 26 instead of 64
    # the LR schedule multiplies the co-scaled LR
    rec2 = Record()
    fit(toy_task, cfg.replace(schedule="cosine"), callbacks=[rec2])
    mid = [hp["lr"] for e, b, hp in rec2.rows if b == 16]
    assert all(lr < s.hparams_at(64, base, "adamw")["lr"] for lr in mid)


def test_planner_is_pure_and_a_dataloader_sees_the_same_batches(toy_task):
    """The planner's batches depend only on the steps before: planned ahead in one go they are
    what fit took, also when a DataLoader (with workers prefetching) fetches them."""
    cfg = TrainConfig(batch_size=8, batch_schedule=((40, 16), (100, 48)), lr=0.05, max_examples=300,
                      eval_train=False, seed=2)
    planned = [[int(i) for i in idx] for p in _plan_steps(cfg, _Sampler(256, torch.Generator().manual_seed(2), False),
                                                           300) for idx in p.micro]
    assert [len(p) for p in planned][:6] == [8, 8, 8, 8, 8, 16]  # 40 examples at 8, then 16

    seen: list[list[int]] = []
    x, y = toy_task.train_set.x, toy_task.train_set.y
    vx, vy = toy_task.val_set.x, toy_task.val_set.y
    TD = torch.utils.data.TensorDataset

    def forward(model, batch):  # the index travels with the batch
        if model.training:
            seen.append([int(i) for i in batch[0]])
        return model(batch[1])

    class Clear(Callback):
        def on_train_begin(self, ctx) -> None:
            seen.clear()  # drop the preflight check's batch

    loader_task = Task.from_torch("toy-loader", lambda: toy_task.make_model(), TD(torch.arange(len(x)), x, y),
                                  TD(torch.arange(len(vx)), vx, vy), forward=forward,
                                  loss=lambda out, b: torch.nn.functional.cross_entropy(out, b[2]),
                                  metric="loss", num_workers=2)
    assert not loader_task.in_memory
    r = fit(loader_task, cfg, callbacks=[Clear()])
    assert r.ok and r.examples == 300
    assert seen == planned


def _train_own_loop(total: int, schedule: BatchSizeSchedule, model, opt, base_hp, data):
    x, y = data
    while schedule.examples < total:
        b = min(schedule.batch, total - schedule.examples)
        schedule.apply_to(opt, base_hp)
        start = schedule.examples % len(x)
        idx = torch.arange(start, start + b) % len(x)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        schedule.step(b)


def test_schedule_resumed_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path, toy_task):
    data = (toy_task.train_set.x, toy_task.train_set.y)
    base_hp = {"lr": 3e-3, "betas": (0.9, 0.99), "eps": 1e-8}

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        opt = make_optimizer("adamw", model.parameters(), base_hp["lr"])
        return model, opt, BatchSizeSchedule(8, stages=((48, 16), (160, 64)), rule="adam-sde")

    model, opt, sched = fresh()
    _train_own_loop(600, sched, model, opt, base_hp, data)
    assert sched.examples == 600

    model2, opt2, sched2 = fresh()
    _train_own_loop(112, sched2, model2, opt2, base_hp, data)  # stop inside the 16 stage
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "sched": json.dumps(sched2.state_dict())},
               tmp_path / "ckpt.pt")
    del model2, opt2, sched2
    model3, opt3, sched3 = fresh()
    ck = torch.load(tmp_path / "ckpt.pt")
    model3.load_state_dict(ck["model"])
    opt3.load_state_dict(ck["opt"])
    sched3.load_state_dict(json.loads(ck["sched"]))
    assert sched3.examples == 112 and sched3.batch == 16
    _train_own_loop(600, sched3, model3, opt3, base_hp, data)
    for p, q in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, q)
    assert opt3.param_groups[0]["betas"] == opt.param_groups[0]["betas"] != base_hp["betas"]

    other = BatchSizeSchedule(8, stages=((48, 16),))
    with pytest.raises(ValueError, match="differs from this one in stages"):
        other.load_state_dict(json.loads(ck["sched"]))
    # a key the schedule never saves (a typo, another object's state) is refused, as torch's strict load does
    with pytest.raises(ValueError, match="does not save: exampels"):
        sched3.load_state_dict({**json.loads(ck["sched"]), "exampels": 5})


def test_fit_refuses_a_schedule_batch_larger_than_the_data(toy_task):
    with pytest.raises(ValueError, match=r"batch_schedule's largest batch \(512\) is larger than the training set"):
        fit(toy_task, TrainConfig(batch_size=8, batch_schedule=((16, 512),), max_examples=64))
    with pytest.raises(ValueError, match="rule 'adam-sde' is for Adam"):
        fit(toy_task, TrainConfig(batch_size=8, batch_schedule=((16, 16),), batch_scale_rule="adam-sde", max_examples=64))
    assert math.isfinite(fit(toy_task, TrainConfig(batch_size=8, batch_schedule=((16, 16),), max_examples=64)).final["val_loss"])


def test_milestone_schedule_in_a_users_loop_asks_for_the_budget_by_name() -> None:
    from batchlab.batchsize import BatchSizeSchedule

    s = BatchSizeSchedule(base=32, milestones=(0.5,))
    with pytest.raises(ValueError, match=r"BatchSizeSchedule.batch: this schedule's milestones \[0.5\] are fractions "
                                         r"of a training budget .* batch_at\(examples, total_examples\)"):
        s.batch
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"BatchSizeSchedule.apply_to: .* apply_to\(\.\.\., total_examples=N\)"):
        s.apply_to(opt, {"lr": 0.1})
    s.step(600)
    hp = s.apply_to(opt, {"lr": 0.1}, total_examples=1000)  # past the milestone: batch 64, LR x 2 (linear)
    assert s.batch_at(600, 1000) == 64 and hp["lr"] == pytest.approx(0.2) == opt.param_groups[0]["lr"]


def test_apply_to_scales_every_parameter_group_and_keeps_their_ratio() -> None:
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW([{"params": a.parameters()}, {"params": b.parameters(), "lr": 1e-4}], lr=1e-3)
    s = BatchSizeSchedule(base=32, stages=((0, 128),))
    hp = s.apply_to(opt, optimizer_hparams(opt))
    assert hp["lr"] == pytest.approx(2e-3) and hp["betas"][1] == pytest.approx(0.999**4)  # sqrt(4) x, adam-halflife
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3, 2e-4])  # the second group stays at a tenth
    assert all(g["betas"][1] == pytest.approx(0.999**4) for g in opt.param_groups)


def test_apply_to_takes_the_group_ratios_when_the_first_lr_is_zero() -> None:
    from batchlab.train.optim import lr_ratios

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": a.parameters()}, {"params": b.parameters(), "lr": 0.01}], lr=0.1)
    ratios = lr_ratios(opt)
    for g in opt.param_groups:
        g["lr"] = 0.0  # a warmup from 0
    BatchSizeSchedule(base=32, stages=((0, 64),)).apply_to(opt, {"lr": 0.1}, ratios=ratios)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.02])


def test_apply_to_with_a_user_lr_scheduler_co_scales_its_base() -> None:
    import torch
    import torch.nn as nn

    from batchlab.batchsize import BatchSizeSchedule

    m = nn.Linear(4, 2)
    opt = torch.optim.AdamW([{"params": [m.weight], "lr": 1e-3}, {"params": [m.bias], "lr": 5e-4}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))  # linear warmup
    s = BatchSizeSchedule(32, stages=[(64, 64)])
    base = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
    lrs = []
    for _ in range(4):
        s.apply_to(opt, base, scheduler=sched)  # every step, as in a user's loop
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
        s.step(32)
    # the warmup goes on (0.1, 0.2, then 0.3, 0.4 of the base); from 64 examples on the base is sqrt(2) x 1e-3,
    # and the bias group keeps half the weight group's LR
    root2 = 2 ** 0.5
    want = [[1e-4, 5e-5], [2e-4, 1e-4], [3e-4 * root2, 1.5e-4 * root2], [4e-4 * root2, 2e-4 * root2]]
    assert all(a == pytest.approx(b) for a, b in zip(lrs, want))
    assert sched.base_lrs == pytest.approx([1e-3 * root2, 5e-4 * root2])
    assert opt.param_groups[0]["betas"][1] == pytest.approx(0.999 ** 2)  # Adam's default rule: half-life kept


def _two_group_adamw(model, lr):  # type: ignore[no-untyped-def]
    """A head with its own LR (10x) and its own beta2, as a user's optimizer factory writes it."""
    params = list(model.parameters())
    return torch.optim.AdamW([{"params": params[:-2], "betas": (0.9, 0.99)},
                              {"params": params[-2:], "lr": 10 * lr, "betas": (0.9, 0.95)}], lr=lr)


def test_fit_co_scales_each_parameter_groups_own_betas():
    # each group's beta2 keeps its own half-life in examples (it used to get the first group's, 0.99**k)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    task = Task.from_torch("two-groups", lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                                                    torch.nn.Linear(8, 2)),
                           data, data, optimizer=_two_group_adamw, lr=1e-3, batch_size=16)
    seen = []

    class Groups(Callback):
        def on_before_step(self, ctx):  # type: ignore[no-untyped-def]
            seen.append((ctx.batch_size, [(g["lr"], g["betas"][1]) for g in ctx.optimizer.param_groups]))

    cfg = BatchSizeSchedule(16, stages=((64, 32),)).apply(TrainConfig(lr=1e-3, max_examples=192, eval_train=False))
    assert fit(task, cfg, callbacks=[Groups()]).ok
    at16 = [g for b, g in seen if b == 16][0]
    at32 = [g for b, g in seen if b == 32][0]
    assert [b2 for _, b2 in at16] == pytest.approx([0.99, 0.95])
    assert [b2 for _, b2 in at32] == pytest.approx([0.99**2, 0.95**2])
    assert at32[1][0] / at32[0][0] == pytest.approx(10.0)  # the head's LR ratio stays


def test_apply_to_with_one_mapping_per_group_keeps_each_groups_betas() -> None:
    from batchlab.train import group_hparams

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW([{"params": a.parameters(), "betas": (0.9, 0.99)},
                             {"params": b.parameters(), "lr": 1e-4, "betas": (0.8, 0.95)}], lr=1e-3)
    base = group_hparams(opt)
    hp = BatchSizeSchedule(base=32, stages=((0, 128),)).apply_to(opt, base)
    assert hp["lr"] == pytest.approx(2e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3, 2e-4])
    assert [g["betas"] for g in opt.param_groups] == [pytest.approx((0.9, 0.99**4)), pytest.approx((0.8, 0.95**4))]


def test_per_group_apply_to_keeps_a_frozen_group_at_zero_and_one_mapping_refuses_to_unfreeze_it() -> None:
    from batchlab.train import group_hparams

    w, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [w]}, {"params": [b], "lr": 0.0}], lr=1e-3)
    BatchSizeSchedule(16, stages=((0, 64),)).apply_to(opt, group_hparams(opt))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3, 0.0])
    frozen_first = torch.optim.AdamW([{"params": [w], "lr": 0.0}, {"params": [b]}], lr=1e-3)
    with pytest.raises(ValueError, match="the first parameter group's LR is 0 and another's is not"):
        BatchSizeSchedule(16, stages=((0, 64),)).apply_to(frozen_first, {"lr": 1e-3})
    assert [g["lr"] for g in frozen_first.param_groups] == [0.0, 1e-3]


def test_a_one_cycle_scheduler_is_refused_rather_than_co_scaled_wrong() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([w], lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=20)
    with pytest.raises(TypeError, match="OneCycleLR computes its LR from max_lr"):
        BatchSizeSchedule(16, stages=((0, 64),)).apply_to(opt, {"lr": 1e-3}, scheduler=sched)


def test_from_critical_batch_takes_the_rule_the_branches_ran_with() -> None:
    from batchlab.batchsize.critical import CriticalBatchResult, CriticalPoint

    pt = CriticalPoint(examples=100, step=10, val_loss=1.0, batches=[16, 32], losses=[[1.0], [1.0]],
                       mean_losses=[1.0, 1.0], critical_batch=32, critical_low=32, critical_high=32,
                       base_loss_std=float("nan"), noise=0.0, b_simple=10.0, ratio=3.2, capped=False)
    r = CriticalBatchResult(task="t", batch_size=16, optimizer="adamw", rule="sqrt", hparams={"lr": 1e-3},
                            tolerance=0.1, branch_examples=64, factors=[1, 2], seeds=[0], budget_examples=1000,
                            points=[pt])
    assert BatchSizeSchedule.from_critical_batch(r, 16).rule == "sqrt"
    assert BatchSizeSchedule.from_critical_batch(r, 16, rule="none").rule == "none"
