"""The three outside-style models of tests/byo/ trained with their tasks' defaults: the metric
before and after, steps and wall time; optionally ``suggest --quick`` on each.

    .venv/bin/python benchmarks/byo_defaults.py [--suggest] [--markdown docs/byo.md]

With ``--markdown FILE`` the table replaces the block between ``<!-- byo-table -->`` and
``<!-- /byo-table -->`` in FILE (the table in docs/byo.md comes from this command, never by hand).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "byo"))

from batchlab.train import TrainConfig, evaluate, fit  # noqa: E402

EXAMPLES = ("cifar_resnet", "char_gpt", "hf_style")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suggest", action="store_true", help="also run suggest(task, quick=True) on each")
    ap.add_argument("--markdown", default=None, help="write the table into this file's byo-table block")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import importlib

    head = "| example | task | metric | before | after | steps | seconds |"
    rows = [head, "|---|---|---|---|---|---|---|"]
    if args.suggest:
        rows[0] += " suggest --quick: batch, LR | suggest s |"
        rows[1] += "---|---|"
    for name in EXAMPLES:
        task = importlib.import_module(name).make_task()
        cfg = TrainConfig(batch_size=task.batch_size, epochs=task.epochs, seed=0)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            _, before = evaluate(task.make_model(), task.val_source, task)  # the metric at initialization
        r = fit(task, cfg)
        elapsed, after = r.wall_time, r.final["val_metric"]
        row = (f"| `{name}` | {task.name} | {task.metric_name} ({'higher' if task.higher_is_better else 'lower'} is better) "
               f"| {before:.3f} | {after:.3f} | {r.steps} | {elapsed:.1f} |")
        if args.suggest:
            from batchlab.batchsize import suggest

            t1 = time.perf_counter()
            s = suggest(task, quick=True)
            row += f" {s.batch_size}, {s.lr:.3g} | {time.perf_counter() - t1:.0f} |"
        rows.append(row)
        print(row, flush=True)
    table = "\n".join(rows)
    note = (f"Measured by `benchmarks/byo_defaults.py{' --suggest' if args.suggest else ''}` (torch "
            f"{torch.__version__}, {args.threads} thread(s); each task's default batch size, LR and epochs, seed 0).")
    print()
    print(table)
    if args.markdown:
        path = Path(args.markdown)
        text = path.read_text()
        start, end = "<!-- byo-table -->", "<!-- /byo-table -->"
        if start not in text or end not in text:
            raise SystemExit(f"--markdown {path}: no {start} ... {end} block")
        a, b = text.index(start) + len(start), text.index(end)
        path.write_text(text[:a] + "\n" + note + "\n\n" + table + "\n" + text[b:])
        print(f"wrote the table into {path}")


if __name__ == "__main__":
    main()
