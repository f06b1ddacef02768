"""Benchmark: ``batchlab.suggest`` against the full grid of batch sizes, scored by suggest's objective.

For each task: train every power of two from 2 to 512 (capped at the training set) with the LR scaled
by the optimizer's rule, the task's budget in examples and ``--seeds`` seeds (at least 4); then run
``suggest`` on the same budget with seeds the grid does not use (``--suggest-seed-offset``, 100 by
default), objective "best metric at the fixed budget, the fastest of the batches tied with it".

Scoring (issue 15):

- a batch is **good** when its seed-mean metric is within the seed noise of the best batch's: the
  difference is at most one standard error of the difference, ``sqrt(s_best^2/n + s_b^2/n)``
  (direction-aware: "best" is the highest accuracy or the lowest loss);
- the **target**: suggest returns a good batch whose mean training time (the grid's seconds at that
  batch) is at most 1.5x that of the fastest good batch, and processes at most 10% of the grid's
  training examples.

Writes ``OUT/results.json``: per task ``task``, ``grid`` (a list of ``{batch, seed, metric, seconds,
examples, status}``, one per grid run), ``higher_is_better``, ``suggested_batch``,
``suggest_seconds``, ``suggest_examples`` and the derived scores. Grid runs go through a results
store (``OUT/store.db``): a rerun trains nothing again. ``--markdown`` prints the table for
docs/batchsize.md from ``OUT/results.json`` (no training).

    .venv/bin/python benchmarks/suggest_vs_grid.py --seeds 4 --max-epochs 5 --out benchmarks/out/sg2 \\
        --tasks digits-mlp synthetic-mlp heldout_tasks:byo_resnet heldout_tasks:byo_gpt heldout_tasks:byo_hf
    .venv/bin/python benchmarks/suggest_vs_grid.py --markdown --out benchmarks/out/sg2

See ``heldout_tasks.py`` for which tasks the method was developed on and which are held out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

GOOD_TIME_FACTOR = 1.5  # suggest's batch may take at most this x the fastest good batch's time
COST_FRACTION = 0.10  # suggest may process at most this fraction of the grid's examples


def grid_runs(task: Any, seeds: list[int], budget: int, store: Any, low: int = 2, high: int = 512) -> list[dict[str, Any]]:
    """Every (batch, seed) of the grid, through the store."""
    from batchlab.batchsize.batches import powers_of_two
    from batchlab.store import run_key
    from batchlab.train import TrainConfig, default_lr_rule, fit, scale_lr

    rule = default_lr_rule(task.optimizer)
    rows = []
    fp = task.fingerprint()
    for b in powers_of_two(low, min(high, task.n_train)):
        for s in seeds:
            cfg = TrainConfig(batch_size=b, lr=scale_lr(task.lr, task.batch_size, b, rule), optimizer=task.optimizer,
                              max_examples=budget, seed=s, eval_train=False)

            def run(cfg: TrainConfig = cfg) -> dict[str, Any]:
                r = fit(task, cfg, raise_errors=False)
                return {"status": r.status, "metric": float(r.final.get("val_metric", math.nan)) if r.ok else math.nan,
                        "seconds": r.train_time, "examples": r.examples}

            d = store.run_or_load(run_key(fp, cfg.to_dict(), kind="grid-v2"), run, kind="grid-v2")
            rows.append({"batch": b, "seed": s, "metric": d["metric"], "seconds": d["seconds"],
                         "examples": d["examples"], "status": d["status"]})
        ms = [r["metric"] for r in rows if r["batch"] == b]
        print(f"  grid {task.name} B={b}: " + " ".join(f"{m:.4f}" for m in ms), flush=True)
    return rows


def score(row: dict[str, Any]) -> dict[str, Any]:
    """Good batches, the fastest good one and whether suggest met the target (see the docstring)."""
    hib = row["higher_is_better"]
    by: dict[int, list[dict[str, Any]]] = {}
    for r in row["grid"]:
        by.setdefault(int(r["batch"]), []).append(r)
    stats = {}
    for b, rs in by.items():
        ms = [r["metric"] for r in rs]
        if any(r["status"] != "ok" or not math.isfinite(r["metric"]) for r in rs):
            continue
        stats[b] = {"mean": statistics.fmean(ms), "var": statistics.variance(ms) if len(ms) > 1 else 0.0, "n": len(ms),
                    "seconds": statistics.fmean(r["seconds"] for r in rs)}
    best = (max if hib else min)(stats, key=lambda b: stats[b]["mean"])
    good = []
    for b, st in stats.items():
        gap = (stats[best]["mean"] - st["mean"]) if hib else (st["mean"] - stats[best]["mean"])
        se = math.sqrt(stats[best]["var"] / stats[best]["n"] + st["var"] / st["n"])
        if gap <= se:
            good.append(b)
    fastest = min(good, key=lambda b: stats[b]["seconds"])
    sb = row.get("suggested_batch")
    grid_examples = sum(r["examples"] for r in row["grid"])
    out = {
        "grid_means": {str(b): stats[b]["mean"] for b in sorted(stats)},
        "grid_seconds": {str(b): stats[b]["seconds"] for b in sorted(stats)},
        "best_batch": best, "good_batches": sorted(good), "fastest_good_batch": fastest,
        "grid_examples": grid_examples, "grid_seconds_total": sum(r["seconds"] for r in row["grid"]),
    }
    if sb is not None:
        out["suggested_good"] = sb in good
        out["time_ratio"] = stats[sb]["seconds"] / stats[fastest]["seconds"] if sb in stats else math.inf
        out["cost_fraction"] = row["suggest_examples"] / grid_examples
        out["target_met"] = bool(out["suggested_good"] and out["time_ratio"] <= GOOD_TIME_FACTOR
                                 and out["cost_fraction"] <= COST_FRACTION)
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| task | metric | grid best B (mean) | good batches | fastest good B (s) | suggested B (grid mean, s) | time / fastest good "
        "| examples suggest / grid | suggest wall s | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        sc = r.get("score") or score(r)
        name = r["task"] + (" (held out)" if r.get("held_out") else "")
        metric = r.get("metric_name", "metric") + (" (higher better)" if r["higher_is_better"] else " (lower better)")
        gm, gs = sc["grid_means"], sc["grid_seconds"]
        sb = r.get("suggested_batch")
        fg = sc["fastest_good_batch"]
        if sb is None:
            sug = "none"
            tail = "- | - | - | no"
        else:
            sug = f"{sb} ({gm.get(str(sb), math.nan):.4g}, {gs.get(str(sb), math.nan):.1f})"
            tail = (f"{sc['time_ratio']:.2f} | {r['suggest_examples']:,} / {sc['grid_examples']:,} = "
                    f"{100 * sc['cost_fraction']:.1f}% | {r['suggest_seconds']:.0f} | "
                    f"{'yes' if sc['target_met'] else 'no'}{'' if sc['suggested_good'] else ' (not good)'}")
        lines.append(f"| {name} | {metric} | {sc['best_batch']} ({gm[str(sc['best_batch'])]:.4g}) | "
                     f"{', '.join(map(str, sc['good_batches']))} | {fg} ({gs[str(fg)]:.1f}) | {sug} | {tail} |")
    met = [r for r in results if (r.get("score") or score(r)).get("target_met")]
    lines.append("")
    lines.append(f"Target met on {len(met)} of {len(results)} tasks "
                 f"({sum(1 for r in met if r.get('held_out'))} of {sum(1 for r in results if r.get('held_out'))} held out); "
                 f"a good batch on {sum(1 for r in results if (r.get('score') or score(r)).get('suggested_good'))}.")
    lines.append("")
    lines.append("Grid seed-means (B = 2, 4, ..., 512) and, from suggest's last rung, the decision:")
    lines.append("")
    for r in results:
        sc = r.get("score") or score(r)
        means = " ".join(f"{v:.4g}" for _, v in sorted(sc["grid_means"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"- {r['task']}{' (held out)' if r.get('held_out') else ''}: {means}. "
                     f"suggest: {r.get('confirm', '-')}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["digits-mlp", "synthetic-mlp"])
    ap.add_argument("--held-out", nargs="*", default=[], help="tasks (also listed in --tasks) marked as held out")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--suggest-seed-offset", type=int, default=100, help="suggest's seeds start here (not the grid's)")
    ap.add_argument("--out", default="benchmarks/out/suggest_vs_grid")
    ap.add_argument("--max-epochs", type=float, default=None, help="cap each task's budget (epochs) to save time")
    ap.add_argument("--cost-runs", type=float, default=3.0,
                    help="suggest's cost budget in full training runs (default 3: within the 10%% of a 9-batch x 4-seed "
                         "grid = 3.6 runs; suggest's own default is 1)")
    ap.add_argument("--objective", choices=("epochs", "time"), default="epochs",
                    help="suggest's objective (epochs: the grid's fixed budget; time: within the time of one full run "
                         "at the task's own batch)")
    ap.add_argument("--max-candidates", type=int, default=None, help="suggest's max_candidates (default: suggest's)")
    ap.add_argument("--grid-only", action="store_true", help="run the grids only (no suggest)")
    ap.add_argument("--grid-store", default=None, help="the grids' results store (default OUT/store.db), to share one")
    ap.add_argument("--markdown", action="store_true", help="print the table from OUT/results.json and exit")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP spinning on a shared machine)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.markdown:
        print(markdown(json.loads((out / "results.json").read_text())))
        return
    if args.seeds < 4:
        ap.error(f"--seeds must be >= 4 (the issue's bar), got {args.seeds}")
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    from batchlab import suggest
    from batchlab.store import Store
    from batchlab.tasks import get_task

    store = Store(Path(args.grid_store) if args.grid_store else out / "store.db")
    seeds = list(range(args.seeds))
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else []
    for spec in args.tasks:
        task = get_task(spec)
        epochs = task.epochs if args.max_epochs is None else min(task.epochs, args.max_epochs)
        budget = round(epochs * task.n_train)
        t0 = time.perf_counter()
        g = grid_runs(task, seeds, budget, store)
        row: dict[str, Any] = {
            "task": task.name, "spec": spec, "held_out": spec in args.held_out, "budget_examples": budget,
            "metric_name": task.metric_name, "higher_is_better": task.higher_is_better, "grid": g,
            "grid_wall_s": time.perf_counter() - t0, "suggested_batch": None,
        }
        if not args.grid_only:
            s_seeds = tuple(args.suggest_seed_offset + i for i in range(2))
            t0 = time.perf_counter()
            s = suggest(task, seeds=s_seeds, budget_examples=budget, objective=args.objective,
                        cost_budget=round(args.cost_runs * budget),
                        **({} if args.max_candidates is None else {"max_candidates": args.max_candidates}),
                        store=Store(out / f"suggest-{spec.replace(':', '_')}.db"))
            row.update({
                "suggested_batch": s.batch_size, "suggested_lr": s.lr, "suggest_seconds": time.perf_counter() - t0,
                "suggest_examples": s.total_examples, "suggest_breakdown": s.examples_processed,
                "suggest_status": s.status, "suggest_headline": s.headline, "suggest_seeds": list(s_seeds),
                "cost_runs": args.cost_runs, "objective": args.objective, "max_candidates": args.max_candidates, "ranked": s.predict.ranked,
                "selected": s.predict.selected, "b_noise": s.b_noise, "halving": s.search.rungs, "confirm": s.confirm.message,
            })
        row["score"] = score(row)
        print(json.dumps({k: v for k, v in row.items() if k != "grid"}, allow_nan=True, default=str), flush=True)
        results = [r for r in results if r.get("spec") != spec] + [row]
        path.write_text(json.dumps(results, indent=2, allow_nan=True, default=str))
    print(markdown(results))


if __name__ == "__main__":
    main()
