"""Critical batch by branching (Merrill et al. 2025) and the optimizer-aware co-scaling rules.

The known-answer problem: linear regression y = x.theta* + noise with x ~ N(0, I_d) and the loss
0.5 (x.theta - y)^2 (Hessian I). At a parameter error delta the per-example gradient covariance is
Sigma = delta delta^T + (|delta|^2 + sigma^2) I, so B_simple = tr(Sigma)/|G|^2 = 1 + d + d sigma^2/|delta|^2,
and for plain SGD the expected squared error follows exactly

    E|delta'|^2 = |delta|^2 ((1 - lr)^2 + lr^2 B_simple(delta) / B)

(one step at batch B). The expected loss of every branch, and so the critical batch, follows from
B_simple alone. With the base LR set to McCandlish et al.'s optimum at the base batch,
lr = 1 / (1 + B_noise / B_0) (B_noise = B_simple here, since H = I), and a tolerance of half the
base branch's progress, the critical batch is B_simple's power of two (E = E_min (1 + B/B_noise)).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from batchlab import Task
from batchlab.batchsize.critical import CriticalBatchResult, critical_batch, critical_from_losses
from batchlab.batchsize.schedule import BatchSizeSchedule
from batchlab.data.arrays import ArrayDataset
from batchlab.train import TrainConfig, fit, make_optimizer, optimizer_hparams, scale_hparams, scale_lr, set_hparams

D = 8


def _linear() -> torch.nn.Module:
    m = torch.nn.Linear(D, 1, bias=False)
    torch.nn.init.zeros_(m.weight)  # start at theta = 0: |delta| = |theta*| = 1
    return m


def _half_mse(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return 0.5 * ((out.squeeze(-1) - batch[1]) ** 2).mean()


def linreg_task(sigma2: float, lr: float, batch: int, n: int = 16384, n_val: int = 8192) -> Task:
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(D, generator=g)
    theta /= theta.norm()

    def sample(count: int, seed: int) -> ArrayDataset:
        gg = torch.Generator().manual_seed(seed)
        x = torch.randn(count, D, generator=gg)
        return ArrayDataset(x, x @ theta + math.sqrt(sigma2) * torch.randn(count, generator=gg))

    return Task.from_torch("linreg", _linear, sample(n, 1), sample(n_val, 2), loss=_half_mse, metric="loss",
                           optimizer="sgd", lr=lr, batch_size=batch, epochs=1)


def expected_loss(delta2: float, sigma2: float, lr: float, batch: int, examples: int) -> float:
    """The exact expected population loss after ``examples // batch`` SGD steps (see the module docstring)."""
    for _ in range(examples // batch):
        b_simple = 1 + D + D * sigma2 / delta2
        delta2 = delta2 * ((1 - lr) ** 2 + lr * lr * b_simple / batch)
    return 0.5 * (delta2 + sigma2)


@pytest.mark.parametrize("sigma2", [1.0, 4.0])
def test_branches_find_the_critical_batch_that_b_simple_predicts(sigma2):
    b0, factors, examples, tol = 2, (1, 2, 4, 8, 16, 32), 64, 0.5
    b_simple = 1 + D + D * sigma2  # at theta = 0: 17 and 41
    lr0 = 1 / (1 + b_simple / b0)
    batches = [k * b0 for k in factors]
    start = 0.5 * (1 + sigma2)
    analytic = [expected_loss(1.0, sigma2, lr0 * k, k * b0, examples) for k in factors]
    # the known answer: at half the progress, B_simple's power of two (17 -> 16, 41 -> 32) ...
    assert critical_from_losses(batches, analytic, start, tol)[0] == 2 ** int(math.log2(b_simple))
    # ... which sits near a boundary, so the measurement (8 seeds) must land in the analytic answer's
    # bracket for tolerances 0.4..0.6: [8, 16] and [16, 32]
    low = critical_from_losses(batches, analytic, start, tol - 0.1)[0]
    high = critical_from_losses(batches, analytic, start, tol + 0.1)[0]
    assert (low, high) == ((8, 16) if sigma2 == 1.0 else (16, 32))

    r = critical_batch(linreg_task(sigma2, lr0, b0), checkpoints=(0.0,), factors=factors, branch_examples=examples,
                       seeds=8, tolerance=tol, gns_groups=64)
    p = r.points[0]
    assert low <= p.critical_batch <= high, (p.mean_losses, analytic)
    assert p.critical_low <= p.critical_batch <= p.critical_high
    assert 0.5 <= p.critical_batch / p.b_simple <= 2 and p.ratio == p.critical_batch / p.b_simple
    assert abs(p.b_simple - b_simple) / b_simple < 0.25, p.b_simple
    # each branch's loss decrease follows the exact expectation (the finite validation set shifts
    # every loss by about the same offset, so decreases are compared; 8 seeds: within 0.05)
    for got, want in zip(p.mean_losses[:4], analytic[:4]):
        assert p.val_loss - got == pytest.approx(start - want, abs=0.05)
    assert p.mean_losses[-1] > p.val_loss  # lr x 32 overshoots: the loss rises


def test_critical_batch_over_training_json_and_plot(tmp_path, toy_task, capsys):
    r = critical_batch(toy_task, batch_size=4, checkpoints=(0.0, 0.5), factors=(1, 2, 4), branch_examples=32,
                       seeds=2, gns_groups=2, budget_examples=128, progress=True)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[critical-batch]")]
    assert len(lines) == 2 and all("B_simple" in ln for ln in lines)  # one progress line per checkpoint
    assert f"critical {'>=' if r.points[1].capped else ''}{r.points[1].critical_batch} " in lines[1]
    assert [p.examples for p in r.points] == [0, 64]
    assert r.points[1].step == 16  # 64 examples at batch 4
    assert r.examples_processed > 64 + 2 * 3 * 2 * 32
    for p in r.points:
        assert p.batches == [4, 8, 16] and len(p.losses) == 3 and all(len(row) == 2 for row in p.losses)
        assert p.critical_batch in p.batches and p.critical_low <= p.critical_high
    back = CriticalBatchResult.from_dict(json.loads(r.to_json()))
    assert back == r
    fig = r.plot()
    fig.savefig(tmp_path / "crit.png")
    assert (tmp_path / "crit.png").stat().st_size > 1000
    assert "critical batch" in r.table() and r.table(markdown=True).startswith("| examples")


def test_branches_start_from_the_checkpoint_model_and_optimizer_state(toy_task):
    """Full-batch Adam (every step sees the whole training set, so data order does not matter):
    a branch from the checkpoint with its optimizer state continues the run exactly; with a fresh
    optimizer (no Adam moments) it does not."""
    import copy

    from batchlab.batchsize.critical import _Checkpointer, _ResumeOptimizer

    n = toy_task.n_train
    cfg = TrainConfig(batch_size=n, lr=0.05, optimizer="adam", max_examples=4 * n, seed=3, eval_train=False)
    straight = fit(toy_task, cfg)
    ckpt = _Checkpointer([2 * n])
    fit(toy_task, cfg, callbacks=[ckpt])
    saved = ckpt.saved[0]
    assert (saved["examples"], saved["step"]) == (2 * n, 2)
    hp = {"lr": 0.05, "betas": (0.9, 0.999), "eps": 1e-8}
    resumed = fit(toy_task, cfg.replace(max_examples=2 * n), model=copy.deepcopy(saved["model"]),
                  callbacks=[_ResumeOptimizer(saved["optimizer"], hp)])
    fresh = fit(toy_task, cfg.replace(max_examples=2 * n), model=copy.deepcopy(saved["model"]))
    assert resumed.final["val_loss"] == pytest.approx(straight.final["val_loss"], rel=1e-5, abs=1e-6)
    assert abs(fresh.final["val_loss"] - straight.final["val_loss"]) > 1e-3


def test_critical_from_losses_rule():
    # start 2.0, base branch reaches 1.0: tolerance 0.2 allows loss <= 1.2
    assert critical_from_losses([8, 16, 32, 64], [1.0, 1.1, 1.19, 1.5], 2.0, 0.2) == (32, False)
    assert critical_from_losses([8, 16, 32], [1.0, 1.3, 1.0], 2.0, 0.2) == (8, False)  # stops at the first failure
    assert critical_from_losses([8, 16], [1.0, 1.0], 2.0, 0.2) == (16, True)  # capped: a lower bound
    assert critical_from_losses([8, 16], [1.0, math.nan], 2.0, 0.2) == (8, False)
    # a plateau: the base branch barely moves (0.001), so 20% of its progress is below the seed noise;
    # the noise floor lets a batch within the noise of the base branch pass
    assert critical_from_losses([8, 16, 32], [0.999, 1.0005, 1.01], 1.0, 0.2) == (8, False)
    assert critical_from_losses([8, 16, 32], [0.999, 1.0005, 1.01], 1.0, 0.2, noise=0.002) == (16, False)
    with pytest.raises(ValueError, match="equal length"):
        critical_from_losses([8, 16], [1.0], 2.0, 0.2)


# ---------------------------------------------------------------------------- co-scaling rules
def test_scale_hparams_sgd_linear_and_sqrt():
    hp = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    assert scale_hparams("momentum", hp, 128, 512) == {"lr": pytest.approx(0.4), "momentum": 0.9, "weight_decay": 5e-4}
    assert scale_hparams("sgd", hp, 128, 32, "sqrt")["lr"] == pytest.approx(0.05)
    assert scale_hparams("sgd", hp, 128, 512, "none") == hp
    assert hp == {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}  # input untouched
    # scale_lr is the LR part of the same rules
    for rule in ("linear", "sqrt", "none"):
        assert scale_lr(0.1, 16, 64, rule) == scale_hparams(None, {"lr": 0.1}, 16, 64, rule)["lr"]


@pytest.mark.parametrize("k", [2, 4, 0.25])
def test_adam_sde_rule_matches_malladi(k):
    """Malladi et al. 2022: batch x k -> lr x sqrt(k), (1 - beta) x k, eps / sqrt(k)."""
    hp = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
    frm = 64
    to = int(frm * k)
    out = scale_hparams("adamw", hp, frm, to, "adam-sde")
    assert out["lr"] == pytest.approx(1e-3 * math.sqrt(k), rel=1e-12)
    assert 1 - out["betas"][0] == pytest.approx(0.1 * k, rel=1e-12)
    assert 1 - out["betas"][1] == pytest.approx(0.001 * k, rel=1e-9)
    assert out["eps"] == pytest.approx(1e-8 / math.sqrt(k), rel=1e-12)
    assert out["weight_decay"] == 0.1


def test_adam_sde_clips_beta_at_zero():
    out = scale_hparams("adam", {"lr": 1e-3, "betas": (0.9, 0.999)}, 8, 8 * 16, "adam-sde")
    assert out["betas"][0] == 0.0  # 0.1 x 16 = 1.6 > 1: clipped
    assert 1 - out["betas"][1] == pytest.approx(0.016)


@pytest.mark.parametrize("k", [2, 8, 0.5])
def test_adam_halflife_rule_matches_marek(k):
    """Marek et al. 2025: beta2' = beta2 ** (B'/B), so beta2 per example (its half-life in
    examples, log(0.5) / (log(beta2) / B)) is unchanged; LR x sqrt(k); beta1 and eps unchanged."""
    hp = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8}
    frm = 32
    to = int(frm * k)
    out = scale_hparams("adam", hp, frm, to, "adam-halflife")
    assert out["betas"][1] == pytest.approx(0.95 ** k, rel=1e-12)
    half_life = lambda beta2, b: math.log(0.5) / math.log(beta2) * b  # noqa: E731
    assert half_life(out["betas"][1], to) == pytest.approx(half_life(0.95, frm), rel=1e-9)
    assert out["betas"][0] == 0.9 and out["eps"] == 1e-8 and out["lr"] == pytest.approx(3e-4 * math.sqrt(k))


