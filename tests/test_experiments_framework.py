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
    validity = {"C98": "none: a toy"}

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
    # the rerun's record keeps what computing the trials took, not the seconds of loading them
    assert first.compute_time == first.wall_time and again.compute_time == first.compute_time
    saved = json.loads((tmp_path / "tiny" / "outcome.json").read_text())
    assert saved["rules"]["C98"].startswith("supported if") and saved["figures"] == ["tiny/figure1.png"]
    assert (tmp_path / "tiny" / "figure1.png").stat().st_size > 1000


def test_a_failing_experiment_is_recorded_not_raised(tmp_path: Path):
    o = run_experiment(_Broken, quick=True, seeds=[0], device="cpu", store=Store(tmp_path / "b.db"), out=tmp_path,
                       progress=False)
    assert o.status == "failed" and "RuntimeError: boom" in o.error
    assert [v["verdict"] for v in o.verdicts] == ["inconclusive"]
    assert "failed" in summary_table([o])
    # the markdown table does not call the validity check of an experiment that never ran "passed"
    from batchlab.experiments.report import markdown_table

    row = next(line for line in markdown_table(tmp_path).splitlines() if "C99" in line or "broken" in line)
    assert "not checked (the experiment failed)" in row and "passed" not in row


def test_select_by_claim_or_id_and_unknown_ids():
    assert FeatureScale in select(["C04"])
    assert FeatureScale in select(["feature_scale"])
    with pytest.raises(ValueError, match="--only 'C77' matches no experiment; known claims: .*C04"):
        select(["C77"])


def test_every_claim_c01_to_c22_has_an_experiment_with_a_validity_check():
    claims = {c for e in select(None) for c in e.claims}
    missing = [f"C{i:02d}" for i in range(1, 23) if f"C{i:02d}" not in claims]
    assert not missing, f"claims without an experiment: {missing}"
    for e in select(None):
        assert all(len(e.validity.get(c, "")) > 40 for c in e.claims), e.id
    reported = {c for e in select(None) for c in e.reported}
    assert reported == {"C05", "C07", "C13"}


def test_verdict_values_are_checked():
    with pytest.raises(ValueError, match="verdict must be one of supported, refuted, inconclusive, observed, not "
                       "observed; got 'maybe'"):
        Verdict("C01", "maybe", "")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a failed validity check gives 'inconclusive', never 'refuted'"):
        Verdict("C01", "refuted", "x", valid=False)
    v = Verdict.invalid("C16", "decay did not beat a constant LR", {"gain": 0.0})
    assert (v.verdict, v.valid, v.effect) == ("inconclusive", False, {"gain": 0.0})
    assert v.reason == "validity check failed: decay did not beat a constant LR"


def test_register_requires_a_validity_check_per_claim():
    from batchlab.experiments.base import register

    class NoCheck(_Tiny):
        id = "no_check"
        validity = {}

    with pytest.raises(ValueError, match="no statement, rule or validity check for claim.*C98"):
        register(NoCheck)

    class Stray(_Tiny):
        id = "stray"
        reported = ("C97",)

    with pytest.raises(ValueError, match="reports claim.*C97"):
        register(Stray)


def test_paired_rule_equivalence_and_noninferiority():
    from batchlab.experiments.kit import paired_rule

    tight = [0.002, -0.001, 0.003, 0.0, -0.002, 0.001, 0.002, -0.001]
    t = paired_rule(tight, 0.01)
    assert t.outcome == "supported" and -0.01 <= t.lo < t.mean < t.hi <= 0.01 and t.n == 8
    # the interval: mean +- t_{0.95, 7} sd / sqrt(8) (scipy's t quantile, 1.8946)
    import statistics

    half = 1.894579 * statistics.stdev(tight) / 8 ** 0.5
    assert t.hi - t.mean == pytest.approx(half, rel=1e-4)
    assert paired_rule([x - 0.05 for x in tight], 0.01).outcome == "refuted"
    assert paired_rule([x + 0.05 for x in tight], 0.01).outcome == "refuted"  # beyond the margin either way
    assert paired_rule([0.03, -0.04, 0.02, -0.01], 0.01).outcome == "inconclusive"
    assert paired_rule([0.0], 0.01).outcome == "inconclusive"  # one seed: no interval
    # non-inferiority: better by any amount is fine, worse by more than the margin is not
    assert paired_rule([x + 0.05 for x in tight], 0.01, "noninferiority").outcome == "supported"
    assert paired_rule([x - 0.05 for x in tight], 0.01, "noninferiority").outcome == "refuted"
    with pytest.raises(ValueError, match="margin must be >= 0, got -1"):
        paired_rule(tight, -1)
    with pytest.raises(ValueError, match="kind must be 'equivalence' or 'noninferiority', got 'two'"):
        paired_rule(tight, 0.01, "two")  # type: ignore[arg-type]


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
    v = exp.decide(data([None, None], [None, None]), params)[0]
    assert v.verdict == "inconclusive" and not v.valid
    well_conditioned = data([5000, 8000], [3, 4])
    for d in well_conditioned["seeds"].values():
        d["raw"]["condition"] = 10.0
    v = exp.decide(well_conditioned, params)[0]
    assert v.verdict == "inconclusive" and not v.valid and "ill-conditioned" in v.reason


