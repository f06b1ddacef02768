"""The ``batchlab`` command line. Thin: it parses, validates and calls the library.

Each sub-module registers its commands on the parser; the table below is the whole command set.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from batchlab import __version__
from batchlab.cli import batchsize, experiments, norm, slim, train
from batchlab.cli.common import CliError, _Parser, release_out_locks
from batchlab.fileio import OutputError
from batchlab.store import StoreError

# command groups, in the order `batchlab --help` lists them
COMMAND_GROUPS = (train, batchsize, norm, experiments, slim)


def build_parser() -> _Parser:
    parser = _Parser(prog="batchlab", description="Measure batch size and normalization choices for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"batchlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def _task_errors() -> tuple[type[Exception], ...]:
    """``TaskError`` when the tasks package is loaded (it imports torch, which ``--help`` need not)."""
    tasks = sys.modules.get("batchlab.tasks")
    error = getattr(tasks, "TaskError", None)
    return (error,) if isinstance(error, type) else ()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser: "batchlab suggest: error: ..."
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except Exception as e:  # noqa: BLE001 - narrowed right below
        # a usage error, a task that cannot run as given (TaskError names the task and what was
        # wrong), a results store that cannot be opened or is damaged, an output that cannot be
        # written: one line naming the argument or file, exit status 2; anything else is a bug
        if not isinstance(e, (CliError, StoreError, OutputError, *_task_errors())):
            raise
        message = _with_flags(" ".join(str(e).split()), parser, args.command)  # one line, with the flags' names
        sys.stderr.write(f"batchlab {args.command}: error: {message}\n")
        return 2
    except KeyboardInterrupt:
        if args.command in _RESUMABLE:
            sys.stderr.write("interrupted; finished trials are kept in the results store: the same command resumes\n")
        else:
            sys.stderr.write("interrupted; no result was written\n")
        return 130
    finally:
        release_out_locks()


#: commands whose trials go to a results store in --out, so a rerun resumes
_RESUMABLE = ("suggest", "reproduce", "critical-batch")


def _with_flags(message: str, parser: argparse.ArgumentParser, command: str) -> str:
    """``message`` with the library's argument names (``eval_every``, ``memory_limit``) followed by the
    command's flag that sets them, once each, so a CLI user knows which option to change."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[command]._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if not flags or "_" not in action.dest:
            continue
        message = re.sub(rf"(?<![\w-]){re.escape(action.dest)}\b(?! \(--)", f"{action.dest} ({flags[0]})", message, count=1)
    return message