def test_scale_hparams_defaults_and_torch_optimizer():
    model = torch.nn.Linear(2, 1)
    adam = make_optimizer("adamw", model.parameters(), 1e-3)
    hp = optimizer_hparams(adam)
    assert hp == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
    out = scale_hparams(adam, hp, 16, 64)  # AdamW's default rule: fixed beta2 half-life
    assert out == scale_hparams("adamw", hp, 16, 64, "adam-halflife")
    set_hparams(adam, out)
    assert adam.param_groups[0]["betas"] == out["betas"] and adam.param_groups[0]["lr"] == out["lr"]
    sgd = make_optimizer("nesterov", model.parameters(), 0.1)
    assert scale_hparams(sgd, {"lr": 0.1}, 16, 64)["lr"] == pytest.approx(0.4)  # linear for SGD


@pytest.mark.parametrize("args, message", [
    (("sgd", {"lr": 0.1}, 16, 64, "cubic"), "rule must be one of linear, sqrt, none, adam-sde, adam-halflife; got 'cubic'"),
    (("sgd", {"lr": 0.1}, 16, 64, "adam-sde"), "rule 'adam-sde' is for Adam.*got optimizer 'sgd'"),
    (("rmsprop", {"lr": 0.1}, 16, 64), "optimizer must be one of .*; got 'rmsprop'"),
    (("sgd", {"lr": 0.1}, 0, 64), "from_batch must be a positive integer, got 0"),
    (("sgd", {"lr": 0.1}, 16, 2.5), "to_batch must be a positive integer, got 2.5"),
    (("sgd", {"momentum": 0.9}, 16, 64), "hparams must be a mapping with an 'lr' entry"),
    (("sgd", {"lr": -1.0}, 16, 64), "lr must be a positive finite number, got -1.0"),
    (("adam", {"lr": 1e-3, "betas": (0.9, 1.0)}, 16, 64), r"betas must be a pair of numbers in \[0, 1\)"),
    (("adam", {"lr": 1e-3, "eps": math.nan}, 16, 64), "eps must be a finite number >= 0, got nan"),
])
def test_scale_hparams_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        scale_hparams(*args)


