"""HTML report of a :class:`~batchlab.batchsize.suggest.Suggestion` (renders plain data, runs nothing)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

MIB = 2**20


def _fin(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def suggestion_figures(s: dict[str, Any]) -> dict[str, Any]:
    """The report's matplotlib figures from ``Suggestion.to_dict()``, by name."""
    from batchlab.report.plots import plot_xy

    figs: dict[str, Any] = {}
    mem = s["memory"]
    pts = [(b, m) for b, m in mem["probes"]] + [(t[0], t[2]) for t in mem["tried"] if _fin(t[2])]
    series: list[dict[str, Any]] = []
    if pts:
        series.append({"x": [p[0] for p in mem["probes"]], "y": [p[1] / MIB for p in mem["probes"]], "label": "probes (fit)"})
        tried = [t for t in mem["tried"] if _fin(t[2])]
        if tried:
            series.append({"x": [t[0] for t in tried], "y": [t[2] / MIB for t in tried], "label": "search trials"})
        if _fin(mem["per_sample_bytes"]):
            xs = sorted({p[0] for p in pts} | {1})
            series.append({
                "x": xs, "y": [(mem["fixed_bytes"] + mem["per_sample_bytes"] * b) / MIB for b in xs],
                "label": "fit: fixed + per-sample x B", "marker": None, "linestyle": "--",
            })
        if mem.get("memory_limit"):
            xs = sorted({p[0] for p in pts})
            series.append({"x": [xs[0], xs[-1]], "y": [mem["memory_limit"] / MIB] * 2, "label": "limit", "marker": None, "linestyle": ":"})
        figs["memory"] = plot_xy(series, "batch size (examples)", "step memory (MiB)", logx=True, logy=True,
                                 title="Memory of one training step vs batch")
    tp = s["throughput"]
    ok = [(b, e, t) for b, e, t in zip(tp["batch_sizes"], tp["examples_per_sec"], tp["epoch_time"]) if _fin(e)]
    if ok:
        figs["throughput"] = plot_xy({"x": [o[0] for o in ok], "y": [o[1] for o in ok], "label": "measured (median)"},
                                     "batch size (examples)", "throughput (examples/s)", logx=True,
                                     title=f"Examples per second vs batch (knee at {tp['knee']})")
        figs["epoch_time"] = plot_xy({"x": [o[0] for o in ok], "y": [o[2] for o in ok], "label": "measured"},
                                     "batch size (examples)", "time per epoch (s)", logx=True, logy=True,
                                     title="Time per epoch vs batch")
    hist = [h for h in s["noise"].get("history") or [] if _fin(h["b_simple"])]
    if hist:
        figs["noise"] = plot_xy({"x": [h["step"] for h in hist], "y": [h["b_simple"] for h in hist], "label": "B_simple (EMA ratio)"},
                                "optimizer step", "B_simple (examples)", title="Gradient noise scale over training")
    trials = [t for t in s["search"]["trials"] if _fin(t["metric"])]  # failed trials have no metric to draw
    if trials:
        seeds = sorted({t["seed"] for t in trials})
        series = []
        for seed in seeds:
            ts = sorted((t for t in trials if t["seed"] == seed), key=lambda t: t["batch_size"])
            series.append({"x": [t["batch_size"] for t in ts], "y": [t["metric"] for t in ts], "label": f"seed {seed}"})
        figs["search"] = plot_xy(series, "batch size (examples)", "validation metric", logx=True, kind="scatter",
                                 title=f"Pivot search trials (best batch {s['batch_size']})")
    cands = [c for c in s["candidates"] if _fin(c["predicted_steps"])]
    if cands:
        figs["tradeoff"] = plot_xy(
            {"x": [c["predicted_examples"] for c in cands], "y": [c["predicted_steps"] for c in cands], "label": "B = "
             + ", ".join(str(c["batch_size"]) for c in cands)},
            "examples to target (predicted)", "steps to target (predicted)", logx=True, logy=True,
            title=f"Steps vs examples: S = S_min(1 + B_noise/B), B_noise ~ {s['b_noise']:.0f}",
        )
    return figs


