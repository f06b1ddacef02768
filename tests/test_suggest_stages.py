"""suggest, second edition: batch arithmetic, the objective, successive halving on known curves, the
confirmation's verdicts, precise-BN scoring, RNG untouched, a fake runner, and the three outside-style
models through the API."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from batchlab.batchsize.batches import BatchRange, Split, budget_in_examples, pow2_floor, powers_of_two
from batchlab.batchsize.halving import RungTrial, plan_rungs, successive_halving
from batchlab.batchsize.objective import Objective, SeedStats, se_of_difference
from conftest import make_toy_task

sys.path.insert(0, str(Path(__file__).parent / "byo"))

ACC = Objective("epochs", 1000, None, "accuracy", True)
LOSS = Objective("epochs", 1000, None, "loss", False)


# ----------------------------------------------------------------------------- batch arithmetic
def test_batch_arithmetic() -> None:
    assert [pow2_floor(x) for x in (0, 1, 2, 3, 8, 9.9, math.nan)] == [1, 1, 2, 2, 8, 8, 1]
    assert powers_of_two(3, 40) == [4, 8, 16, 32]
    r, note = BatchRange(2, 512).capped(100)
    assert (r.low, r.high) == (2, 100) and "training-set size" in note and r.sizes() == [2, 4, 8, 16, 32, 64]
    r, note = BatchRange(2, 64).capped(1000, memory_max=16)
    assert r.high == 16 and "memory maximum" in note
    assert BatchRange(2, 64).capped(1000, memory_max=16, accumulate=True)[0].high == 64
    assert Split.of(64, 16) == Split(16, 4) and Split.of(8, 16) == Split(8, 1) and Split.of(64, 24).micro == 16
    assert budget_in_examples(100, epochs=2.5) == 250 and budget_in_examples(100, examples=7) == 7
    with pytest.raises(ValueError, match="low must be <= high, got low=8 > high=4"):
        BatchRange(8, 4)
    with pytest.raises(ValueError, match="high must be a positive integer, got 0"):
        BatchRange(1, 0)
    with pytest.raises(ValueError, match=r"low must be <= the training-set size \(5 examples\), got 8"):
        BatchRange(8, 16).check_data(5)
    with pytest.raises(ValueError, match="not both"):
        budget_in_examples(10, epochs=1, examples=10)
    with pytest.raises(ValueError, match="not a multiple of the micro-batch 16"):
        Split.of(40, 16)


# ----------------------------------------------------------------------------- objective
def test_objective_keeps_the_metric_direction() -> None:
    assert ACC.better(0.9, 0.8) and not ACC.better(0.8, 0.9) and LOSS.better(1.2, 1.5)
    assert LOSS.best_of({2: 1.5, 8: 1.2, 32: math.nan}) == 8 and ACC.best_of({2: 0.5, 8: 0.7}) == 8
    assert LOSS.gap(1.2, 1.5) == pytest.approx(0.3) and ACC.gap(0.9, 0.8) == pytest.approx(0.1)
    assert "lowest validation loss" in LOSS.describe() and "fastest" in LOSS.describe()
    assert "within 12.5 s" in Objective("time", 10, 12.5, "accuracy", True).describe()
    with pytest.raises(ValueError, match="objective must be one of time, epochs, got 'speed'"):
        Objective("speed", 1, None, "accuracy", True)
    a, b = SeedStats.of([1.0, 3.0]), SeedStats.of([2.0, 2.0])
    assert a.mean == 2.0 and a.se == pytest.approx(1.0) and se_of_difference(a, b) == pytest.approx(1.0)
    # the floor stands in for a one-seed side only: two measured errors are never floored
    assert se_of_difference(SeedStats.of([1.0, 1.1]), SeedStats.of([1.2, 1.3]), floor=2.0) == pytest.approx(0.0707, abs=1e-4)
    assert se_of_difference(SeedStats.of([1.0]), SeedStats.of([1.2, 1.3]), floor=0.3) == pytest.approx(0.3041, abs=1e-4)
    assert not SeedStats.of([1.0, math.nan]).ok


# ----------------------------------------------------------------------------- successive halving
class Curves:
    """Known learning curves: metric(batch, examples) with a per-batch asymptote and speed."""

    def __init__(self, final: dict[int, float], rate: dict[int, float], higher: bool = True, noise: float = 0.0):
        self.final, self.rate, self.higher, self.noise = final, rate, higher, noise
        self.calls: list[tuple[int, float, int, int]] = []

    def metric(self, b: int, examples: float, seed: int) -> float:
        done = 1 - math.exp(-examples * self.rate[b])
        jitter = self.noise * (1 if seed % 2 else -1)
        return (self.final[b] * done if self.higher else 3 - (3 - self.final[b]) * done) + jitter

    def __call__(self, batches: list[int], budget: float, seeds: list[int], rung: int) -> list[RungTrial]:
        out = []
        for b in batches:
            for s in seeds:
                self.calls.append((b, budget, s, rung))
                out.append(RungTrial(batch=b, seed=s, rung=rung, metric=self.metric(b, budget, s), status="ok",
                                     examples=int(budget), seconds=budget / b))
        return out


def test_plan_rungs_fits_the_budget() -> None:
    plan = plan_rungs(8, 10_000, eta=2, seeds_last=2, seeds_early=1)
    assert [c for c, _ in plan] == [8, 4, 2]
    assert [b / plan[0][1] for _, b in plan] == [1, 2, 4]
    cost = sum(c * (2 if k == len(plan) - 1 else 1) * b for k, (c, b) in enumerate(plan))
    assert cost == pytest.approx(10_000)
    assert plan_rungs(4, 100, per_trial_overhead=50) == []


def test_halving_promotes_the_better_half_and_compares_winners_at_the_next_rung() -> None:
    # batch 64 learns slowly but ends best; 4 learns fast and ends worst
    final = {4: 0.70, 8: 0.75, 16: 0.80, 32: 0.85, 64: 0.90}
    rate = {4: 0.02, 8: 0.01, 16: 0.005, 32: 0.003, 64: 0.002}
    c = Curves(final, rate)
    plan = plan_rungs(4, 4000)
    rungs, trials, survivors = successive_halving([8, 16, 32, 64], [b for _, b in plan], c, ACC,
                                                  [[0]] * (len(plan) - 1) + [[0, 1]])
    assert len(rungs) == 2 and rungs[0].tested == [8, 16, 32, 64]
    # the winners of rung 0 are exactly those compared at rung 1, at twice the budget
    assert rungs[0].promoted == rungs[1].tested and len(rungs[1].tested) == 2
    assert rungs[1].budget == pytest.approx(2 * rungs[0].budget)
    top = sorted(rungs[0].tested, key=lambda b: -c.metric(b, rungs[0].budget, 0))[:2]
    assert sorted(rungs[1].tested) == sorted(top)
    assert survivors[0] == max(rungs[1].tested, key=lambda b: c.metric(b, rungs[1].budget, 0))
    assert {t.seed for t in trials if t.rung == 1} == {0, 1}


def test_halving_on_a_loss_picks_the_lowest_and_gives_large_batches_a_bye() -> None:
    final = {4: 2.0, 64: 1.0}
    c = Curves(final, {4: 0.01, 64: 0.01}, higher=False)
    rungs, _, survivors = successive_halving(
        [4, 64], [100, 200, 400], c, LOSS, [[0], [0], [0, 1]], testable=lambda b, budget: budget >= 4 * b,
    )
    assert rungs[0].byes == [64] and rungs[0].tested == [4]  # 100 examples = 1.6 steps at 64: not judged
    assert 64 in rungs[0].promoted and rungs[-1].tested == [4, 64]
    assert survivors[0] == 64  # the lower loss wins; the loss is never negated
    assert all(t[0] != 64 or t[1] >= 400 for t in c.calls)


def test_a_batch_whose_runs_all_failed_gives_its_place_to_a_bye() -> None:
    def run(batches, budget, seeds, rung):
        return [RungTrial(batch=b, seed=s, rung=rung, metric=math.nan if b == 4 else 0.8,
                          status="failed" if b == 4 else "ok", examples=int(budget), seconds=1.0)
                for b in batches for s in seeds]

    rungs, _, survivors = successive_halving([4, 64], [100, 400], run, ACC, [[0], [0, 1]],
                                             testable=lambda b, budget: budget >= 4 * b)
    assert rungs[0].tested == [4] and rungs[0].byes == [64]
    assert rungs[0].promoted == [64]  # the failed 4 is not run again with two seeds
    assert survivors == [64]


# ----------------------------------------------------------------------------- confirm: verdicts
def _confirm(stats: dict[int, tuple[float, float]], baseline: float, objective: Objective = ACC, eps=None,
             measured=None):
    from types import SimpleNamespace

    from batchlab.batchsize.suggest import Prediction, SearchResult, confirm

    rung = {"index": 0, "budget": 100.0, "seeds": [0, 1], "tested": list(stats), "byes": [], "promoted": list(stats),
            "stats": {str(b): {"mean": m, "se": se, "n": 2, "failed": 0, "seconds": 1.0} for b, (m, se) in stats.items()}}
    s = SearchResult(plan=[], unit="examples", rungs=[rung], trials=[], survivors=list(stats), examples=0, seconds=0.0)
    m = SimpleNamespace(baseline=baseline, baseline_kind="the majority-class rate")
    eps = eps or {b: float(b) for b in stats}
    p = Prediction(objective={}, candidates=[{"batch_size": b, "examples_per_sec": e} for b, e in eps.items()],
                   ranked=list(stats), selected=list(stats), speed_samples={b: [v] for b, v in (measured or {}).items()})
    return confirm(s, m, p, objective)


def test_not_separable_prefers_the_fastest() -> None:
    c = _confirm({8: (0.80, 0.02), 32: (0.79, 0.02), 128: (0.70, 0.01)}, baseline=0.1)
    assert c.tied == [8, 32] and c.batch == 32 and c.best == 8 and not c.separable and c.supported
    assert "not separable by more than their seed noise" in c.message and "the fastest of them, 32" in c.message
    c = _confirm({8: (0.80, 0.001), 32: (0.79, 0.001)}, baseline=0.1)
    assert c.batch == 8 and c.separable and "better than 32 by more than the seed noise" in c.message
    # the fastest is judged by the speeds the runs measured where there are any, not the throughput prediction
    c = _confirm({8: (0.80, 0.02), 32: (0.79, 0.02)}, baseline=0.1, measured={"8": 900.0, "32": 500.0})
    assert c.tied == [8, 32] and c.batch == 8
    # one blown-up batch (a diverged seed: se 2.48) does not make the others look tied (a probe's RMSE case)
    c = _confirm({64: (1.248, 0.033), 128: (1.223, 0.0042), 256: (0.9731, 0.023), 512: (4.0, 2.48)}, baseline=2.0,
                 objective=LOSS)
    assert c.best == 256 and c.tied == [256] and c.batch == 256
    # every batch down to one usable seed: no noise estimate, so nothing is separated (the fastest is taken)
    c = _confirm({8: (0.80, math.nan), 32: (0.70, math.nan)}, baseline=0.1)
    assert c.tied == [8, 32] and c.batch == 32 and not c.separable


def test_no_better_than_the_baseline_is_not_supported() -> None:
    c = _confirm({8: (0.52, 0.01), 32: (0.51, 0.01)}, baseline=0.515)
    assert not c.supported and "Recommendation not supported" in c.message and "majority-class" in c.message
    assert "a larger --cost-budget (cost_budget=) lengthens them" in c.message, "says what the user can change"
    c = _confirm({8: (2.1, 0.05), 32: (2.0, 0.05)}, baseline=4.2, objective=LOSS)
    assert c.supported and c.best == 32
    # the recommendation is the fastest of the tied: it is what must beat the baseline, not the best
    c = _confirm({8: (0.283, 0.008), 16: (0.271, 0.037)}, baseline=0.25)
    assert c.batch == 16 and c.best == 8 and not c.supported and "batch 16's validation accuracy 0.271" in c.message


# ----------------------------------------------------------------------------- precise BN scoring
def test_fit_trial_scores_batchnorm_after_precise_bn() -> None:
    from batchlab.batchsize.search import fit_trial
    from batchlab.norm import precise_bn
    from batchlab.train import TrainConfig, evaluate, fit

    task = make_toy_task(n_train=256)
    cfg = TrainConfig(batch_size=128, max_examples=512, lr=0.1, seed=3, eval_train=False)
    d = fit_trial(task, cfg)
    assert d["status"] == "ok" and "metric_stale" in d and d["precise_bn_examples"] == 256
    # the same run by hand: the stale metric is fit's, the scored one is after precise BN
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = task.make_model()
    r = fit(task, cfg, model=model)
    assert d["metric_stale"] == pytest.approx(r.final["val_metric"])
    x = task.train_set.x
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(3))  # iterate_batches' first epoch
    precise_bn(model, [x[perm[i:i + 64]] for i in range(0, 256, 64)], num_batches=4)
    _, want = evaluate(model, task.val_source, task)
    assert d["metric"] == pytest.approx(want)
    assert d["bn_health"] is not None and set(d["bn_health"]) >= {"ok", "problems"}
    assert d["param_groups"] == r.extra["param_groups"] and d["param_groups"][0]["lr"] == 0.1  # the trial's optimizer
    no_bn = fit_trial(task, cfg.replace(norm="layer"))
    assert "metric_stale" not in no_bn


class _NoForward(torch.nn.Module):
    """A BatchNorm model called through the task's forward only (Lightning's ``self.net`` style)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 3))