@pytest.mark.parametrize("kw, message", [
    ({"checkpoints": (0.5, 0.25)}, "checkpoints must be increasing fractions of the budget in \\[0, 1\\)"),
    ({"checkpoints": (1.0,)}, "checkpoints must be increasing fractions"),
    ({"factors": (2, 4)}, "factors must be increasing integers starting at 1"),
    ({"factors": (1, 0)}, "factors must be a non-empty sequence of integers >= 1"),
    ({"tolerance": 1.5}, r"tolerance must be a number in \[0, 1\)"),
    ({"batch_size": 1000}, r"batch_size must be an integer in \[1, 256\]"),
    ({"branch_examples": 4}, "branch_examples must be an integer >= the largest branch batch"),
    ({"optimizer": "lbfgs"}, "optimizer must not be 'lbfgs'"),
    ({"rule": "adam-sde"}, "rule 'adam-sde' is for Adam"),
    ({"seeds": 0}, "seeds must be a positive count"),
    ({"budget_examples": 3}, r"budget_examples must be an integer >= the batch size 4 \(one step of the base run"),
])
def test_critical_batch_bad_inputs(toy_task, kw, message):
    args = dict(batch_size=4, checkpoints=(0.0,), factors=(1, 2), branch_examples=16, seeds=1, gns_groups=1)
    args.update(kw)
    with pytest.raises(ValueError, match=message):
        critical_batch(toy_task, **args)


