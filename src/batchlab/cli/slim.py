"""``batchlab slim``: Network Slimming on a task, with a measured before/after report."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from batchlab.cli.common import CliError, add_task_args, check_batch_fits, load_task, nonneg_float, positive_float, positive_int, prepare_out
from batchlab.fileio import OutputError, atomic_open, atomic_write


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a fraction strictly between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction strictly between 0 and 1, got {text!r}")
    return value


def register(sub: Any) -> None:
    p = sub.add_parser(
        "slim",
        help="Network Slimming: L1 on BN gammas, global channel pruning, fine-tuning, BN folding",
        description="Train with an L1 penalty on every BN gamma, remove the given fraction of channels with the "
        "smallest |gamma| (one global threshold) with Torch-Pruning, fine-tune, fold BN, and report parameters, "
        "FLOPs, CPU latency and accuracy before and after (Liu et al. 2017).",
    )
    add_task_args(p)
    p.add_argument("--sparsity", type=nonneg_float, default=1e-4, help="L1 weight lambda on the BN gammas (default 1e-4)")
    p.add_argument("--prune", type=_fraction, default=0.5, help="fraction of all BN channels to remove, in (0, 1)")
    p.add_argument("--epochs", type=positive_float, default=None, help="sparsity-training epochs (default: the task's)")
    p.add_argument("--finetune-epochs", type=nonneg_float, default=None, help="fine-tuning epochs (default: half of --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: the task's")
    p.add_argument("--lr", type=positive_float, default=None, help="default: the task's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip the unpruned baseline trained without L1")
    p.add_argument("--no-fold", action="store_true", help="keep the BN layers of the slimmed model")
    p.add_argument("--repeats", type=positive_int, default=30, help="latency repeats (the median is reported)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch intra-op threads for training (default 1: these small models gain nothing from more, "
                   "and on a shared CPU extra threads wait on each other)")
    p.add_argument("--out", help="folder for result.json, the |gamma| histogram PNG and index.html")
    p.set_defaults(func=cmd_slim)


def cmd_slim(args: argparse.Namespace) -> int:
    from batchlab.slim import bn_layers, slim_task
    from batchlab.train.config import TrainConfig

    task = load_task(args)
    out = None
    if args.out:  # checked before training: a finished run must have somewhere to go
        out = prepare_out(args.out)
        if (out / "result.json").exists():
            raise CliError(f"--out: {out / 'result.json'} already exists; it is never overwritten: move it away or "
                           "choose another --out folder")
    batch = args.batch_size or task.batch_size
    check_batch_fits(task, batch)
    if not bn_layers(task.make_model()):
        raise CliError(f"--task {args.task!r}: its model has no BatchNorm layer with a learnable scale; network "
                       f"slimming ranks channels by BN gamma")
    cfg = TrainConfig(batch_size=batch, lr=args.lr, eval_train=False)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        res = slim_task(task, sparsity=args.sparsity, prune=args.prune, epochs=args.epochs,
                        finetune_epochs=args.finetune_epochs, seed=args.seed, config=cfg,
                        baseline=not args.no_baseline, fold=not args.no_fold, latency_repeats=args.repeats)
    except ValueError as e:
        raise CliError(str(e)) from e
    finally:
        torch.set_num_threads(threads)
    data = res.to_dict()
    summary = _summary(data)
    if out is not None:
        text = json.dumps(data, indent=1, allow_nan=True)
        try:  # the result first (never replacing one), then the report made from it
            atomic_write(out / "result.json", text, exclusive=True)
        except (OutputError, FileExistsError) as e:  # the disk filled up, or another run wrote it meanwhile
            print(text)
            raise CliError(f"{e}; the full result was printed on stdout instead") from e
        summary["result"] = str(out / "result.json")
        summary["report"] = str(write_slim_report(data, out))
    print(json.dumps(summary, indent=2))
    return 0


def _summary(d: dict[str, Any]) -> dict[str, Any]:
    b, a = d["before"], d["after"]
    return {
        "task": d["task"], "sparsity": d["sparsity"], "prune": d["prune"],
        "channels_removed": round(d["slim"]["removed_fraction"], 4), "threshold": d["slim"]["threshold"],
        "notes": d["slim"]["notes"],
        "params": [b["params"], a["params"]], "macs": [b["macs"], a["macs"]], "flops": [2 * b["macs"], 2 * a["macs"]],
        "latency_ms_b1": [round(b["latency_ms_b1"], 4), round(a["latency_ms_b1"], 4)],
        "latency_ms_b64": [round(b["latency_ms_b64"], 4), round(a["latency_ms_b64"], 4)],
        "metric": d.get("metric", "accuracy"), "higher_is_better": d.get("higher_is_better", True),
        "val_acc": [b["val_acc"], a["val_acc"]],  # the task's metric (named by "metric"), accuracy or not
        "val_acc_pruned_before_finetune": d["pruned_acc_before_finetune"],
        "baseline_val_acc": d["baseline"]["val_acc"] if d["baseline"] else None,
        "fold": d["fold_note"], "fold_max_diff": d["fold_max_diff"], "wall_time_s": round(d["wall_time"], 2),
    }


def write_slim_report(d: dict[str, Any], out: Path) -> Path:
    """PNG histogram and an HTML page for one :func:`batchlab.slim.slim_task` result dict."""
    from batchlab.report.html import write_report
    from batchlab.report.plots import gamma_histogram

    fig = gamma_histogram(d["gammas_sparse"], d["gammas_baseline"], sparsity=d["sparsity"], threshold=d["slim"]["threshold"])
    with atomic_open(out / "gamma_hist.png") as f:
        fig.savefig(f, format="png", dpi=110)
    rows = []
    folded = d["fold_max_diff"] is not None
    metric = d.get("metric", "accuracy")
    direction = "higher" if d.get("higher_is_better", True) else "lower"
    for label, key in (("baseline (no L1, unpruned)", "baseline"), ("sparsity-trained (before)", "before"),
                       (f"slimmed, fine-tuned{', folded' if folded else ''} (after)", "after")):
        s = d[key]
        if s:
            rows.append({"model": label, "params": s["params"], "MACs / example": s["macs"], "FLOPs / example": 2 * s["macs"],
                         "BN channels": s["bn_channels"], "latency b=1 (ms)": f"{s['latency_ms_b1']:.3f}",
                         "latency b=64 (ms)": f"{s['latency_ms_b64']:.3f}", f"val {metric}": f"{s['val_acc']:.4f}"})
    layers = [{"layer": n, "channels before": c, "channels after": d["slim"]["channels_after"].get(n)}
              for n, c in d["slim"]["channels_before"].items()]
    text = [
        f"Task **{d['task']}**, seed {d['seed']}: {d['epochs']:g} epochs of sparsity training (lambda = {d['sparsity']:g}), "
        f"remove {d['prune']:.0%} of all BN channels by one global |gamma| threshold "
        f"({d['slim']['threshold']:.4g}), fine-tune {d['finetune_epochs']:g} epochs" + (", fold BN." if folded else "."),
        f"Channels removed: {d['slim']['removed_fraction']:.1%}. Validation {metric} ({direction} is better) right after "
        f"pruning, before fine-tuning: {d['pruned_acc_before_finetune']:.4f}. BN folding: {d['fold_note']}"
        + (f" (largest output difference {d['fold_max_diff']:.2g}; the baseline and the sparsity-trained model are "
           "measured folded too, so the rows differ by pruning alone)." if folded else "."),
        "Latency is the median wall time of repeated forward passes on this machine's CPU with one torch thread; MACs are counted with "
        "forward hooks on conv and linear layers (FLOPs = 2 x MACs).",
    ] + [f"Note: {n}" for n in d["slim"]["notes"]]
    sections = [
        {"title": "Before and after", "text": text, "tables": [{"rows": rows}, {"rows": layers, "caption": "BN channels per layer"}]},
        {"title": "|gamma| histograms", "figures": [{"figure": fig, "caption": "BN scales of the net trained without L1 "
                                                     "and with it; the dashed line is the global prune threshold"}]},
    ]
    return write_report(out, f"Network slimming: {d['task']}", sections)
