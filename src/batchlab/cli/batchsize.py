"""Batch-size sub-commands: ``suggest``, ``find-max-batch``, ``throughput``, ``noise-scale``, ``critical-batch``."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Any
from pathlib import Path

from batchlab.argtypes import device
from batchlab.cli.common import (
    CliError,
    claim_out,
    add_task_args,
    add_threads_arg,
    float_list,
    load_task,
    positive_float,
    positive_int,
    prepare_out,
)
from batchlab.fileio import atomic_write

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def memory_size(text: str) -> int:
    """``"4G"``, ``"512MiB"``, ``"1000000"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"must be a size like 4G, 512MiB or a number of bytes, got {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}")
    return out


def _range_args(p: argparse.ArgumentParser) -> None:
    add_threads_arg(p)
    p.add_argument("--low", type=positive_int, default=2, help="smallest batch considered (default 2)")
    p.add_argument("--high", type=positive_int, default=512, help="largest batch considered (default 512; capped at the data set)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")


def _check_range(args: argparse.Namespace, task: Any) -> None:
    n = task.size("train")
    if args.low > args.high:
        raise CliError(f"--low ({args.low}) must be <= --high ({args.high})")
    if n is not None and args.low > n:
        raise CliError(f"--low {args.low} is larger than the training set of {task.name} ({n} examples); allowed: 1..{n}")


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, allow_nan=True, default=str)


