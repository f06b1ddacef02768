"""HTML report of a :class:`~batchlab.batchsize.suggest.Suggestion` (renders plain data, runs nothing).

Order: the recommendation in one line; each candidate's time and quality; then the evidence stage by
stage (objective, measurements, prediction, successive halving, confirmation, advice, cost).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from batchlab.train import last_error_line

MIB = 2**20


def _fin(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def candidate_rows(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Per candidate batch: the furthest rung it reached, its metric there (mean +- standard error over
    seeds), the training seconds per run there, the predicted time of a full run, and its role."""
    metric = s["objective"]["metric"]
    rungs = s["search"]["rungs"]
    c = s["confirm"]
    rows = []
    for cand in sorted(s["predict"]["candidates"], key=lambda r: r["batch_size"]):
        b = cand["batch_size"]
        reached = [r for r in rungs if str(b) in r["stats"]]
        row: dict[str, Any] = {"batch size": b}
        if reached:
            r = reached[-1]
            st = r["stats"][str(b)]
            row.update({"last rung": r["index"], f"validation {metric}": st["mean"], "+- (se)": st["se"],
                        "train s per run": st["seconds"]})
        else:
            row.update({"last rung": "-", f"validation {metric}": math.nan, "+- (se)": math.nan, "train s per run": math.nan})
        # the speed its own search runs measured (data loading in) where it ran, else the throughput step's
        samples = [v for v in (s["predict"].get("speed_samples") or {}).get(str(b), []) if _fin(v) and v > 0]
        speed = statistics.median(samples) if samples else cand["examples_per_sec"]
        full = s["objective"]["budget_examples"] / speed if _fin(speed) and speed else math.nan
        row["full run s"] = full
        row["speed from"] = "its runs" if samples else ("throughput step" if _fin(full) else "-")
        role = []
        if b == s["batch_size"]:
            role.append("recommended")
        if b in c["tied"] and b != s["batch_size"]:
            role.append("tied")
        if b not in (s["search"].get("searched") or s["predict"]["selected"]):
            role.append("not searched")
        row["role"] = ", ".join(role)
        rows.append(row)
    return rows


def suggestion_figures(s: dict[str, Any]) -> dict[str, Any]:
    """The report's matplotlib figures from ``Suggestion.to_dict()``, by name."""
    from batchlab.report.plots import plot_xy

    figs: dict[str, Any] = {}
    metric = s["objective"]["metric"]
    rungs = [r for r in s["search"]["rungs"] if r["tested"]]
    series = []
    for r in rungs:
        pts = [(int(b), v["mean"]) for b, v in r["stats"].items() if _fin(v["mean"])]
        if pts:
            pts.sort()
            series.append({"x": [p[0] for p in pts], "y": [p[1] for p in pts],
                           "label": f"rung {r['index']} ({r['budget']:.3g} {s['search']['unit']})"})
    if series:
        figs["halving"] = plot_xy(series, "batch size (examples)", f"validation {metric}", logx=True,
                                  title=f"Successive halving (recommended {s['batch_size']})")
    tp = s["measure"]["throughput"]
    ok = [(b, e) for b, e in zip(tp["batch_sizes"], tp["examples_per_sec"]) if _fin(e)]
    if ok:
        figs["throughput"] = plot_xy({"x": [o[0] for o in ok], "y": [o[1] for o in ok], "label": "measured"},
                                     "batch size (examples)", "throughput (examples/s)", logx=True,
                                     title=f"Examples per second vs batch (knee at {tp['knee']})")
    hist = [h for h in s["measure"]["noise"].get("history") or [] if _fin(h["b_simple"])]
    if hist:
        figs["noise"] = plot_xy({"x": [h["step"] for h in hist], "y": [h["b_simple"] for h in hist], "label": "B_simple (EMA ratio)"},
                                "optimizer step", "B_simple (examples)", title="Gradient noise scale until stable")
    return figs


def write_suggestion_report(suggestion: Any, out_dir: str | Path) -> Path:
    """Write ``out_dir/index.html`` for a Suggestion (or its dict). Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from batchlab.report.html import Section, write_report

    s = suggestion.to_dict() if hasattr(suggestion, "to_dict") else dict(suggestion)
    figs = suggestion_figures(s)
    m, p, se, c, a = s["measure"], s["predict"], s["search"], s["confirm"], s["advise"]
    trial_rows = [{"rung": t["rung"], "batch size": t["batch"], "seed": t["seed"], "lr": t["lr"], "metric": t["metric"],
                   "metric before precise BN": t["extra"].get("metric_stale", math.nan), "status": t["status"],
                   "examples": t["examples"], "steps": t["steps"], "train s": t["seconds"],
                   "error": last_error_line(t["extra"].get("error")) if t["status"] != "ok" else ""} for t in se["trials"]]
    pred_rows = [{k: r[k] for k in ("batch_size", "micro_batch", "accumulation", "step_time", "examples_per_sec",
                                    "predicted_steps", "predicted_time")} for r in p["candidates"]]
    sections = [
        Section("Recommendation", text=[f"**{s['headline']}**", f"Status: {s['status']}."]),
        Section("Candidates: time and quality", text=(
            "Each candidate at the furthest successive-halving rung it reached (later rungs had larger budgets); "
            "train s per run: training seconds of each run there (first step and DataLoader start-up included); full "
            "run s: the objective's examples at the speed the candidate's own runs measured (data loading in, first "
            "step out), or at the throughput step's where it did not run."), tables=[candidate_rows(s)],
            figures=[f for k, f in figs.items() if k == "halving"]),
        Section("Objective", text=_objective_text(s["objective"])),
        Section("Evidence: measurements", text=["- " + n for n in m["notes"]],
                figures=[f for k, f in figs.items() if k in ("throughput", "noise")]),
        Section("Evidence: prediction (ranks candidates only)", text=["- " + n for n in p["notes"]],
                tables=[pred_rows] if pred_rows else None),
        Section("Evidence: successive halving", text=["- " + n for n in se["notes"]],
                tables=[trial_rows] if trial_rows else None),
        Section("Evidence: confirmation", text=c["message"]),
        Section("Advice", text=["- " + n for n in a["lines"]] or "none"),
        Section("Cost", text=(f"Bound: {s['cost_budget']} examples (one full training run unless set); processed "
                              f"{sum(s['examples_processed'].values())}."),
                tables=[{**s["examples_processed"], "wall time (s)": s["wall_time"]}]),
    ]
    try:
        return write_report(out_dir, f"batchlab suggest: {s['task']}", sections)
    finally:
        for f in figs.values():
            plt.close(f)


def _objective_text(o: dict[str, Any]) -> str:
    from batchlab.batchsize.objective import Objective

    return Objective(**o).describe() + "."
