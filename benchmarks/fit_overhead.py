"""fit() against a plain hand-written torch loop: same model, data, batch, epochs and evaluation.

Both train for the same number of epochs with SGD+momentum and evaluate on the validation set
after every epoch. Runs are interleaved (raw, fit, raw, fit, ...) and the ratio of medians is
printed. Two data paths:

- in-memory built-in tasks (``--tasks``): the raw loop indexes the tensors by hand;
- a DataLoader-backed task (``--loader-task``, default the outside-style CIFAR ResNet of
  tests/byo/cifar_resnet.py: uint8 images, crop/flip augmentation, ``--workers`` processes): the
  raw loop iterates a ``torch.utils.data.DataLoader`` over the same Dataset.

Target: fit / raw <= 1.03 on both paths.

    .venv/bin/python benchmarks/fit_overhead.py [--repeats 7] [--epochs 5] [--tasks digits-mlp,mnist1d-cnn]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from batchlab.tasks import get_task
from batchlab.train import TrainConfig, fit


def raw_loop(task, model, batch_size: int, epochs: int, lr: float, seed: int) -> float:
    """The loop a person writes by hand; returns the last validation accuracy."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    x, y = task.train_set.x, task.train_set.y
    n = x.shape[0]
    acc = 0.0
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item()
        model.eval()
        with torch.no_grad():
            logits = model(task.val_set.x)
            acc = float((logits.argmax(1) == task.val_set.y).float().mean())
    return acc


def raw_loader_loop(task, model, batch_size: int, epochs: int, lr: float, seed: int) -> float:
    """The same by hand over a DataLoader of the task's Dataset; returns the last validation accuracy."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    # persistent workers: the fastest way to write it by hand (no worker start-up per epoch)
    keep = task.num_workers > 0
    train = DataLoader(task.train_set, batch_size=batch_size, shuffle=True, generator=gen,
                       num_workers=task.num_workers, collate_fn=task.collate_fn, persistent_workers=keep)
    val = DataLoader(task.val_set, batch_size=batch_size, num_workers=task.num_workers, collate_fn=task.collate_fn,
                     persistent_workers=keep)
    acc = 0.0
    for _ in range(epochs):
        model.train()
        for x, y in train:
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            loss.item()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in val:
                correct += int((model(x).argmax(1) == y).sum())
                total += len(y)
        acc = correct / total
    return acc


def compare(name: str, task, loop, args) -> None:
    cfg = TrainConfig(batch_size=args.batch_size, epochs=args.epochs, optimizer="momentum", lr=task.lr,
                      eval_train=False)
    raw_t, fit_t = [], []
    for rep in range(args.repeats + 1):  # the first pair warms up
        torch.manual_seed(rep)
        model = task.make_model()
        t0 = time.perf_counter()
        raw_acc = loop(task, model, args.batch_size, args.epochs, task.lr, rep)
        t1 = time.perf_counter()
        torch.manual_seed(rep)
        model = task.make_model()  # built outside the timed region, as for the raw loop
        t1 = time.perf_counter()
        r = fit(task, cfg.replace(seed=rep), model=model)
        t2 = time.perf_counter()
        if rep:
            raw_t.append(t1 - t0)
            fit_t.append(t2 - t1)
    raw_m, fit_m = statistics.median(raw_t), statistics.median(fit_t)
    print(f"{name:<38} {raw_m:8.3f} {fit_m:8.3f} {fit_m / raw_m:8.3f}  {raw_acc:7.3f} {r.final['val_acc']:7.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="digits-mlp,mnist1d-cnn")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--loader-task", default="cifar_resnet:make_task",
                    help="a DataLoader-backed task entry point ('' to skip); tests/byo is on the path")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the loader task")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"epochs {args.epochs}, {args.repeats} interleaved repeats")
    print(f"{'task':<38} {'raw s':>8} {'fit s':>8} {'fit/raw':>8}  {'raw acc':>7} {'fit acc':>7}")
    for name in filter(None, args.tasks.split(",")):
        compare(name, get_task(name), raw_loop, args)
    if args.loader_task:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "byo"))
        task = get_task(args.loader_task, num_workers=args.workers)
        compare(f"{task.name} (DataLoader, {args.workers} workers)", task, raw_loader_loop, args)


if __name__ == "__main__":
    main()
