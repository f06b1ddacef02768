"""``batchlab tasks``, ``batchlab train`` and ``batchlab report``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from batchlab.cli.common import (
    CliError,
    claim_out,
    add_task_args,
    add_threads_arg,
    add_train_args,
    config_from_args,
    load_task,
    prepare_out,
)


def cmd_tasks(args: argparse.Namespace) -> int:
    from batchlab.tasks import list_tasks

    tasks = list_tasks()
    width = max(map(len, tasks), default=4)
    for name, desc in tasks.items():
        print(f"{name:<{width}}  {desc}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from batchlab.distributed import maybe_run_distributed
    from batchlab.fileio import OutputError
    from batchlab.train import fit

    task = load_task(args)
    config = config_from_args(args, task)
    path = None
    if args.out:  # checked before training: a finished run must have somewhere to go
        path = prepare_out(args.out) / result_filename(args, task, config)
        if path.exists():
            raise CliError(f"--out: {path} already exists (a run with the same task, task arguments, data and "
                           "config); it is never overwritten: move it away or choose another --out folder")
    result = maybe_run_distributed(args, task, config)  # under torchrun with 2+ processes
    if result is None:
        # an exception of the model mid-run is the run's outcome ("failed", its traceback and history kept
        # in the result), not a usage error: the task itself was checked before training
        result = fit(task, config, progress=not args.quiet, raise_errors=False)
        if result.status == "failed" and not result.failed_step:
            # the very first step failed: the task cannot run as given (a batch of one through BatchNorm,
            # a shape the model rejects): a usage error, one line, nothing trained that could be lost
            from batchlab.train import last_error_line

            raise CliError(f"task {task.name!r}: training failed at step 0 (batch {config.batch_size}): "
                           f"{last_error_line(result.error)}")
    summary = {k: v for k, v in result.to_dict().items() if k != "history"}
    if path is not None:
        try:
            summary["path"] = str(_write_new(path, result.to_json()))
        except OutputError as e:  # e.g. the disk filled up while training: the result goes to stdout
            print(result.to_json())
            raise CliError(f"{e}; the full result was printed on stdout instead") from e
    print(json.dumps(summary, indent=2))
    if result.status == "failed":
        from batchlab.train import last_error_line

        sys.stderr.write(f"batchlab train: training failed at step {result.failed_step} "
                         f"({last_error_line(result.error)}); the result records it\n")
    return 0 if result.ok else 1


def result_filename(args: argparse.Namespace, task: Any, config: Any) -> str:
    """``<task>-b<batch>-s<seed>-<hash>.json``: the hash covers every input that changes the result
    (task spec, ``--task-arg`` values, ``--data-root``, the task's fingerprint, the whole config), and
    the task name is reduced to letters, digits, ``.``, ``_`` and ``-`` (no ``/``, no leading dot),
    so the file lands directly inside ``--out``."""
    import os

    from batchlab.store import run_key

    root = os.path.abspath(os.path.expanduser(args.data_root)) if args.data_root else None
    fingerprint = task.fingerprint() if hasattr(task, "fingerprint") else {"name": task.name}
    key = run_key(fingerprint, config.to_dict(), task_spec=args.task, task_args=[[k, v] for k, v in args.task_arg],
                  data_root=root)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(task.name)).lstrip(".")[:80] or "task"
    return f"{name}-b{config.batch_size}-s{config.seed}-{key[:16]}.json"


def _write_new(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, never replacing a file: when ``path`` appeared meanwhile
    (another process), the next free ``<stem>-2.json``, ``-3`` ... is used."""
    from batchlab.fileio import atomic_write

    for n in range(1, 1000):
        target = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        try:
            return atomic_write(target, text, exclusive=True)
        except FileExistsError:
            continue
    raise CliError(f"--out: {path} and 999 numbered variants exist; nothing was overwritten")


def cmd_report(args: argparse.Namespace) -> int:
    from batchlab.report.html import report_from_dir

    path = Path(args.dir)
    if not path.is_dir():
        raise CliError(f"DIR {args.dir!r} is not a folder")
    if args.out:
        out = prepare_out(args.out)
    else:
        try:
            out = prepare_out(path / "report", "the report folder")
        except CliError as e:
            raise CliError(f"{e}; write the report elsewhere with --out") from e
    # a report is rebuilt from its folder (the same DIR refreshes it); another folder's report is another result
    args.source = str(path.resolve())
    claim_out(out, args, keys=("source",))
    try:
        index = report_from_dir(path, out_dir=out)
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
    p.add_argument("--out", help="folder for index.html and figures/ (default: DIR/report); use it when DIR is read-only")
    p.set_defaults(func=cmd_report)
