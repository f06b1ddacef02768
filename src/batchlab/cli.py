"""The ``batchlab`` command line. Thin: it parses, validates and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from batchlab import __version__
from batchlab.argtypes import nonneg_float, positive_float, positive_int  # noqa: F401  (used by cli_* too)


class CliError(Exception):
    """A usage error found after parsing (e.g. a batch larger than the data set): exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from None


def key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"must look like key=value, got {text!r}")
    k, v = text.split("=", 1)
    try:
        return k, json.loads(v)
    except json.JSONDecodeError:
        return k, v


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads for this command (applied by :func:`main`)."""
    p.add_argument(
        "--threads", type=positive_int, default=None,
        help="torch CPU threads (default: torch's choice). 1 is fastest for the built-in tasks' tiny models, "
        "especially when other processes share the cores",
    )


def add_task_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--task", required=required, help="task name (see `batchlab tasks`) or package.module:function")
    p.add_argument("--data-root", help="folder with MNIST idx / CIFAR-10 files for mnist-cnn and cifar10-resnet")
    p.add_argument(
        "--task-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE",
        help="keyword passed to the task factory (e.g. n_samples=2000); repeatable",
    )


def load_task(args: argparse.Namespace) -> Any:
    from batchlab.tasks import get_task

    kwargs = dict(args.task_arg)
    if args.data_root:
        kwargs["root"] = args.data_root
    try:
        return get_task(args.task, **kwargs)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise CliError(f"--task {args.task!r}: {e}") from e


def add_train_args(p: argparse.ArgumentParser) -> None:
    from batchlab.train.config import OPTIMIZERS, SCHEDULES

    p.add_argument("--batch-size", type=positive_int, default=None, help="examples per step (default: the task's)")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: the task's)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default: the task's")
    p.add_argument("--momentum", type=nonneg_float, default=0.9)
    p.add_argument("--weight-decay", type=nonneg_float, default=0.0)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=positive_float, default=None, help="budget in epochs (default: the task's)")
    budget.add_argument("--steps", type=positive_int, default=None, help="budget in optimizer steps")
    budget.add_argument("--examples", type=positive_int, default=None, help="budget in training examples")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--milestones", type=float_list, default=(), help="fractions of the budget, e.g. 0.5,0.75")
    p.add_argument("--accumulation", type=positive_int, default=1, help="micro-batches per step")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: every epoch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--norm", default=None, help="batch, group, layer, instance, none ... (default: the task's)")
    p.add_argument("--activation", choices=("relu", "sigmoid", "tanh"), default="relu")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on CUDA)")


def config_from_args(args: argparse.Namespace, task: Any) -> Any:
    from batchlab.norm import known_norms
    from batchlab.train.config import TrainConfig

    batch = args.batch_size or task.batch_size
    if batch > len(task.train_set):
        raise CliError(f"--batch-size {batch} is larger than the training set of {task.name} ({len(task.train_set)} examples)")
    if args.norm is not None and args.norm not in known_norms():
        raise CliError(f"--norm {args.norm!r} is unknown; known: {', '.join(known_norms())}")
    budget: dict[str, Any] = {"epochs": args.epochs or task.epochs}
    if args.steps:
        budget = {"epochs": None, "max_steps": args.steps}
    elif args.examples:
        budget = {"epochs": None, "max_examples": args.examples}
    try:
        return TrainConfig(
            batch_size=batch, lr=args.lr, optimizer=args.optimizer, momentum=args.momentum,
            weight_decay=args.weight_decay, schedule=args.schedule, warmup_steps=args.warmup_steps,
            milestones=args.milestones, accumulation=args.accumulation, eval_every=args.eval_every,
            seed=args.seed, norm=args.norm, activation=args.activation, device=args.device, amp=args.amp, **budget,
        )
    except ValueError as e:
        raise CliError(str(e)) from e


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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="batchlab", description="Measure batch size and normalization choices for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"batchlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

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

    for register in _EXTENSIONS:
        register(sub)
    return parser


# Modules that add sub-commands (batch-size tools, normalization tools, experiments) append here.
_EXTENSIONS: list[Callable[[Any], None]] = []


def _load_extensions() -> None:
    import importlib

    if _EXTENSIONS:
        return
    for name in ("batchlab.cli_batchsize", "batchlab.cli_norm", "batchlab.cli_experiments", "batchlab.cli_slim"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        _EXTENSIONS.append(module.register)


def main(argv: Sequence[str] | None = None) -> int:
    _load_extensions()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        sys.stderr.write(f"batchlab {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; finished trials are kept in the results store\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
