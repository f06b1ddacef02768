"""Benchmark: ``batchlab.batchsize.suggest`` against the full grid of batch sizes (claim C14).

For each task: train every power of two from 2 to 512 (capped at the training set) with the LR
scaled by the optimizer's rule, the task's full budget and the same seeds; then run ``suggest``.
Reported per task:

- cost: training examples processed by suggest (memory probes, throughput timing, noise-scale run
  and pivot-search trials all counted) / examples of the grid (target <= 15%);
- regret: grid's best mean validation metric - grid's mean metric at the suggested batch, in
  points (target <= 0.5);
- whether the suggested batch is within one power of two of the grid's best (of any of them when
  several batch sizes tie exactly for the best mean, which happens on small validation sets).

Both go through a results store (``--out/store.db``), so a rerun costs nothing.

Two controls, because the grid's own best is partly seed noise:

- ``--replicate``: a second full grid with fresh seeds (``seeds + n``); its best batch is scored
  against the first grid exactly like suggest's. This is the ceiling of any method: a rerun of
  the grid itself, at 100% of the cost, is how far "the grid's best" reproduces.
- ``--suggest-seed-offset K``: suggest runs with seeds ``K, K+1, ...`` instead of the grid's, so its
  full-budget confirmation runs do not share the grid's seed noise.

    .venv/bin/python benchmarks/suggest_vs_grid.py --tasks digits-mlp synthetic-mlp mnist1d-mlp --max-epochs 10 --replicate
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from batchlab.batchsize import suggest
from batchlab.batchsize.search import fit_trial, trial_job
from batchlab.distributed.ray_backend import add_backend_args, backend_from_args, map_trials
from batchlab.store import Store, run_key
from batchlab.tasks import get_task
from batchlab.train import TrainConfig, default_lr_rule, scale_lr


def grid(task, seeds, budget_examples, store, low=2, high=512, backend=None):
    n = len(task.train_set)
    rule = default_lr_rule(task.optimizer)
    sizes = [b for b in (2**k for k in range(1, 12)) if low <= b <= min(high, n)]
    rows = {}
    examples = 0
    t0 = time.perf_counter()
    items, where = [], []
    for b in sizes:
        for s in seeds:
            cfg = TrainConfig(batch_size=b, lr=scale_lr(task.lr, task.batch_size, b, rule), optimizer=task.optimizer,
                              max_examples=budget_examples, seed=s, eval_train=False)
            items.append((run_key(task.fingerprint(), cfg.to_dict(), kind="grid"), (fit_trial, task, cfg)))
            where.append(b)
    # every grid trial is independent: with --backend ray they run as parallel Ray Tune trials
    payloads = map_trials(store, items, trial_job, backend=backend, kind="grid")
    for b in sizes:
        ds = [d for d, w in zip(payloads, where) if w == b]
        examples += sum(int(d.get("examples", 0)) for d in ds)
        vals = [d["metric"] if d["status"] == "ok" else math.nan for d in ds]
        rows[b] = statistics.fmean(vals) if all(math.isfinite(v) for v in vals) else -math.inf
        print(f"  grid {task.name} B={b}: {rows[b]:.4f}", flush=True)
    return rows, examples, time.perf_counter() - t0


def best_batches(g: dict[int, float]) -> list[int]:
    """Every batch size whose mean metric equals the grid's best exactly."""
    top = max(g.values())
    return [b for b, v in g.items() if v == top]


