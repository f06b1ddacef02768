"""What a batch size costs and buys in one step: the gradient noise (C08) and the time per step (C09).

Shared setup: the 8x8 digits MLP (``digits-mlp``) *without* normalization, so that BatchNorm's own
dependence on the batch (tested by C17) does not mix into the effect of B. C09 times one thread with
its own CPU clock, so other processes on a shared machine do not distort the ratios; its knee is
the library's (:func:`batchlab.batchsize.throughput.find_knee`), the same one ``batchlab throughput``
reports.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from batchlab.batchsize.throughput import find_knee
from batchlab.experiments.base import Experiment, ExperimentContext, Verdict, fmt_spread, one_thread, register, spread
from batchlab.experiments.kit import per_seed, pyplot, seeded_model, seed_keys as _seed_keys
from batchlab.tasks import get_task
from batchlab.train import TrainConfig, fit

TASK = "digits-mlp"
NORM = "none"


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of log(y) on log(x) and its R^2 (NaN when fewer than 2 finite points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0 and math.isfinite(y)]
    if len(pts) < 2:
        return float("nan"), float("nan")
    lx, ly = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    slope, icpt = np.polyfit(lx, ly, 1)
    resid = ly - (slope * lx + icpt)
    ss = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss if ss > 0 else float("nan")
    return float(slope), r2



# ----------------------------------------------------------------------------------------------- C08
@register
class GradientNoise(Experiment):
    id = "grad_noise"
    claims = ("C08",)
    title = "Mini-batch gradient noise vs batch size"
    seed_doc = "001"
    statements = {
        "C08": "The std of the mini-batch gradient falls as sigma/sqrt(B): compute grows linearly with B, "
        "the noise falls only with its square root."
    }
    rules = {
        "C08": "digits-mlp without normalization, at two fixed parameter points (initialization, and after 1 epoch "
        "of SGD with momentum at B=32, lr 0.05). The full-batch gradient G is computed on the whole training set; "
        "for each B in 1, 2, 4, ..., 128 (at most N/10, so the finite-population factor stays above 0.95), "
        "n_batches mini-batches drawn without replacement give g_B, and std(B) = sqrt(mean ||g_B - G||^2). "
        "Slope = least-squares fit of log std on log B. Supported if the slope lies in [-0.6, -0.4] at every point "
        "in every seed (and the fit's R^2 >= 0.9); refuted if the mean slope over seeds at some point lies outside "
        "[-0.6, -0.4]; otherwise (seeds straddle a bound, or a poor power-law fit) inconclusive."
    }
    validity = {
        "C08": "Sampling without replacement from N examples shrinks the variance by (N - B)/(N - 1): every B must be "
        "<= N/10 so that this factor stays above 0.9 and cannot bend the slope; and every B must give a finite std."
    }

    def params(self, quick: bool) -> dict[str, Any]:
        return {"task": TASK, "norm": NORM, "batches": [1, 2, 4, 8, 16, 32, 64, 128], "n_batches": 150 if quick else 300,
                "points": ["init", "trained"], "train_steps": 45, "band": [-0.6, -0.4], "min_r2": 0.9}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        p = {k: v for k, v in params.items() if k != "seeds"}
        return per_seed(ctx, lambda s: ctx.cached("grad_std", {**p, "seed": s}, lambda: self._one(params, s)))

    @staticmethod
    def _one(p: dict[str, Any], seed: int) -> dict[str, Any]:
        task = get_task(p["task"])
        model = seeded_model(seed, lambda: task.make_model(norm=p["norm"]))()
        X, Y = task.train_set.x, task.train_set.y
        n = X.shape[0]
        params = [q for q in model.parameters() if q.requires_grad]

        def grad(idx: torch.Tensor | None) -> torch.Tensor:
            xb, yb = (X, Y) if idx is None else (X.index_select(0, idx), Y.index_select(0, idx))
            loss = task.loss(model(xb), yb)
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

        res: dict[str, Any] = {"n_train": n, "points": {}}
        for point in p["points"]:
            if point == "trained":
                fit(task, TrainConfig(batch_size=32, lr=0.05, optimizer="momentum", max_steps=p["train_steps"],
                                      norm=p["norm"], seed=seed, eval_every=p["train_steps"]), model=model)
            model.train()
            G = grad(None).detach()
            gen = torch.Generator().manual_seed(10_000 + seed)
            stds, rel = [], []
            for b in p["batches"]:
                sq = [float(((grad(torch.randperm(n, generator=gen)[:b]) - G) ** 2).sum()) for _ in range(p["n_batches"])]
                s = math.sqrt(sum(sq) / len(sq))
                stds.append(s)
                rel.append(s / float(G.norm()))
            res["points"][point] = {"B": list(p["batches"]), "std": stds, "rel_std": rel, "full_grad_norm": float(G.norm())}
        return res

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        lo, hi = params["band"]
        slopes: dict[str, list[float]] = {}
        r2s: dict[str, list[float]] = {}
        for s in _seed_keys(data):
            for point, d in data["seeds"][s]["points"].items():
                sl, r2 = loglog_slope(d["B"], d["std"])
                slopes.setdefault(point, []).append(sl)
                r2s.setdefault(point, []).append(r2)
        effect = {"slope": {k: spread(v) for k, v in slopes.items()}, "r2": {k: spread(v) for k, v in r2s.items()},
                  "band": [lo, hi], "per_seed_slopes": slopes}
        txt = "; ".join(f"{k}: slope {fmt_spread(spread(v))}" for k, v in slopes.items())
        if not slopes or any(not math.isfinite(x) for v in slopes.values() for x in v):
            return [Verdict.invalid("C08", "too few batch sizes with a finite gradient std to fit a slope", effect)]
        too_big = [(s, d["B"][-1]) for s in _seed_keys(data) for d in data["seeds"][s]["points"].values()
                   if "n_train" in data["seeds"][s] and d["B"][-1] > data["seeds"][s]["n_train"] / 10]
        if too_big:
            return [Verdict.invalid("C08", f"batch sizes above N/10 ({too_big[0][1]} of "
                                    f"{data['seeds'][too_big[0][0]]['n_train']}): the finite-population factor bends "
                                    f"the slope ({txt})", effect)]
        if any(not lo <= spread(v)["mean"] <= hi for v in slopes.values()):
            return [Verdict("C08", "refuted", f"mean fitted slope outside [{lo}, {hi}] ({txt})", effect)]
        in_band = all(lo <= x <= hi for v in slopes.values() for x in v)
        if in_band and all(x >= params["min_r2"] for v in r2s.values() for x in v):
            return [Verdict("C08", "supported", f"log-log slope of gradient std vs B within [{lo}, {hi}] at every point "
                            f"and seed ({txt}; sqrt(B) law: -0.5)", effect)]
        return [Verdict("C08", "inconclusive", f"mean slopes inside [{lo}, {hi}] but some seed outside it or a power-law "
                        f"fit with R^2 < {params['min_r2']} ({txt})", effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = pyplot()
        points = list(data["seeds"][_seed_keys(data)[0]]["points"])
        fig, axes = plt.subplots(1, len(points), figsize=(6 * len(points), 4.5), squeeze=False)
        for ax, point in zip(axes[0], points):
            for i, s in enumerate(_seed_keys(data)):
                d = data["seeds"][s]["points"][point]
                sl, _ = loglog_slope(d["B"], d["std"])
                ax.plot(d["B"], d["std"], "o-", color=f"C{i}", label=f"seed {s} (slope {sl:.3f})")
            d = data["seeds"][_seed_keys(data)[0]]["points"][point]
            ref = np.array(d["B"], dtype=float)
            ax.plot(ref, d["std"][0] / np.sqrt(ref), "k--", lw=1, label="sigma/sqrt(B) (slope -0.5)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size B (examples, log2 scale)")
            ax.set_ylabel("std of mini-batch gradient ||g_B - G|| (RMS, log)")
            ax.set_title(f"parameters at: {point}")
            ax.legend(fontsize=8)
        fig.suptitle("C08: mini-batch gradient noise vs B (digits-mlp, no norm)")
        fig.tight_layout()
        return [fig]


# ----------------------------------------------------------------------------------------------- C09
@register
class StepTime(Experiment):
    id = "step_time"
    claims = ("C09",)
    title = "Time per step and per epoch vs batch size on this machine"
    seed_doc = "001, 003"
    statements = {
        "C09": "With parallel hardware, time per update is nearly flat in B up to a limit, so time per epoch falls as "
        "B grows."
    }
    rules = {
        "C09": "One training step (batch gather, forward, backward, SGD-momentum update) of digits-mlp and mnist1d-cnn "
        "(no normalization) at B = 1, 2, 4, ... 1024. On the CPU the step runs on one torch thread and is timed with "
        "that thread's CPU clock, so other processes on this shared machine do not distort the ratios (the SIMD "
        "units of one core are the parallel hardware); on CUDA with the wall clock after synchronizing. Per B: warm-up "
        "steps, then the median over repeats (B interleaved round-robin within each repeat). Knee = smallest B "
        "reaching 90% of the peak examples/s. 'Much less than B' means: time(knee)/time(B=1) < 0.5 * knee/1 "
        "(equivalently examples/s at the knee more than 2x those at B=1), which also makes the time per epoch fall "
        "from B=1 to the knee. Supported if that holds for both models in every seed (an independent measurement "
        "session); refuted if it fails for some model in every seed; otherwise inconclusive. The knee is reported "
        "(a knee at the largest B tested is a lower bound). The knee is the library's find_knee (the one `batchlab "
        "throughput` reports)."
    }
    validity = {
        "C09": "At least 4 batch sizes must be timed for each model (a power-of-two sweep from B=1), so a knee can be "
        "told from a single step."
    }

    def params(self, quick: bool) -> dict[str, Any]:
        return {"configs": [{"label": "digits-mlp", "task": "digits-mlp", "kwargs": {}, "max_batch": 1024},
                            {"label": "mnist1d-cnn", "task": "mnist1d-cnn", "kwargs": {"n_samples": 5000}, "max_batch": 1024}],
                "repeats": 3 if quick else 5, "warmup": 2, "target_s": 0.01, "knee_fraction": 0.9, "factor": 0.5}

    def scale_up(self, params: dict[str, Any], factor: int) -> dict[str, Any]:
        """On a GPU the knee lies at far larger batches: sweep up to ``factor`` times further
        (bounded by each task's training set when measured)."""
        out = super().scale_up(params, factor)
        out["configs"] = [{**c, "max_batch": c["max_batch"] * factor} for c in params["configs"]]
        return out

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        p = {k: v for k, v in params.items() if k != "seeds"}
        return per_seed(ctx, lambda s: ctx.cached("step_time", {**p, "seed": s}, lambda: self._one(params, s, ctx.device)))

    @staticmethod
    def _one(p: dict[str, Any], seed: int, device: str = "cpu") -> dict[str, Any]:
        dev = torch.device(device)
        cuda = dev.type == "cuda"
        clock = time.perf_counter if cuda else time.thread_time
        res: dict[str, Any] = {"device": device, "clock": "wall (synchronized)" if cuda else "thread CPU time, 1 thread",
                               "cpu_count": os.cpu_count(), "loadavg_before": list(os.getloadavg()), "configs": {}}
        with contextlib.nullcontext() if cuda else one_thread():
            res["threads"] = torch.get_num_threads()
            for c in p["configs"]:
                task = get_task(c["task"], **c["kwargs"])
                X, Y = task.train_set.x.to(dev), task.train_set.y.to(dev)
                n = X.shape[0]
                batches = [2**i for i in range(0, 20) if 2**i <= min(n, c["max_batch"])]
                with torch.random.fork_rng():
                    torch.manual_seed(seed)
                    model = task.make_model(norm="none").to(dev)
                model.train()
                opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
                gen = torch.Generator().manual_seed(seed)

                def step(b: int) -> None:
                    idx = torch.randint(n, (b,), generator=gen).to(dev)
                    opt.zero_grad(set_to_none=True)
                    task.loss(model(X.index_select(0, idx)), Y.index_select(0, idx)).backward()
                    opt.step()

                def timed(b: int, k: int) -> float:
                    if cuda:
                        torch.cuda.synchronize(dev)
                    t0 = clock()
                    for _ in range(k):
                        step(b)
                    if cuda:
                        torch.cuda.synchronize(dev)
                    return (clock() - t0) / k

                times: dict[int, list[float]] = {b: [] for b in batches}
                for _ in range(p["repeats"]):
                    for b in batches:
                        per = timed(b, p["warmup"])
                        k = int(min(50, max(3, p["target_s"] / max(per, 1e-6))))
                        times[b].append(timed(b, k))
                res["configs"][c["label"]] = {"B": batches, "n_train": n,
                                              "t_step": [float(np.median(times[b])) for b in batches],
                                              "t_all": [times[b] for b in batches]}
        res["loadavg_after"] = list(os.getloadavg())
        return res

    @staticmethod
    def summarize(d: dict[str, Any], fraction: float) -> dict[str, Any]:
        B, t, n = d["B"], d["t_step"], d["n_train"]
        thr = [b / x for b, x in zip(B, t)]
        knee = find_knee(B, thr, fraction)
        i = B.index(knee)
        return {"knee": knee, "knee_at_edge": knee == B[-1], "b_min": B[0], "time_ratio": t[i] / t[0],
                "batch_ratio": knee / B[0], "throughput_gain": thr[i] / thr[0], "peak_throughput": max(thr),
                "epoch_time_bmin": math.ceil(n / B[0]) * t[0], "epoch_time_knee": math.ceil(n / knee) * t[i]}

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        f = params["factor"]
        per: dict[str, list[dict[str, Any]]] = {}
        for s in _seed_keys(data):
            for label, d in data["seeds"][s]["configs"].items():
                per.setdefault(label, []).append(self.summarize(d, params["knee_fraction"]))
        ok = {label: [r["time_ratio"] < f * r["batch_ratio"] for r in rs] for label, rs in per.items()}
        effect = {label: {"knee": [r["knee"] for r in rs], "knee_at_edge": [r["knee_at_edge"] for r in rs],
                          "time_ratio": spread(r["time_ratio"] for r in rs), "batch_ratio": spread(r["batch_ratio"] for r in rs),
                          "throughput_gain": spread(r["throughput_gain"] for r in rs),
                          "epoch_time_speedup": spread(r["epoch_time_bmin"] / r["epoch_time_knee"] for r in rs)}
                  for label, rs in per.items()}
        effect["threads"] = [data["seeds"][s].get("threads") for s in _seed_keys(data)]
        effect["loadavg"] = [data["seeds"][s].get("loadavg_before") for s in _seed_keys(data)]
        txt = "; ".join(f"{label}: knee B={e['knee']}{' (largest tested)' if all(e['knee_at_edge']) else ''}, "
                        f"step time x{fmt_spread(e['time_ratio'])} for batch x{fmt_spread(e['batch_ratio'])}, "
                        f"epoch {fmt_spread(e['epoch_time_speedup'])}x faster"
                        for label, e in effect.items() if isinstance(e, dict) and "knee" in e)
        if not per:
            return [Verdict.invalid("C09", "no timings", effect)]
        few = {label: len(d["B"]) for s in _seed_keys(data) for label, d in data["seeds"][s]["configs"].items()
               if len(d["B"]) < 4}
        if few:
            return [Verdict.invalid("C09", f"fewer than 4 batch sizes timed: {few}", effect)]
        if all(all(v) for v in ok.values()):
            return [Verdict("C09", "supported", f"per-step time grew by less than {f:g}x the batch ratio up to the knee "
                            f"in every seed ({txt})", effect)]
        if any(not any(v) for v in ok.values()):
            return [Verdict("C09", "refuted", f"per-step time grew by {f:g}x the batch ratio or more up to the knee in "
                            f"every seed for some model ({txt})", effect)]
        return [Verdict("C09", "inconclusive", f"seeds disagree ({txt})", effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = pyplot()
        labels = list(data["seeds"][_seed_keys(data)[0]]["configs"])
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
        for j, label in enumerate(labels):
            for i, s in enumerate(_seed_keys(data)):
                d = data["seeds"][s]["configs"][label]
                B, t, n = np.array(d["B"]), np.array(d["t_step"]), d["n_train"]
                kw = {"color": f"C{j}", "alpha": 0.9, "marker": "o", "ms": 3, "label": label if i == 0 else None}
                axes[0].plot(B, t * 1e3, **kw)
                axes[1].plot(B, np.ceil(n / B) * t, **kw)
                axes[2].plot(B, B / t, **kw)
                knee = self.summarize(d, params["knee_fraction"])["knee"]
                axes[2].axvline(knee, color=f"C{j}", ls=":", lw=1, label=f"{label} knee (B={knee})" if i == 0 else None)
            d = data["seeds"][_seed_keys(data)[0]]["configs"][label]
            B = np.array(d["B"], dtype=float)
            axes[0].plot(B, d["t_step"][0] * 1e3 * B, color=f"C{j}", ls="--", lw=0.8,
                         label=f"{label}: time proportional to B" if j == 0 else f"{label}: proportional to B")
        for ax, ylab, title in ((axes[0], "time per step (ms, log)", "time per update"),
                                (axes[1], "time per epoch (s, log)", "time per epoch = ceil(N/B) steps"),
                                (axes[2], "throughput (examples/s, log)", "examples per second")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size B (log2 scale)")
            ax.set_ylabel(ylab)
            ax.set_title(title)
            ax.legend(fontsize=7)
        clock = data["seeds"][_seed_keys(data)[0]].get("clock", "")
        fig.suptitle(f"C09: step time vs B on this machine ({clock}; median of repeats; every seed)")
        fig.tight_layout()
        return [fig]


