"""Benchmark: overhead of the GradientNoiseScale callback on the training step time.

Trains the same run (micro-batch x accumulation, fixed steps) with and without the tracker,
alternating the two several times, and reports the ratio of median training time (evaluation
excluded). Target: <= 1.05 (at most 5% of the step time).

    .venv/bin/python benchmarks/noise_overhead.py --tasks digits-mlp digits-cnn
"""

from __future__ import annotations

import argparse
import statistics

import torch

from batchlab.batchsize import GradientNoiseScale
from batchlab.tasks import get_task
from batchlab.train import TrainConfig, fit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["digits-mlp", "digits-cnn"])
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--accumulation", type=int, default=4)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--every", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| task | micro x acc | tracker every | step time without (ms) | with (ms) | ratio |")
    print("|---|---|---|---|---|---|")
    for name in args.tasks:
        task = get_task(name)
        cfg = TrainConfig(batch_size=args.micro_batch, accumulation=args.accumulation, max_steps=args.steps,
                          eval_every=10**9, eval_train=False, drop_last=True)
        fit(task, cfg.replace(max_steps=20))  # warm-up
        for every in args.every:
            base, tracked = [], []
            for _ in range(args.repeats):
                base.append(fit(task, cfg).train_time / args.steps)
                gns = GradientNoiseScale(every=every)
                tracked.append(fit(task, cfg, callbacks=[gns]).train_time / args.steps)
                assert gns.updates > 0
            b, t = statistics.median(base), statistics.median(tracked)
            print(f"| {name} | {args.micro_batch} x {args.accumulation} | {every} | {1e3 * b:.3f} | {1e3 * t:.3f} | {t / b:.3f} |", flush=True)


if __name__ == "__main__":
    main()