def test_cli_critical_batch(cli, tmp_path):
    r = cli("critical-batch", "--task", "digits-mlp", "--batch-size", "8", "--checkpoints", "0,0.02",
            "--factors", "1,2,4", "--seeds", "2", "--branch-examples", "64", "--budget", "2",
            "--gns-groups", "2", "--out", str(tmp_path / "out"), "--threads", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "critical batch" in r.stdout and "B_simple" in r.stdout and "schedule" in r.stdout
    data = json.loads((tmp_path / "out" / "critical_batch.json").read_text())
    # 2% of 2 epochs of 1438 examples is 57.5: the first checkpoint past it, in steps of 8
    assert [p["examples"] for p in data["points"]] == [0, 64]
    assert (tmp_path / "out" / "critical_batch.png").stat().st_size > 1000
    # the saved JSON loads back (its extra "schedule" entry ignored) and gives the schedule the command printed
    back = CriticalBatchResult.from_dict(data)
    assert [p.examples for p in back.points] == [0, 64]
    for measured in (back, data):
        sched = BatchSizeSchedule.from_critical_batch(measured, 8, rule=data["rule"], max_batch=1438)
        assert [list(p) for p in sched.stages] == data["schedule"]["stages"]
    # the same command again: the finished measurement is shown, nothing run, nothing overwritten
    before = (tmp_path / "out" / "critical_batch.json").read_bytes()
    again = cli("critical-batch", "--task", "digits-mlp", "--batch-size", "8", "--checkpoints", "0,0.02",
                "--factors", "1,2,4", "--seeds", "2", "--branch-examples", "64", "--budget", "2",
                "--gns-groups", "2", "--out", str(tmp_path / "out"), "--threads", "1", "--quiet")
    assert again.returncode == 0 and "nothing was run" in again.stdout and "critical batch" in again.stdout
    assert (tmp_path / "out" / "critical_batch.json").read_bytes() == before
    bad = cli("critical-batch", "--task", "digits-mlp", "--factors", "2,4", "--quiet")
    assert bad.returncode == 2 and "factors must be increasing integers starting at 1" in bad.stderr


def test_an_interrupted_measurement_resumes_from_its_store(tmp_path, toy_task, monkeypatch):
    import batchlab.batchsize.critical as C
    from batchlab.store import Store

    kw = dict(batch_size=4, checkpoints=(0.0, 0.5), factors=(1, 2), branch_examples=16, seeds=2, gns_groups=2,
              budget_examples=64, store=tmp_path)
    real, calls = C._branch, []

    def stop_after_five(*a, **k):
        if len(calls) == 5:
            raise KeyboardInterrupt  # the user's Ctrl-C in the sixth branch
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(C, "_branch", stop_after_five)
    with pytest.raises(KeyboardInterrupt):
        critical_batch(toy_task, **kw)
    assert len(Store(tmp_path / "batchlab.db")) == 5  # the finished branches are kept
    counted = []
    monkeypatch.setattr(C, "_branch", lambda *a, **k: counted.append(1) or real(*a, **k))
    resumed = critical_batch(toy_task, **kw)
    assert len(counted) == 3  # only the 8 - 5 missing branches ran
    assert any("resumed: 5 of 8 branches were loaded from the store" in n for n in resumed.notes)
    whole = critical_batch(toy_task, **{**kw, "store": None})
    assert [p.losses for p in resumed.points] == [p.losses for p in whole.points]


class _NanAfter(torch.nn.Module):
    """A model whose outputs become NaN after ``after`` training forwards (a user's model going bad)."""

    def __init__(self, after: int, batch: int | None = None) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 3)  # the toy task's 8 features, 3 classes
        self.after, self.batch, self.calls = after, batch, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        out = self.lin(x.flatten(1))
        if self.batch is not None and x.shape[0] == self.batch and self.training:
            raise RuntimeError(f"this model cannot take batch {self.batch}")
        return out * math.nan if self.calls > self.after else out


