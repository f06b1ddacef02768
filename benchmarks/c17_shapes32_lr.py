"""C17's lr32 for a Shapes-32 task, chosen from runs at B = 32 only (docs/reproduce.md, 2026-12-01).

BN and GN at B = 32, seed 0, 8 epochs, one thread, for lr32 in 0.025 and 0.05; the lr32 with the
higher mean of the two final validation accuracies is used (never a small-batch run).

    .venv/bin/python benchmarks/c17_shapes32_lr.py --task shapes32-vgg
"""

from __future__ import annotations

import argparse

import torch

from batchlab.tasks import get_task
from batchlab.train import TrainConfig, fit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="shapes32-vgg", choices=("shapes32-cnn", "shapes32-vgg"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    task = get_task(args.task)
    means = {}
    for lr32 in (0.025, 0.05):
        accs = []
        for norm in ("batch", "group"):
            r = fit(task, TrainConfig(batch_size=32, lr=lr32, optimizer="momentum", epochs=8, norm=norm, seed=0,
                                      eval_train=False))
            accs.append(r.metric("val_acc"))
            print(f"lr32 {lr32} {norm}: {r.status}, val accuracy {accs[-1]:.4f}", flush=True)
        means[lr32] = sum(accs) / 2
    print("mean of BN and GN:", ", ".join(f"lr32 {k}: {v:.4f}" for k, v in means.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
