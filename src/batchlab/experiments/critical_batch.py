"""C22: McCandlish et al.'s steps-examples trade-off and the gradient noise scale.

For each batch size B, the fewest optimizer steps S(B) (over a small LR grid) to bring the training
loss to a target, and the examples E(B) = B S(B). McCandlish et al. (2018, "An Empirical Model of
Large-Batch Training") predict ``S = S_min (1 + B_noise / B)`` and ``E = E_min (1 + B / B_noise)``
with the critical batch ``B_crit = E_min / S_min = B_noise``, and that the simple noise scale
``B_simple = tr(Sigma) / |G|^2`` (measured by :func:`batchlab.batchsize.noise.noise_scale`, the one
``batchlab noise`` runs) approximates it.

The fit is linear in the unknowns: ``S = a + c / B`` with ``a = S_min`` and ``c = S_min B_noise``,
fitted to relative residuals (rows ``[1/S, 1/(B S)]``, target 1), so that B = 8 with thousands of
steps and B = 1024 with tens weigh alike; R^2 is computed on log S.

C22 is also the ground truth ``batchlab suggest`` is judged by: in the full run (and ``--quick``) the
experiment runs :func:`batchlab.batchsize.suggest` on each task as C22 trains it (no normalization, the
same optimizer, the LR C22 centres on at B = 128), with a small cost budget, and reports where its
recommended batch falls relative to the fitted B_crit (ratio suggested / B_crit, and whether it lies
within a factor 2). That is a measure reported next to the verdict; the verdict rule (pre-registered)
does not use it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

import numpy as np

from batchlab.experiments.base import Experiment, ExperimentContext, Verdict, fmt_spread, one_thread, register, spread
from batchlab.experiments.kit import pyplot
from batchlab.train import Callback, StepContext, TrainConfig, fit


class StopAtTarget(Callback):
    """Stop training at the first evaluation whose ``key`` is at or below ``target``; ``hit`` = that step."""

    def __init__(self, key: str, target: float) -> None:
        self.key, self.target = key, target
        self.hit: int | None = None

    def on_evaluate(self, ctx: StepContext, row: dict[str, Any]) -> None:
        v = row.get(self.key)
        if self.hit is None and v is not None and math.isfinite(v) and v <= self.target:
            self.hit = ctx.step
            ctx.stop = True


def fit_steps_curve(batches: list[float], steps: list[float]) -> dict[str, float]:
    """Fit ``S = S_min (1 + B_noise / B)`` to measured (B, S); returns S_min, B_noise (= B_crit), E_min, R^2 on log S.

    NaN everywhere with fewer than 3 finite points or a fit with S_min <= 0 or B_noise <= 0.
    """
    pts = [(float(b), float(s)) for b, s in zip(batches, steps) if s is not None and math.isfinite(s) and s > 0]
    nan = {"s_min": math.nan, "b_noise": math.nan, "e_min": math.nan, "r2_log": math.nan, "n": len(pts)}
    if len(pts) < 3:
        return nan
    B = np.array([p[0] for p in pts])
    S = np.array([p[1] for p in pts])
    A = np.stack([1.0 / S, 1.0 / (B * S)], axis=1)
    (a, c), *_ = np.linalg.lstsq(A, np.ones_like(S), rcond=None)
    if not (a > 0 and c > 0):
        return {**nan, "s_min": float(a), "b_noise": float(c / a) if a else math.nan}
    pred = np.log(a + c / B)
    ls = np.log(S)
    ss = float(((ls - ls.mean()) ** 2).sum())
    r2 = 1.0 - float(((ls - pred) ** 2).sum()) / ss if ss > 0 else math.nan
    return {"s_min": float(a), "b_noise": float(c / a), "e_min": float(c), "r2_log": r2, "n": len(pts)}


@register
class CriticalBatch(Experiment):
    id = "critical_batch"
    claims = ("C22",)
    title = "Steps and examples to a target loss across B; the fitted critical batch vs the gradient noise scale"
    seed_doc = "001, 000"
    statements = {
        "C22": "Steps and examples to a target trade off as S = S_min (1 + B_noise/B), E = E_min (1 + B/B_noise), "
        "and the gradient noise scale predicts the critical batch B_crit (McCandlish et al. 2018; the quantitative "
        "core behind C08-C16)."
    }
    rules = {
        "C22": "Two tasks without normalization: digits-mlp (target training loss 0.15) and mnist1d-mlp on 10000 "
        "samples (target training loss 1.0). Plain SGD; for each B in the grid and seed, S(B) = the fewest steps "
        "over the LR grid lr = c * lr_ref * sqrt(B / 32), c in {0.5, 1, 2}, at which the training loss (fixed "
        "training subset, evaluated every max(1, 256 / B) steps) reaches the target; E(B) = B S(B). Fit "
        "S = S_min (1 + B_noise / B) to the per-B median over seeds (relative least squares; R^2 on log S); "
        "B_crit = B_noise. B_simple = the library's noise_scale (micro-batch 16 x 8 accumulation, 200 steps, "
        "EMA 0.95; mean of the second half of its history), mean over seeds. Per task: holds if R^2 >= 0.9 and "
        "B_simple within a factor 2 of B_crit; fails if R^2 < 0.9 or B_simple off by more than a factor 4; "
        "otherwise undecided. Supported if it holds on both tasks, refuted if it fails on both, otherwise "
        "inconclusive. (Reported next to the verdict, not part of this rule: batchlab suggest's recommended batch "
        "on each task, run as C22 trains it, over the fitted B_crit, and whether it lies within a factor 2.)"
    }
    validity = {
        "C22": "Per task, the target must be reached at enough batch sizes for a 2-parameter curve: at least "
        "min_points batch sizes (6 in the full run, 4 in --quick) reach it in every seed, and the measured S spans "
        "at least a factor 2 (else the trade-off is not visible). A task failing this is left out; with none left "
        "the verdict is inconclusive."
    }
    R2 = 0.9
    WITHIN = 2.0
    OFF = 4.0

    def params(self, quick: bool) -> dict[str, Any]:
        tasks = [
            {"label": "digits-mlp", "task": "digits-mlp", "kwargs": {}, "target": 0.15, "lr_ref": 0.2,
             "max_epochs": 150 if quick else 300},
            {"label": "mnist1d-mlp", "task": "mnist1d-mlp", "kwargs": {"n_samples": 10000}, "target": 1.0,
             "lr_ref": 0.1, "max_epochs": 25 if quick else 50},
        ]
        batches = [8, 32, 128, 512] if quick else [8, 16, 32, 64, 128, 256, 512, 1024]
        # suggest as a user would run it (default "time" objective, two seeds) over C22's batch range, with
        # a cost budget of a few epochs; its whole result is one cached measurement per task
        sug = {"low": min(batches), "high": max(batches), "seeds": [0, 1], "objective": "time",
               "cost_epochs": 5 if quick else 10, "quick": quick}
        return {"tasks": tasks, "batches": batches, "lr_factors": [0.5, 1.0, 2.0], "optimizer": "sgd",
                "noise": {"micro_batch": 16, "accumulation": 8, "steps": 200, "beta": 0.95},
                "min_points": 4 if quick else 6, "min_span": 2.0, "suggest": sug}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"tasks": {}}
        with one_thread(ctx.device):
            for spec in params["tasks"]:
                task = ctx.task(spec["task"], **spec["kwargs"])
                runs: dict[str, dict[str, dict[str, Any]]] = {}
                for b in params["batches"]:
                    for c in params["lr_factors"]:
                        lr = c * spec["lr_ref"] * math.sqrt(b / 32)
                        for seed in ctx.seeds:
                            key = {"task": spec, "B": b, "lr": lr, "seed": seed, "optimizer": params["optimizer"],
                                   "fingerprint": task.fingerprint()}
                            runs.setdefault(str(b), {}).setdefault(f"{lr:.6g}", {})[str(seed)] = ctx.cached(
                                "steps_to_target", key,
                                lambda b=b, lr=lr, seed=seed, task=task, spec=spec: self._one(task, spec, params, b, lr,
                                                                                            seed, ctx.device))
                noise = {str(seed): ctx.cached("b_simple", {"task": spec, "seed": seed, **params["noise"],
                                                            "fingerprint": task.fingerprint()},
                                               lambda seed=seed, task=task: self._noise(task, params, seed, ctx.device))
                         for seed in ctx.seeds}
                out["tasks"][spec["label"]] = {"runs": runs, "b_simple": noise, "target": spec["target"]}
                if params.get("suggest"):
                    out["tasks"][spec["label"]]["suggest"] = ctx.cached(
                        "suggest", {"task": spec, **params["suggest"], "optimizer": params["optimizer"],
                                    "fingerprint": task.fingerprint()},
                        lambda task=task, spec=spec: self._suggest(task, spec, params, ctx.device))
        return out

    @staticmethod
    def _one(task: Any, spec: dict[str, Any], p: dict[str, Any], b: int, lr: float, seed: int,
             device: str) -> dict[str, Any]:
        n = len(task.train_set)
        stop = StopAtTarget("train_loss", spec["target"])
        cfg = TrainConfig(batch_size=b, lr=lr, optimizer=p["optimizer"], max_examples=int(spec["max_epochs"] * n),
                          eval_every=max(1, 256 // b), eval_train=True, norm="none", seed=seed, device=device)
        r = fit(task, cfg, callbacks=[stop], raise_errors=False)
        return {"status": r.status, "steps_to_target": stop.hit, "steps": r.steps, "train_time": r.train_time}

    @staticmethod
    def _noise(task: Any, p: dict[str, Any], seed: int, device: str) -> dict[str, Any]:
        from batchlab.batchsize.noise import noise_scale

        q = p["noise"]
        r = noise_scale(task, micro_batch=q["micro_batch"], accumulation=q["accumulation"], steps=q["steps"],
                        beta=q["beta"], seed=seed, device=device, norm="none")
        hist = [h.get("b_simple") for h in r.history]
        tail = [float(v) for v in hist[len(hist) // 2:] if v is not None and math.isfinite(float(v)) and v > 0]
        return {"status": r.status, "b_simple_final": r.b_simple,
                "b_simple": statistics.fmean(tail) if tail else math.nan, "n_history": len(hist)}

    @staticmethod
    def suggest_task(task: Any, spec: dict[str, Any], p: dict[str, Any]) -> Any:
        """``task`` as C22 trains it, for suggest: no normalization, C22's optimizer, and the LR C22's grid
        centres on at B = 128 (``lr_ref * sqrt(128 / 32)``) as its default at batch 128 (suggest scales it by
        the optimizer's rule)."""
        lr128 = spec["lr_ref"] * math.sqrt(128 / 32)
        return dataclasses.replace(task, norm="none", optimizer=p["optimizer"], lr=lr128, batch_size=128, spec=None,
                                   info={**task.info, "c22": f"norm none, {p['optimizer']}, lr {lr128:g} at 128"})

    @classmethod
    def _suggest(cls, task: Any, spec: dict[str, Any], p: dict[str, Any], device: str) -> dict[str, Any]:
        from batchlab.batchsize.suggest import suggest

        q = p["suggest"]
        t = cls.suggest_task(task, spec, p)
        s = suggest(t, device=device, low=q["low"], high=q["high"], seeds=q["seeds"], objective=q["objective"],
                    cost_budget=int(q["cost_epochs"] * t.n_train), quick=q["quick"], store=None)
        return {"status": s.status, "batch_size": s.batch_size, "lr": s.lr, "b_noise": s.b_noise,
                "tied": list(s.confirm.tied), "examples": s.total_examples, "cost_budget": s.cost_budget,
                "wall_time": s.wall_time, "headline": s.headline}

    @staticmethod
    def suggest_vs_b_crit(suggested: dict[str, Any] | None, b_crit: float, within: float = 2.0) -> dict[str, Any] | None:
        """Where suggest's recommended batch falls relative to the fitted B_crit: the ratio suggested / B_crit and
        whether it lies within a factor ``within`` (a reported measure, not part of the verdict rule)."""
        if not suggested:
            return None
        b = suggested.get("batch_size")
        ok = b is not None and math.isfinite(b_crit) and b_crit > 0
        ratio = b / b_crit if ok else math.nan
        return {"batch": b, "b_crit": b_crit, "ratio": ratio, "within": within,
                "within_factor": bool(ok and 1 / within <= ratio <= within), "status": suggested.get("status"),
                "lr": suggested.get("lr"), "suggest_b_noise": suggested.get("b_noise"),
                "examples": suggested.get("examples"), "wall_time": suggested.get("wall_time")}

    @staticmethod
    def steps_per_b(task_data: dict[str, Any]) -> dict[str, dict[str, float]]:
        """B -> seed -> fewest steps to the target over the LR grid (inf when no LR reached it)."""
        out: dict[str, dict[str, float]] = {}
        for b, per_lr in task_data["runs"].items():
            seeds = {s for runs in per_lr.values() for s in runs}
            for s in seeds:
                hits = [r[s]["steps_to_target"] for r in per_lr.values()
                        if s in r and r[s].get("status") == "ok" and r[s].get("steps_to_target") is not None]
                out.setdefault(b, {})[s] = float(min(hits)) if hits else math.inf
        return out

    @staticmethod
    def lr_at_grid_edge(task_data: dict[str, Any]) -> dict[str, str]:
        """Batches whose fastest LR (fewest steps to the target, in some seed) is the grid's smallest or
        largest: a faster LR may lie outside the grid, so S(B) is only an upper bound there."""
        out: dict[str, str] = {}
        for b, per_lr in task_data["runs"].items():
            lrs = sorted(per_lr, key=float)
            if len(lrs) < 3:
                continue
            seeds = {s for runs in per_lr.values() for s in runs}
            for s in seeds:
                hits = {lr: r[s]["steps_to_target"] for lr, r in per_lr.items()
                        if s in r and r[s].get("status") == "ok" and r[s].get("steps_to_target") is not None}
                if hits:
                    best = min(hits, key=lambda lr: (hits[lr], float(lr)))
                    if best in (lrs[0], lrs[-1]):
                        out[b] = "largest" if best == lrs[-1] else "smallest"
        return out

    def judge_task(self, task_data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        per_b = self.steps_per_b(task_data)
        bs = sorted(per_b, key=int)
        seeds = sorted({s for v in per_b.values() for s in v}, key=int)
        reached = [b for b in bs if all(math.isfinite(per_b[b].get(s, math.inf)) for s in seeds)]
        med = {b: float(np.median([per_b[b][s] for s in seeds])) for b in reached}
        f = fit_steps_curve([int(b) for b in reached], [med[b] for b in reached])
        bsim = spread(v.get("b_simple") for v in task_data["b_simple"].values())
        ratio = bsim["mean"] / f["b_noise"] if f["b_noise"] and math.isfinite(f["b_noise"]) else math.nan
        res = {"steps_median": med, "steps_per_seed": per_b, "reached_B": [int(b) for b in reached], "fit": f,
               "b_simple": bsim, "b_simple_over_b_crit": ratio,
               "examples_median": {b: int(b) * s for b, s in med.items()}}
        span = max(med.values()) / min(med.values()) if med else math.nan
        res["steps_span"] = span
        edge = self.lr_at_grid_edge(task_data)
        res["lr_at_grid_edge"] = edge
        txt = (f"S_min {f['s_min']:.4g}, B_crit {f['b_noise']:.4g}, E_min {f['e_min']:.4g}, R^2(log S) "
               f"{f['r2_log']:.3f} on {f['n']} B; B_simple {fmt_spread(bsim)} (ratio B_simple/B_crit {ratio:.3g})"
               + (f"; note (not part of the rule): the fastest LR is the grid's {'/'.join(sorted(set(edge.values())))} "
                  f"at B = {', '.join(sorted(edge, key=int))}, so S(B) there is an upper bound" if edge else ""))
        res["text"] = txt
        res["suggest"] = self.suggest_vs_b_crit(task_data.get("suggest"), f["b_noise"], self.WITHIN)
        if len(reached) < params["min_points"] or not span >= params["min_span"]:
            res["outcome"] = "invalid"
            res["why"] = (f"the target was reached in every seed at {len(reached)} batch sizes (needs "
                          f"{params['min_points']}), steps span x{span:.3g} (needs x{params['min_span']:g})")
        elif f["r2_log"] >= self.R2 and 1 / self.WITHIN <= ratio <= self.WITHIN:
            res["outcome"], res["why"] = "holds", "good fit and B_simple within 2x of B_crit"
        elif not f["r2_log"] >= self.R2 or not 1 / self.OFF <= ratio <= self.OFF:
            res["outcome"] = "fails"
            res["why"] = "poor fit" if not f["r2_log"] >= self.R2 else "B_simple more than 4x from B_crit"
        else:
            res["outcome"], res["why"] = "undecided", "B_simple between 2x and 4x from B_crit"
        return res

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        rule = (f"rule per task: R^2 >= {self.R2} and B_simple within {self.WITHIN:g}x of the fitted B_crit holds; "
                f"R^2 < {self.R2} or more than {self.OFF:g}x off fails; supported if it holds on both tasks")
        per = {label: self.judge_task(t, params) for label, t in data["tasks"].items()}
        effect = {label: {k: v for k, v in r.items() if k not in ("text", "steps_per_seed")} for label, r in per.items()}
        nums = "; ".join(f"{label}: {r['outcome']} ({r['why']}): {r['text']}" for label, r in per.items())
        nums += self.suggest_note(per)
        valid = {label: r for label, r in per.items() if r["outcome"] != "invalid"}
        if not valid:
            return [Verdict.invalid("C22", f"no task reached its target at enough batch sizes. {nums}", effect)]
        got = {r["outcome"] for r in valid.values()}
        if got == {"holds"} and len(valid) == len(per):
            return [Verdict("C22", "supported", f"{rule}. {nums}", effect)]
        if got == {"fails"}:
            return [Verdict("C22", "refuted", f"{rule}. {nums}", effect)]
        return [Verdict("C22", "inconclusive", f"{rule}. {nums}", effect)]

    @staticmethod
    def suggest_note(per: dict[str, dict[str, Any]]) -> str:
        """The sentence reporting suggest against B_crit (empty when suggest did not run)."""
        parts = []
        for label, r in per.items():
            sv = r.get("suggest")
            if sv is None:
                continue
            if sv["batch"] is None:
                parts.append(f"{label}: no recommendation (status {sv['status']})")
                continue
            parts.append(f"{label}: B={sv['batch']} vs B_crit {sv['b_crit']:.4g}, ratio {sv['ratio']:.3g} "
                         f"({'within' if sv['within_factor'] else 'not within'} {sv['within']:g}x; status {sv['status']})")
        return f". Reported, not part of the rule: batchlab suggest's batch on {'; '.join(parts)}" if parts else ""

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = pyplot()
        labels = list(data["tasks"])
        fig, axes = plt.subplots(2, len(labels), figsize=(6.5 * len(labels), 9), squeeze=False)
        for j, label in enumerate(labels):
            r = self.judge_task(data["tasks"][label], params)
            f = r["fit"]
            for i, (key, ylabel) in enumerate((("steps", "optimizer steps to the target (log)"),
                                               ("examples", "training examples to the target (log)"))):
                ax = axes[i][j]
                for s_i, s in enumerate(sorted({s for v in r["steps_per_seed"].values() for s in v}, key=int)):
                    xs = [int(b) for b in sorted(r["steps_per_seed"], key=int)
                          if math.isfinite(r["steps_per_seed"][b].get(s, math.inf))]
                    ys = [r["steps_per_seed"][str(b)][s] * (b if key == "examples" else 1) for b in xs]
                    ax.plot(xs, ys, "o", color=f"C{s_i}", alpha=0.6, label=f"seed {s}")
                if math.isfinite(f["r2_log"]):
                    grid = np.geomspace(min(params["batches"]), max(params["batches"]), 100)
                    curve = f["s_min"] * (1 + f["b_noise"] / grid)
                    ax.plot(grid, curve * (grid if key == "examples" else 1), "k-",
                            label=f"fit: B_crit={f['b_noise']:.3g}, R^2={f['r2_log']:.2f}")
                    ax.axvline(f["b_noise"], color="k", ls=":", lw=1, label="fitted B_crit")
                bsim = r["b_simple"]["mean"]
                if math.isfinite(bsim):
                    ax.axvline(bsim, color="C3", ls="--", lw=1.2, label=f"B_simple (noise scale) = {bsim:.3g}")
                if r.get("suggest") and r["suggest"]["batch"]:
                    ax.axvline(r["suggest"]["batch"], color="C2", ls="-.", lw=1.2,
                               label=f"batchlab suggest's batch = {r['suggest']['batch']}")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("batch size B (examples, log2 scale)")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{label}: {key} to training loss {data['tasks'][label]['target']}")
                ax.legend(fontsize=7)
        fig.suptitle("C22: the steps-examples trade-off (McCandlish et al. 2018) and the gradient noise scale")
        fig.tight_layout()
        return [fig]