def test_failed_branches_are_named_and_a_failed_base_gives_no_critical_batch(toy_task):
    import dataclasses

    # branches at batch 16 raise: counted as not within tolerance, and named
    t = dataclasses.replace(toy_task, model_fn=lambda **kw: _NanAfter(10**9, batch=16), model_kwargs=False)
    r = critical_batch(t, batch_size=4, checkpoints=(0.0,), factors=(1, 2, 4), branch_examples=32, seeds=2,
                       gns_groups=2, budget_examples=64)
    p = r.points[0]
    assert p.defined and p.critical_batch <= 8 and len(p.failed) == 2 and "batch 16 seed 0: failed" in p.failed[0]
    assert any("2 branch(es) failed (counted as not within tolerance)" in n for n in r.notes)
    # every branch goes NaN: the base branch too, so there is nothing to compare with
    t = dataclasses.replace(toy_task, model_fn=lambda **kw: _NanAfter(1), model_kwargs=False)
    r = critical_batch(t, batch_size=4, checkpoints=(0.0,), factors=(1, 2), branch_examples=16, seeds=2,
                       gns_groups=2, budget_examples=64)
    p = r.points[0]
    assert not p.defined and "none (base branch failed)" in r.table()
    assert BatchSizeSchedule.from_critical_batch(r, 4).stages == ()