def test_reproduce_report_shows_rule_before_numbers_and_renders(tmp_path: Path):
    """The reproduce page: statement, seed document, rule, verdict, numbers, figure and rerun command
    for each claim; every image loads in headless Chromium."""
    from batchlab.experiments.runner import reproduce
    from tests.test_report import CHROMIUM, render_probe

    outcomes = reproduce(only=["C04"], quick=True, seeds=2, out=tmp_path, progress=False)
    assert [o.status for o in outcomes] == ["ok"]
    page = (tmp_path / "index.html").read_text()
    for text in ("Features on very different scales", "seed 002", "Decision rule", "Verdict: supported",
                 "batchlab reproduce --only C04 --quick", "The numbers behind the verdict"):
        assert text in page, text
    assert page.index("Decision rule") < page.index("Validity check") < page.index("The numbers behind the verdict")
    md = (tmp_path / "verdicts.md").read_text()  # the run's table, generated
    assert "| C04 | `feature_scale` | **supported** | passed |" in md and "--quick configuration, 2 seeds" in md
    # the command line regenerates a marked block of a document from the same run (every trial loads from the store)
    from batchlab.cli import main

    doc = tmp_path / "doc.md"
    doc.write_text("# doc\n<!-- reproduce:quick:begin -->\nstale\n<!-- reproduce:quick:end -->\n")
    assert main(["reproduce", "--only", "C04", "--quick", "--seeds", "2", "--out", str(tmp_path), "--quiet",
                 "--markdown", str(doc), "--markdown-block", "quick"]) == 0
    assert "stale" not in doc.read_text() and "| C04 | `feature_scale` | **supported** |" in doc.read_text()
    assert main(["reproduce", "--only", "C04", "--out", str(tmp_path), "--markdown", str(doc),
                 "--markdown-block", "full"]) == 2  # no such block: refused before anything runs
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


def test_markdown_block_is_regenerated_from_the_outcomes(tmp_path: Path):
    from batchlab.experiments.report import main, markdown_table, write_markdown

    out = tmp_path / "run"
    store = Store(tmp_path / "b.db")
    run_experiment(_Tiny, quick=True, seeds=[0, 1], device="cpu", store=store, out=out, progress=False)
    table = markdown_table(out)
    assert "| C98 | `tiny` | **" in table and "validity check" in table
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- reproduce:quick:begin -->\nold table\n<!-- reproduce:quick:end -->\nafter\n")
    write_markdown(out, doc, "quick")
    text = doc.read_text()
    assert "old table" not in text and table in text and text.startswith("intro\n") and text.endswith("after\n")
    write_markdown(out, doc, "quick")  # idempotent
    assert doc.read_text() == text
    with pytest.raises(ValueError, match="has no block <!-- reproduce:full:begin -->"):
        write_markdown(out, doc, "full")
    with pytest.raises(ValueError, match="no outcome.json under"):
        markdown_table(tmp_path / "empty")
    assert main([str(out), "--markdown", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text() == table


def test_retry_failed_runs_a_stored_failure_again(tmp_path) -> None:
    from batchlab.experiments.base import ExperimentContext
    from batchlab.store import Store
    from batchlab.train.config import TrainConfig

    store = Store(tmp_path / "batchlab.db")
    cfg = TrainConfig(batch_size=32, max_steps=2, eval_train=False)
    ctx = ExperimentContext("x", True, [0], "cpu", store, tmp_path)
    trial = ctx.trial("digits-mlp", cfg)
    store.put(trial.key(), {"status": "failed", "error": "a cause since fixed"}, kind="experiment:x")
    assert ctx.fit("digits-mlp", cfg).status == "failed" and ctx.trials_run == 0  # loaded, not rerun
    again = ExperimentContext("x", True, [0], "cpu", store, tmp_path, retry_failed=True)
    assert again.fit("digits-mlp", cfg).status == "ok" and again.trials_run == 1
    assert store.record(trial.key()).status == "ok"