def test_the_bn_health_of_a_trial_goes_through_the_tasks_forward() -> None:
    from batchlab import Task
    from batchlab.batchsize.search import fit_trial
    from batchlab.train import TrainConfig

    toy = make_toy_task(n_train=128)
    task = Task.from_torch(name="nofwd", model=_NoForward, train=toy.train_set, val=toy.val_set,
                           forward=lambda m, b: m.net(b[0]), optimizer="momentum", lr=0.05, batch_size=16)
    d = fit_trial(task, TrainConfig(batch_size=16, max_examples=64, seed=0, eval_train=False))
    assert d["status"] == "ok" and d["bn_health"] is not None and "ok" in d["bn_health"]


# ----------------------------------------------------------------------------- suggest end to end
FAST = dict(budget_epochs=8, high=64, seeds=(0, 1), objective="epochs")


class FakeRunner:
    """A runner that trains nothing: known curves, and a record of every trial it was given."""

    def __init__(self) -> None:
        self.trials: list = []

    def metric(self, b: int, ex: int, seed: int) -> float:
        return 0.9 * (1 - math.exp(-ex / (40.0 * b ** 0.5))) + 0.001 * seed

    def run(self, trials, store=None, *, kind="", progress=False, retry_failed=False):
        out = []
        for t in trials:
            self.trials.append(t)
            b = t.config.batch_size * t.config.accumulation
            ex = t.config.max_examples
            m = self.metric(b, ex, t.config.seed)
            out.append({"status": "ok", "metric": m, "examples": ex, "time": ex / b * 1e-3, "steps": ex // b})
        return out


def test_suggest_with_a_fake_runner_leaves_the_rng_and_is_bounded(tmp_path) -> None:
    from batchlab.batchsize import Suggestion, suggest

    task = make_toy_task(n_train=512)
    runner = FakeRunner()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    s = suggest(task, runner=runner, store=tmp_path, **FAST)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is untouched
    assert runner.trials and {t.config.seed for t in runner.trials} == {0, 1}
    assert s.status == "ok" and s.batch_size in s.confirm.tied and s.headline.startswith("toy: batch size")
    assert s.total_examples <= s.cost_budget == 8 * 512  # one full run
    # every rung's tested batches are the previous rung's promoted ones (byes included)
    rungs = s.search.rungs
    for a, b in zip(rungs, rungs[1:]):
        assert set(b["tested"]) | set(b["byes"]) == set(a["promoted"])
    again = Suggestion.from_dict(__import__("json").loads(s.to_json()))
    assert again.batch_size == s.batch_size and again.confirm.tied == s.confirm.tied
    page = __import__("batchlab.batchsize.report", fromlist=["x"]).write_suggestion_report(s, tmp_path).read_text()
    assert page.index("Recommendation") < page.index("Candidates: time and quality") < page.index("Evidence: measurements")
    assert "validation accuracy" in page


def test_suggest_builds_a_task_from_torch_and_checks_arguments() -> None:
    from batchlab.batchsize import suggest

    toy = make_toy_task(n_train=256)
    with pytest.raises(ValueError, match="give task=, or model=, train= and val="):
        suggest(model=toy.model_fn)
    with pytest.raises(ValueError, match="task= was given, so lr, model must not be"):
        suggest(toy, model=toy.model_fn, lr=0.1)
    with pytest.raises(ValueError, match="objective must be one of time, epochs, got 'best'"):
        suggest(toy, objective="best")
    with pytest.raises(ValueError, match="time_budget needs objective='time'"):
        suggest(toy, objective="epochs", time_budget=3.0)
    s = suggest(model=lambda: toy.model_fn(norm="layer"), train=toy.train_set, val=toy.val_set, name="nb",
                lr=0.1, batch_size=32, epochs=8, high=64, runner=FakeRunner())
    assert s.task == "nb" and s.objective["kind"] == "time" and s.objective["time_budget"] > 0


# ----------------------------------------------------------------------------- the three outside-style models
@pytest.mark.parametrize(("module", "kwargs"), [
    ("cifar_resnet", dict(n_train=128, n_val=64, num_workers=0, epochs=16)),
    ("char_gpt", dict(n_chars=6000, epochs=2, block_size=16)),
    ("hf_style", dict(n_train=128, n_val=64, epochs=8)),
])
def test_suggest_quick_on_outside_style_models(module, kwargs) -> None:
    import importlib

    from batchlab.batchsize import suggest

    task = importlib.import_module(module).make_task(**kwargs)
    before = torch.random.get_rng_state()
    s = suggest(task, quick=True, high=32, objective="epochs")
    assert torch.equal(torch.random.get_rng_state(), before)
    assert s.status in ("ok", "not supported") and s.batch_size is not None
    assert s.total_examples <= s.cost_budget
    assert f"validation {task.metric_name}" in s.confirm.message or task.metric_name in s.confirm.message
    if task.metric_name == "loss":  # lower is better, never negated
        assert s.objective["higher_is_better"] is False and all(v > 0 for v in s.confirm.means.values())
    if module == "cifar_resnet":
        assert any("metric_stale" in t["extra"] for t in s.search.trials)  # BatchNorm scored after precise BN


def test_critical_batch_is_reported_and_the_warmup_offered_only_when_it_saves_steps() -> None:
    from batchlab.batchsize import suggest

    task = make_toy_task(n_train=512)
    off = suggest(task, runner=FakeRunner(), **FAST)
    assert off.advise.critical is None and "not measured" in off.advise.lines[-1]
    s = suggest(task, runner=FakeRunner(), critical=True, **FAST)
    c = s.advise.critical
    assert c is not None and c["points"] and s.examples_processed["advice"] > 0
    assert "critical batch over training" in s.advise.lines[-1]
    assert c["warmup"] == (c["steps_warmup"] < c["steps_constant"])
    assert ("option: a batch-size warmup" in s.advise.lines[-1]) == c["warmup"]


def test_throughput_on_dict_batches_leaves_the_rng() -> None:
    import hf_style

    from batchlab.batchsize import throughput

    task = hf_style.make_task(n_train=64, n_val=32)
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    r = throughput(task, [4, 16], warmup=1, repeats=1, max_repeats=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert r.status == ["ok", "ok"] and all(t > 0 for t in r.step_time) and r.examples_processed == 2 * 20


def test_the_advice_recommends_what_the_trials_ran_and_offers_adams_half_life_beta2_apart(toy_task) -> None:
    import dataclasses

    from batchlab.batchsize.suggest import _co_scaled

    task = dataclasses.replace(toy_task, optimizer="adamw", lr=1e-3, batch_size=32)
    h = _co_scaled(task, 128)
    # the recommendation: the LR by the trials' rule (sqrt), betas as the trials kept them
    assert h["rule"] == "sqrt" and h["from"]["betas"] == (0.9, 0.999)
    assert h["to"]["lr"] == pytest.approx(2e-3) and h["to"]["betas"] == (0.9, 0.999)
    alt = h["alternative"]  # not measured: the same half-life in examples
    assert alt["rule"] == "adam-halflife" and alt["betas"][1] == pytest.approx(0.999**4)
    own = dataclasses.replace(task, optimizer_fn=lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95)))
    assert _co_scaled(own, 64)["alternative"]["betas"][1] == pytest.approx(0.95**2)  # the user's own betas
    sgd = _co_scaled(dataclasses.replace(task, optimizer="momentum", lr=0.1), 64)
    assert sgd["rule"] == "linear" and sgd["to"]["lr"] == pytest.approx(0.2) and "betas" not in sgd["to"]
    assert "alternative" not in sgd


class CurveRunner(FakeRunner):
    """Metrics from ``curve(batch, examples)`` plus a little seed noise; trains nothing."""

    def __init__(self, curve) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.curve = curve

    def metric(self, b: int, ex: int, seed: int) -> float:
        return self.curve(b, ex) + 0.002 * (seed % 2)


def test_the_climb_recommends_a_faster_batch_tied_with_the_winner_and_stays_within_the_cost(tmp_path) -> None:
    from batchlab.batchsize import suggest

    # 32 looks poor on the short first rung and is dropped there, but ties 16 at the last rung's budget;
    # 64 is clearly worse: the climb should go 16 -> 32 and stop at 64
    def curve(b: int, ex: int) -> float:
        return {16: 0.80, 32: 0.80 if ex > 700 else 0.60, 64: 0.55}.get(b, 0.70)

    task = make_toy_task(n_train=2048)
    s = suggest(task, runner=CurveRunner(curve), store=tmp_path / "a", **{**FAST, "high": 256})
    last = next(r for r in reversed(s.search.rungs) if r["tested"])
    assert 32 not in last["tested"] and 16 in last["tested"]  # the halving left 32 behind
    assert last["climbed"] == [32, 64] and s.batch_size == 32 and s.confirm.tied == [16, 32]
    assert any("climb: batch 32" in n and "so the faster 32 is recommended" in n for n in s.search.notes)
    assert any("climb: batch 64" in n and "32 stays recommended" in n for n in s.search.notes)
    assert s.total_examples <= s.cost_budget


def test_the_rungs_use_the_speeds_their_runs_measured(toy_task) -> None:
    """In "time" mode a rung's batches get equal time at the speeds their earlier runs took (first step
    left out), the fastest of them the examples the cost plan gave the rung."""
    from types import SimpleNamespace

    from batchlab.batchsize.suggest import Prediction, _examples_at, _rung_runner

    class Timed(FakeRunner):
        def run(self, trials, store=None, *, kind="", progress=False, retry_failed=False):
            out = []
            for t in trials:
                self.trials.append(t)
                b, ex = t.config.batch_size, t.config.max_examples
                steps = ex // b
                # batch 8 really runs at 400 examples/s after a 0.5 s first step; batch 16 at 1000/s
                speed = 400.0 if b == 8 else 1000.0
                first = 0.5 + b / speed
                out.append({"status": "ok", "metric": 0.5, "examples": steps * b, "time": first + (steps - 1) * b / speed,
                            "steps": steps, "first_step_time": first})
            return out

    # the throughput measurement said 8 and 16 both run at 800 examples/s
    p = Prediction(objective={}, candidates=[{"batch_size": b, "examples_per_sec": 800.0} for b in (8, 16)],
                   ranked=[8, 16], selected=[8, 16])
    obj = Objective("time", 10_000, 10.0, "accuracy", True)
    m = SimpleNamespace(micro_max=None)
    runner = Timed()
    run = _rung_runner(toy_task, p, m, obj, device="cpu", store=None, runner=None, backend=runner, trial_fn=None,
                       max_speed=800.0)
    run([8, 16], 1.0, [0], 0)
    assert [t.config.max_examples for t in runner.trials] == [800, 800]  # first rung: the prediction's speed
    assert p.measured_speed["8"] == pytest.approx(400.0) and p.measured_speed["16"] == pytest.approx(1000.0)
    runner.trials.clear()
    run([8, 16], 1.0, [0], 1)
    # next rung: the fastest (16) gets the planned 800 examples (the cost plan), 8 what it runs in the same time
    assert [t.config.max_examples for t in runner.trials] == [320, 800]
    # every measured speed ten times below the prediction (data loading): the same examples, more seconds,
    # not a tenth of the planned examples
    p.speed_samples.update({"8": [40.0], "16": [80.0]})
    assert _examples_at(p, obj, 16, 1.0, 800.0, [8, 16]) == 800 and _examples_at(p, obj, 8, 1.0, 800.0, [8, 16]) == 400
    # a batch not run yet is predicted at the measured batches' median measured/predicted ratio (here 1/20 and
    # 1/10: 0.075), not at the throughput's compute-only speed that would make it the rung's reference
    p.candidates.append({"batch_size": 32, "examples_per_sec": 1600.0})
    assert p.speed(32) == pytest.approx(1600.0 * 0.075)
    # calibrated, 32 (120/s) is the rung's fastest: it gets the planned 800, 16 two thirds of it (equal time)
    assert _examples_at(p, obj, 32, 1.0, 800.0, [8, 16, 32]) == 800
    assert _examples_at(p, obj, 16, 1.0, 800.0, [8, 16, 32]) == 533  # (uncalibrated: 800 * 80 / 1600 = 40)


def test_a_model_failing_at_a_probed_batch_leaves_memory_unmeasured_and_the_baseline_says_why() -> None:
    from batchlab import Task
    from batchlab.batchsize.suggest import _baseline, _memory

    class FailsFrom16(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] >= 16:
                raise RuntimeError("cannot take 16 or more")
            return self.lin(x)

    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    data = torch.utils.data.TensorDataset(x, y)
    task = Task.from_torch("fails16", FailsFrom16, data, data, batch_size=8, lr=0.1)
    mem, micro_max, used, line = _memory(task, "cpu", None, BatchRange(2, 64), cap=10**6)
    assert mem is None and micro_max is None and "a probe step failed" in line and "cannot take 16" in line
    value, kind = _baseline(task, "cpu", 0)  # evaluated at batch 8 (a DataLoader task): it works
    assert math.isfinite(value)


def test_the_report_says_planned_and_taken_seconds_and_full_runs_at_the_measured_speed() -> None:
    # a short run's seconds include the first step and a DataLoader's start-up, which the plan's step times
    # leave out: the text says both (suggestion.json keeps the plan as the rung's budget), and a full run
    # is predicted at the speed the candidate's own runs measured
    from batchlab.batchsize.report import candidate_rows
    from batchlab.batchsize.suggest import _rung_text

    time_obj = Objective(kind="time", metric="accuracy", higher_is_better=True, budget_examples=3072, time_budget=2.5)
    rung = {"budget": 0.158, "stats": {"16": {"seconds": 0.70}, "32": {"seconds": 0.69}}}
    assert _rung_text(rung, time_obj) == "0.158 s planned per run, 0.695 s taken"
    assert _rung_text({**rung, "stats": {"16": {"seconds": 0.16}}}, time_obj) == "0.158 s per run"
    ex_obj = Objective(kind="epochs", metric="accuracy", higher_is_better=True, budget_examples=3072, time_budget=None)
    assert _rung_text({"budget": 170, "stats": {}}, ex_obj) == "170 examples per run"
    s = {"objective": {"metric": "accuracy", "budget_examples": 3072}, "batch_size": 16,
         "search": {"rungs": [{"index": 0, "stats": {"16": {"mean": 0.5, "se": 0.1, "seconds": 0.7}}}],
                    "searched": [16, 32]},
         "confirm": {"tied": [16]},
         "predict": {"candidates": [{"batch_size": 16, "examples_per_sec": 2000.0},
                                    {"batch_size": 32, "examples_per_sec": 4000.0}],
                     "selected": [16, 32], "speed_samples": {"16": [1000.0, 1048.0, 1024.0]}}}
    rows = {r["batch size"]: r for r in candidate_rows(s)}
    assert rows[16]["full run s"] == pytest.approx(3.0) and rows[16]["speed from"] == "its runs"
    assert rows[32]["full run s"] == pytest.approx(0.768) and rows[32]["speed from"] == "throughput step"


def test_a_cut_inside_an_exact_tie_is_said() -> None:
    # rung 0 of a probe: 16, 8 and 4 all at the majority-class rate; 16 went on by the predicted order alone
    from types import SimpleNamespace

    from batchlab.batchsize.suggest import _tie_note

    st = {str(b): {"mean": 0.09766, "failed": False} for b in (16, 8, 4)}
    r = SimpleNamespace(index=0, tested=[16, 8, 4], promoted=[16, 32], stats=st)
    assert _tie_note(r) == (" (4, 8, 16 tied exactly at 0.09766: the cut among them followed the predicted order, "
                            "not the metric)")
    st["8"]["mean"] = 0.08
    st["4"]["mean"] = 0.07
    assert _tie_note(r) == ""  # a cut by the metric
    assert _tie_note(SimpleNamespace(index=1, tested=[16, 8], promoted=[16, 8], stats=st)) == ""  # the last rung


def test_the_majority_class_rate_of_a_causal_lm_counts_the_next_tokens() -> None:
    # a Hugging Face causal LM scores position t against label t+1; the baseline counted the labels
    # before that shift (0.208 where the bar is 0.2105)
    from dataclasses import dataclass

    from batchlab import Task
    from batchlab.batchsize.suggest import _majority_rate

    @dataclass
    class CausalLMOutputWithPast:  # what transformers returns, by name
        loss: torch.Tensor
        logits: torch.Tensor

    class TinyLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(4, 4)

        def forward(self, input_ids, labels):  # type: ignore[no-untyped-def]
            logits = self.emb(input_ids)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 4), labels[:, 1:].reshape(-1))
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    # every sequence starts 3, 3, 3 and goes on 0, 1, 2: unshifted, 3 is the most common label
    # (3 of 6); the next tokens (what is scored) are 3, 3, 0, 1, 2: 3 is 2 of 5
    seqs = torch.tensor([[3, 3, 3, 0, 1, 2]] * 6)
    data = [{"input_ids": s, "labels": s} for s in seqs]
    task = Task.from_torch("lm", TinyLM, data, data, metric="accuracy", batch_size=2)
    assert _majority_rate(task, TinyLM(), "cpu") == pytest.approx(2 / 5)
    plain = Task.from_torch("cls", lambda: torch.nn.Linear(2, 3), [(torch.zeros(2), k) for k in (0, 0, 0, 1)],
                            [(torch.zeros(2), k) for k in (0, 0, 0, 1)], metric="accuracy")
    assert _majority_rate(plain, torch.nn.Linear(2, 3), "cpu") == pytest.approx(3 / 4)