def test_a_model_that_fails_while_b_simple_is_measured_leaves_the_branches_standing(toy_task, monkeypatch):
    # an exception of the user's model in the B_simple step crashed the command with a traceback,
    # every rerun again, though every branch was stored
    import batchlab.batchsize.critical as crit

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("the model failed on this batch")

    monkeypatch.setattr(crit, "_b_simple_at", broken)
    r = critical_batch(toy_task, batch_size=4, checkpoints=(0.0,), factors=(1, 2), branch_examples=16, seeds=2,
                       gns_groups=2, budget_examples=64)
    p = r.points[0]
    assert p.defined and math.isnan(p.b_simple)
    assert any("B_simple could not be measured (RuntimeError: the model failed on this batch)" in n for n in r.notes)
    assert "critical" in r.table()


def test_quick_mode_for_suggest(toy_task):
    """The cheap mode suggest calls: checkpoints at 0 and 25% of the budget, factors 1-8, 2 seeds;
    explicit arguments win over it."""
    r = critical_batch(toy_task, batch_size=4, quick=True)
    budget = round(toy_task.epochs * toy_task.n_train)
    assert r.budget_examples == budget and [p.examples for p in r.points] == [0, budget // 4]
    assert r.factors == [1, 2, 4, 8] and r.seeds == [0, 1] and r.branch_examples == 8 * 32
    assert r.examples_processed == budget // 4 + 2 * 4 * 2 * 256 + 2 * 8 * 4 * 32  # base + branches + B_simple
    r2 = critical_batch(toy_task, batch_size=4, quick=True, factors=(1, 2), checkpoints=(0.0,), gns_groups=2)
    assert r2.factors == [1, 2] and len(r2.points) == 1


def test_factors_past_the_training_set_are_dropped_with_a_note(toy_task):
    r = critical_batch(toy_task, batch_size=64, factors=[1, 2, 8], checkpoints=[0.0], seeds=1, budget_examples=128,
                       branch_examples=128, gns_groups=2)
    assert r.factors == [1, 2]
    assert len(r.notes) == 1 and "factors 8 left out" in r.notes[0] and "256 examples" in r.notes[0]
    assert CriticalBatchResult.from_dict(r.to_dict()).notes == r.notes


def test_branches_co_scale_each_parameter_groups_own_betas() -> None:
    # a head with its own beta2: at factor k its branch trains with 0.95**k, not the first group's 0.99**k
    seen: list[tuple[float, float]] = []

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):  # type: ignore[no-untyped-def]
            seen.append(tuple(g["betas"][1] for g in self.param_groups))
            return super().step(closure)

    def two_groups(model, lr):  # type: ignore[no-untyped-def]
        p = list(model.parameters())
        return Recording([{"params": p[:1], "betas": (0.9, 0.99)}, {"params": p[1:], "lr": 10 * lr,
                                                                       "betas": (0.9, 0.95)}], lr=lr)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, x @ torch.ones(4))
    task = Task.from_torch("two-groups", lambda: torch.nn.Linear(4, 1), data, data, loss=_half_mse, metric="loss",
                           optimizer=two_groups, lr=1e-3, batch_size=8)
    r = critical_batch(task, batch_size=8, budget_examples=64, checkpoints=[0.0], factors=[1, 2], seeds=1,
                       branch_examples=32, gns_groups=2)
    assert r.points
    for want in ((0.99, 0.95), (0.99**2, 0.95**2)):  # the base branch, and the branch at twice the batch
        assert any(s == pytest.approx(want, rel=1e-12) for s in seen), want
    assert not any(s[1] == pytest.approx(0.99**2, rel=1e-12) for s in seen)  # the head never gets the first's
