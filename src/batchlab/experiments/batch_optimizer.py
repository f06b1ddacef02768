"""First- vs second-order optimizers across batch sizes: SGD vs L-BFGS (C15)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from batchlab.experiments.base import Experiment, ExperimentContext, Verdict, fmt_spread, register, spread
from batchlab.experiments.batch_accuracy import NORM, _grid_config
from batchlab.experiments.kit import final_metric as _final, nan_if_none as _nan, per_seed, pyplot, seed_keys as _seed_keys
from batchlab.train import TrainConfig


# ----------------------------------------------------------------------------------------------- C15
@register
class LBFGSBatch(Experiment):
    id = "lbfgs_batch"
    claims = ("C15",)
    title = "SGD vs L-BFGS across batch sizes"
    seed_doc = "000"
    statements = {
        "C15": "First-order methods like small batches; second-order ones (L-BFGS, conjugate gradient) need large "
        "ones, thousands and more."
    }
    rules = {
        "C15": "mnist1d-mlp on 10000 generated samples (8000 train / 2000 val, so that 'thousands' fits in a batch) "
        "without normalization, B = 32, 256, 2048 and 8000 (full batch). Every arm gets the same budget in gradient "
        "evaluations (examples x evaluations): SGD (momentum 0.9, best val accuracy over the LR grid per B) trains E "
        "epochs; L-BFGS (lr 1, strong-Wolfe line search, history 20, lbfgs_max_iter iterations per batch, which "
        "torch caps at 1.25 x lbfgs_max_iter function evaluations) gets floor(E x N / (B x 1.25 x lbfgs_max_iter)) "
        "steps (at least 1), i.e. at most SGD's evaluations. Supported if in every seed (a) at the smallest B L-BFGS "
        "diverged/failed or ends at least 10 points of val accuracy below SGD at that B, and (b) at the largest B "
        "L-BFGS is within 5 points of SGD's best over all B (competitive). Refuted if the mean over seeds fails (a) "
        "or (b); otherwise inconclusive."
    }
    validity = {
        "C15": "The budget must teach the task to the first-order method: SGD's best val accuracy >= 50% (5x chance) "
        "in every seed."
    }

    def params(self, quick: bool) -> dict[str, Any]:
        return {"task": "mnist1d-mlp", "task_kwargs": {"n_samples": 10000}, "batches": [32, 256, 2048, 8000],
                "epochs": 5 if quick else 20, "sgd_lrs": [0.05, 0.2] if quick else [0.0125, 0.05, 0.2], "lbfgs_max_iter": 8,
                "far_worse": 0.10, "competitive": 0.05, "min_sgd_acc": 0.5}

    @staticmethod
    def lbfgs_steps(p: dict[str, Any], n_train: int, b: int) -> int:
        """L-BFGS steps with at most SGD's gradient evaluations (torch's LBFGS: max_eval = max_iter * 5 // 4)."""
        evals_per_step = p["lbfgs_max_iter"] * 5 // 4
        return max(1, int(p["epochs"] * n_train // (min(b, n_train) * evals_per_step)))

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        task = ctx.task(params["task"], **params["task_kwargs"])
        n_train = len(task.train_set)

        def one(seed: int) -> dict[str, Any]:
            sgd_all, sgd_status, lb, lb_status, lb_time, sgd_time = [], [], [], [], [], []
            jobs = []
            for b in params["batches"]:
                jobs += [(task, _grid_config(b, lr, params["epochs"], seed)) for lr in params["sgd_lrs"]]
                jobs.append((task, TrainConfig(batch_size=b, lr=1.0, optimizer="lbfgs",
                                               max_steps=self.lbfgs_steps(params, n_train, b),
                                               lbfgs_max_iter=params["lbfgs_max_iter"], norm=NORM, seed=seed,
                                               eval_every=0)))
            runs = iter(ctx.fit_many(jobs))
            for _b in params["batches"]:
                row, st, tt = [], [], []
                for _lr in params["sgd_lrs"]:
                    r = next(runs)
                    row.append(_final(r, "val_acc"))
                    st.append(r.status)
                    tt.append(r.train_time)
                sgd_all.append(row)
                sgd_status.append(st)
                sgd_time.append(tt)
                r = next(runs)
                lb.append(_final(r, "val_acc"))
                lb_status.append(r.status)
                lb_time.append(r.train_time)
            return {"B": params["batches"], "sgd_lrs": params["sgd_lrs"], "sgd_all": sgd_all, "sgd_status": sgd_status,
                    "sgd_time": sgd_time, "lbfgs": lb, "lbfgs_status": lb_status, "lbfgs_time": lb_time}

        return per_seed(ctx, one)

    @staticmethod
    def summarize(d: dict[str, Any]) -> dict[str, Any]:
        sgd_best = []
        for row in d["sgd_all"]:
            fin = [_nan(v) for v in row if v is not None]
            sgd_best.append(max(fin) if fin else float("nan"))
        lb = [_nan(v) for v in d["lbfgs"]]
        fin_sgd = [v for v in sgd_best if math.isfinite(v)]
        return {"sgd_best_per_B": sgd_best, "lbfgs": lb, "sgd_overall": max(fin_sgd) if fin_sgd else float("nan"),
                "gap_small": (sgd_best[0] - lb[0]) if math.isfinite(lb[0]) else float("inf"),
                "gap_large": (max(fin_sgd) - lb[-1]) if math.isfinite(lb[-1]) and fin_sgd else float("inf")}

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        sums = [self.summarize(data["seeds"][s]) for s in _seed_keys(data)]
        fw, comp = params["far_worse"], params["competitive"]
        a = [x["gap_small"] >= fw for x in sums]
        b = [x["gap_large"] <= comp for x in sums]
        cap = lambda v: min(v, 1.0)  # noqa: E731 - a diverged L-BFGS counts as 100 points behind in the spread
        gs, gl = spread(cap(x["gap_small"]) for x in sums), spread(cap(x["gap_large"]) for x in sums)
        B = data["seeds"][_seed_keys(data)[0]]["B"]
        effect = {"sgd_minus_lbfgs_at_smallest_B": gs, "sgd_best_minus_lbfgs_at_largest_B": gl,
                  "lbfgs_val_acc_per_B": {str(bb): spread(x["lbfgs"][i] for x in sums) for i, bb in enumerate(B)},
                  "sgd_val_acc_per_B": {str(bb): spread(x["sgd_best_per_B"][i] for x in sums) for i, bb in enumerate(B)},
                  "thresholds": {"far_worse": fw, "competitive": comp}}
        txt = (f"at B={B[0]} SGD leads L-BFGS by {fmt_spread(gs)} (needs >= {fw:.2f}); at B={B[-1]} L-BFGS trails SGD's best "
               f"by {fmt_spread(gl)} (needs <= {comp:.2f}); accuracies as fractions")
        sgd_best = spread(x["sgd_overall"] for x in sums)
        effect["sgd_best_val_acc"] = sgd_best
        if not sums or sgd_best["n"] < len(sums) or sgd_best["min"] < params["min_sgd_acc"]:
            return [Verdict.invalid("C15", f"SGD's best val accuracy {fmt_spread(sgd_best)} is below "
                            f"{params['min_sgd_acc']:.0%} in some seed: the budget does not teach the task; {txt}", effect)]
        if all(a) and all(b):
            return [Verdict("C15", "supported", txt, effect)]
        if gs["mean"] < fw or gl["mean"] > comp:
            return [Verdict("C15", "refuted", txt, effect)]
        return [Verdict("C15", "inconclusive", txt + "; seeds disagree", effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        for i, s in enumerate(_seed_keys(data)):
            d = data["seeds"][s]
            sm = self.summarize(d)
            B = d["B"]
            axes[0].plot(B, np.array(sm["sgd_best_per_B"]) * 100, "o-", color="C0", alpha=0.8,
                         label="SGD momentum (best LR per B)" if i == 0 else None)
            lb = np.array(sm["lbfgs"]) * 100
            axes[0].plot(B, lb, "s-", color="C3", alpha=0.8,
                         label=f"L-BFGS (max_iter {params['lbfgs_max_iter']})" if i == 0 else None)
            for bb, st in zip(B, d["lbfgs_status"]):
                if st != "ok":
                    axes[0].plot([bb], [10], "x", color="C3", ms=10, label="L-BFGS diverged" if i == 0 else None)
            axes[1].plot(B, [min(t) for t in d["sgd_time"]], "o-", color="C0", alpha=0.8,
                         label="SGD (fastest of its LR runs)" if i == 0 else None)
            axes[1].plot(B, d["lbfgs_time"], "s-", color="C3", alpha=0.8, label="L-BFGS" if i == 0 else None)
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel("batch size B (log)")
            ax.legend()
        axes[0].set_ylabel("final val accuracy (%)")
        axes[0].set_title(f"same gradient evaluations: SGD {params['epochs']} epochs (all seeds)")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("training time (s, log)")
        axes[1].set_title("cost of the budget")
        fig.suptitle(f"C15: SGD vs L-BFGS across batch sizes ({params['task']}, no norm)")
        fig.tight_layout()
        return [fig]

