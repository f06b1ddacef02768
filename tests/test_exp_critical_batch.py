"""C22 (McCandlish et al.): the steps-examples fit, the decision rule on built data, figure, a tiny real run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import pytest

from batchlab.experiments.base import ExperimentContext
from batchlab.experiments.critical_batch import CriticalBatch, fit_steps_curve
from batchlab.store import Store
from tests.helpers.figures import check_figures

BATCHES = [8, 16, 32, 64, 128, 256, 512, 1024]


def test_fit_recovers_the_model_and_reports_a_bad_fit():
    f = fit_steps_curve(BATCHES, [200 * (1 + 64 / b) for b in BATCHES])
    assert f["s_min"] == pytest.approx(200) and f["b_noise"] == pytest.approx(64)
    assert f["e_min"] == pytest.approx(200 * 64) and f["r2_log"] == pytest.approx(1.0)
    # steps that grow with B are not the trade-off: no positive S_min, B_noise
    bad = fit_steps_curve(BATCHES, [10 * b for b in BATCHES])
    assert math.isnan(bad["r2_log"])
    assert math.isnan(fit_steps_curve([8, 16], [10, 5])["b_noise"])  # two points are not a fit
    noisy = fit_steps_curve(BATCHES, [200 * (1 + 64 / b) * (1.6 if i % 2 else 0.6) for i, b in enumerate(BATCHES)])
    assert noisy["r2_log"] < 0.9


def _task(b_noise: float, b_simple: float, reached: list[int] | None = None, seeds: int = 2) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for b in BATCHES:
        ok = reached is None or b in reached
        steps = round(300 * (1 + b_noise / b))
        runs[str(b)] = {f"{lr:g}": {str(s): {"status": "ok", "steps_to_target": (steps + lr_i * 50) if ok else None,
                                             "steps": steps, "train_time": 1.0} for s in range(seeds)}
                        for lr_i, lr in enumerate((0.05, 0.1))}
    return {"runs": runs, "b_simple": {str(s): {"b_simple": b_simple * (1 + 0.05 * s)} for s in range(seeds)},
            "target": 0.5}


P = {**CriticalBatch().params(False), "seeds": [0, 1]}


def _v(a: dict[str, Any], b: dict[str, Any]) -> str:
    (v,) = CriticalBatch().decide({"tasks": {"a": a, "b": b}}, P)
    return "invalid" if not v.valid else v.verdict


def test_c22_supported_refuted_inconclusive_invalid():
    assert _v(_task(64, 70), _task(200, 150)) == "supported"  # good fits, B_simple within 2x of B_crit
    assert _v(_task(64, 1000), _task(200, 10)) == "refuted"  # B_simple off by more than 4x on both
    assert _v(_task(64, 70), _task(200, 2000)) == "inconclusive"  # the tasks disagree
    assert _v(_task(64, 180), _task(200, 150)) == "inconclusive"  # 2.9x off on one task: between the thresholds
    few = [8, 16, 32]  # the target is reached at 3 batch sizes only
    assert _v(_task(64, 70, reached=few), _task(200, 150, reached=few)) == "invalid"
    # a task that fails its check is left out; the other decides, but 'supported' needs both
    assert _v(_task(64, 70), _task(200, 150, reached=few)) == "inconclusive"
    assert _v(_task(64, 1000), _task(200, 150, reached=few)) == "refuted"


def test_c22_notes_a_fastest_lr_at_the_grid_edge_without_changing_the_verdict():
    t = _task(64, 70)
    for b in ("8", "16"):  # the grid's largest LR (0.2) is the fastest there
        t["runs"][b]["0.2"] = {s: {**r, "steps_to_target": r["steps_to_target"] - 100}
                               for s, r in t["runs"][b]["0.05"].items()}
    e = CriticalBatch()
    r = e.judge_task(t, P)
    assert r["lr_at_grid_edge"] == {"8": "largest", "16": "largest"}
    assert "the fastest LR is the grid's largest at B = 8, 16, so S(B) there is an upper bound" in r["text"]
    assert e.judge_task(_task(64, 70), P)["lr_at_grid_edge"] == {}  # two LRs: no interior to speak of
    assert _v(t, _task(200, 150)) == _v(_task(64, 70), _task(200, 150))


def _suggested(batch: int | None, status: str = "ok") -> dict[str, Any]:
    return {"status": status, "batch_size": batch, "lr": 0.1, "b_noise": 50.0, "tied": [], "examples": 1000,
            "cost_budget": 2000, "wall_time": 1.0, "headline": "x"}


def test_c22_reports_suggest_against_b_crit_without_changing_the_verdict():
    a, b = _task(64, 70), _task(200, 150)
    (plain,) = CriticalBatch().decide({"tasks": {"a": a, "b": b}}, P)
    a["suggest"], b["suggest"] = _suggested(100), _suggested(1024)
    (v,) = CriticalBatch().decide({"tasks": {"a": a, "b": b}}, P)
    assert v.verdict == plain.verdict == "supported"  # the verdict rule does not use suggest
    sa, sb = v.effect["a"]["suggest"], v.effect["b"]["suggest"]
    assert sa["b_crit"] == pytest.approx(v.effect["a"]["fit"]["b_noise"])
    assert sa["ratio"] == pytest.approx(100 / sa["b_crit"]) and sa["ratio"] == pytest.approx(100 / 64, rel=0.05)
    assert sa["within_factor"] is True and sa["batch"] == 100
    assert sb["ratio"] == pytest.approx(1024 / 200, rel=0.05) and sb["within_factor"] is False
    assert "Reported, not part of the rule: batchlab suggest" in v.reason and "not within 2x" in v.reason
    assert "suggest" not in plain.reason and plain.effect["a"]["suggest"] is None
    # more than 2x below B_crit is not within either; no recommendation is reported as such
    a["suggest"], b["suggest"] = _suggested(16), _suggested(None, "failed")
    (v,) = CriticalBatch().decide({"tasks": {"a": a, "b": b}}, P)
    assert v.effect["a"]["suggest"]["within_factor"] is False and v.effect["a"]["suggest"]["ratio"] == pytest.approx(0.25, rel=0.05)
    assert v.effect["b"]["suggest"]["within_factor"] is False and math.isnan(v.effect["b"]["suggest"]["ratio"])
    assert "b: no recommendation (status failed)" in v.reason
    check_figures(CriticalBatch().plot({"tasks": {"a": a, "b": b}}, P))


def test_c22_suggest_runs_on_the_task_as_c22_trains_it():
    from batchlab.tasks import get_task

    e = CriticalBatch()
    p = e.params(False)
    spec = p["tasks"][0]
    base = get_task(spec["task"], **spec["kwargs"])
    t = e.suggest_task(base, spec, p)
    assert t.norm == "none" and t.optimizer == p["optimizer"] and t.batch_size == 128 and t.spec is None
    assert t.lr == pytest.approx(spec["lr_ref"] * 2) and base.norm == "batch"
    assert t.fingerprint() != base.fingerprint()
    assert p["suggest"]["low"] == min(p["batches"]) and p["suggest"]["high"] == max(p["batches"])


def test_c22_figure():
    check_figures(CriticalBatch().plot({"tasks": {"a": _task(64, 70), "b": _task(200, 150, reached=[8, 16, 32])}}, P))


def test_c22_tiny_real_run(tmp_path: Path):
    e = CriticalBatch()
    q = e.params(True)
    p = {**q, "batches": [32, 128], "lr_factors": [1.0], "seeds": [0],
         "noise": {"micro_batch": 8, "accumulation": 2, "steps": 4, "beta": 0.9},
         "tasks": [{"label": "digits-mlp", "task": "digits-mlp", "kwargs": {}, "target": 2.27, "lr_ref": 0.2,
                    "max_epochs": 1}],
         "suggest": {**q["suggest"], "low": 32, "high": 128, "cost_epochs": 4}}
    ctx = ExperimentContext(e.id, True, [0], "cpu", Store(tmp_path / "b.db"), tmp_path)
    data = e.run(ctx, p)
    t = data["tasks"]["digits-mlp"]
    hits = [r["0"]["steps_to_target"] for per_lr in t["runs"].values() for r in per_lr.values()]
    assert all(h is not None and h >= 1 for h in hits)  # loss 2.27 is reached within the epoch, and training stopped
    assert all(r["0"]["steps"] == r["0"]["steps_to_target"] for per_lr in t["runs"].values() for r in per_lr.values())
    assert t["b_simple"]["0"]["status"] == "ok"
    (v,) = e.decide(data, p)
    assert v.verdict == "inconclusive" and not v.valid  # two batch sizes cannot carry the fit
    # 2 training runs, B_simple, and suggest on the same task (cheaply): one stored measurement, a power of two
    # in suggest's range
    sg = t["suggest"]
    assert ctx.trials_run == 4 and sg["batch_size"] in (32, 64, 128) and sg["examples"] <= sg["cost_budget"]
    (v,) = e.decide(data, p)
    assert v.effect["digits-mlp"]["suggest"]["batch"] == sg["batch_size"] and "batchlab suggest" in v.reason
    e.run(ctx, p)
    assert ctx.trials_run == 4  # loaded from the store, not run again
