"""The reproduce framework: resume through the store, failures recorded, verdicts from data."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from batchlab.experiments.base import Experiment, ExperimentContext, Verdict, spread, steps_to_target
from batchlab.experiments.runner import run_experiment, select, summary_table
from batchlab.experiments.feature_scale import FeatureScale
from batchlab.store import Store
from batchlab.train import TrainConfig


class _Tiny(Experiment):
    id = "tiny"
    claims = ("C98",)
    title = "tiny"
    seed_doc = "000"
    statements = {"C98": "a toy claim"}
    rules = {"C98": "supported if val_acc > 0.5 in every seed"}

    def params(self, quick: bool) -> dict[str, Any]:
        return {"steps": 5}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        from tests.conftest import make_toy_task

        task = make_toy_task()
        runs = ctx.fit_many([(task, TrainConfig(batch_size=32, max_steps=params["steps"], seed=s)) for s in ctx.seeds])
        return {"acc": [r.final["val_acc"] for r in runs]}

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        ok = all(a > 0.5 for a in data["acc"])
        return [Verdict("C98", "supported" if ok else "refuted", f"accuracies {data['acc']}", {"acc": spread(data["acc"])})]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        from batchlab.report.plots import plot_xy

        return [plot_xy({"label": "acc", "x": list(range(len(data["acc"]))), "y": data["acc"]}, xlabel="seed",
                        ylabel="val accuracy", title="tiny")]


class _Broken(_Tiny):
    id = "broken"

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("boom")


def test_rerun_loads_every_trial_from_the_store(tmp_path: Path):
    store = Store(tmp_path / "b.db")
    first = run_experiment(_Tiny, quick=True, seeds=[0, 1], device="cpu", store=store, out=tmp_path, progress=False)
    assert first.status == "ok" and first.trials_run == 2 and first.trials_loaded == 0
    again = run_experiment(_Tiny, quick=True, seeds=[0, 1], device="cpu", store=store, out=tmp_path, progress=False)
    assert again.trials_run == 0 and again.trials_loaded == 2
    assert again.verdicts == first.verdicts
    saved = json.loads((tmp_path / "tiny" / "outcome.json").read_text())
    assert saved["rules"]["C98"].startswith("supported if") and saved["figures"] == ["tiny/figure1.png"]
    assert (tmp_path / "tiny" / "figure1.png").stat().st_size > 1000


def test_a_failing_experiment_is_recorded_not_raised(tmp_path: Path):
    o = run_experiment(_Broken, quick=True, seeds=[0], device="cpu", store=Store(tmp_path / "b.db"), out=tmp_path,
                       progress=False)
    assert o.status == "failed" and "RuntimeError: boom" in o.error
    assert [v["verdict"] for v in o.verdicts] == ["inconclusive"]
    assert "failed" in summary_table([o])


def test_select_by_claim_or_id_and_unknown_ids():
    assert FeatureScale in select(["C04"])
    assert FeatureScale in select(["feature_scale"])
    with pytest.raises(ValueError, match="--only 'C77' matches no experiment; known claims: .*C04"):
        select(["C77"])


def test_every_claim_c01_to_c20_has_an_experiment():
    claims = {c for e in select(None) for c in e.claims}
    missing = [f"C{i:02d}" for i in range(1, 21) if f"C{i:02d}" not in claims]
    assert not missing, f"claims without an experiment: {missing}"


def test_verdict_values_are_checked():
    with pytest.raises(ValueError, match="verdict must be one of supported, refuted, inconclusive; got 'maybe'"):
        Verdict("C01", "maybe", "")  # type: ignore[arg-type]


def test_steps_to_target_and_spread():
    hist = [{"step": 0, "val_acc": 0.1}, {"step": 10, "val_acc": 0.95}, {"step": 20, "val_acc": 0.97}]
    assert steps_to_target(hist, 0.9) == 10
    assert steps_to_target(hist, 0.99) == float("inf")
    s = spread([1.0, 3.0, float("nan")])
    assert (s["mean"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 2)


def test_feature_scale_decision_rule_on_built_data():
    exp, params = FeatureScale(), FeatureScale().params(True)

    def data(raw: list[int | None], std: list[int | None]) -> dict[str, Any]:
        return {"seeds": {str(i): {"raw": {"steps": r, "condition": 1e4}, "standardized": {"steps": s, "condition": 1.0}}
                          for i, (r, s) in enumerate(zip(raw, std))}}

    assert exp.decide(data([5000, 8000], [3, 4]), params)[0].verdict == "supported"
    assert exp.decide(data([50, 80], [60, 4]), params)[0].verdict == "refuted"
    assert exp.decide(data([50, 80], [10, 40]), params)[0].verdict == "inconclusive"
    assert exp.decide(data([None, None], [None, None]), params)[0].verdict == "inconclusive"


def test_reproduce_report_shows_rule_before_numbers_and_renders(tmp_path: Path):
    """The reproduce page: statement, seed document, rule, verdict, numbers, figure and rerun command
    for each claim; every image loads in headless Chromium."""
    from batchlab.experiments.runner import reproduce
    from tests.test_report import CHROMIUM, render_probe

    outcomes = reproduce(only=["C04"], quick=True, seeds=1, out=tmp_path, progress=False)
    assert [o.status for o in outcomes] == ["ok"]
    page = (tmp_path / "index.html").read_text()
    for text in ("Features on very different scales", "seed 002", "Decision rule", "Verdict: supported",
                 "batchlab reproduce --only C04 --quick", "The numbers behind the verdict"):
        assert text in page, text
    assert page.index("Decision rule") < page.index("The numbers behind the verdict")
    if CHROMIUM is None and not os.environ.get("BATCHLAB_REQUIRE_BROWSER"):
        pytest.skip("no chromium binary on PATH (CI installs it)")
    images, broken = render_probe(tmp_path / "index.html", tmp_path)
    assert images >= 1 and broken == 0


def test_cuda_runs_larger_configurations():
    """On CUDA the same command runs larger budgets; on CPU the parameters are the sized defaults."""
    scaled_any = 0
    for exp_cls in select(None):
        exp = exp_cls()
        for quick in (True, False):
            cpu, gpu = exp.params_for(quick, "cpu"), exp.params_for(quick, "cuda")
            assert cpu == exp.params(quick)
            assert set(gpu) == set(cpu)
            for key in exp.budget_keys:
                if isinstance(cpu.get(key), (int, float)) and not isinstance(cpu.get(key), bool):
                    assert gpu[key] == exp.gpu_scale * cpu[key], (exp.id, key)
                    scaled_any += 1
    assert scaled_any >= 20
