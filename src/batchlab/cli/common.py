"""Pieces every command-line module shares: the parser class, usage errors, task and training flags."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Any, NoReturn

from batchlab.argtypes import device, nonneg_float, positive_float, positive_int


class CliError(Exception):
    """A usage error found after parsing (e.g. a batch larger than the data set): exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message and exit status 2, and no abbreviated options
    (``--seed`` must not silently mean ``--seeds``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

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
    if not k.strip():
        raise argparse.ArgumentTypeError(f"must look like key=value with a non-empty key, got {text!r}")
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
    """The task the command line names, checked before any work: it loads, its training and
    validation sets are not empty, and its model builds with the given ``--norm``/``--activation``
    and ``--task-arg`` values (a bad value fails here, with its flag, not as a traceback later)."""
    import torch

    from batchlab.norm import known_norms
    from batchlab.tasks import get_task

    kwargs = dict(args.task_arg)
    if args.data_root:
        kwargs["root"] = args.data_root
    given = f"--task {args.task!r}" + "".join(f" --task-arg {k}={v!r}" for k, v in args.task_arg)
    try:
        task = get_task(args.task, **kwargs)
    except (ValueError, FileNotFoundError, TypeError) as e:
        if args.data_root and "root" in str(e) and isinstance(e, TypeError):
            raise CliError(f"--data-root is for tasks that read data files (mnist-cnn, cifar10-resnet); task "
                           f"{args.task!r} does not take it ({e})") from e
        raise CliError(f"{given}: {e}") from e
    norm, activation = getattr(args, "norm", None), getattr(args, "activation", None)
    if norm is not None and norm not in known_norms():
        raise CliError(f"--norm {norm!r} is unknown; known: {', '.join(known_norms())}")
    flags = "".join(f" {f} {v!r}" for f, v in (("--norm", norm), ("--activation", activation)) if v not in (None, "relu"))
    try:
        with torch.random.fork_rng(devices=[]):  # the probe leaves the caller's RNG as it was
            model = task.make_model(norm=norm, activation=activation)
        # one tiny batch through the model, loss and metric: empty data sets, batches the model
        # rejects, a non-scalar loss, labels out of range all fail here, before any long work
        task.check(getattr(args, "device", "cpu"), model=model)
    except (ValueError, TypeError) as e:
        raise CliError(f"{given}{flags}: {e}") from e
    return task


def prepare_out(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Create the output folder and check that files can be written in it, before any work."""
    from batchlab.fileio import OutputError, probe_dir

    try:
        return probe_dir(path, flag)
    except OutputError as e:
        raise CliError(str(e)) from e


#: what each command leaves in its --out folder, for folders written before the owner file existed
_RESULT_FILES = (("suggestion.json", "suggest"), ("critical_batch.json", "critical-batch"), ("verdicts.md", "reproduce"),
                 ("index.html", "report"))
_OWNER_FILE = ".batchlab-command.json"
#: settings that do not change what a command computes
_NOT_IDENTITY = {"func", "command", "quiet", "threads", "out", "markdown", "markdown_block", "list", "backend", "retry_failed",
                 "address", "cpus_per_trial", "gpus_per_trial"}


def claim_out(out: Path, args: argparse.Namespace, keys: Sequence[str] | None = None, *, mark: bool = True,
              task: Any = None) -> None:
    """Refuse an ``--out`` folder that holds another command's results, or this command's for
    other settings (results are never overwritten), and mark the folder as this run's.

    ``keys``: the arguments that make a run's results what they are (None: every argument but
    those that only change how it runs); a rerun with the same ones resumes or refreshes.
    ``mark=False``: only check (a command that writes its results at the end checks before its
    long work and marks when it writes, so a run refused on its arguments leaves no mark).
    ``task``: the loaded task, whose fingerprint (a user task's model and data code, a built-in's
    data) is part of the settings, so a folder measured with other code is not taken for this one's
    (a folder claimed before the fingerprint was recorded is checked on its arguments alone).
    """
    from batchlab.fileio import atomic_write

    names = sorted(k for k in vars(args) if k not in _NOT_IDENTITY) if keys is None else list(keys)
    mine = {"command": args.command, "settings": {k: _plain(getattr(args, k, None)) for k in names}}
    if task is not None:
        digest = hashlib.blake2b(json.dumps(task.fingerprint(), sort_keys=True, default=str).encode(), digest_size=8)
        mine["settings"]["task_version"] = digest.hexdigest()
    _lock_out(out)  # held until the command ends: a second run on this folder is refused, not mixed in
    owner_path = out / _OWNER_FILE
    owner: dict[str, Any] | None = None
    if owner_path.is_file():
        try:
            owner = json.loads(owner_path.read_text())
            if not isinstance(owner, dict):
                raise ValueError("not a mapping")
        except (OSError, ValueError) as e:
            if _holds_results(out):
                raise CliError(f"--out {out} holds results, but its {_OWNER_FILE} (which settings they were made with) "
                               f"cannot be read ({e}); results are never overwritten: choose another folder") from e
            owner = None  # nothing finished here: the folder is free
    elif _holds_results(out):
        legacy = "reproduce" if any(out.glob("*/outcome.json")) else None
        legacy = legacy or next((cmd for f, cmd in _RESULT_FILES if (out / f).exists()), None)
        if (out / "batchlab.db").is_file():  # a damaged store is that, not results: say so
            from batchlab.store import Store

            Store(out / "batchlab.db", readonly=True).close()
        if not (legacy == "reproduce" == args.command):
            whose = f"of `batchlab {legacy}`" if legacy else "a results store"
            raise CliError(f"--out {out} holds results ({whose}) but no {_OWNER_FILE} saying which "
                           "settings they were made with; results are never overwritten: choose another folder")
        # reproduce() called from Python writes no owner file; its trials are stored under keys of their
        # own settings, and each claim's outcome is rebuilt from them, so the command may go on there
        owner = {"command": "reproduce", "settings": None}
    if owner is not None:
        if owner.get("command") != args.command:
            raise CliError(f"--out {out} holds the results of `batchlab {owner.get('command')}`; results are never "
                           "overwritten: choose another folder")
        theirs = owner.get("settings")
        if theirs is not None and "task_version" not in theirs and "task_version" in mine["settings"]:
            theirs = {**theirs, "task_version": mine["settings"]["task_version"]}  # claimed before it was recorded
        if theirs is not None and theirs != mine["settings"] and _holds_results(out):
            changed = [k for k in sorted(set(theirs) | set(mine["settings"])) if theirs.get(k) != mine["settings"].get(k)]
            diff = ", ".join(f"{k}={theirs.get(k)!r} (now {mine['settings'].get(k)!r})" for k in changed)
            if changed == ["task_version"]:
                raise CliError(f"--out {out} holds the results of `batchlab {args.command}` for another version of task "
                               f"{getattr(task, 'name', '?')!r} (its model, data or code changed since); results are never "
                               "overwritten: choose another folder")
            raise CliError(f"--out {out} holds the results of `batchlab {args.command}` with other settings ({diff}); "
                           "results are never overwritten: choose another folder, or rerun with the same settings "
                           "to resume")
    if mark:
        atomic_write(owner_path, json.dumps(mine, indent=1, sort_keys=True))


#: --out folders this process has locked (path -> open lock file), released when the command ends
_HELD: dict[str, Any] = {}
_LOCK_FILE = ".batchlab.lock"


def _lock_out(out: Path) -> None:
    """An exclusive lock on ``out`` for the rest of this command (``flock``: the system drops it when
    the process ends, however it ends); refused at once when another process holds it. Where
    ``fcntl`` is missing (Windows) or the file system has no ``flock`` (some network mounts) folders
    are not locked."""
    key = str(out.resolve())
    if key in _HELD:
        return
    try:
        import fcntl
    except ImportError:
        return
    try:
        f = open(out / _LOCK_FILE, "a+")  # noqa: SIM115 - kept open: the lock lives as long as the file
    except OSError:
        return  # a folder where no lock file can be made: not locked (prepare_out checked it is writable)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        f.close()
        raise CliError(f"--out {out} is in use by another batchlab run; results are never overwritten or mixed: wait "
                       "for it to finish (then the same command resumes or shows its result), or choose another "
                       "folder") from e
    except OSError:  # a file system without flock (some network mounts): not locked
        f.close()
        return
    _HELD[key] = f


def release_out_locks() -> None:
    """Drop the --out locks this process holds (at the end of a command)."""
    while _HELD:
        _, f = _HELD.popitem()
        f.close()


def _holds_results(out: Path) -> bool:
    """Whether ``out`` holds anything a run finished: a result file, a claim's outcome, or a trial in
    its results store (a run refused on its arguments or stopped before its first trial holds none,
    so its folder may be used again with other settings)."""
    if any(out.glob("*/outcome.json")) or any((out / f).exists() for f, _ in _RESULT_FILES):
        return True
    db = out / "batchlab.db"
    if not db.is_file():
        return False
    from batchlab.store import Store

    try:
        with Store(db, readonly=True) as store:
            return len(store) > 0
    except Exception:  # noqa: BLE001 - an unreadable store is kept as if it held results
        return True


def _plain(v: Any) -> Any:
    """A JSON-able form of an argument value (tuples as lists, other objects as text)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def add_train_args(p: argparse.ArgumentParser) -> None:
    from batchlab.train.config import OPTIMIZERS, SCHEDULES

    p.add_argument("--batch-size", type=positive_int, default=None, help="examples per step (default: the task's)")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: the task's)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default: the task's")
    p.add_argument("--momentum", type=nonneg_float, default=0.9)
    p.add_argument("--weight-decay", type=nonneg_float, default=0.0,
                   help="for a named optimizer (a task's own optimizer sets its weight decay)")
    p.add_argument("--grad-clip", type=positive_float, default=None, help="clip the gradient norm to this value")
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
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on CUDA)")


