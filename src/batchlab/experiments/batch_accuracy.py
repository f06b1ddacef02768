"""Accuracy against the batch size: at a fixed number of epochs (C10), over the (B, LR) grid (C13) and at
matched vs mismatched lr/B (C12). C11 lives in ``batch_sharpness``, C15 in ``batch_optimizer``.

Shared setup: the 8x8 digits MLP (``digits-mlp``, 1438 train / 359 val) *without* normalization,
so that BatchNorm's own dependence on the batch (tested by C17) does not mix into the effect of B.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from batchlab.experiments.base import Experiment, ExperimentContext, Verdict, fmt_spread, register, spread
from batchlab.experiments.kit import final_metric as _final, nan_if_none as _nan, per_seed, pyplot, seed_keys as _seed_keys
from batchlab.train import TrainConfig

TASK = "digits-mlp"
NORM = "none"


# ----------------------------------------------------------------------------------------------- C10 / C13 grid
def _grid_config(b: int, lr: float, epochs: float, seed: int) -> TrainConfig:
    """One cell of the fixed-epoch (B, LR) grid shared by C10 and C13 (identical configs share the store)."""
    return TrainConfig(batch_size=b, lr=lr, optimizer="momentum", epochs=epochs, norm=NORM, seed=seed, eval_every=0)


@register
class FixedEpochBatch(Experiment):
    id = "batch_fixed_epochs"
    claims = ("C10",)
    title = "Train and validation accuracy vs batch size at a fixed number of epochs"
    seed_doc = "003"
    statements = {
        "C10": "Larger batches give worse validation and even training accuracy at a fixed number of epochs "
        "(MNIST and CIFAR-10 figure)."
    }
    rules = {
        "C10": "digits-mlp without normalization, SGD with momentum 0.9 at the task's LR 0.05 (tuned at B=128) for "
        "every B in 2, 4, ..., 128 (about N/10), the same number of epochs for all. Per seed, peak = best final val "
        "accuracy over B. Supported if in every seed the val accuracy at the largest B is at least 2 points below the "
        "peak (it falls beyond some B); refuted if in every seed it is within 0.5 point of the peak or above; "
        "otherwise inconclusive. Training accuracy is reported alongside."
    }
    validity = {
        "C10": "The budget must teach the task at the best batch: peak val accuracy >= 80% in every seed (a task "
        "nobody learns cannot show large batches learning it worse)."
    }

    def params(self, quick: bool) -> dict[str, Any]:
        # --quick: 2 epochs, the same cells as C13's quick grid (shared through the store)
        return {"task": TASK, "batches": [2, 4, 8, 16, 32, 64, 128], "lr": 0.05, "epochs": 2 if quick else 4,
                "drop": 0.02, "flat": 0.005}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        def one(seed: int) -> dict[str, Any]:
            rows = {"B": [], "val_acc": [], "train_acc": [], "status": [], "steps": []}
            runs = ctx.fit_many([(params["task"], _grid_config(b, params["lr"], params["epochs"], seed))
                                 for b in params["batches"]])
            for b, r in zip(params["batches"], runs):
                rows["B"].append(b)
                rows["val_acc"].append(_final(r, "val_acc"))
                rows["train_acc"].append(_final(r, "train_acc"))
                rows["status"].append(r.status)
                rows["steps"].append(r.steps)
            return rows

        return per_seed(ctx, one)

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        drops, peaks_b, train_drops = [], [], []
        for s in _seed_keys(data):
            d = data["seeds"][s]
            val = [_nan(v) for v in d["val_acc"]]
            tr = [_nan(v) for v in d["train_acc"]]
            if not any(math.isfinite(v) for v in val) or not math.isfinite(val[-1]):
                continue
            peak = max(v for v in val if math.isfinite(v))
            peaks_b.append(d["B"][val.index(peak)])
            drops.append(peak - val[-1])
            fin_tr = [v for v in tr if math.isfinite(v)]
            train_drops.append(max(fin_tr) - tr[-1] if fin_tr and math.isfinite(tr[-1]) else float("nan"))
        effect = {"val_drop_at_largest_B": spread(drops), "best_B": peaks_b, "train_drop_at_largest_B": spread(train_drops),
                  "threshold_drop": params["drop"], "threshold_flat": params["flat"]}
        if len(drops) < len(data["seeds"]) or not drops:
            return [Verdict("C10", "inconclusive", "the largest batch did not finish in some seed", effect)]
        peaks = [max(v for v in (_nan(x) for x in data["seeds"][s]["val_acc"]) if math.isfinite(v)) for s in _seed_keys(data)]
        effect["peak_val_acc"] = spread(peaks)
        if not min(peaks) >= 0.8:
            return [Verdict.invalid("C10", f"the best batch reached only {fmt_spread(spread(peaks))} val accuracy "
                                    "(needs >= 0.8 in every seed)", effect)]
        txt = (f"val accuracy at B={data['seeds'][_seed_keys(data)[0]]['B'][-1]} is {fmt_spread(spread(drops))} below the "
               f"peak (best B per seed {peaks_b}); training accuracy drop {fmt_spread(spread(train_drops))}")
        if all(x >= params["drop"] for x in drops):
            return [Verdict("C10", "supported", f"{txt}; at least {params['drop']:.0%} in every seed", effect)]
        if all(x <= params["flat"] for x in drops):
            return [Verdict("C10", "refuted", f"{txt}; within {params['flat']:.1%} of the peak in every seed", effect)]
        return [Verdict("C10", "inconclusive", f"{txt}; not a drop of {params['drop']:.0%} in every seed", effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, color, name in (("train_acc", "C0", "train"), ("val_acc", "C3", "validation")):
            arr = np.array([[_nan(v) for v in data["seeds"][s][key]] for s in _seed_keys(data)])
            B = data["seeds"][_seed_keys(data)[0]]["B"]
            for row in arr:
                ax.plot(B, row * 100, color=color, alpha=0.25, lw=1)
            ax.plot(B, np.nanmean(arr, 0) * 100, "o-", color=color, label=f"{name} (mean; thin: seeds)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size B (log2 scale)")
        ax.set_ylabel("accuracy after a fixed budget (%)")
        ax.set_title(f"C10: digits-mlp, {params['epochs']} epochs, SGD momentum lr {params['lr']} for every B")
        ax.legend()
        fig.tight_layout()
        return [fig]


@register
class BatchLRGrid(Experiment):
    id = "batch_lr_grid"
    claims = ("C13",)
    title = "Validation accuracy over (batch size, learning rate)"
    seed_doc = "000"
    statements = {
        "C13": "Small batches are unstable and need a careful learning rate; batch sizes 2-32 often work best "
        "(Masters & Luschi)."
    }
    rules = {
        "C13": "Reported as measured. digits-mlp without normalization, SGD momentum 0.9, the same number of epochs "
        "(examples; 4 epochs, 2 in --quick) in every cell, B = 2..512 (powers of 2) x LR on a log grid. Per B: the best val accuracy over LR, "
        "and the stable-LR band = LRs that did not diverge and end within 5 points of that B's best (width in "
        "decades, log10(hi/lo)). Best B = the B with the highest best-over-LR val accuracy. The LR grid spans 12 "
        "octaves (0.0002 to 0.8; 7 points a factor 4 apart in --quick) so that no band is cut off by the grid. Observed "
        "if the best B lies in 2..32 in every seed; not observed if it lies above 32 in every seed; otherwise "
        "inconclusive."
    }
    validity = {
        "C13": "No stable-LR band may be truncated by the grid: for every B and seed the band must start above the "
        "grid's lowest LR and end below its highest (a band touching an edge has an unknown width)."
    }
    reported = ("C13",)

    def params(self, quick: bool) -> dict[str, Any]:
        lrs = [0.003125 * 4**i for i in range(-2, 5)] if quick else [0.003125 * 2**i for i in range(-4, 9)]
        batches = [2, 8, 32, 128, 512] if quick else [2, 4, 8, 16, 32, 64, 128, 256, 512]
        return {"task": TASK, "batches": batches, "lrs": lrs, "epochs": 2 if quick else 4,
                "band_tol": 0.05, "best_range": [2, 32]}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        def one(seed: int) -> dict[str, Any]:
            acc, status = [], []
            runs = iter(ctx.fit_many([(params["task"], _grid_config(b, lr, params["epochs"], seed))
                                      for b in params["batches"] for lr in params["lrs"]]))
            for _b in params["batches"]:
                row_a, row_s = [], []
                for _lr in params["lrs"]:
                    r = next(runs)
                    row_a.append(_final(r, "val_acc"))
                    row_s.append(r.status)
                acc.append(row_a)
                status.append(row_s)
            return {"B": params["batches"], "lr": params["lrs"], "val_acc": acc, "status": status}

        return per_seed(ctx, one)

    @staticmethod
    def summarize(d: dict[str, Any], tol: float) -> dict[str, Any]:
        best_per_b, bands = [], []
        for row in d["val_acc"]:
            vals = [_nan(v) for v in row]
            fin = [v for v in vals if math.isfinite(v)]
            best = max(fin) if fin else float("nan")
            best_per_b.append(best)
            stable = [lr for lr, v in zip(d["lr"], vals) if math.isfinite(v) and v >= best - tol]
            bands.append([min(stable), max(stable)] if stable else None)
        fin = [v for v in best_per_b if math.isfinite(v)]
        best_b = d["B"][best_per_b.index(max(fin))] if fin else None
        widths = [math.log10(b[1] / b[0]) if b else float("nan") for b in bands]
        return {"best_b": best_b, "best_per_b": best_per_b, "bands": bands, "band_decades": widths}

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        lo, hi = params["best_range"]
        sums = [self.summarize(data["seeds"][s], params["band_tol"]) for s in _seed_keys(data)]
        best = [x["best_b"] for x in sums]
        B = data["seeds"][_seed_keys(data)[0]]["B"]
        widths = {str(b): spread(x["band_decades"][i] for x in sums) for i, b in enumerate(B)}
        acc = {str(b): spread(x["best_per_b"][i] for x in sums) for i, b in enumerate(B)}
        effect = {"best_B": best, "best_acc_per_B": acc, "stable_band_decades_per_B": widths,
                  "bands_per_seed": [x["bands"] for x in sums], "best_range": [lo, hi]}
        band_txt = ", ".join(f"B={b}: {widths[str(b)]['mean']:.2f}" for b in B)
        txt = f"best B per seed {best}; stable-LR band width (decades, mean) {band_txt}"
        if any(b is None for b in best):
            return [Verdict.invalid("C13", f"every cell diverged in some seed ({txt})", effect)]
        lrs = data["seeds"][_seed_keys(data)[0]]["lr"]
        cut = sorted({b for x in sums for b, band in zip(B, x["bands"]) if band and (band[0] <= min(lrs) or band[1] >= max(lrs))})
        effect["truncated_bands_at_B"] = cut
        if cut:
            return [Verdict.invalid("C13", f"the stable-LR band reaches the edge of the LR grid at B = {cut}, so its "
                                    f"width is unknown ({txt})", effect)]
        if all(lo <= b <= hi for b in best):
            return [Verdict("C13", "observed", f"{txt}; best B within {lo}..{hi} in every seed", effect)]
        if all(b > hi for b in best):
            return [Verdict("C13", "not observed", f"{txt}; best B above {hi} in every seed", effect)]
        return [Verdict("C13", "inconclusive", f"{txt}; best B not on one side of {hi} in every seed", effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = pyplot()
        import matplotlib

        keys = _seed_keys(data)
        d0 = data["seeds"][keys[0]]
        arr = np.array([[[_nan(v) for v in row] for row in data["seeds"][s]["val_acc"]] for s in keys])
        with warnings.catch_warnings():  # a cell that diverged in every seed stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(arr, 0)
        fig, axes = plt.subplots(1, 2, figsize=(14, 5))
        ax = axes[0]
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
        im = ax.imshow(mean.T * 100, origin="lower", aspect="auto", cmap=cmap, vmin=10, vmax=100)
        for i in range(arr.shape[1]):
            for j in range(arr.shape[2]):
                v = mean[i, j]
                n_div = sum(1 for s in keys if data["seeds"][s]["status"][i][j] != "ok")
                ax.text(i, j, "div" if not math.isfinite(v) else f"{v * 100:.0f}" + ("*" if n_div else ""),
                        ha="center", va="center", color="w" if math.isfinite(v) and v < 0.7 else "k", fontsize=8)
        ax.set_xticks(range(len(d0["B"])), [str(b) for b in d0["B"]])
        ax.set_yticks(range(len(d0["lr"])), [f"{x:g}" for x in d0["lr"]])
        ax.set_xlabel("batch size B")
        ax.set_ylabel("learning rate (SGD momentum 0.9)")
        ax.set_title(f"val accuracy (%), mean over {len(keys)} seeds (* some seed diverged; div: all did)")
        fig.colorbar(im, ax=ax, label="val accuracy (%)")
        ax = axes[1]
        for i, s in enumerate(keys):
            sm = self.summarize(data["seeds"][s], params["band_tol"])
            for k, (b, band) in enumerate(zip(d0["B"], sm["bands"])):
                if band:
                    x = k + (i - (len(keys) - 1) / 2) * 0.12
                    ax.plot([x, x], band, color=f"C{i}", lw=3, marker="_", ms=12, solid_capstyle="butt",
                            label=f"seed {s}" if not any(t.get_label() == f"seed {s}" for t in ax.lines) else None)
        ax.set_ylim(d0["lr"][0] / 1.5, d0["lr"][-1] * 1.5)
        ax.set_yscale("log")
        ax.set_xticks(range(len(d0["B"])), [str(b) for b in d0["B"]])
        ax.set_xlabel("batch size B")
        ax.set_ylabel("learning rate (log)")
        ax.set_title(f"stable-LR band per B (no divergence, within {params['band_tol'] * 100:g} points of that B's best)")
        ax.legend()
        fig.suptitle(f"C13: (B, LR) grid, digits-mlp no norm, {params['epochs']} epochs per cell")
        fig.tight_layout()
        return [fig]


# ----------------------------------------------------------------------------------------------- C12
@register
class LRBatchRatio(Experiment):
    id = "lr_batch_ratio"
    claims = ("C12",)
    title = "Matched lr/B ratio vs mismatched: learning curves over epochs"
    seed_doc = "000"
    statements = {"C12": "A large batch is equivalent to a small learning rate (SGD noise scale ~ lr/B)."}
    rules = {
        "C12": "digits-mlp without normalization, SGD momentum 0.9, reference B0=16 at lr0=0.00625 (the task's 0.05 "
        "at B=128, scaled linearly). For k = 2, 4, 8 and B = k*B0, three arms: matched lr = k*lr0 (same lr/B), "
        "unscaled lr = lr0 (lr/B divided by k: the large batch as a small LR) and over-scaled lr = k^2*lr0 (lr/B "
        "times k). Distance of an arm to the reference = mean over epochs 1..E of |val loss - reference val loss| "
        "(infinite if it diverged). Supported if the matched arm is closer than both mismatched arms for every k in "
        "every seed; refuted if it is closer than both in at most half of the (seed, k) comparisons; otherwise "
        "inconclusive."
    }
    validity = {
        "C12": "The reference run must finish and learn the task (final val accuracy >= 80% in every seed), so that "
        "'closer to the reference' means closer to a working run."
    }
    #: Goyal et al. 2017 (ImageNet in 1 hour): the linear scaling rule with warmup (REFERENCE.md)
    PUBLISHED = {"source": "Goyal et al. 2017, ResNet-50 ImageNet: lr = 0.1 * B / 256 with 5-epoch warmup",
                 "published": "matched lr/B keeps the small-batch curve and accuracy up to B = 8192 (32x of 256); "
                 "the rule breaks down beyond that"}

    def params(self, quick: bool) -> dict[str, Any]:
        return {"task": TASK, "b0": 16, "lr0": 0.00625, "ks": [2, 4, 8], "epochs": 10}

    @staticmethod
    def _arms(p: dict[str, Any]) -> list[dict[str, Any]]:
        arms = [{"kind": "reference", "k": 1, "B": p["b0"], "lr": p["lr0"]}]
        for k in p["ks"]:
            for kind, lr in (("matched", k * p["lr0"]), ("unscaled", p["lr0"]), ("over-scaled", k * k * p["lr0"])):
                arms.append({"kind": kind, "k": k, "B": k * p["b0"], "lr": lr})
        return arms

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        def one(seed: int) -> dict[str, Any]:
            arms = []
            specs = self._arms(params)
            runs = ctx.fit_many([(params["task"], TrainConfig(batch_size=a["B"], lr=a["lr"], optimizer="momentum",
                                                              epochs=params["epochs"], norm=NORM, seed=seed,
                                                              eval_every=0)) for a in specs])
            for a, r in zip(specs, runs):
                arms.append({**a, "status": r.status, "epoch": r.series("epoch"), "val_loss": r.series("val_loss"),
                             "val_acc": r.series("val_acc")})
            return {"arms": arms}

        return per_seed(ctx, one)

    @staticmethod
    def distance(arm: dict[str, Any], ref: dict[str, Any], epochs: int) -> float:
        if arm["status"] != "ok" or ref["status"] != "ok":
            return float("inf")

        def at_epochs(a: dict[str, Any]) -> list[float]:
            out = []
            for e in range(1, epochs + 1):
                vals = [v for ep, v in zip(a["epoch"], a["val_loss"]) if abs(ep - e) < 1e-6]
                out.append(vals[0] if vals else float("nan"))
            return out

        x, y = at_epochs(arm), at_epochs(ref)
        diffs = [abs(a - b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
        if len(diffs) < len(x):
            return float("inf")
        return float(np.mean(diffs))

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        comps, wins = [], 0
        ratio_unscaled, ratio_over = [], []
        for s in _seed_keys(data):
            arms = data["seeds"][s]["arms"]
            ref = next(a for a in arms if a["kind"] == "reference")
            for k in params["ks"]:
                d = {a["kind"]: self.distance(a, ref, params["epochs"]) for a in arms if a["k"] == k}
                win = d["matched"] < min(d["unscaled"], d["over-scaled"])
                wins += win
                comps.append({"seed": int(s), "k": k, **d, "matched_closest": win})
                for lst, kind in ((ratio_unscaled, "unscaled"), (ratio_over, "over-scaled")):
                    lst.append(d["matched"] / d[kind] if math.isfinite(d[kind]) and d[kind] > 0 else 0.0)
        effect = {"comparisons": comps, "matched_closest": f"{wins}/{len(comps)}",
                  "matched_over_unscaled_distance": spread(ratio_unscaled),
                  "matched_over_overscaled_distance": spread(ratio_over)}
        txt = (f"matched arm closest in {wins}/{len(comps)} (seed, k) comparisons; distance ratio matched/unscaled "
               f"{fmt_spread(spread(ratio_unscaled))}, matched/over-scaled {fmt_spread(spread(ratio_over))} "
               f"(0 = mismatched arm diverged)")
        published = {**self.PUBLISHED, "measured": f"matched lr/B closest to the reference curve in {wins}/{len(comps)} "
                     f"comparisons for k up to {max(params['ks'])}x", "trend_agrees": bool(comps) and wins == len(comps)}
        if not comps:
            return [Verdict("C12", "inconclusive", "no comparisons", effect)]
        refs = [next(a for a in data["seeds"][s]["arms"] if a["kind"] == "reference") for s in _seed_keys(data)]
        ref_acc = [r["val_acc"][-1] if r["status"] == "ok" and r["val_acc"] else math.nan for r in refs]
        if not all(math.isfinite(a) and a >= 0.8 for a in ref_acc):
            return [Verdict.invalid("C12", f"the reference run did not learn the task in every seed (final val accuracy "
                                    f"{ref_acc}); {txt}", effect, published)]
        if wins == len(comps):
            return [Verdict("C12", "supported", txt, effect, published=published)]
        if wins <= len(comps) / 2:
            return [Verdict("C12", "refuted", txt, effect, published=published)]
        return [Verdict("C12", "inconclusive", txt, effect, published=published)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = pyplot()
        s = _seed_keys(data)[0]
        arms = data["seeds"][s]["arms"]
        ref = next(a for a in arms if a["kind"] == "reference")
        fig, axes = plt.subplots(1, len(params["ks"]) + 1, figsize=(5 * (len(params["ks"]) + 1), 4.3))
        styles = {"matched": ("C2", "-"), "unscaled": ("C0", "--"), "over-scaled": ("C3", ":")}
        for ax, k in zip(axes, params["ks"]):
            ax.plot(ref["epoch"], ref["val_loss"], "k-", lw=2.5, alpha=0.5, label=f"reference B={ref['B']} lr={ref['lr']:g}")
            for a in arms:
                if a["k"] == k:
                    c, ls = styles[a["kind"]]
                    lab = f"{a['kind']}: B={a['B']} lr={a['lr']:g}" + ("" if a["status"] == "ok" else f" ({a['status']})")
                    ax.plot(a["epoch"], a["val_loss"], color=c, ls=ls, marker="o", ms=3, label=lab)
            ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.set_ylabel("val loss (cross-entropy, log)")
            ax.set_title(f"B = {k} x {params['b0']} (seed {s})")
            ax.legend(fontsize=7)
        ax = axes[-1]
        ks = params["ks"]
        for kind, (c, _) in styles.items():
            vals = []
            for k in ks:
                ds = []
                for sk in _seed_keys(data):
                    aa = data["seeds"][sk]["arms"]
                    r = next(a for a in aa if a["kind"] == "reference")
                    ds.append(self.distance(next(a for a in aa if a["k"] == k and a["kind"] == kind), r, params["epochs"]))
                vals.append(ds)
            for j, sk in enumerate(_seed_keys(data)):
                y = [v[j] if math.isfinite(v[j]) else np.nan for v in vals]
                ax.plot(ks, y, color=c, marker="o", alpha=0.8, label=kind if j == 0 else None)
                for k, v in zip(ks, vals):
                    if not math.isfinite(v[j]):
                        ax.plot([k], [1.0], "x", color=c, ms=9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch multiplier k (B = k x B0)")
        ax.set_ylabel("mean |val loss - reference| over epochs (log)")
        ax.set_title("distance to the reference curve (x at 1.0: diverged)")
        ax.legend(fontsize=8)
        fig.suptitle("C12: matched lr/B vs mismatched (digits-mlp, SGD momentum, no norm)")
        fig.tight_layout()
        return [fig]