def within_one_pow2(b: int | None, bests: list[int]) -> bool:
    return b is not None and any(abs(math.log2(b) - math.log2(x)) <= 1 for x in bests)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["digits-mlp", "synthetic-mlp", "mnist1d-mlp"])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out/suggest_vs_grid")
    ap.add_argument("--max-epochs", type=float, default=None, help="cap each task's budget (epochs) to save time")
    ap.add_argument("--replicate", action="store_true", help="also run a second grid with fresh seeds (the ceiling)")
    ap.add_argument("--suggest-seed-offset", type=int, default=0, help="suggest's seeds start here (0: the grid's seeds)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP spinning on a shared machine)")
    add_backend_args(ap)
    args = ap.parse_args()
    backend = backend_from_args(args)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = Store(out / "store.db")
    seeds = tuple(range(args.seeds))
    results = []
    for name in args.tasks:
        task = get_task(name)
        epochs = task.epochs if args.max_epochs is None else min(task.epochs, args.max_epochs)
        budget = round(epochs * len(task.train_set))
        g, g_examples, g_time = grid(task, seeds, budget, store, backend=backend)
        t0 = time.perf_counter()
        s_seeds = tuple(args.suggest_seed_offset + i for i in range(args.seeds))
        s = suggest(task, seeds=s_seeds, budget_examples=budget, store=Store(out / f"suggest-{name}.db"), backend=backend)
        s_time = time.perf_counter() - t0
        best_b = max(g, key=g.get)
        bests = best_batches(g)
        sb = s.batch_size
        regret = 100 * (g[best_b] - g.get(sb, -math.inf)) if sb is not None else math.inf
        row = {
            "task": name, "budget_examples": budget, "grid_best_batch": best_b, "grid_best_batches": bests, "grid_best_metric": g[best_b],
            "suggested_batch": sb, "suggested_lr": s.lr, "grid_metric_at_suggested": g.get(sb),
            "regret_points": regret, "within_one_pow2": within_one_pow2(sb, bests),
            "suggest_examples": s.total_examples, "grid_examples": g_examples,
            "cost_ratio": s.total_examples / g_examples, "suggest_breakdown": s.examples_processed,
            "suggest_wall_s": s_time, "grid_wall_s": g_time, "b_noise": s.b_noise, "search_path": s.search["path"],
            "grid": {str(k): v for k, v in g.items()}, "suggest_seeds": list(s_seeds),
            "confirm": s.search.get("confirm"), "screen_means": s.search["means"],
        }
        if args.replicate:
            r_seeds = tuple(range(args.seeds, 2 * args.seeds))
            g2, _, _ = grid(task, r_seeds, budget, store, backend=backend)
            rb = max(g2, key=g2.get)
            row["replicate"] = {"seeds": list(r_seeds), "grid": {str(k): v for k, v in g2.items()}, "best_batch": rb,
                                "regret_points": 100 * (g[best_b] - g[rb]),
                                "within_one_pow2": within_one_pow2(rb, bests)}
        results.append(row)
        print(json.dumps(row, allow_nan=True), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True))
    print("\n| task | grid best B (val acc) | suggested B (grid acc there) | regret (points) | within x2 | examples suggest/grid | suggest wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['task']} | {' = '.join(map(str, r['grid_best_batches']))} ({100 * r['grid_best_metric']:.2f}) | {r['suggested_batch']} "
              f"({100 * (r['grid_metric_at_suggested'] or math.nan):.2f}) | {r['regret_points']:.2f} | "
              f"{'yes' if r['within_one_pow2'] else 'no'} | {r['suggest_examples']}/{r['grid_examples']} = {100 * r['cost_ratio']:.1f}% "
              f"| {r['suggest_wall_s']:.0f} |")
    reps = [r for r in results if "replicate" in r]
    if reps:
        print("\nCeiling: a second grid with fresh seeds, scored against the first")
        print("| task | first grid best B | replicate grid best B (first grid's acc there) | regret (points) | within x2 |")
        print("|---|---|---|---|---|")
        for r in reps:
            p = r["replicate"]
            print(f"| {r['task']} | {r['grid_best_batch']} | {p['best_batch']} ({100 * r['grid'][str(p['best_batch'])]:.2f}) | "
                  f"{p['regret_points']:.2f} | {'yes' if p['within_one_pow2'] else 'no'} |")


if __name__ == "__main__":
    main()
