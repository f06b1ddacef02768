"""C11: large batches find sharp minima, small batches flat ones, and flat minima generalize better."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from batchlab.experiments.base import Experiment, ExperimentContext, Verdict, fmt_spread, register, spread
from batchlab.experiments.kit import pyplot
from batchlab.experiments.batch_accuracy import NORM, TASK
from batchlab.experiments.kit import per_seed, seeded_model, seed_keys as _seed_keys
from batchlab.tasks import Task, get_task
from batchlab.train import TrainConfig, fit


def _vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _load(model: torch.nn.Module, vec: torch.Tensor) -> None:
    torch.nn.utils.vector_to_parameters(vec, model.parameters())


@torch.no_grad()
def _loss_acc(model: torch.nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    return float(task.loss(logits, y)), float(task.metric(logits, y))


def eps_sharpness(model: torch.nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                  step_frac: float = 0.25) -> float:
    """Keskar et al. (2017) epsilon-sharpness of ``model`` on ``(x, y)``, in percent.

    ``(max_{z in C} f(w + z) - f(w)) / (1 + f(w)) * 100`` with the box ``|z_i| <= eps (|w_i| + 1)``; the max is
    approximated by ``steps`` of projected sign-gradient ascent from z = 0 (step ``step_frac`` of the box), keeping
    the largest loss seen. The model's parameters are restored.
    """
    w0 = _vector(model)
    box = eps * (w0.abs() + 1.0)
    model.eval()
    f0 = _loss_acc(model, task, x, y)[0]
    z = torch.zeros_like(w0)
    best = f0
    params = list(model.parameters())
    try:
        for _ in range(steps):
            _load(model, w0 + z)
            loss = task.loss(model(x), y)
            best = max(best, float(loss.detach()))
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
            z = torch.maximum(torch.minimum(z + step_frac * box * g.sign(), box), -box)
        _load(model, w0 + z)
        best = max(best, _loss_acc(model, task, x, y)[0])
    finally:
        _load(model, w0)
    return (best - f0) / (1.0 + f0) * 100.0


@register
class SharpMinima(Experiment):
    id = "sharp_minima"
    claims = ("C11",)
    title = "Small-batch vs large-batch solutions: sharpness and generalization"
    seed_doc = "003"
    statements = {
        "C11": "Large batches find sharp minima, small batches flat ones, and flat minima generalize better "
        "(Keskar et al.)."
    }
    rules = {
        "C11": "digits-mlp without normalization, one initialization per seed trained twice with SGD momentum 0.9 at "
        "the task's lr 0.05 with a cosine decay to 0 (so both end in a minimum) for the same number of steps: small "
        "batch SB=16 and large batch LB=256 (18% of the training set; LB sees 16x more examples, so it is not "
        "under-trained). Sharpness = Keskar's epsilon-sharpness on the training loss (eps 1e-3, box |z_i| <= eps(|w_i|+1), 20 steps of projected sign-gradient ascent); "
        "generalization gap = train accuracy - val accuracy. Valid only if both reach train accuracy >= 99% "
        "(otherwise inconclusive). Supported if in every seed sharpness(LB)/sharpness(SB) >= 1.5 and gap(LB) - "
        "gap(SB) >= 1 point; refuted if the mean ratio is <= 1 or the mean gap difference is <= 0; otherwise "
        "inconclusive. The 1-D interpolation w(alpha) = (1-alpha) w_SB + alpha w_LB is drawn."
    }
    validity = {
        "C11": "Both solutions must be minima of the training loss: train accuracy >= 99% for SB and LB in every "
        "seed, with a finite sharpness (otherwise sharpness compares points on a slope)."
    }
    PUBLISHED = {"source": "Keskar et al. 2017, Table 3-4 (epsilon-sharpness, eps 1e-3 and 5e-4, six networks)",
                 "published": "large-batch sharpness above small-batch on every network, with a larger "
                 "generalization gap (numbers: see the paper's tables; not restated here)"}

    def params(self, quick: bool) -> dict[str, Any]:
        return {"task": TASK, "small": 16, "large": 256, "lr": 0.05, "schedule": "cosine", "steps": 1500, "eps": [1e-3, 5e-4],
                "ascent_steps": 20, "alphas": [round(a, 3) for a in np.linspace(-0.5, 1.5, 21).tolist()],
                "min_train_acc": 0.99, "ratio": 1.5, "gap": 0.01}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        p = {k: v for k, v in params.items() if k != "seeds"}
        return per_seed(ctx, lambda s: ctx.cached("sharpness", {**p, "seed": s}, lambda: self._one(params, s)))

    @staticmethod
    def _one(p: dict[str, Any], seed: int) -> dict[str, Any]:
        task = get_task(p["task"])
        init = seeded_model(seed, lambda: task.make_model(norm=NORM))()
        w_init = _vector(init)
        xt, yt, xv, yv = task.train_set.x, task.train_set.y, task.val_set.x, task.val_set.y
        res: dict[str, Any] = {}
        vecs = {}
        for name in ("small", "large"):
            model = task.make_model(norm=NORM)
            _load(model, w_init.clone())
            cfg = TrainConfig(batch_size=p[name], lr=p["lr"], optimizer="momentum", max_steps=p["steps"], norm=NORM,
                              schedule=p["schedule"],
                              seed=seed, eval_every=p["steps"])
            r = fit(task, cfg, model=model)
            tl, ta = _loss_acc(model, task, xt, yt)
            vl, va = _loss_acc(model, task, xv, yv)
            sharp = {str(e): eps_sharpness(model, task, xt, yt, e, p["ascent_steps"]) if r.ok else None for e in p["eps"]}
            res[name] = {"B": p[name], "status": r.status, "train_loss": tl, "train_acc": ta, "val_loss": vl, "val_acc": va,
                         "sharpness": sharp, "examples": r.examples, "weight_norm": float(_vector(model).norm())}
            vecs[name] = _vector(model)
        m = task.make_model(norm=NORM)
        interp = {"alpha": p["alphas"], "train_loss": [], "val_loss": [], "train_acc": [], "val_acc": []}
        for a in p["alphas"]:
            _load(m, (1 - a) * vecs["small"] + a * vecs["large"])
            tl, ta = _loss_acc(m, task, xt, yt)
            vl, va = _loss_acc(m, task, xv, yv)
            for k, v in (("train_loss", tl), ("train_acc", ta), ("val_loss", vl), ("val_acc", va)):
                interp[k].append(v if math.isfinite(v) else None)
        res["interp"] = interp
        return res

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        eps = str(params["eps"][0])
        ratios, gaps, accs, sh_s, sh_l = [], [], [], [], []
        for s in _seed_keys(data):
            d = data["seeds"][s]
            sm, lg = d["small"], d["large"]
            accs += [sm["train_acc"] if sm["status"] == "ok" else 0.0, lg["train_acc"] if lg["status"] == "ok" else 0.0]
            a, b = sm["sharpness"].get(eps), lg["sharpness"].get(eps)
            sh_s.append(a)
            sh_l.append(b)
            ratios.append(b / a if a is not None and b is not None and a > 0 else float("nan"))
            gaps.append((lg["train_acc"] - lg["val_acc"]) - (sm["train_acc"] - sm["val_acc"]))
        effect = {"sharpness_small": spread(x for x in sh_s if x is not None),
                  "sharpness_large": spread(x for x in sh_l if x is not None),
                  "sharpness_ratio_large_over_small": spread(ratios), "gap_difference_large_minus_small": spread(gaps),
                  "min_train_acc": min(accs) if accs else None, "eps": float(eps),
                  "thresholds": {"ratio": params["ratio"], "gap": params["gap"], "min_train_acc": params["min_train_acc"]}}
        txt = (f"eps={eps} sharpness SB {fmt_spread(effect['sharpness_small'])} vs LB {fmt_spread(effect['sharpness_large'])}, "
               f"ratio LB/SB {fmt_spread(effect['sharpness_ratio_large_over_small'])} (needs >= {params['ratio']}); "
               f"generalization gap LB - SB {fmt_spread(effect['gap_difference_large_minus_small'])} (needs >= {params['gap']})")
        if not accs or min(accs) < params["min_train_acc"] or any(not math.isfinite(r) for r in ratios):
            return [Verdict.invalid("C11", f"a solution did not reach train accuracy {params['min_train_acc']:.0%} "
                            f"(lowest {min(accs) if accs else float('nan'):.3f}) or has no sharpness; {txt}", effect)]
        published = {**self.PUBLISHED, "measured": txt,
                     "trend_agrees": bool(spread(ratios)["mean"] > 1.0 and spread(gaps)["mean"] > 0.0)}
        if all(r >= params["ratio"] for r in ratios) and all(g >= params["gap"] for g in gaps):
            return [Verdict("C11", "supported", txt, effect, published=published)]
        if spread(ratios)["mean"] <= 1.0 or spread(gaps)["mean"] <= 0.0:
            return [Verdict("C11", "refuted", txt, effect, published=published)]
        return [Verdict("C11", "inconclusive", txt, effect, published=published)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
        for i, s in enumerate(_seed_keys(data)):
            it = data["seeds"][s]["interp"]
            a = np.array(it["alpha"])
            f = lambda k: np.array([np.nan if v is None else v for v in it[k]])  # noqa: E731
            axes[0].plot(a, f("train_loss"), "-", color=f"C{i}", label=f"train, seed {s}")
            axes[0].plot(a, f("val_loss"), "--", color=f"C{i}", label=f"val, seed {s}")
            axes[1].plot(a, f("train_acc") * 100, "-", color=f"C{i}", label=f"train, seed {s}")
            axes[1].plot(a, f("val_acc") * 100, "--", color=f"C{i}", label=f"val, seed {s}")
        for ax in axes[:2]:
            ax.axvline(0, color="grey", lw=0.8)
            ax.axvline(1, color="grey", lw=0.8)
            ax.set_xlabel(f"alpha (0: small-batch B={params['small']} solution, 1: large-batch B={params['large']})")
            ax.legend(fontsize=7)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("cross-entropy loss (log)")
        axes[0].set_title("1-D interpolation: loss")
        axes[1].set_ylabel("accuracy (%)")
        axes[1].set_title("1-D interpolation: accuracy")
        ax = axes[2]
        keys = _seed_keys(data)
        width = 0.35
        for j, e in enumerate(params["eps"]):
            for k, name in enumerate(("small", "large")):
                vals = [data["seeds"][s][name]["sharpness"].get(str(e)) for s in keys]
                vals = [np.nan if v is None else v for v in vals]
                x = j + (k - 0.5) * width
                ax.bar(x, np.nanmean(vals), width, color=f"C{k}", alpha=0.6,
                       label=f"{name} batch (B={params[name]})" if j == 0 else None)
                ax.plot([x] * len(vals), vals, "k.", ms=6)
        ax.set_xticks(range(len(params["eps"])), [f"eps={e:g}" for e in params["eps"]])
        ax.set_xlabel("box size eps (relative perturbation per weight)")
        ax.set_ylabel("epsilon-sharpness (% loss increase)")
        ax.set_title("Keskar sharpness (bars: mean, dots: seeds)")
        ax.legend()
        fig.suptitle(f"C11: sharp vs flat minima (digits-mlp, {params['steps']} steps each)")
        fig.tight_layout()
        return [fig]
