"""BatchNorm and training: speed (C01), learning rate (C02), position (C06), data size (C07).

The sigmoid experiments (C03 vanishing gradients, C05 saturation and affine) are in
``bn_activations.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from batchlab.experiments.base import (
    Experiment,
    ExperimentContext,
    Verdict,
    fmt_spread,
    one_thread,
    register,
    spread,
    steps_to_target,
)
from batchlab.experiments.kit import paired_rule, pyplot, seeded_model
from batchlab.train import RunResult, TrainConfig

CURVE_KEYS = ("step", "epoch", "val_acc", "val_loss", "train_loss", "train_acc")


def compact(r: RunResult) -> dict[str, Any]:
    """The parts of a run the verdicts and figures need (keeps data.json small)."""
    return {
        "status": r.status,
        "failed_step": r.failed_step,
        "steps": r.steps,
        "final_val_acc": float(r.final.get("val_acc", math.nan)),
        "final_train_acc": float(r.final.get("train_acc", math.nan)),
        "final_train_loss": float(r.final.get("train_loss", math.nan)),
        "history": [{k: row[k] for k in CURVE_KEYS if k in row} for row in r.history],
    }



def _band(ax: Any, runs: Sequence[dict[str, Any]], key: str, label: str, color: str, x: str = "step",
          style: str = "-") -> None:
    """Mean curve over seeds with a min..max band (over the common x grid of ok runs)."""
    import numpy as np

    curves = [r["history"] for r in runs if r["history"]]
    if not curves:
        return
    n = min(len(c) for c in curves)
    xs = np.array([row[x] for row in curves[0][:n]], dtype=float)
    ys = np.array([[row.get(key, np.nan) for row in c[:n]] for c in curves], dtype=float)
    ax.plot(xs, np.nanmean(ys, 0), style, color=color, label=label)
    if len(curves) > 1:
        ax.fill_between(xs, np.nanmin(ys, 0), np.nanmax(ys, 0), color=color, alpha=0.18, lw=0)




# ---------------------------------------------------------------------------------------------
# C01 + C02: BN and training speed, BN and the learning rate
# ---------------------------------------------------------------------------------------------


@register
class BNLearningRate(Experiment):
    id = "bn_lr"
    claims = ("C01", "C02")
    title = "BatchNorm: faster convergence, and much higher learning rates"
    seed_doc = "002"
    statements = {
        "C01": "BN makes training converge faster.",
        "C02": "BN allows a much higher learning rate (e.g. 30x) and converges faster with it "
        "(Ioffe & Szegedy: BN-x5, BN-x30).",
    }
    rules = {
        "C01": "digits-mlp (ReLU MLP 64-100-100-100-10), SGD+momentum 0.9 at the task's learning rate 0.05 and "
        "batch 128 for both arms, validation accuracy every 5 steps. Target: 90% validation accuracy (fixed "
        "before any run). Supported if BN reaches the target in fewer steps than no-BN in every seed; refuted if "
        "no-BN reaches it in as few steps or fewer in every seed; otherwise (mixed seeds, or neither reaches it) "
        "inconclusive.",
        "C02": "Same setup, learning rate x1, x5, x30 of the task's 0.05 with and without BN, same step budget, "
        "target 90%. Per seed: (a) BN-x30 does not diverge and reaches the target in fewer steps than BN-x1; "
        "(b) no-BN-x30 diverges or ends more than 1 point below no-BN-x1. Supported if (a) and (b) hold in every "
        "seed; refuted if (a) fails in every seed or (b) fails in every seed; otherwise inconclusive.",
    }
    validity = {
        "C01": "The task must be learnable in the budget: BN or no-BN at x1 reaches the 90% target in some seed "
        "(else neither arm can be faster, and the verdict is inconclusive).",
        "C02": "The base learning rate must train: BN-x1 reaches the 90% target in every seed (else 'faster than x1' "
        "has no reference).",
    }
    #: Ioffe & Szegedy 2015, Inception on ImageNet: training steps to 72.2% top-1 (REFERENCE.md)
    PUBLISHED = {"source": "Ioffe & Szegedy 2015 (Inception, ImageNet), steps to 72.2% top-1",
                 "steps_millions": {"baseline (no BN)": 31.0, "BN": 13.3, "BN-x5": 2.1, "BN-x30": 2.7},
                 "trend": "BN fewer steps than no BN; BN-x5 and BN-x30 both fewer than BN-x1; BN-x5 the fewest"}

    def params(self, quick: bool) -> dict[str, Any]:
        return {"task": "digits-mlp", "lr_base": 0.05, "multipliers": [1, 5, 30], "batch_size": 128,
                "max_steps": 300 if quick else 400, "eval_every": 5, "target": 0.90, "worse_tol": 0.01}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        jobs, keys = [], []
        for norm in ("none", "batch"):
            for m in params["multipliers"]:
                for seed in ctx.seeds:
                    cfg = TrainConfig(batch_size=params["batch_size"], lr=params["lr_base"] * m,
                                      max_steps=params["max_steps"], eval_every=params["eval_every"], seed=seed,
                                      norm=norm, activation="relu")
                    jobs.append((params["task"], cfg))
                    keys.append((f"{norm}/x{m:g}", str(seed)))
        with one_thread(ctx.device):
            results = ctx.fit_many(jobs)
        runs: dict[str, dict[str, Any]] = {}
        for (arm, seed), r in zip(keys, results):
            runs.setdefault(arm, {})[seed] = compact(r)
        return {"runs": runs}

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        return [self._c01(data, params), self._c02(data, params)]

    @staticmethod
    def _steps(run: dict[str, Any], target: float) -> float:
        if run["status"] != "ok":
            return math.inf
        return steps_to_target(run["history"], target)

    def _c01(self, data: dict[str, Any], p: dict[str, Any]) -> Verdict:
        t = p["target"]
        bn, none = data["runs"]["batch/x1"], data["runs"]["none/x1"]
        seeds = sorted(bn, key=int)
        s_bn = [self._steps(bn[s], t) for s in seeds]
        s_none = [self._steps(none[s], t) for s in seeds]
        per_seed = []
        for a, b in zip(s_bn, s_none):
            if math.isinf(a) and math.isinf(b):
                per_seed.append("neither")
            elif a < b:
                per_seed.append("bn")
            else:
                per_seed.append("none")
        speedup = [b / a for a, b in zip(s_bn, s_none) if a > 0 and math.isfinite(a) and math.isfinite(b)]
        effect = {"target": t, "steps_bn": s_bn, "steps_none": s_none, "steps_bn_spread": spread(s_bn),
                  "steps_none_spread": spread(s_none), "speedup_spread": spread(speedup), "per_seed": per_seed,
                  "final_acc_bn": spread(bn[s]["final_val_acc"] for s in seeds),
                  "final_acc_none": spread(none[s]["final_val_acc"] for s in seeds)}
        nums = (f"steps to {t:.0%}: BN {fmt_spread(effect['steps_bn_spread'])}, no BN "
                f"{fmt_spread(effect['steps_none_spread'])} (per seed BN {s_bn} vs no BN {s_none})")
        if all(x == "neither" for x in per_seed):
            return Verdict.invalid("C01", f"neither arm reached {t:.0%} within {p['max_steps']} steps in any seed", effect)
        if all(x == "bn" for x in per_seed):
            return Verdict("C01", "supported", f"BN reached the target first in every seed; {nums}", effect)
        if all(x == "none" for x in per_seed):
            return Verdict("C01", "refuted", f"no-BN reached the target as fast or faster in every seed; {nums}", effect)
        return Verdict("C01", "inconclusive", f"seeds disagree ({per_seed}); {nums}", effect)

    def _c02(self, data: dict[str, Any], p: dict[str, Any]) -> Verdict:
        t, tol = p["target"], p["worse_tol"]
        hi = f"x{max(p['multipliers']):g}"
        runs = data["runs"]
        seeds = sorted(runs["batch/x1"], key=int)
        a_ok, b_ok, rows = [], [], []
        for s in seeds:
            bn1, bnh = runs["batch/x1"][s], runs[f"batch/{hi}"][s]
            n1, nh = runs["none/x1"][s], runs[f"none/{hi}"][s]
            s1, sh = self._steps(bn1, t), self._steps(bnh, t)
            a = bnh["status"] == "ok" and math.isfinite(sh) and sh < s1
            b = nh["status"] != "ok" or nh["final_val_acc"] < n1["final_val_acc"] - tol
            a_ok.append(a)
            b_ok.append(b)
            rows.append({"seed": int(s), "bn_x1_steps": s1, f"bn_{hi}_steps": sh, f"bn_{hi}_status": bnh["status"],
                         f"none_{hi}_status": nh["status"], "none_x1_final": n1["final_val_acc"],
                         f"none_{hi}_final": nh["final_val_acc"] if nh["status"] == "ok" else None})
        arms = {arm: {"steps_to_target": spread(self._steps(r, t) for r in v.values()),
                      "diverged": sum(r["status"] == "diverged" for r in v.values()),
                      "final_val_acc": spread(r["final_val_acc"] for r in v.values() if r["status"] == "ok")}
                for arm, v in runs.items()}
        effect = {"target": t, "per_seed": rows, "a_bn_high_lr_faster": a_ok, "b_nobn_high_lr_fails": b_ok, "arms": arms}
        nums = "; ".join(f"{arm}: steps {fmt_spread(v['steps_to_target'])}, diverged {v['diverged']}/{len(seeds)}, "
                         f"final {fmt_spread(v['final_val_acc'])}" for arm, v in arms.items())
        published = self.published_vs(arms)
        if not all(math.isfinite(self._steps(runs["batch/x1"][s], t)) for s in seeds):
            return Verdict.invalid("C02", f"BN-x1 did not reach {t:.0%} in every seed, so there is no reference to be "
                                   f"faster than. {nums}", effect, published)
        if all(a_ok) and all(b_ok):
            return Verdict("C02", "supported", f"in every seed BN-{hi} trained and beat BN-x1 to {t:.0%}, and no-BN-{hi} "
                           f"diverged or ended worse. {nums}", effect, published=published)
        if not any(a_ok):
            return Verdict("C02", "refuted", f"BN-{hi} diverged, missed the target or was not faster than BN-x1 in "
                           f"every seed. {nums}", effect, published=published)
        if not any(b_ok):
            return Verdict("C02", "refuted", f"no-BN-{hi} trained as well as no-BN-x1 in every seed. {nums}", effect,
                           published=published)
        return Verdict("C02", "inconclusive", f"seeds disagree: (a) {a_ok}, (b) {b_ok}. {nums}", effect,
                       published=published)

    def published_vs(self, arms: dict[str, Any]) -> dict[str, Any]:
        """Ioffe & Szegedy's steps to target next to the measured seed-mean steps to this task's target; the
        trend agrees when BN-x1 < no-BN-x1 and BN-x5, BN-x30 < BN-x1 (a miss is 'never')."""
        def mean_steps(arm: str) -> float:
            sp = arms.get(arm, {}).get("steps_to_target", {})
            return sp.get("mean", math.nan) if sp.get("n") == sp.get("n_all", sp.get("n")) else math.nan

        m = {arm: mean_steps(arm) for arm in ("none/x1", "batch/x1", "batch/x5", "batch/x30")}
        fin = {k: (v if math.isfinite(v) else math.inf) for k, v in m.items()}
        agrees = (fin["batch/x1"] < fin["none/x1"] and fin["batch/x5"] < fin["batch/x1"]
                  and fin["batch/x30"] < fin["batch/x1"])
        return {"source": self.PUBLISHED["source"], "published": self.PUBLISHED["steps_millions"],
                "published_trend": self.PUBLISHED["trend"],
                "measured": {"seed-mean steps to target": {k: ("never" if math.isinf(v) else round(v, 1))
                                                           for k, v in fin.items()}},
                "trend_agrees": bool(agrees)}

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        import numpy as np

        plt = pyplot()
        runs, t = data["runs"], params["target"]
        figs = []
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for arm, color, label in (("none/x1", "C3", "no BN"), ("batch/x1", "C0", "BN")):
            _band(ax, list(runs[arm].values()), "val_acc", f"{label} (mean, min..max band)", color)
            for r in runs[arm].values():
                s = self._steps(r, t)
                if math.isfinite(s):
                    ax.axvline(s, color=color, ls=":", lw=0.8, alpha=0.7)
        ax.axhline(t, color="k", ls="--", lw=0.8, label=f"target {t:.0%}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation accuracy (fraction)")
        ax.set_ylim(0, 1)
        ax.set_title(f"C01: same net and LR ({params['lr_base']:g}), with and without BN; dotted: step each seed hit the target")
        ax.legend(loc="lower right")
        fig.tight_layout()
        figs.append(fig)

        mults = params["multipliers"]
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
        colors = {m: f"C{i}" for i, m in enumerate(mults)}
        for ax, norm, name in ((axes[0], "none", "no BN"), (axes[1], "batch", "BN")):
            for m in mults:
                arm = f"{norm}/x{m:g}"
                rs = list(runs[arm].values())
                ok = [r for r in rs if r["status"] == "ok"]
                label = f"x{m:g} (lr {params['lr_base'] * m:g}), {len(ok)}/{len(rs)} ok"
                if ok:
                    _band(ax, ok, "val_acc", label, colors[m])
                else:
                    ax.plot([], [], "-", color=colors[m], label=label)
                for r in rs:
                    if r["status"] != "ok":
                        last = r["history"][-1]["val_acc"] if r["history"] else 0.1
                        ax.plot([r["failed_step"] or 0], [last], "x", color=colors[m], ms=11, mew=2.5)
            ax.plot([], [], "kx", ms=9, mew=2, label="diverged (step it stopped)")
            ax.axhline(t, color="k", ls="--", lw=0.8)
            ax.set_ylim(0, 1)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("validation accuracy (fraction)")
            ax.set_title(f"{name}: learning rate x1 / x5 / x30")
            ax.legend(loc="lower right", fontsize=8)
        ax = axes[2]
        cap = params["max_steps"]
        for norm, color, name in (("none", "C3", "no BN"), ("batch", "C0", "BN")):
            for i, m in enumerate(mults):
                for j, r in enumerate(runs[f"{norm}/x{m:g}"].values()):
                    s = self._steps(r, t)
                    x = m * (1 + 0.04 * (j - 1))
                    if r["status"] != "ok":
                        ax.plot(x, cap * 1.15, "x", color=color, ms=10, mew=2.5)
                    elif math.isinf(s):
                        ax.plot(x, cap * 1.15, "o", mfc="none", color=color, ms=8)
                    else:
                        ax.plot(x, s, "o", color=color, ms=6, alpha=0.8)
            means = [np.mean([self._steps(r, t) for r in runs[f"{norm}/x{m:g}"].values()]) for m in mults]
            ax.plot([m for m, v in zip(mults, means) if math.isfinite(v)], [v for v in means if math.isfinite(v)],
                    "-", color=color, label=f"{name} (mean of seeds that reached it)")
        ax.axhline(cap, color="gray", ls=":", lw=0.8)
        ax.plot([], [], "kx", label="diverged")
        ax.plot([], [], "ko", mfc="none", label=f"never reached {t:.0%}")
        ax.set_xscale("log")
        ax.set_xticks(mults, [f"x{m:g}" for m in mults])
        ax.set_xlabel("learning-rate multiplier (log scale)")
        ax.set_ylabel(f"steps to {t:.0%} validation accuracy")
        ax.set_title("Steps to target vs learning rate, every seed")
        ax.legend(fontsize=8)
        fig.suptitle("C02: BN and the learning rate (digits-mlp, SGD+momentum, batch 128)")
        fig.tight_layout()
        figs.append(fig)
        return figs


# ---------------------------------------------------------------------------------------------
# C06: BN before or after the activation
# ---------------------------------------------------------------------------------------------


@register
class BNPosition(Experiment):
    id = "bn_position"
    claims = ("C06",)
    title = "BatchNorm before or after the ReLU"
    seed_doc = "002"
    statements = {"C06": "Where BN goes, before or after the activation, matters little."}
    rules = {
        "C06": "mnist1d-mlp on 10000 generated samples (MLP 40-100-100-100-10, ReLU; more data and fewer epochs "
        "than the task's default, so it does not overfit), SGD+momentum lr 0.05, batch 128, 10 epochs, "
        "Linear-BN-ReLU vs Linear-ReLU-BN, same seed (init and batch order) paired, at least 8 paired seeds (10 in "
        "the full run) whatever --seeds says. d = final validation accuracy before - after, per seed. Equivalence "
        "test (two one-sided tests, the kit's paired_rule) with a margin of 1.5 points: supported if the 90% "
        "t-interval of mean d lies inside [-1.5, +1.5] points; refuted if it lies entirely outside; otherwise "
        "inconclusive."
    }
    validity = {
        "C06": "Both positions must learn the task (seed-mean val accuracy >= 30%, three times chance) and every "
        "paired seed must finish; otherwise the difference says nothing about placement."
    }

    def params(self, quick: bool) -> dict[str, Any]:
        return {"task": "mnist1d-mlp", "task_kwargs": {"n_samples": 10000}, "hidden": [100, 100, 100],
                "epochs": 6 if quick else 10, "batch_size": 128, "lr": 0.05, "margin": 0.015,
                "min_seeds": 8 if quick else 10, "min_acc": 0.3}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        from batchlab.models import MLP

        task = ctx.task(params["task"], **params["task_kwargs"])
        runs: dict[str, dict[str, Any]] = {}
        in_features = int(task.train_set.x[0].numel())
        seeds = list(range(max(len(ctx.seeds), params["min_seeds"])))
        for pos in ("before", "after"):
            for seed in seeds:
                build = (lambda pos=pos: MLP(in_features, tuple(params["hidden"]), task.num_classes, norm="batch",
                                             activation="relu", norm_position=pos))
                cfg = TrainConfig(batch_size=params["batch_size"], lr=params["lr"], epochs=params["epochs"], seed=seed,
                                  norm="batch", activation="relu", eval_train=False)
                with one_thread(ctx.device):
                    r = ctx.fit(task, cfg, model_fn=seeded_model(seed, build),
                                variant=f"MLP hidden={params['hidden']} norm=batch norm_position={pos}")
                runs.setdefault(pos, {})[str(seed)] = compact(r)
        return {"runs": runs}

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        return [self._c06(data, params)]

    def _c06(self, data: dict[str, Any], params: dict[str, Any]) -> Verdict:
        margin = params["margin"]
        before, after = data["runs"]["before"], data["runs"]["after"]
        seeds = sorted(before, key=int)
        bad = [s for s in seeds if before[s]["status"] != "ok" or after.get(s, {}).get("status") != "ok"]
        d = [before[s]["final_val_acc"] - after[s]["final_val_acc"] for s in seeds if s not in bad]
        test = paired_rule(d, margin, "equivalence")
        effect = {"margin": margin, "diff_before_minus_after": d, "diff": spread(d), "equivalence_test": test.to_dict(),
                  "acc_before": spread(before[s]["final_val_acc"] for s in seeds if s not in bad),
                  "acc_after": spread(after[s]["final_val_acc"] for s in seeds if s not in bad), "not_ok_seeds": bad}
        nums = (f"accuracy before ReLU {fmt_spread(effect['acc_before'])}, after {fmt_spread(effect['acc_after'])}; "
                f"{test.text('difference before - after')}")
        low = min(effect["acc_before"]["mean"], effect["acc_after"]["mean"]) if d else math.nan
        if bad or not d or not low >= params["min_acc"]:
            why = f"runs did not finish in seeds {bad}" if bad or not d else (
                f"an arm did not learn the task (seed-mean accuracy {low:.3f} < {params['min_acc']})")
            return Verdict.invalid("C06", f"{why}; {nums}", effect)
        if test.outcome == "supported":
            return Verdict("C06", "supported", f"equivalent within the margin; {nums}", effect)
        if test.outcome == "refuted":
            better = "before" if test.mean > 0 else "after"
            return Verdict("C06", "refuted", f"BN {better} the ReLU is better by more than the margin; {nums}", effect)
        return Verdict("C06", "inconclusive", f"the interval straddles the margin; {nums}", effect)

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = pyplot()
        runs = data["runs"]
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [2, 1]})
        ax = axes[0]
        for pos, color in (("before", "C0"), ("after", "C1")):
            ok = [r for r in runs[pos].values() if r["status"] == "ok"]
            _band(ax, ok, "val_acc", "Linear-BN-ReLU" if pos == "before" else "Linear-ReLU-BN", color, x="epoch")
            _band(ax, ok, "train_acc", f"(train) {pos}", color, x="epoch", style="--")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (fraction); solid: validation, dashed: training")
        ax.set_title(f"{params['task']}: BN before vs after ReLU (mean, min..max band)")
        ax.legend(loc="lower right")
        ax = axes[1]
        seeds = sorted(runs["before"], key=int)
        for i, s in enumerate(seeds):
            ys = [runs["before"][s]["final_val_acc"], runs["after"][s]["final_val_acc"]]
            ax.plot([0, 1], ys, "o-", color=f"C{i % 10}", alpha=0.7, label=f"seed {s}" if i < 10 else None)
        ax.set_xticks([0, 1], ["BN before ReLU", "BN after ReLU"])
        ax.set_xlim(-0.4, 1.4)
        ax.set_xlabel("position of BN in each hidden layer")
        ax.set_ylabel("final validation accuracy (fraction)")
        ax.set_title(f"Paired seeds (equivalence margin +-{params['margin'] * 100:g} points)")
        ax.legend(fontsize=7, ncol=2)
        fig.suptitle("C06: where BN goes")
        fig.tight_layout()
        return [fig]


# ---------------------------------------------------------------------------------------------
# C07: BN with little data
# ---------------------------------------------------------------------------------------------


@register
class BNDataSize(Experiment):
    id = "bn_data_size"
    claims = ("C07",)
    title = "BatchNorm with little training data"
    seed_doc = "000"
    statements = {"C07": "With little data BN can under-fit, and no BN may be better."}
    rules = {
        "C07": "Reported as measured. digits-mlp (ReLU MLP) trained on random subsets of 64, 128, 256, 512 and all "
        "1438 training images (a new subset per seed), SGD+momentum lr 0.05, batch 32, the same 300 steps for "
        "every size and arm, validated on the full 359-image validation set. 'Little data' = sizes <= 150 (about "
        "10% of the set). Per seed, d = mean over the little-data sizes of (no-BN - BN) final validation accuracy, "
        "and u = the same for training accuracy (u > 0: BN fits the training set worse, i.e. under-fits). "
        "The claim is hedged ('can', 'may') and CLAIMS.md asks for it to be reported as measured: observed if "
        "d > 1 point and u > 1 point in every seed (no BN better, and BN under-fits); not observed if d < -1 point "
        "in every seed (BN better with little data); otherwise inconclusive."
    }
    validity = {
        "C07": "With all the data both arms must learn the task (seed-mean val accuracy >= 80% at the full size), so "
        "that a small-data difference is about the data, not the budget; every run must finish."
    }
    reported = ("C07",)

    def params(self, quick: bool) -> dict[str, Any]:
        return {"task": "digits-mlp", "sizes": [64, 128, 256, 512, 1438], "small_max": 150, "batch_size": 32,
                "lr": 0.05, "max_steps": 300, "tol": 0.01}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        base = ctx.task(params["task"])
        jobs, keys = [], []
        for n in params["sizes"]:
            for seed in ctx.seeds:
                sub = base.train_set.subset(n, seed=1000 + seed)
                task = dataclasses.replace(base, train_set=sub,
                                           info={**base.info, "n_train": len(sub), "subset_seed": 1000 + seed})
                for norm in ("none", "batch"):
                    cfg = TrainConfig(batch_size=params["batch_size"], lr=params["lr"], max_steps=params["max_steps"],
                                      eval_every=params["max_steps"], seed=seed, norm=norm, activation="relu")
                    jobs.append((task, cfg))
                    keys.append((norm, str(len(sub)), str(seed)))
        with one_thread(ctx.device):
            results = ctx.fit_many(jobs)
        runs: dict[str, dict[str, dict[str, Any]]] = {}
        for (norm, n, seed), r in zip(keys, results):
            c = compact(r)
            c.pop("history")
            runs.setdefault(norm, {}).setdefault(n, {})[seed] = c
        return {"runs": runs}

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        tol = params["tol"]
        runs = data["runs"]
        sizes = sorted(runs["batch"], key=int)
        small = [n for n in sizes if int(n) <= params["small_max"]]
        seeds = sorted(runs["batch"][sizes[0]], key=int)

        def gap(key: str, s: str, ns: Sequence[str]) -> float:
            return sum(runs["none"][n][s][key] - runs["batch"][n][s][key] for n in ns) / len(ns)

        per_size = {n: {"bn_val": spread(runs["batch"][n][s]["final_val_acc"] for s in seeds),
                        "none_val": spread(runs["none"][n][s]["final_val_acc"] for s in seeds),
                        "bn_train": spread(runs["batch"][n][s]["final_train_acc"] for s in seeds),
                        "none_train": spread(runs["none"][n][s]["final_train_acc"] for s in seeds),
                        "val_gap_none_minus_bn": spread(gap("final_val_acc", s, [n]) for s in seeds)}
                    for n in sizes}
        effect: dict[str, Any] = {"tol": tol, "small_sizes": [int(n) for n in small], "per_size": per_size}
        bad = [(n, s) for n in sizes for s in seeds for norm in ("none", "batch") if runs[norm][n][s]["status"] != "ok"]
        if not small or bad:
            why = "no training-set size is small enough" if not small else f"runs did not finish: {bad}"
            return [Verdict.invalid("C07", why, effect)]
        full = sizes[-1]
        low = min(per_size[full]["bn_val"]["mean"], per_size[full]["none_val"]["mean"])
        if not low >= 0.8:
            return [Verdict.invalid("C07", f"with all {full} images an arm reached only {low:.3f} validation accuracy "
                                    "(< 0.8): the budget does not teach the task", effect)]
        d = [gap("final_val_acc", s, small) for s in seeds]
        u = [gap("final_train_acc", s, small) for s in seeds]
        effect.update({"d_val": d, "u_train": u, "d_val_spread": spread(d), "u_train_spread": spread(u)})
        table = "; ".join(f"n={n}: BN {fmt_spread(v['bn_val'])} vs none {fmt_spread(v['none_val'])}"
                          for n, v in per_size.items())
        nums = (f"little data (n <= {params['small_max']}): no-BN - BN validation {fmt_spread(effect['d_val_spread'])}, "
                f"training {fmt_spread(effect['u_train_spread'])}. Validation accuracy by size: {table}")
        if all(x > tol for x in d) and all(x > tol for x in u):
            return [Verdict("C07", "observed", f"with little data no BN was better and BN under-fit in every seed; {nums}",
                            effect)]
        if all(x < -tol for x in d):
            return [Verdict("C07", "not observed", f"with little data BN was better by more than {tol:g} in every seed; "
                            f"{nums}", effect)]
        if all(x > tol for x in d):
            return [Verdict("C07", "inconclusive", "no BN was better with little data in every seed, but BN did not "
                            f"under-fit the training set (the claim's mechanism); {nums}", effect)]
        return [Verdict("C07", "inconclusive", f"no consistent difference beyond {tol:g} with little data; {nums}", effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        import numpy as np

        plt = pyplot()
        runs = data["runs"]
        sizes = sorted(runs["batch"], key=int)
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
        for ax, key, what in ((axes[0], "final_val_acc", "validation"), (axes[1], "final_train_acc", "training")):
            for norm, color, name in (("none", "C3", "no BN"), ("batch", "C0", "BN")):
                xs = np.array([int(n) for n in sizes])
                vals = [[r[key] for r in runs[norm][n].values()] for n in sizes]
                ax.plot(xs, [np.mean(v) for v in vals], "o-", color=color, label=f"{name} (mean, min..max)")
                ax.fill_between(xs, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.18, lw=0)
            ax.axvspan(min(int(n) for n in sizes) * 0.8, params["small_max"], color="gray", alpha=0.12,
                       label="'little data' in the rule")
            ax.set_xscale("log")
            ax.set_xlabel("training-set size (examples, log scale)")
            ax.set_ylabel(f"final {what} accuracy (fraction)")
            ax.set_title(f"{what.capitalize()} accuracy after {params['max_steps']} steps (batch {params['batch_size']})")
            ax.legend(loc="lower right")
        fig.suptitle("C07: BN vs no BN as the training set shrinks (digits-mlp)")
        fig.tight_layout()
        return [fig]
