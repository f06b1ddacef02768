"""``batchlab reproduce``: the claim experiments."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from batchlab.argtypes import device
from batchlab.cli.common import CliError, claim_out, positive_int, prepare_out


def register(sub: Any) -> None:
    p = sub.add_parser("reproduce", help="run the experiment behind every claim and write a report with verdicts")
    p.add_argument("--quick", action="store_true", help="small configuration: the whole suite in about 10 minutes on a 2-core CPU")
    p.add_argument("--only", default=None, help="comma-separated claim ids or experiment ids, e.g. C10,C17")
    p.add_argument("--out", default="batchlab-out/reproduce", help="output folder (report at OUT/index.html)")
    p.add_argument("--seeds", type=positive_int, default=None, help="seeds per setting (default 3; 2 with --quick)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--retry-failed", action="store_true",
                   help="run again the stored trials that failed or ran out of memory (after fixing the cause); "
                        "diverged trials are kept")
    p.add_argument("--markdown", default=None, metavar="FILE",
                   help="also write the run's verdict table as Markdown to FILE (every run writes OUT/verdicts.md)")
    p.add_argument("--markdown-block", default=None, metavar="NAME",
                   help="with --markdown: replace only the <!-- reproduce:NAME:begin/end --> block of FILE "
                   "(how docs/reproduce.md keeps its generated tables)")
    from batchlab.distributed.ray_backend import add_backend_args

    add_backend_args(p)
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from batchlab.experiments.base import experiments
    from batchlab.experiments.runner import print_summary, reproduce, select

    if args.list:
        for exp in experiments().values():
            print(f"{','.join(exp.claims):<10} {exp.id:<22} {exp.title}")
        return 0
    only = None
    if args.only is not None:
        only = [w.strip() for w in args.only.split(",") if w.strip()]
        if not only:
            raise CliError(f"--only must name at least one claim or experiment id (e.g. C10,C17), got {args.only!r}")
    try:
        select(only)
    except ValueError as e:
        raise CliError(str(e)) from e
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise CliError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.seeds is not None and args.seeds < 2:
        raise CliError(f"--seeds must be an integer >= 2 (the verdicts weigh effects against the seed-to-seed "
                       f"spread), got {args.seeds}")
    if args.markdown_block is not None and args.markdown is None:
        raise CliError("--markdown-block needs --markdown FILE")
    if args.markdown_block is not None:
        from batchlab.experiments.report import has_block

        if not has_block(args.markdown, args.markdown_block):
            raise CliError(f"--markdown {args.markdown!r} has no <!-- reproduce:{args.markdown_block}:begin/end --> block")
    if args.markdown is not None and args.markdown_block is None:  # written at the end: checked now
        target = Path(args.markdown)
        folder = target.parent
        if not folder.is_dir():
            raise CliError(f"--markdown {args.markdown!r}: its folder {str(folder)!r} does not exist")
        if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
            raise CliError(f"--markdown {args.markdown!r} cannot be written (no permission)")
    # a folder gathers claims run with one configuration (--only may add claims to it)
    claim_out(prepare_out(args.out), args, keys=("quick", "seeds", "device"))
    from batchlab.distributed.ray_backend import backend_from_args

    try:
        backend = backend_from_args(args)
        if backend is not None:
            backend.check_resources()  # an unreachable cluster, or more CPUs/GPUs per trial than it has: now
    except (ValueError, ImportError, ConnectionError) as e:
        raise CliError(str(e)) from e
    outcomes = reproduce(only=only, quick=args.quick, out=args.out, seeds=args.seeds, device=args.device,
                         retry_failed=args.retry_failed,
                         progress=not args.quiet, backend=backend)
    print_summary(outcomes, Path(args.out))
    if args.markdown is not None:
        from batchlab.experiments.report import write_markdown

        print(f"verdict table: {write_markdown(args.out, args.markdown, args.markdown_block)}")
    return 0 if all(o.status == "ok" for o in outcomes) else 1