def test_a_rung_says_how_its_unfinished_runs_ended() -> None:
    # a batch whose runs diverged was reported as "128 failed"
    from batchlab.batchsize.halving import RungTrial, batch_stats

    trials = [RungTrial(128, s, 0, math.nan, "diverged", 64, 0.1) for s in (0, 1)]
    st, entry = batch_stats(trials)
    assert st.failed == 2 and entry["ended"] == "diverged"
    _, entry = batch_stats([RungTrial(8, 0, 0, 0.9, "ok", 64, 0.1), RungTrial(8, 1, 0, math.nan, "oom", 0, 0.0)])
    assert entry["ended"] == "oom"


def test_the_baseline_of_a_regression_or_an_own_metric_is_the_best_constant_prediction() -> None:
    # the untrained model's MAE was the only bar: a regression recommended at MAE 4.6 "ok" where
    # predicting the training mean scores 2.5; an own top-1 metric at 0.947 on 95/5 data passed
    # where always predicting the common class scores 0.965
    from batchlab import Task
    from batchlab.batchsize.suggest import _baseline

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g)
    y = x[:, :1] * 2 + 30 + 0.1 * torch.randn(300, 1, generator=g)
    data = list(zip(x, y))
    mae = lambda out, b: float((out - b[1]).abs().mean())  # noqa: E731
    mse = lambda out, b: torch.nn.functional.mse_loss(out, b[1])  # noqa: E731
    task = Task.from_torch("reg", lambda: torch.nn.Linear(5, 1), data[:200], data[200:], loss=mse, metric=mae,
                           higher_is_better=False)
    value, kind = _baseline(task, "cpu", 0)
    mean = torch.stack([t for _, t in data[:200]]).mean()
    want = float(torch.stack([(t - mean).abs() for _, t in data[200:]]).mean())
    assert kind.startswith("a constant prediction of the training targets' mean") and value == pytest.approx(want, rel=1e-5)

    labels = (torch.rand(300, generator=g) < 0.95).long()
    cls = list(zip(x, labels))
    top1 = lambda out, b: float((out.argmax(-1) == b[1]).float().mean())  # noqa: E731
    task = Task.from_torch("imbalanced", lambda: torch.nn.Linear(5, 2), cls[:200], cls[200:], metric=top1,
                           higher_is_better=True)
    value, kind = _baseline(task, "cpu", 0)
    assert kind.startswith("a constant prediction of the training classes' frequencies")
    assert value == pytest.approx(float((labels[200:] == 1).float().mean()))

    # a rank metric on a class-sorted validation set: equal scores ordered by position would make the
    # constant a perfect ranker (AUC 1.0); ties are broken at random, so it scores about chance
    def auc(out, b):  # type: ignore[no-untyped-def]
        s, y = out[:, 1] - out[:, 0], b[1]
        r = s.argsort().argsort().double() + 1
        npos, nneg = int(y.sum()), int((1 - y).sum())
        return float((r[y == 1].sum() - npos * (npos + 1) / 2) / (npos * nneg))

    balanced = sorted(zip(x, (torch.arange(300) % 2)), key=lambda p: int(p[1]))
    task = Task.from_torch("sorted-auc", lambda: torch.nn.Linear(5, 2), balanced, balanced, metric=auc,
                           higher_is_better=True, batch_size=300)
    from batchlab.batchsize.suggest import _constant_prediction, eval_batch_size

    value, _ = _constant_prediction(task, torch.nn.Linear(5, 2), "cpu", eval_batch_size(task, 300))
    assert 0.35 < value < 0.65
