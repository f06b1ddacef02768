"""C04: features on very different scales make a rugged (ill-conditioned) error surface."""

from __future__ import annotations

from typing import Any

import numpy as np

from batchlab.experiments.base import Experiment, ExperimentContext, Verdict, fmt_spread, register, spread
from batchlab.experiments.kit import per_seed


def _gd(X: np.ndarray, y: np.ndarray, lr: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-batch gradient descent on the mean squared error from w = 0; returns losses and path."""
    n = X.shape[0]
    w = np.zeros(X.shape[1])
    path, losses = [w.copy()], []
    for _ in range(steps):
        r = X @ w - y
        losses.append(float(r @ r / n))
        w = w - lr * (2.0 / n) * (X.T @ r)
        path.append(w.copy())
    r = X @ w - y
    losses.append(float(r @ r / n))
    return np.asarray(losses), np.asarray(path)


@register
class FeatureScale(Experiment):
    id = "feature_scale"
    claims = ("C04",)
    title = "Feature scales and the shape of the error surface"
    seed_doc = "002"
    statements = {
        "C04": "Features on very different scales make a rugged error surface; normalizing them makes it "
        "smooth and easy to descend."
    }
    rules = {
        "C04": "Linear regression y = w1*x1 + w2*x2 + noise with x1 ~ N(0, 1) and x2 ~ N(0, 100^2). Full-batch GD "
        "from w = 0, each input version with its own best stable learning rate (the grid 2/L * {0.1 .. 0.95}, "
        "L the largest Hessian eigenvalue). Steps to reach a loss within 1% of the least-squares optimum's excess "
        "over the noise floor. Supported if standardized inputs need at least 10x fewer steps in every seed; "
        "refuted if in any seed they need as many steps or more; otherwise inconclusive."
    }
    validity = {
        "C04": "The raw problem must be ill-conditioned (Hessian condition number >= 100 in every seed) and at least "
        "one input version must reach the target within the step budget."
    }

    def params(self, quick: bool) -> dict[str, Any]:
        return {"n": 500, "scale2": 100.0, "max_steps": 20000 if quick else 50000, "tol": 0.01, "factor": 10.0}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        return per_seed(ctx, lambda s: ctx.cached("gd", {**params, "seed": s}, lambda: self._one(params, s)))

    def _one(self, p: dict[str, Any], seed: int) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        X = np.stack([rng.normal(0, 1, p["n"]), rng.normal(0, p["scale2"], p["n"])], axis=1)
        w_true = np.array([2.0, -0.03])
        y = X @ w_true + rng.normal(0, 0.5, p["n"])
        res: dict[str, Any] = {}
        for name, Xv in (("raw", X), ("standardized", (X - X.mean(0)) / X.std(0))):
            yc = y - y.mean() if name == "standardized" else y
            H = 2.0 / p["n"] * Xv.T @ Xv
            eig = np.linalg.eigvalsh(H)
            w_opt = np.linalg.lstsq(Xv, yc, rcond=None)[0]
            r = Xv @ w_opt - yc
            floor = float(r @ r / p["n"])
            start = float(yc @ yc / p["n"])
            target = floor + p["tol"] * (start - floor)
            best = None
            for frac in (0.1, 0.25, 0.5, 0.75, 0.95):
                lr = frac * 2.0 / eig[-1]
                losses, path = _gd(Xv, yc, lr, p["max_steps"])
                hit = np.nonzero(losses <= target)[0]
                steps = int(hit[0]) if hit.size else None
                if best is None or (steps is not None and (best["steps"] is None or steps < best["steps"])):
                    best = {"lr": lr, "steps": steps, "losses": losses[:: max(1, len(losses) // 400)].tolist(),
                            "path": path[:: max(1, len(path) // 400)].tolist()}
            res[name] = {**best, "condition": float(eig[-1] / eig[0]), "w_opt": w_opt.tolist(), "floor": floor,
                         "target": target, "X_head": Xv[:200].tolist(), "y_head": yc[:200].tolist()}
        return res

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        cap = params["max_steps"]
        raw = [d["raw"]["steps"] if d["raw"]["steps"] is not None else float("inf") for d in data["seeds"].values()]
        std = [d["standardized"]["steps"] if d["standardized"]["steps"] is not None else float("inf")
               for d in data["seeds"].values()]
        ratios = [r / s if s not in (0, float("inf")) else (float("inf") if s == 0 else 0.0) for r, s in zip(raw, std)]
        effect = {"steps_raw": raw, "steps_standardized": std, "speedup": spread([min(x, cap) for x in ratios]),
                  "condition_raw": spread(d["raw"]["condition"] for d in data["seeds"].values()),
                  "condition_standardized": spread(d["standardized"]["condition"] for d in data["seeds"].values())}
        if all(s == float("inf") for s in std) and all(r == float("inf") for r in raw):
            return [Verdict.invalid("C04", f"neither input version reached the target within {cap} steps", effect)]
        if not effect["condition_raw"]["min"] >= 100:
            return [Verdict.invalid("C04", f"the raw problem is not ill-conditioned (condition number "
                                    f"{fmt_spread(effect['condition_raw'])} < 100)", effect)]
        if any(s >= r for r, s in zip(raw, std)):
            return [Verdict("C04", "refuted", f"standardized inputs needed as many steps or more in some seed "
                            f"(raw {raw}, standardized {std})", effect)]
        if all(x >= params["factor"] for x in ratios):
            return [Verdict("C04", "supported", f"standardized inputs reached the target in {std} steps vs {raw} raw "
                            f"(speed-up {fmt_spread(effect['speedup'])}, at least {params['factor']:g}x in every seed)",
                            effect)]
        return [Verdict("C04", "inconclusive", f"standardized inputs were faster but not {params['factor']:g}x in "
                        f"every seed (speed-up {fmt_spread(effect['speedup'])})", effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        d = data["seeds"][min(data["seeds"], key=int)]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for ax, name in zip(axes[:2], ("raw", "standardized")):
            run = d[name]
            X, y = np.asarray(run["X_head"]), np.asarray(run["y_head"])
            path, w = np.asarray(run["path"]), np.asarray(run["w_opt"])
            span = np.full(2, np.abs(path - w).max() * 1.3 + 1e-3)  # same scale on both axes: shapes are honest
            g1, g2 = np.meshgrid(np.linspace(w[0] - span[0], w[0] + span[0], 120), np.linspace(w[1] - span[1], w[1] + span[1], 120))
            W = np.stack([g1.ravel(), g2.ravel()], 1)
            Z = ((X @ W.T - y[:, None]) ** 2).mean(0).reshape(g1.shape)
            ax.contour(g1, g2, np.log10(Z), levels=25, cmap="viridis")
            ax.plot(path[:, 0], path[:, 1], "r.-", ms=2, lw=0.8, label="GD path")
            ax.plot(*w, "k*", ms=12, label="optimum")
            ax.set_aspect("equal")
            ax.set_title(f"{name} inputs: condition number {run['condition']:.3g}")
            ax.set_xlabel("w1 (weight of x1)")
            ax.set_ylabel("w2 (weight of x2)")
            ax.legend(loc="upper right")
        ax = axes[2]
        for name, style in (("raw", "C3"), ("standardized", "C0")):
            for i, s in enumerate(sorted(data["seeds"], key=int)):
                run = data["seeds"][s][name]
                losses = np.asarray(run["losses"]) - run["floor"]
                stride = max(1, (params["max_steps"] + 1) // max(1, len(run["losses"]) - 1))
                xs = np.arange(len(losses)) * stride
                ax.plot(xs + 1, np.maximum(losses, 1e-12), color=style, alpha=0.8, label=name if i == 0 else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("GD step")
        ax.set_ylabel("loss above the optimum (MSE)")
        ax.set_title("Convergence, every seed")
        ax.legend()
        fig.suptitle("C04: feature scales and gradient descent")
        fig.tight_layout()
        return [fig]
