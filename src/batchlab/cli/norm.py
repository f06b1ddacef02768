"""``batchlab bn-health``: diagnose the BatchNorm layers of a task's model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from batchlab.cli.common import CliError, add_task_args, add_threads_arg, load_task, nonneg_float, positive_int


def register(sub: Any) -> None:
    p = sub.add_parser("bn-health", help="check a model's BatchNorm layers: dead channels, collapsed or non-finite "
                                         "statistics, train/eval gap, saturation")
    add_task_args(p)
    add_threads_arg(p)
    p.add_argument("--checkpoint", help="state_dict file (torch.save) to load into the task's model")
    p.add_argument("--epochs", type=nonneg_float, default=1.0,
                   help="train this many epochs first when no checkpoint is given (0: the fresh model)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="validation examples in the checked batch (default 128, or the whole validation set if smaller)")
    p.add_argument("--norm", default=None, help="norm of the model (default: the task's)")
    p.add_argument("--activation", choices=("relu", "sigmoid", "tanh"), default="relu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_bn_health)


def cmd_bn_health(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from batchlab.norm import bn_health, format_bn_health
    from batchlab.train import TrainConfig, fit

    from batchlab.norm import is_batchnorm

    task = load_task(args)
    n_val = task.size("val")  # None: a validation stream of unknown length
    if args.batch_size is None:
        args.batch_size = 128 if n_val is None else min(128, n_val)
    if n_val is not None and args.batch_size > n_val:
        raise CliError(f"--batch-size {args.batch_size} is larger than the validation set of {task.name} ({n_val} "
                       "examples), which the checked batch is drawn from")
    torch.manual_seed(args.seed)
    try:
        model = task.make_model(norm=args.norm, activation=args.activation)
    except ValueError as e:
        raise CliError(f"--norm {args.norm!r}: {e}") from e
    if not any(is_batchnorm(m) for m in model.modules()):
        if not task.model_kwargs:  # a user model: --norm only swaps BatchNorm layers it does not have
            raise CliError(f"--task {args.task!r}: the model has no BatchNorm layer, so there is nothing for "
                           "bn-health to check")
        norm = f"--norm {args.norm!r}" if args.norm else f"its default norm {getattr(task, 'norm', None)!r}"
        raise CliError(f"--task {args.task!r}: the model (with {norm}) has no BatchNorm layer, so there is nothing for "
                       "bn-health to check; try --norm batch")
    if args.checkpoint:
        path = Path(args.checkpoint)
        if not path.is_file():
            raise CliError(f"--checkpoint {args.checkpoint!r} is not a file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        except Exception as e:  # noqa: BLE001 - any load failure is a usage error here
            # torch's load_state_dict error: a header line, then one line per kind of mismatch (missing keys,
            # unexpected keys, size mismatches): the kinds are what tells the user what is wrong
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
            what = " ".join(lines[:4])
            if len(what) > 600:
                what = what[:600] + " ..."
            raise CliError(f"--checkpoint {args.checkpoint!r} does not load into {task.name}'s model: {what}") from e
    elif args.epochs > 0:
        result = fit(task, TrainConfig(batch_size=min(task.batch_size, task.size("train") or task.batch_size), epochs=args.epochs,
                                       seed=args.seed, norm=args.norm, activation=args.activation),
                     model=model, progress=not args.json)
        if not result.ok:
            print(f"note: training ended with status {result.status}: {result.error}")
    n = args.batch_size
    batch = task.sample_batch(n, seed=args.seed, split="val", device=next(iter(model.parameters())).device)
    report = bn_health(model, batch, forward=task.forward_batch)
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2, default=str))
    else:
        print(format_bn_health(report))
    return 0
