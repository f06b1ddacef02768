"""``batchlab tasks``, ``batchlab train`` and ``batchlab report``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from batchlab.cli.common import CliError, add_task_args, add_threads_arg, add_train_args, config_from_args, load_task


def cmd_tasks(args: argparse.Namespace) -> int:
    from batchlab.tasks import list_tasks

    tasks = list_tasks()
    width = max(map(len, tasks), default=4)
    for name, desc in tasks.items():
        print(f"{name:<{width}}  {desc}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from batchlab.distributed import maybe_run_distributed
    from batchlab.train import fit

    task = load_task(args)
    config = config_from_args(args, task)
    result = maybe_run_distributed(args, task, config)  # under torchrun with 2+ processes
    if result is None:
        result = fit(task, config, progress=not args.quiet)
    summary = {k: v for k, v in result.to_dict().items() if k != "history"}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{task.name}-b{config.batch_size}-s{config.seed}-{_short_hash(summary['config'])}.json"
        path.write_text(result.to_json())
        summary["path"] = str(path)
    print(json.dumps(summary, indent=2))
    return 0 if result.ok else 1


def _short_hash(d: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def cmd_report(args: argparse.Namespace) -> int:
    from batchlab.report.html import report_from_dir

    path = Path(args.dir)
    if not path.is_dir():
        raise CliError(f"DIR {args.dir!r} is not a folder")
    try:
        index = report_from_dir(path)
    except ValueError as e:
        raise CliError(str(e)) from e
    print(index)
    return 0


def register(sub: Any) -> None:
    sub.add_parser("tasks", help="list the built-in tasks").set_defaults(func=cmd_tasks)

    p = sub.add_parser("train", help="train a task once and print its result as JSON")
    add_task_args(p)
    add_train_args(p)
    from batchlab.distributed import add_distributed_args

    add_distributed_args(p)
    add_threads_arg(p)
    p.add_argument("--out", help="folder to write the full result JSON into")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="turn a folder of result JSON into figures and an HTML page")
    p.add_argument("dir", help="folder of result JSON files (e.g. from `batchlab train --out DIR`)")
    p.set_defaults(func=cmd_report)
