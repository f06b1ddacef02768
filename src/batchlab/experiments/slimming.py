"""C21: BN's gamma shows which channels matter (Network Slimming, Liu et al. 2017)."""

from __future__ import annotations

import math
from typing import Any

from batchlab.experiments.base import Experiment, ExperimentContext, Verdict, fmt_spread, register, spread

# lambda is the paper's value for VGG (1e-4). It replaced a first design after that design had run once: it
# matched the paper's total L1 pull (lambda x sum of lr ~ 0.66 over 125k steps, against gammas initialized at 0.5) on our ~100-step
# runs, giving lambda ~ 0.27: that crushed every gamma towards 0 during training (sparse-net accuracy 54-80%) and
# the claim came out refuted by an artefact of the calibration, not of the method. See docs/slim.md.
PAPER_LAMBDA = 1e-4


@register
class Slimming(Experiment):
    id = "slimming"
    claims = ("C21",)
    title = "Network slimming: L1 on BN gamma, prune small-gamma channels, fine-tune"
    seed_doc = "004"
    statements = {
        "C21": "BN's gamma shows which channels matter: L1 on gamma, then pruning small-gamma channels, slims the "
        "net at little cost (Network Slimming)."
    }
    rules = {
        "C21": "digits-cnn (16+32 BN channels). Lambda is chosen before the final runs, on a held-out split: the "
        "training set is split 80/20 (per seed), and for every lambda of the sweep fixed here (1e-4, the paper's "
        "value for VGG, 1e-3, 3e-3 and 1e-2; 1e-3 and 1e-2 in --quick) the whole procedure below runs on the 80% "
        "and is scored on the 20%; the chosen lambda is the one with the best seed-mean held-out accuracy after "
        "pruning and fine-tuning (a tie goes to the larger lambda). Final runs on the full training set, scored "
        "on the validation set the sweep never saw. Per seed: sparsity training for E epochs with L1 on every BN "
        "gamma, remove 50% of all BN channels by one global |gamma| threshold (Torch-Pruning), fine-tune F epochs; the baseline is "
        "the same net trained without L1 and without pruning for E+F epochs with the same seed. Drop = baseline "
        "val accuracy - slimmed val accuracy, in points. Inconclusive if any seed removed less than 50% of the "
        "channels. Supported if the drop is at most 1 point in every seed. Refuted if the drop exceeds 1 point in "
        "every seed and its mean exceeds 1 point by more than the seed-to-seed std of the baseline accuracy. "
        "Otherwise inconclusive (seeds disagree or the excess is within noise)."
    }
    validity = {
        "C21": "The L1 penalty must have made gamma sparse: after sparsity training, in every seed at least half of "
        "the BN channels have |gamma| below 10% of the largest |gamma| (otherwise the global threshold cuts "
        "channels that matter, and the experiment tests pruning, not slimming); and at least 50% of the channels "
        "must have been removed."
    }

    def params(self, quick: bool) -> dict[str, Any]:
        sweep = [1e-3, 1e-2] if quick else [PAPER_LAMBDA, 1e-3, 3e-3, 1e-2]
        return {"task": "digits-cnn", "prune": 0.5, "max_drop": 1.0, "min_removed": 0.5,
                "epochs": 6 if quick else 20, "finetune_epochs": 3 if quick else 10,
                "lambdas": sweep, "heldout_fraction": 0.2, "latency_repeats": 10 if quick else 30}

    @staticmethod
    def heldout_task(task: Any, fraction: float, seed: int) -> Any:
        """``task`` with its training set split: the first part trains, the held-out part is the validation set."""
        import dataclasses

        import torch

        n = len(task.train_set)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(5000 + seed))
        k = int(round(fraction * n))
        tr, ho = idx[k:], idx[:k]
        ds = type(task.train_set)
        return dataclasses.replace(task, train_set=ds(task.train_set.x[tr], task.train_set.y[tr]),
                                   val_set=ds(task.train_set.x[ho], task.train_set.y[ho]),
                                   info={**task.info, "heldout_fraction": fraction, "heldout_seed": 5000 + seed})

    @staticmethod
    def choose_lambda(sweep: dict[str, dict[str, float]]) -> float:
        """The lambda with the best seed-mean held-out accuracy (a tie goes to the larger lambda)."""
        means = {float(lam): sum(v.values()) / len(v) for lam, v in sweep.items() if v}
        return max(means, key=lambda lam: (round(means[lam], 9), lam))

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        task = ctx.task(params["task"])
        base = {k: v for k, v in params.items() if k not in ("seeds", "lambdas")}
        sweep: dict[str, dict[str, float]] = {}
        sweep_removed: dict[str, dict[str, float]] = {}
        for lam in params["lambdas"]:
            for seed in ctx.seeds:
                r = ctx.cached("slim_heldout", base | {"lambda": lam, "seed": seed},
                               lambda lam=lam, s=seed: self._one(self.heldout_task(task, params["heldout_fraction"], s),
                                                                 params, lam, s, baseline=False))
                sweep.setdefault(f"{lam:g}", {})[str(seed)] = r["after"]["val_acc"]
                sweep_removed.setdefault(f"{lam:g}", {})[str(seed)] = r["slim"]["removed_fraction"]
        lam = self.choose_lambda(sweep)
        out: dict[str, Any] = {"lambda": lam, "sweep_heldout_acc": sweep, "sweep_removed": sweep_removed,
                               "n_val": len(task.val_set), "seeds": {}}
        for seed in ctx.seeds:
            key = base | {"lambda": lam, "seed": seed}
            out["seeds"][str(seed)] = ctx.cached("slim", key, lambda s=seed: self._one(task, params, lam, s))
        return out

    @staticmethod
    def _one(task: Any, p: dict[str, Any], lam: float, seed: int, baseline: bool = True) -> dict[str, Any]:
        from batchlab.slim import slim_task

        r = slim_task(task, sparsity=lam, prune=p["prune"], epochs=p["epochs"], finetune_epochs=p["finetune_epochs"],
                      seed=seed, latency_repeats=p["latency_repeats"], baseline=baseline).to_dict()
        for k in ("history_sparse", "history_finetune"):  # keep what the figures need
            r[k] = [{"epoch": h["epoch"], "val_acc": h["val_acc"]} for h in r[k]]
        return r

    @staticmethod
    def sparse_fraction(gammas: list[float], rel: float = 0.1) -> float | None:
        """Fraction of channels whose ``|gamma|`` is below ``rel`` times the largest (None without gammas)."""
        mags = [abs(float(g)) for g in gammas]
        if not mags or max(mags) <= 0:
            return None
        return sum(g < rel * max(mags) for g in mags) / len(mags)

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        import dataclasses

        sweep = data.get("sweep_heldout_acc", {})
        note = (f"lambda {data.get('lambda'):g} chosen on the held-out split (seed-mean held-out accuracy after "
                "slimming by lambda: " + ", ".join(f"{lam}: {100 * spread(v.values())['mean']:.1f}%"
                                                   for lam, v in sweep.items()) + ")") if sweep else ""
        return [dataclasses.replace(v, reason=f"{v.reason}; {note}" if note else v.reason)
                for v in self._decide(data, params)]

    def _decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        seeds = sorted(data["seeds"], key=int)
        runs = [data["seeds"][s] for s in seeds]
        removed = [r["slim"]["removed_fraction"] for r in runs]
        base = [100.0 * r["baseline"]["val_acc"] for r in runs]
        slim = [100.0 * r["after"]["val_acc"] for r in runs]
        drops = [b - a for b, a in zip(base, slim)]
        noise = spread(base)["std"] if len(base) > 1 else math.nan
        effect = {
            "drop_points": spread(drops), "drops": drops, "removed_fraction": spread(removed),
            "baseline_acc": spread(base), "slim_acc": spread(slim), "baseline_std_points": noise,
            "params_ratio": spread(r["after"]["params"] / r["before"]["params"] for r in runs),
            "macs_ratio": spread(r["after"]["macs"] / r["before"]["macs"] for r in runs),
            "max_drop": params["max_drop"], "lambda": data.get("lambda"),
            "lambda_sweep_heldout_acc": {lam: spread(v.values()) for lam, v in data.get("sweep_heldout_acc", {}).items()},
            "one_val_example_points": 100.0 / data["n_val"] if data.get("n_val") else None,
        }
        md = params["max_drop"]
        sparse = [self.sparse_fraction(r.get("gammas_sparse") or []) for r in runs]
        effect["gamma_below_10pct_of_max"] = sparse
        if any(f is None or not f >= 0.5 for f in sparse):
            return [Verdict.invalid("C21", f"the L1 penalty did not make gamma sparse: fraction of channels with |gamma| "
                                    f"< 10% of the largest per seed {sparse} (needs >= 0.5); drops "
                                    f"{[round(d, 2) for d in drops]} points", effect)]
        if any(f < params["min_removed"] for f in removed):
            return [Verdict.invalid("C21", f"some seed removed less than {params['min_removed']:.0%} of the "
                            f"channels (removed {[round(f, 3) for f in removed]}), so the claim was not tested", effect)]
        if all(d <= md for d in drops):
            return [Verdict("C21", "supported", f"{fmt_spread(effect['removed_fraction'])} of the channels removed; "
                            f"accuracy drop vs the unpruned baseline {fmt_spread(effect['drop_points'])} points, at most "
                            f"{md:g} in every seed", effect)]
        margin = noise if math.isfinite(noise) else 0.0
        if all(d > md for d in drops) and effect["drop_points"]["mean"] > md + margin:
            return [Verdict("C21", "refuted", f"the slimmed net lost {fmt_spread(effect['drop_points'])} points, more "
                            f"than {md:g} in every seed and beyond the baseline's seed spread ({margin:.2g})", effect)]
        return [Verdict("C21", "inconclusive", f"drops {[round(d, 2) for d in drops]} points: over {md:g} in some seeds "
                        f"but not clearly beyond the baseline's seed spread ({margin:.2g} points)", effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        from batchlab.report.plots import gamma_histogram

        seeds = sorted(data["seeds"], key=int)
        first = data["seeds"][seeds[0]]
        fig, axes = plt.subplots(1, 4, figsize=(22, 4.5))
        gamma_histogram(first["gammas_sparse"], first["gammas_baseline"], sparsity=first["sparsity"],
                        threshold=first["slim"]["threshold"], ax=axes[0])
        axes[0].set_title(f"|gamma| without and with L1 (seed {seeds[0]})")

        ax = axes[1]
        labels = ["baseline (no L1, E+F ep.)", "sparse, before prune", "pruned, before fine-tune", "slimmed + fine-tuned"]
        keys = [lambda r: r["baseline"]["val_acc"], lambda r: r["before"]["val_acc"],
                lambda r: r["pruned_acc_before_finetune"], lambda r: r["after"]["val_acc"]]
        xs = np.arange(len(labels))
        for i, s in enumerate(seeds):
            r = data["seeds"][s]
            ax.bar(xs + (i - (len(seeds) - 1) / 2) * 0.8 / len(seeds), [100 * k(r) for k in keys], 0.8 / len(seeds),
                   label=f"seed {s}")
        base_mean = np.mean([100 * data["seeds"][s]["baseline"]["val_acc"] for s in seeds])
        ax.axhline(base_mean - params["max_drop"], color="k", ls="--", lw=1,
                   label=f"baseline mean - {params['max_drop']:g} point")
        ax.set_xticks(xs, labels, rotation=15, fontsize=8)
        ax.set_xlabel("stage of the procedure")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_ylim(max(0, min(100 * k(data["seeds"][s]) for s in seeds for k in keys) - 5), 100)
        ax.set_title(f"Accuracy, {params['prune']:.0%} of BN channels removed")
        ax.legend(fontsize=8)

        ax = axes[2]
        names = list(first["slim"]["channels_before"])
        before = [first["slim"]["channels_before"][n] for n in names]
        xs = np.arange(len(names))
        ax.bar(xs - 0.2, before, 0.4, label="before", color="C7")
        for i, s in enumerate(seeds):
            after = [data["seeds"][s]["slim"]["channels_after"][n] for n in names]
            ax.plot(xs + 0.2, after, "o", label=f"after, seed {s}")
        ax.set_xticks(xs, names)
        ax.set_xlabel("BN layer")
        ax.set_ylabel("channels")
        ax.set_title("Channels kept per layer (global threshold)")
        ax.legend(fontsize=8)
        ax = axes[3]
        sweep = data.get("sweep_heldout_acc", {})
        lams = sorted(sweep, key=float)
        for i, s in enumerate(seeds):
            ax.plot([float(x) for x in lams], [100 * sweep[x].get(s, np.nan) for x in lams], "o-", alpha=0.7,
                    label=f"seed {s}")
        if lams:
            ax.axvline(data["lambda"], color="k", ls=":", label=f"chosen: {data['lambda']:g}")
            ax.set_xscale("log")
        ax.set_xlabel("L1 weight lambda on |gamma| (log)")
        ax.set_ylabel("held-out accuracy after slimming (%)")
        ax.set_title("Lambda sweep on the held-out 20% of the training set")
        ax.legend(fontsize=8)
        fig.suptitle(f"C21: network slimming on {params['task']} (lambda = {data['lambda']:.3g})")
        fig.tight_layout()
        return [fig]