def write_suggestion_report(suggestion: Any, out_dir: str | Path) -> Path:
    """Write ``out_dir/index.html`` for a Suggestion (or its dict). Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from batchlab.report.html import Section, write_report

    s = suggestion.to_dict() if hasattr(suggestion, "to_dict") else dict(suggestion)
    figs = suggestion_figures(s)
    rec = {
        "batch size": s["batch_size"], "micro-batch": s["micro_batch"], "accumulation": s["accumulation"],
        "learning rate": s["lr"], "optimizer": s["optimizer"], "LR rule": s["rule"], "B_noise": s["b_noise"],
        "status": s["status"],
    }
    cand_rows = [
        {k: c[k] for k in ("batch_size", "micro_batch", "accumulation", "step_time", "examples_per_sec", "epoch_time",
                           "predicted_steps", "predicted_examples", "predicted_time", "fits")}
        for c in s["candidates"]
    ]
    trial_rows = [{k: t[k] for k in ("batch_size", "seed", "lr", "metric", "status", "examples", "steps", "time")}
                  for t in s["search"]["trials"]]
    sections = [
        Section("Recommendation", text=["- " + r for r in s["rationale"]], tables=[rec]),
        Section("Memory", text=(
            f"Largest batch whose whole step fits: **{s['memory']['batch_size']}** (limit "
            f"{(s['memory']['memory_limit'] or 0) / MIB:.0f} MiB; capped by {s['memory']['capped_by']})."),
            figures=[f for k, f in figs.items() if k == "memory"]),
        Section("Speed", text=f"Median of timed steps after warm-up; knee = smallest batch at 90% of peak examples/s: {s['throughput']['knee']}.",
                figures=[f for k, f in figs.items() if k in ("throughput", "epoch_time")]),
        Section("Gradient noise scale", text=(
            f"B_simple = EMA(tr Sigma) / EMA(|G|^2) from micro-batch gradients (McCandlish et al. 2018): "
            f"**{s['b_noise']:.1f}**."), figures=[f for k, f in figs.items() if k == "noise"]),
        Section("Prediction", text="S = S_min (1 + B_noise/B) steps and E = E_min (1 + B/B_noise) examples; time = S x measured step time.",
                tables=[cand_rows] if cand_rows else None, figures=[f for k, f in figs.items() if k == "tradeoff"]),
        Section("Pivot search", text=f"{s['search']['stop_reason']}; path {s['search']['path']}; seed noise {s['search']['noise']:.4f}.",
                tables=[trial_rows] if trial_rows else None, figures=[f for k, f in figs.items() if k == "search"]),
    ]
    conf = s["search"].get("confirm") or {}
    if conf.get("metrics"):
        inc = conf.get("incumbent")
        def role(b: int) -> str:
            return "screen's candidate" if b == conf.get("screened") else ("task's own batch size" if b == inc else "neighbour")

        rows = [{"batch size": int(b), "role": role(int(b)),
                 "validation metric (full budget)": v, "recommended": int(b) == conf.get("batch")}
                for b, v in sorted(conf["metrics"].items(), key=lambda kv: int(kv[0]))]
        sections.append(Section(
            "Full-budget confirmation",
            text=(f"The screen's short runs favour small batches, so its candidate is compared with the task's own batch "
                  f"size at the full budget ({conf.get('budget_examples')} examples, seed {conf.get('seed')}); the better "
                  f"run is recommended, the larger batch on a tie."),
            tables=[rows]))
    if s.get("norm_advice"):
        sections.append(Section("Normalization", text=s["norm_advice"]["message"]))
    sections.append(Section("Cost", tables=[{**s["examples_processed"], "wall time (s)": s["wall_time"]}]))
    try:
        return write_report(out_dir, f"batchlab suggest: {s['task']}", sections)
    finally:
        for f in figs.values():
            plt.close(f)