def check_batch_fits(task: Any, batch: int, flag: str = "--batch-size") -> None:
    n = task.size("train")
    if n is not None and batch > n:
        raise CliError(f"{flag} {batch} is larger than the training set of {task.name} ({n} examples)")


def config_from_args(args: argparse.Namespace, task: Any) -> Any:
    from batchlab.train.config import TrainConfig

    batch = args.batch_size or task.batch_size
    check_batch_fits(task, batch)
    if args.accumulation > 1:
        check_batch_fits(task, batch * args.accumulation, f"--batch-size {batch} x --accumulation {args.accumulation} =")
    budget: dict[str, Any] = {"epochs": args.epochs or task.epochs}
    if args.steps:
        budget = {"epochs": None, "max_steps": args.steps}
    elif args.examples:
        budget = {"epochs": None, "max_examples": args.examples}
    optimizer = args.optimizer or task.optimizer
    if args.weight_decay and getattr(task, "optimizer_fn", None) is not None and optimizer == task.optimizer:
        raise CliError(f"--weight-decay: task {task.name} builds its own optimizer, which sets its weight decay; "
                       f"got {args.weight_decay} (allowed: 0, or name an optimizer with --optimizer)")
    try:
        # the LR and optimizer actually used, written out (a result says what it ran with)
        return TrainConfig(
            batch_size=batch, lr=args.lr if args.lr is not None else task.lr, optimizer=optimizer,
            momentum=args.momentum, grad_clip=args.grad_clip,
            weight_decay=args.weight_decay, schedule=args.schedule, warmup_steps=args.warmup_steps,
            milestones=args.milestones, accumulation=args.accumulation, eval_every=args.eval_every,
            seed=args.seed, norm=args.norm, activation=args.activation, device=args.device, amp=args.amp, **budget,
        )
    except ValueError as e:
        raise CliError(str(e)) from e
