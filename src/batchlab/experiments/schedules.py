"""C16 and C19: how the trajectory is driven over time.

- C16 (``batch_growth``): decaying the LR vs growing the batch at the same milestones (Smith et al. 2018).
- C19 (``momentum``): SGD with and without momentum on a task and on 2-D surfaces with a saddle,
  a plateau and a small local minimum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from batchlab.experiments.base import (
    Experiment, ExperimentContext, Verdict, fmt_spread, one_thread, register, spread, steps_to_target,
)
from batchlab.experiments.kit import pyplot
from batchlab.train.config import TrainConfig




# ----------------------------------------------------------------------------------------------
# C16: increase the batch instead of decaying the learning rate
# ----------------------------------------------------------------------------------------------

ARMS16 = {"lr_decay": "LR decay (step, /k)", "batch_growth": "batch growth (x k)", "constant": "constant LR and batch"}
COLORS16 = {"lr_decay": "C0", "batch_growth": "C3", "constant": "C7"}


@register
class BatchGrowth(Experiment):
    id = "batch_growth"
    claims = ("C16",)
    title = "Growing the batch instead of decaying the learning rate"
    seed_doc = "000"
    statements = {
        "C16": "Gradually increasing the batch size combines the benefits of small and large batches "
        "(Smith et al.: increase the batch instead of decaying the LR)."
    }
    rules = {
        "C16": "mnist1d-mlp on 10000 generated samples (larger than the default 4000, so a decayed LR has something "
        "to gain), momentum SGD, B0 = 16, lr0 = 0.1, same budget in epochs for both arms. LR decay: batch B0, LR lr0 divided "
        "by k at the milestones. Batch growth: LR lr0 constant, batch B0 multiplied by k at the same milestones "
        "(same SGD noise scale lr/B in every phase). diff = final val acc(growth) - acc(decay) per seed. "
        "Supported if the seed-mean diff is >= -1 point, no seed below -2 points, and growth took fewer parameter "
        "updates in every seed. Refuted if the seed-mean diff is < -2 points or growth did not take fewer updates. "
        "Otherwise inconclusive. A constant-LR, constant-batch run is shown for reference only."
    }
    validity = {
        "C16": "LR decay must beat the constant-LR, constant-batch arm: seed-mean final val acc(decay) - acc(constant) "
        ">= 1 point. Otherwise the task cannot show what decay (or growth in its place) buys, and the verdict is "
        "inconclusive."
    }
    TOL = 0.01
    #: Smith et al. 2018 (ICLR, "Don't decay the learning rate, increase the batch size"): with the batch multiplied
    #: by the factor the LR would have been divided by, the curves match at fewer parameter updates
    PUBLISHED16 = {"source": "Smith, Kindermans, Ying & Le 2018 (CIFAR-10 ResNet, Fig. 2-3)",
                   "published": "growth and decay reach the same test accuracy (within noise); growth takes fewer "
                   "parameter updates (how many fewer: see their figures; not restated here)"}

    def params(self, quick: bool) -> dict[str, Any]:
        base = {"task": "mnist1d-mlp", "task_kwargs": {"n_samples": 10000}, "batch0": 16, "lr0": 0.1, "k": 5,
                "milestones": [0.5, 0.75]}
        return {**base, "epochs": 8 if quick else 12}

    def configs(self, p: dict[str, Any], seed: int) -> dict[str, TrainConfig]:
        common = {"batch_size": p["batch0"], "lr": p["lr0"], "optimizer": "momentum", "epochs": p["epochs"],
                  "seed": seed, "eval_train": False}
        return {
            "lr_decay": TrainConfig(**common, schedule="step", milestones=tuple(p["milestones"]), gamma=1.0 / p["k"]),
            "batch_growth": TrainConfig(**common, batch_growth=tuple(p["milestones"]), growth_factor=p["k"]),
            "constant": TrainConfig(**common),
        }

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with one_thread(ctx.device):
            task = ctx.task(params["task"], **params.get("task_kwargs", {}))
            for seed in ctx.seeds:
                for arm, cfg in self.configs(params, seed).items():
                    r = ctx.fit(task, cfg)
                    out.setdefault(arm, {})[str(seed)] = {
                        "status": r.status, "final_acc": r.metric("val_acc") if r.ok else math.nan, "steps": r.steps,
                        "epoch": r.series("epoch"), "step": r.series("step"), "val_acc": r.series("val_acc"),
                        "lr": r.series("lr"), "batch_size": r.series("batch_size")}
        return {"runs": out}

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        rule = (f"rule: growth - decay final acc >= -{self.TOL:.0%} (mean), >= -{2 * self.TOL:.0%} every seed, with "
                f"fewer updates every seed; refuted if mean < -{2 * self.TOL:.0%} or not fewer updates")
        runs = data["runs"]
        dec, gro = runs.get("lr_decay", {}), runs.get("batch_growth", {})
        seeds = [s for s in dec if s in gro]
        diffs, fewer, ratio = [], [], []
        for s in seeds:
            a, b = dec[s]["final_acc"], gro[s]["final_acc"]
            if not math.isfinite(a):
                continue
            diffs.append((b if math.isfinite(b) else 0.0) - a)
            fewer.append(gro[s]["steps"] < dec[s]["steps"])
            ratio.append(gro[s]["steps"] / max(1, dec[s]["steps"]))
        d = spread(diffs)
        effect = {"growth_minus_decay": d, "updates_ratio_growth_over_decay": spread(ratio),
                  "acc": {arm: spread(r["final_acc"] for r in v.values()) for arm, v in runs.items()},
                  "steps": {arm: spread(r["steps"] for r in v.values()) for arm, v in runs.items()},
                  "tolerance": self.TOL}
        if not diffs:
            return [Verdict("C16", "inconclusive", f"{rule}. The LR-decay runs did not finish", effect)]
        nums = (f"growth - decay {fmt_spread(d)}; growth used {fmt_spread(effect['updates_ratio_growth_over_decay'])} "
                f"of the decay arm's updates; decay acc {fmt_spread(effect['acc'].get('lr_decay', spread([])))}, "
                f"constant acc {fmt_spread(effect['acc'].get('constant', spread([])))}")
        const = runs.get("constant", {})
        gain = spread(dec[s]["final_acc"] - const[s]["final_acc"] for s in seeds if s in const)
        effect["decay_minus_constant"] = gain
        published = {**self.PUBLISHED16, "measured": nums,
                     "trend_agrees": bool(d["mean"] >= -self.TOL and all(fewer))}
        if not gain["n"] or not gain["mean"] >= self.TOL:
            return [Verdict.invalid("C16", f"LR decay did not beat a constant LR by {self.TOL:.0%} (decay - constant "
                                    f"{fmt_spread(gain)}), so this task cannot show what decay buys. {nums}", effect,
                                    published)]
        nums += f"; decay - constant {fmt_spread(gain)} (validity: >= {self.TOL:.0%})"
        if d["mean"] < -2 * self.TOL or not all(fewer):
            return [Verdict("C16", "refuted", f"{rule}. {nums}", effect, published=published)]
        if d["mean"] >= -self.TOL and d["min"] >= -2 * self.TOL:
            return [Verdict("C16", "supported", f"{rule}. {nums}", effect, published=published)]
        return [Verdict("C16", "inconclusive", f"{rule}. Between the thresholds: {nums}", effect, published=published)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
        for ax, xkey, xlabel in ((axes[0], "epoch", "epochs (passes over the training set)"),
                                 (axes[1], "step", "parameter updates (optimizer steps)")):
            for arm, label in ARMS16.items():
                for i, (s, r) in enumerate(sorted(data["runs"].get(arm, {}).items())):
                    ax.plot(r[xkey], r["val_acc"], color=COLORS16[arm], alpha=0.8, label=label if i == 0 else None)
            for m in params["milestones"]:
                if xkey == "epoch":
                    ax.axvline(m * params["epochs"], color="k", ls=":", lw=0.8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation accuracy (fraction)")
            ax.legend()
        axes[0].set_title(f"{params['task']}: same epochs (dotted: milestones), every seed")
        axes[1].set_title("Same curves against updates: growth needs fewer")
        ax = axes[2]
        s0 = min(data["runs"].get("lr_decay", {"0": None}), key=int)
        for arm in ("lr_decay", "batch_growth"):
            r = data["runs"].get(arm, {}).get(s0)
            if r:
                noise = [lr / b if b else math.nan for lr, b in zip(r["lr"], r["batch_size"])]
                style = {"lr_decay": dict(ls="-", marker="o", ms=7, lw=3, alpha=0.5),
                         "batch_growth": dict(ls="--", marker="x", ms=6, lw=1.5)}[arm]
                ax.plot(r["epoch"], noise, color=COLORS16[arm], label=f"{ARMS16[arm]}: lr / B", **style)
        ax.set_yscale("log")
        ax.set_xlabel("epochs")
        ax.set_ylabel("SGD noise scale lr / B (per example, log scale)")
        ax.set_title(f"Both arms follow the same noise schedule (k={params['k']})")
        ax.legend()
        fig.suptitle(f"C16: batch growth vs LR decay (B0={params['batch0']}, lr0={params['lr0']})")
        fig.tight_layout()
        return [fig]


# ----------------------------------------------------------------------------------------------
# C19: momentum
# ----------------------------------------------------------------------------------------------


def _saddle(w: np.ndarray) -> tuple[float, np.ndarray]:
    x, y = w
    return 0.5 * x * x + 0.25 * y**4 - 0.5 * y * y, np.array([x, y**3 - y])


def _plateau(w: np.ndarray) -> tuple[float, np.ndarray]:
    x, y = w
    e = math.exp(-(x * x + 5 * y * y) / 2)
    return 1.0 - e, np.array([x * e, 5 * y * e])


def _local_min(w: np.ndarray) -> tuple[float, np.ndarray]:
    x, y = w
    bump = 0.15 * math.exp(-4 * (x - 2) ** 2)
    return 0.05 * x * x + 0.5 * y * y - bump, np.array([0.1 * x + 8 * (x - 2) * bump, y])


SURFACES: dict[str, dict[str, Any]] = {
    "saddle": {"f": _saddle, "start": (1.0, 1e-3), "target": -0.25 + 1e-3, "fmin": -0.25,
               "label": "saddle: x^2/2 + y^4/4 - y^2/2 (start next to the saddle)", "box": (-1.2, 1.2, -1.5, 1.5)},
    "plateau": {"f": _plateau, "start": (3.5, 0.3), "target": 0.01, "fmin": 0.0,
                "label": "plateau: 1 - exp(-(x^2 + 5y^2)/2)", "box": (-1.5, 4.5, -1.5, 1.5)},
    "local_min": {"f": _local_min, "start": (4.0, 0.5), "target": 0.005, "fmin": 0.0,
                  "label": "small local minimum: 0.05x^2 + y^2/2 - 0.15 exp(-4(x-2)^2)", "box": (-2.5, 4.5, -1.5, 1.5)},
}


def heavy_ball(f: Callable[[np.ndarray], tuple[float, np.ndarray]], w0: np.ndarray, lr: float, beta: float,
               steps: int, target: float) -> dict[str, Any]:
    """(Heavy-ball) gradient descent: ``v = beta v + g; w -= lr v`` (torch's SGD momentum); beta=0 is GD.

    Returns the loss curve, the path and the first step at which the loss is <= ``target`` (None if never).
    """
    w, v = np.array(w0, dtype=float), np.zeros(2)
    path, losses, hit = [w.copy()], [], None
    for t in range(steps + 1):
        loss, g = f(w)
        losses.append(loss)
        if hit is None and loss <= target:
            hit = t
            break
        if t == steps or not np.isfinite(loss) or np.abs(w).max() > 1e3:
            break
        v = beta * v + g
        w = w - lr * v
        path.append(w.copy())
    return {"steps": hit, "losses": losses, "path": np.asarray(path).tolist()}


@register
class Momentum(Experiment):
    id = "momentum"
    claims = ("C19",)
    title = "SGD with and without momentum: a task and 2-D surfaces with a saddle, a plateau, a local minimum"
    seed_doc = "003"
    statements = {
        "C19": "Momentum adds the previous step's movement and carries the search past plateaus, saddle points "
        "and small local minima."
    }
    rules = {
        "C19": "Task: digits-mlp without normalization, batch 32, SGD vs SGD+momentum 0.9, each at its best LR from "
        "the same grid (best = fewest seed-mean steps to the target val accuracy 0.90, a miss counting as twice the "
        "budget). 2-D: GD vs heavy ball (beta 0.9) on the saddle, plateau and local-minimum surfaces, start jittered "
        "per seed, each at its best LR from the same grid, steps to reach the surface's loss target. Supported if "
        "momentum needs fewer steps than SGD on the task in every seed and fewer steps on every surface in every "
        "seed. Refuted if on the task momentum's seed-mean steps are >= SGD's, or on some surface momentum needs "
        "more steps in every seed. Otherwise inconclusive. A method that never reaches a target (at any LR of the "
        "grid) counts as twice the budget in every seed, so momentum escaping where plain GD never does counts for "
        "momentum."
    }
    validity = {
        "C19": "On the task, at least one of the two optimizers must reach the target val accuracy within the budget "
        "at some LR of the grid (otherwise the task comparison says nothing and the verdict is inconclusive)."
    }
    BETA = 0.9

    def params(self, quick: bool) -> dict[str, Any]:
        base = {"task": "digits-mlp", "norm": "none", "batch_size": 32, "target": 0.90, "eval_every": 10,
                "surface_lrs": [0.01, 0.03, 0.1, 0.3, 1.0], "surface_steps": 3000}
        if quick:
            return {**base, "lrs": [0.01, 0.03, 0.1, 0.3, 1.0], "max_steps": 200}
        return {**base, "lrs": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0], "max_steps": 300}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        task_runs: dict[str, Any] = {}
        with one_thread(ctx.device):
            task = ctx.task(params["task"])
            for opt in ("sgd", "momentum"):
                for lr in params["lrs"]:
                    for seed in ctx.seeds:
                        cfg = TrainConfig(batch_size=params["batch_size"], lr=lr, optimizer=opt, momentum=self.BETA,
                                          max_steps=params["max_steps"], eval_every=params["eval_every"],
                                          eval_train=False, norm=params["norm"], seed=seed)
                        r = ctx.fit(task, cfg)
                        hit = steps_to_target(r.history, params["target"]) if r.ok else math.inf
                        task_runs.setdefault(opt, {}).setdefault(str(lr), {})[str(seed)] = {
                            "status": r.status, "steps_to_target": None if math.isinf(hit) else hit,
                            "step": r.series("step"), "val_acc": r.series("val_acc"),
                            "final_acc": r.metric("val_acc") if r.ok else math.nan}
        surf = {}
        for name in SURFACES:
            surf[name] = {str(s): ctx.cached("surface", {"surface": name, "seed": s, "lrs": params["surface_lrs"],
                                                         "steps": params["surface_steps"], "beta": self.BETA},
                                             lambda name=name, s=s: self._surface(name, s, params))
                          for s in ctx.seeds}
        return {"task": task_runs, "surfaces": surf}

    def _surface(self, name: str, seed: int, p: dict[str, Any]) -> dict[str, Any]:
        spec = SURFACES[name]
        rng = np.random.default_rng(seed)
        w0 = np.array(spec["start"], dtype=float)
        w0 = w0 * (1 + 0.05 * rng.standard_normal(2)) if name != "saddle" else np.array([w0[0] * (1 + 0.05 * rng.standard_normal()), w0[1] * (1 + abs(rng.standard_normal()))])
        out: dict[str, Any] = {"start": w0.tolist()}
        for method, beta in (("gd", 0.0), ("momentum", self.BETA)):
            out[method] = {str(lr): heavy_ball(spec["f"], w0, lr, beta, p["surface_steps"], spec["target"])
                           for lr in p["surface_lrs"]}
            for r in out[method].values():  # keep the cache small: thin long paths
                stride = max(1, len(r["path"]) // 300)
                r["path"] = r["path"][::stride] + ([r["path"][-1]] if len(r["path"]) % stride != 1 else [])
                r["losses"] = r["losses"][::stride]
        return out

    @staticmethod
    def best_lr(runs: dict[str, dict[str, Any]], cap: float, key: str = "steps_to_target") -> str | None:
        """The LR (key) with the fewest seed-mean steps, a miss counting as ``cap``; None if none hits."""
        best, best_v = None, math.inf
        for lr in sorted(runs, key=float):
            vals = [r[key] if r.get(key) is not None else cap for r in runs[lr].values()]
            v = float(np.mean(vals)) if vals else math.inf
            if v < best_v and any(r.get(key) is not None for r in runs[lr].values()):
                best, best_v = lr, v
        return best

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        rule = ("rule: momentum fewer steps to target than SGD (each at its best LR) on the task in every seed and on "
                "every 2-D surface in every seed; refuted if task seed-mean steps momentum >= SGD or some surface "
                "slower in every seed")
        cap = 2 * params["max_steps"]
        t = data["task"]
        b_sgd, b_mom = self.best_lr(t.get("sgd", {}), cap), self.best_lr(t.get("momentum", {}), cap)
        effect: dict[str, Any] = {"best_lr": {"sgd": b_sgd, "momentum": b_mom}, "target": params["target"]}

        def seed_steps(runs: dict[str, Any], lr: str | None, key: str, capv: float) -> dict[str, float]:
            if lr is None:  # never reached the target at any LR: twice the budget in every seed
                return {s: capv for s in {s for per_lr in runs.values() for s in per_lr}}
            return {s: (r[key] if r.get(key) is not None else capv) for s, r in runs[lr].items()}

        sg = seed_steps(t.get("sgd", {}), b_sgd, "steps_to_target", cap)
        mo = seed_steps(t.get("momentum", {}), b_mom, "steps_to_target", cap)
        effect["task_steps"] = {"sgd": spread(sg.values()), "momentum": spread(mo.values())}
        surf_res: dict[str, Any] = {}
        for name, seeds in data["surfaces"].items():
            scap = 2 * params["surface_steps"]
            per = {"gd": {}, "momentum": {}}
            for method in per:
                runs = {lr: {s: seeds[s][method][lr] for s in seeds} for lr in seeds[next(iter(seeds))][method]}
                blr = self.best_lr(runs, scap, key="steps")
                per[method] = {"best_lr": blr, "steps": seed_steps(runs, blr, "steps", scap)}
            common = [s for s in per["gd"]["steps"] if s in per["momentum"]["steps"]]
            surf_res[name] = {
                "gd": {"best_lr": per["gd"]["best_lr"], "steps": spread(per["gd"]["steps"].values())},
                "momentum": {"best_lr": per["momentum"]["best_lr"], "steps": spread(per["momentum"]["steps"].values())},
                "faster_every_seed": bool(common) and all(per["momentum"]["steps"][s] < per["gd"]["steps"][s] for s in common),
                "gd_missed": per["gd"]["best_lr"] is None,
                "slower_every_seed": bool(common) and all(per["momentum"]["steps"][s] > per["gd"]["steps"][s] for s in common),
                "momentum_missed": per["momentum"]["best_lr"] is None,
            }
        effect["surfaces"] = surf_res
        same_lr = {}  # for the report: momentum vs SGD at the same LR (where both reached the target)
        for lr in sorted(set(t.get("sgd", {})) & set(t.get("momentum", {})), key=float):
            a = seed_steps(t["sgd"], lr, "steps_to_target", cap)
            b = seed_steps(t["momentum"], lr, "steps_to_target", cap)
            same_lr[lr] = {"sgd": spread(a.values()), "momentum": spread(b.values()),
                           "momentum_faster_seeds": sum(1 for s in a if s in b and b[s] < a[s]), "seeds": len(a)}
        effect["task_same_lr"] = same_lr
        surf_note = "; ".join(f"{n}: GD {fmt_spread(v['gd']['steps'])} (lr {v['gd']['best_lr']}) vs momentum "
                              f"{fmt_spread(v['momentum']['steps'])} (lr {v['momentum']['best_lr']})" for n, v in surf_res.items())
        if b_sgd is None and b_mom is None:
            return [Verdict.invalid("C19", f"neither optimizer reached val acc {params['target']} on the task within "
                                    f"{params['max_steps']} steps at any LR. Surfaces: {surf_note}", effect)]
        task_note = (f"task steps to {params['target']}: SGD {fmt_spread(effect['task_steps']['sgd'])} (lr {b_sgd}) vs "
                     f"momentum {fmt_spread(effect['task_steps']['momentum'])} (lr {b_mom})")
        m_mean, s_mean = effect["task_steps"]["momentum"]["mean"], effect["task_steps"]["sgd"]["mean"]
        slower = [n for n, v in surf_res.items() if v["slower_every_seed"] or (v["momentum_missed"] and not v["gd_missed"])]
        if (b_mom is None or m_mean >= s_mean) or slower:
            which = ("momentum not faster on the task" if (b_mom is None or m_mean >= s_mean) else "") + (
                ("; " if (b_mom is None or m_mean >= s_mean) else "") + f"momentum slower in every seed on: {', '.join(slower)}"
                if slower else "")
            return [Verdict("C19", "refuted", f"{rule}. Refuted by: {which}. {task_note}. Surfaces: {surf_note}", effect)]
        task_ok = all(mo[s] < sg[s] for s in sg if s in mo)
        if task_ok and all(v["faster_every_seed"] for v in surf_res.values()):
            return [Verdict("C19", "supported", f"{rule}. {task_note}. Surfaces: {surf_note}", effect)]
        return [Verdict("C19", "inconclusive", f"{rule}. Not faster in every seed / surface: {task_note}. "
                        f"Surfaces: {surf_note}", effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = pyplot()
        figs = []
        fig, axes = plt.subplots(1, 3, figsize=(18, 5))
        for ax, (name, spec) in zip(axes, SURFACES.items()):
            seeds = data["surfaces"].get(name)
            if not seeds:
                continue
            s0 = seeds[min(seeds, key=int)]
            x0, x1, y0, y1 = spec["box"]
            gx, gy = np.meshgrid(np.linspace(x0, x1, 160), np.linspace(y0, y1, 120))
            Z = np.vectorize(lambda a, b: spec["f"](np.array([a, b]))[0])(gx, gy)
            ax.contourf(gx, gy, Z, levels=30, cmap="Greys", alpha=0.6)
            ax.contour(gx, gy, Z, levels=15, colors="k", linewidths=0.3)
            for method, color in (("gd", "C0"), ("momentum", "C3")):
                runs = {lr: {"x": {s: seeds[s][method][lr] for s in seeds}} for lr in s0[method]}
                blr = self.best_lr({lr: v["x"] for lr, v in runs.items()}, 2 * params["surface_steps"], key="steps")
                lr = blr or sorted(s0[method], key=float)[len(s0[method]) // 2]
                r = s0[method][lr]
                path = np.asarray(r["path"])
                steps = r["steps"] if r["steps"] is not None else f">{params['surface_steps']}"
                ax.plot(path[:, 0], path[:, 1], ".-", ms=2, lw=1, color=color,
                        label=f"{'GD' if method == 'gd' else 'momentum 0.9'} lr={lr}: {steps} steps")
            ax.plot(*s0["start"], "ko", ms=6, label="start")
            ax.set_xlim(x0, x1)
            ax.set_ylim(y0, y1)
            ax.set_xlabel("w1")
            ax.set_ylabel("w2")
            ax.set_title(spec["label"], fontsize=9)
            ax.legend(fontsize=8, loc="lower left")
        fig.suptitle("C19: GD vs heavy-ball momentum on 2-D surfaces (each at its best LR, first seed)")
        fig.tight_layout()
        figs.append(fig)

        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        cap = 2 * params["max_steps"]
        t = data["task"]
        ax = axes[0]
        for opt, color in (("sgd", "C0"), ("momentum", "C3")):
            blr = self.best_lr(t.get(opt, {}), cap) or sorted(t.get(opt, {"0.1": {}}), key=float)[-1]
            for i, (s, r) in enumerate(sorted(t.get(opt, {}).get(blr, {}).items())):
                ax.plot(r["step"], r["val_acc"], color=color, alpha=0.8,
                        label=f"{'SGD' if opt == 'sgd' else 'SGD + momentum 0.9'}, lr={blr}" if i == 0 else None)
        ax.axhline(params["target"], color="k", ls="--", lw=0.8, label=f"target {params['target']}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation accuracy (fraction)")
        ax.set_title(f"{params['task']} (no norm), batch {params['batch_size']}, best LR each, every seed")
        ax.legend()
        ax = axes[1]
        for opt, color in (("sgd", "C0"), ("momentum", "C3")):
            lrs = sorted(t.get(opt, {}), key=float)
            sp = [spread(r["steps_to_target"] if r["steps_to_target"] is not None else cap for r in t[opt][lr].values())
                  for lr in lrs]
            ax.errorbar([float(x) for x in lrs], [s["mean"] for s in sp],
                        yerr=[[s["mean"] - s["min"] for s in sp], [s["max"] - s["mean"] for s in sp]], fmt="o-",
                        capsize=3, color=color, label="SGD" if opt == "sgd" else "SGD + momentum 0.9")
        ax.axhline(cap, color="k", ls=":", lw=0.8, label=f"missed (plotted at {cap})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel(f"steps to val acc {params['target']} (log scale)")
        ax.set_title("Steps to target vs LR (mean, min..max over seeds)")
        ax.legend()
        fig.suptitle("C19: momentum on a real task")
        fig.tight_layout()
        figs.append(fig)
        return figs