def cmd_suggest(args: argparse.Namespace) -> int:
    from batchlab.batchsize import suggest
    from batchlab.batchsize.report import write_suggestion_report

    task = load_task(args)
    _check_range(args, task)
    if args.time_budget is not None and args.objective != "time":
        raise CliError(f"--time-budget needs --objective time, got --objective {args.objective}")
    if args.seeds < 2:
        raise CliError(f"--seeds must be >= 2 (the seed-to-seed noise needs two), got {args.seeds}")
    from batchlab.distributed.ray_backend import backend_from_args

    try:
        backend = backend_from_args(args)
        if backend is not None:
            backend.check_resources()  # an unreachable cluster, or more CPUs/GPUs per trial than it has: now
    except (ValueError, ImportError, ConnectionError) as e:
        raise CliError(str(e)) from e
    out = prepare_out(args.out)
    claim_out(out, args, task=task)
    done = out / "suggestion.json"
    if done.exists() and not args.retry_failed:  # finished with these settings: shown, never rewritten
        from batchlab.batchsize.suggest import Suggestion

        try:
            finished = Suggestion.from_dict(json.loads(done.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise CliError(f"--out {out} already holds a suggestion.json that cannot be read ({e}); it is never "
                           "overwritten: choose another folder") from e
        print(finished.summary())
        print(f"--out {out} already holds this suggestion (suggestion.json, same settings); it is never overwritten: "
              "nothing was run (--retry-failed reruns the failed trials and keeps this file beside the new one)")
        return 0 if finished.status == "ok" else 1
    if args.retry_failed:
        _forget_failures(out)
        if done.exists():  # the earlier answer is kept under a numbered name
            _keep_aside(done)
    stored = _stored_results(out)
    if stored:
        print(f"resuming: the store in {out} holds {stored} result(s); those this run needs (same task code, data "
              "and settings) are loaded, not rerun")
    try:
        s = suggest(
            task, device=args.device, low=args.low, high=args.high, seeds=tuple(range(args.seeds)),
            budget_epochs=args.budget, objective=args.objective, time_budget=args.time_budget,
            cost_budget=args.cost_budget, memory_limit=args.memory_limit, critical=args.critical,
            store=out, quick=args.quick, progress=not args.quiet, backend=backend,
        )
    except ValueError as e:
        raise CliError(str(e)) from e
    atomic_write(out / "suggestion.json", s.to_json(indent=2))
    index = write_suggestion_report(s, out)
    print(s.summary())
    print(f"report: {index}")
    print(f"examples processed: {s.total_examples} (bound {s.cost_budget}; {s.budget_examples} per full training run); "
          f"{s.wall_time:.1f} s in suggest (measurements and runs; building the task and the report not counted)")
    return 0 if s.status == "ok" else 1


def _keep_aside(path: Path) -> Path:
    """Rename a finished result file to the first free ``name-N.suffix`` (never overwriting one)."""
    for i in range(1, 1000):
        target = path.with_name(f"{path.stem}-{i}{path.suffix}")
        try:
            os.link(path, target)  # fails if target exists: no race can overwrite it
        except FileExistsError:
            continue
        path.unlink()
        return target
    raise CliError(f"--out: {path} and 999 numbered variants exist; nothing was overwritten")


def _forget_failures(out: Path) -> None:
    """Remove the stored results that ended "failed" or "oom", so this run tries them again
    (``--retry-failed``, after the user fixed the cause); "diverged" stays a result."""
    from batchlab.store import DEFAULT_FILENAME, RETRYABLE_STATUSES, Store

    if not (out / DEFAULT_FILENAME).is_file():
        return
    with Store(out) as st:
        gone = [r.key for r in st.records(status=RETRYABLE_STATUSES) if st.delete(r.key)]
    if gone:
        print(f"--retry-failed: {len(gone)} stored failed or out-of-memory result(s) will run again")


def _stored_results(out: Path) -> int:
    """How many results the folder's store already holds (0 without one)."""
    from batchlab.store import DEFAULT_FILENAME, Store

    if not (out / DEFAULT_FILENAME).is_file():
        return 0
    st = Store(out, readonly=True)
    try:
        return len(st)
    finally:
        st.close()


def cmd_find_max_batch(args: argparse.Namespace) -> int:
    from batchlab.batchsize import max_batch_size

    task = load_task(args)
    _check_range(args, task)
    try:
        r = max_batch_size(task, device=args.device, memory_limit=args.memory_limit, low=args.low, high=args.high)
    except ValueError as e:
        raise CliError(str(e)) from e
    print(_json(r.to_dict()))
    if r.batch_size is None:
        limit = f"{r.memory_limit} bytes" if r.memory_limit is not None else "the device's memory"
        print(f"batchlab find-max-batch: not even a batch of --low {args.low} fits in {limit} (one step needs about "
              f"{r.fixed_bytes + r.per_sample_bytes * args.low:.3g} bytes)", file=sys.stderr)
        return 1
    return 0


def cmd_throughput(args: argparse.Namespace) -> int:
    from batchlab.batchsize import throughput

    task = load_task(args)
    n = task.size("train") or 512
    sizes = args.batch_sizes or [b for b in (2**k for k in range(1, 10)) if b <= n]
    bad = [b for b in sizes if b > n]
    if bad:
        raise CliError(f"--batch-sizes {bad[0]} is larger than the training set of {task.name} ({n} examples); allowed: 1..{n}")
    try:
        r = throughput(task, sizes, device=args.device, warmup=args.warmup, repeats=args.repeats, progress=not args.quiet)
    except ValueError as e:
        raise CliError(str(e)) from e
    if args.json:
        print(_json(r.to_dict()))
        return 0
    print(f"{'batch':>7} {'ms/step':>10} {'examples/s':>12} {'s/epoch':>9}  status")
    for b, t, e, ep, st in zip(r.batch_sizes, r.step_time, r.examples_per_sec, r.epoch_time, r.status):
        print(f"{b:>7} {t * 1e3:>10.3f} {e:>12.0f} {ep:>9.3f}  {st}" if math.isfinite(t) else f"{b:>7} {'-':>10} {'-':>12} {'-':>9}  {st}")
    print(f"knee (smallest batch at 90% of the peak examples/s): {r.knee}")
    for b, err in zip(r.batch_sizes, r.errors):
        if err:
            print(f"batch {b} failed: {err}")
    if r.data_examples_per_sec is not None:
        slower = r.data_bound()
        print(f"data pipeline (Dataset, collate, DataLoader workers): {r.data_examples_per_sec:.4g} examples/s at batch "
              f"{r.data_batch}; the step times above leave it out"
              + (f"; at batch {', '.join(map(str, slower))} training waits for data" if slower else ""))
    return 0


def cmd_noise_scale(args: argparse.Namespace) -> int:
    from batchlab.batchsize import noise_scale

    task = load_task(args)
    n = task.size("train")
    if n is not None and args.micro_batch * args.accumulation > n:
        raise CliError(
            f"--micro-batch x --accumulation = {args.micro_batch * args.accumulation} is larger than the training set "
            f"of {task.name} ({n} examples)"
        )
    if args.accumulation < 2:
        raise CliError(f"--accumulation must be >= 2 (two batch sizes are needed), got {args.accumulation}")
    try:
        r = noise_scale(task, micro_batch=args.micro_batch, accumulation=args.accumulation, steps=args.steps,
                        beta=args.beta, device=args.device, progress=not args.quiet)
    except ValueError as e:
        raise CliError(str(e)) from e
    d = r.to_dict()
    if not args.history:
        d.pop("history")
    print(_json(d))
    if r.status == "ok" and not math.isfinite(r.b_simple):
        print(f"B_simple is not defined here: the estimate of |G|^2 stayed <= 0 over {r.steps} steps (the gradient "
              "signal is below the noise at these batch sizes); train longer (--steps), or use a larger --micro-batch "
              "or --accumulation", file=sys.stderr)
        return 1
    return 0 if r.status == "ok" else 1


def cmd_critical_batch(args: argparse.Namespace) -> int:
    from batchlab.batchsize import BatchSizeSchedule, critical_batch
    from batchlab.fileio import atomic_open

    task = load_task(args)
    out = prepare_out(args.out) if args.out else None
    if out is not None:
        claim_out(out, args, task=task)  # branches are kept in its store as they finish: an interrupted run resumes
        if (out / "critical_batch.json").exists():  # finished with these settings: nothing to do, nothing overwritten
            from batchlab.batchsize.critical import CriticalBatchResult

            try:
                done = CriticalBatchResult.from_dict(json.loads((out / "critical_batch.json").read_text()))
            except (OSError, ValueError, TypeError) as e:
                raise CliError(f"--out {out} already holds a critical_batch.json that cannot be read ({e}); it is never "
                               "overwritten: choose another folder") from e
            print(done.table())
            for note in done.notes:
                print(f"note: {note}")
            print(f"--out {out} already holds this measurement (critical_batch.json, same settings); it is never "
                  "overwritten: nothing was run")
            undefined = [p.examples for p in done.points if not p.defined]
            if undefined:  # the same exit status as the run that made it
                print(f"batchlab critical-batch: no critical batch at {', '.join(map(str, undefined))} examples: the "
                      "base batch's branches failed there (see the notes)", file=sys.stderr)
                return 1
            return 0
    n = task.size("train")  # None for an IterableDataset without a length: the budget must come in examples
    if args.budget is not None and args.budget_examples is not None:
        raise CliError(f"give --budget (epochs) or --budget-examples, not both; got --budget {args.budget} and "
                       f"--budget-examples {args.budget_examples}")
    if n is None and args.budget_examples is None:
        raise CliError(f"the training set of task {task.name!r} has no length, so a budget in epochs means nothing: "
                       "give --budget-examples N")
    budget = args.budget_examples if args.budget is None else max(1, round(args.budget * n))
    try:
        r = critical_batch(
            task, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, rule=args.rule,
            budget_examples=budget, checkpoints=args.checkpoints, factors=args.factors,
            branch_examples=args.branch_examples, seeds=args.seeds, tolerance=args.tolerance,
            gns_groups=args.gns_groups, device=args.device, quick=args.quick, progress=not args.quiet,
            store=out,
        )
    except ValueError as e:
        raise CliError(str(e)) from e
    schedule = BatchSizeSchedule.from_critical_batch(r, r.batch_size, rule=r.rule, max_batch=n)  # n None: no cap
    print(r.table())
    for note in r.notes:
        print(f"note: {note}")
    print(f"warmup schedule (examples seen, batch) from B={r.batch_size}: {list(schedule.stages) or 'constant'}"
          f" ({r.rule} co-scaling)")
    print(f"examples processed: {r.examples_processed}; {r.wall_time:.1f} s")
    if out is not None:
        d = r.to_dict()
        d["schedule"] = schedule.state_dict()
        fig = r.plot()
        with atomic_open(out / "critical_batch.png", "wb") as f:  # the figure first: the JSON marks the run done
            fig.savefig(f, format="png", dpi=120)
        atomic_write(out / "critical_batch.json", _json(d))
        print(f"wrote {out / 'critical_batch.json'} and {out / 'critical_batch.png'}")
    undefined = [p.examples for p in r.points if not p.defined]
    if undefined:
        print(f"batchlab critical-batch: no critical batch at {', '.join(map(str, undefined))} examples: the base "
              "batch's branches failed there (see the notes)", file=sys.stderr)
        return 1
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("suggest", help="recommend batch size, learning rate and accumulation (with an HTML report)")
    add_task_args(p)
    _range_args(p)
    p.add_argument("--budget", type=positive_float, default=None, help="full training budget in epochs (default: the task's)")
    p.add_argument("--objective", choices=("time", "epochs"), default="time",
                   help="time: best metric within the time of one full run at the task's batch (default); "
                        "epochs: best metric after --budget epochs")
    p.add_argument("--time-budget", type=positive_float, default=None,
                   help="seconds of one full training run (objective time; default: measured at the task's batch)")
    p.add_argument("--cost-budget", type=positive_int, default=None,
                   help="examples suggest may process in all (default: one full training run)")
    p.add_argument("--seeds", type=positive_int, default=2, help="seeds of the last rung (>= 2, default 2)")
    p.add_argument("--critical", action="store_true",
                   help="also measure the critical batch over training and offer a batch-size warmup (extra cost)")
    p.add_argument("--memory-limit", type=memory_size, default=None, help="bytes a step may use, e.g. 4G (CPU default: half the available RAM)")
    p.add_argument("--out", default="batchlab-suggest", help="output folder: index.html, suggestion.json, batchlab.db")
    p.add_argument("--retry-failed", action="store_true",
                   help="run again the stored results that failed or ran out of memory (after fixing the cause)")
    p.add_argument("--quick", action="store_true", help="shorter measurements, at most 4 candidates")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    from batchlab.distributed.ray_backend import add_backend_args

    add_backend_args(p)
    p.set_defaults(func=cmd_suggest)

    p = sub.add_parser("find-max-batch", help="largest batch whose whole training step fits in memory (JSON)")
    add_task_args(p)
    _range_args(p)
    p.add_argument("--memory-limit", type=memory_size, default=None, help="bytes a step may use, e.g. 4G")
    p.set_defaults(func=cmd_find_max_batch)

    p = sub.add_parser("throughput", help="time per step, examples/s and time per epoch per batch size")
    add_task_args(p)
    add_threads_arg(p)
    p.add_argument("--batch-sizes", type=int_list, default=None, help="comma-separated (default: 2,4,...,512)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_throughput)

    p = sub.add_parser("noise-scale", help="gradient noise scale B_simple from micro-batch gradient norms (JSON)")
    add_task_args(p)
    add_threads_arg(p)
    p.add_argument("--micro-batch", type=positive_int, default=16)
    p.add_argument("--accumulation", type=positive_int, default=4)
    p.add_argument("--steps", type=positive_int, default=100)
    p.add_argument("--beta", type=float, default=0.95)
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--history", action="store_true", help="include the per-step history")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_noise_scale)

    from batchlab.train.config import OPTIMIZERS, SCALE_RULES

    p = sub.add_parser("critical-batch", help="critical batch over training by branching (Merrill et al. 2025), "
                                              "beside B_simple; table, JSON and figure")
    add_task_args(p)
    add_threads_arg(p)
    p.add_argument("--batch-size", type=positive_int, default=None, help="base batch B (default: the task's)")
    p.add_argument("--lr", type=positive_float, default=None, help="LR at B (default: the task's, scaled to B)")
    p.add_argument("--optimizer", choices=[o for o in OPTIMIZERS if o != "lbfgs"], default=None,
                   help="default: the task's")
    p.add_argument("--rule", choices=SCALE_RULES, default=None,
                   help="co-scaling rule of the branches (default: linear for SGD, adam-halflife for Adam)")
    p.add_argument("--budget", type=positive_float, default=None,
                   help="training budget in epochs the checkpoints are fractions of (default: the task's)")
    p.add_argument("--budget-examples", type=positive_int, default=None,
                   help="the same budget in training examples (needed for a training set without a length)")
    p.add_argument("--checkpoints", type=float_list, default=None,
                   help="fractions of the budget, e.g. 0,0.1,0.25,0.5 (the default; --quick: 0,0.25)")
    p.add_argument("--factors", type=int_list, default=None, help="branch batches as multiples of B (default 1,2,4,8,16)")
    p.add_argument("--branch-examples", type=positive_int, default=None,
                   help="examples per branch (default: 8 steps at the largest batch)")
    p.add_argument("--seeds", type=positive_int, default=2, help="branch seeds (default 2)")
    p.add_argument("--tolerance", type=float, default=0.2,
                   help="fraction of the base branch's loss decrease a larger batch may lose (default 0.2)")
    p.add_argument("--gns-groups", type=positive_int, default=None, help="B_simple groups (default 16; --quick 8)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="folder for critical_batch.json and critical_batch.png")
    p.add_argument("--quick", action="store_true", help="2 checkpoints, factors up to 8")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_critical_batch)

