"""Batch-size claims: gradient noise (C08), step time (C09), accuracy at fixed epochs (C10), the lr/B
ratio (C12), the (B, LR) grid (C13) and L-BFGS vs SGD across B (C15). C11 lives in ``batch_sharpness``.

Shared setup: the 8x8 digits MLP (``digits-mlp``, 1438 train / 359 val) *without* normalization,
so that BatchNorm's own dependence on the batch (tested by C17) does not mix into the effect of B.
Training experiments run with one torch thread (restored afterwards): on a loaded 2-core machine
two threads of tiny kernels spend most of their time waiting for each other, and the results of a
run do not depend on the thread count. C09 times one thread with its own CPU clock for the same reason.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from batchlab.experiments.base import Experiment, ExperimentContext, Verdict, fmt_spread, one_thread, register, spread
from batchlab.tasks import get_task
from batchlab.train import TrainConfig, fit

TASK = "digits-mlp"
NORM = "none"


# ----------------------------------------------------------------------------------------------- helpers

def _final(r: Any, key: str) -> float | None:
    """A final metric of a RunResult, None when the run did not end ``ok``."""
    if r.status != "ok":
        return None
    v = r.final.get(key)
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


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


def find_knee(batches: Sequence[int], throughput: Sequence[float], fraction: float = 0.9) -> int:
    """The smallest batch whose examples/s reach ``fraction`` of the peak."""
    peak = max(throughput)
    return int(next(b for b, t in zip(batches, throughput) if t >= fraction * peak))


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _seed_keys(data: dict[str, Any]) -> list[str]:
    return sorted(data["seeds"], key=int)


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

    def params(self, quick: bool) -> dict[str, Any]:
        return {"task": TASK, "norm": NORM, "batches": [1, 2, 4, 8, 16, 32, 64, 128], "n_batches": 150 if quick else 300,
                "points": ["init", "trained"], "train_steps": 45, "band": [-0.6, -0.4], "min_r2": 0.9}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"seeds": {}}
        with one_thread():
            for seed in ctx.seeds:
                p = {k: v for k, v in params.items() if k != "seeds"}
                out["seeds"][str(seed)] = ctx.cached("grad_std", {**p, "seed": seed}, lambda s=seed: self._one(params, s))
        return out

    @staticmethod
    def _one(p: dict[str, Any], seed: int) -> dict[str, Any]:
        task = get_task(p["task"])
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = task.make_model(norm=p["norm"])
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
            return [Verdict("C08", "inconclusive", "too few batch sizes with a finite gradient std to fit a slope", effect)]
        if any(not lo <= spread(v)["mean"] <= hi for v in slopes.values()):
            return [Verdict("C08", "refuted", f"mean fitted slope outside [{lo}, {hi}] ({txt})", effect)]
        in_band = all(lo <= x <= hi for v in slopes.values() for x in v)
        if in_band and all(x >= params["min_r2"] for v in r2s.values() for x in v):
            return [Verdict("C08", "supported", f"log-log slope of gradient std vs B within [{lo}, {hi}] at every point "
                            f"and seed ({txt}; sqrt(B) law: -0.5)", effect)]
        return [Verdict("C08", "inconclusive", f"mean slopes inside [{lo}, {hi}] but some seed outside it or a power-law "
                        f"fit with R^2 < {params['min_r2']} ({txt})", effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = _plt()
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
        "(a knee at the largest B tested is a lower bound)."
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
        out: dict[str, Any] = {"seeds": {}}
        for seed in ctx.seeds:
            p = {k: v for k, v in params.items() if k != "seeds"}
            out["seeds"][str(seed)] = ctx.cached("step_time", {**p, "seed": seed},
                                                 lambda s=seed: self._one(params, s, ctx.device))
        return out

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
            return [Verdict("C09", "inconclusive", "no timings", effect)]
        if all(all(v) for v in ok.values()):
            return [Verdict("C09", "supported", f"per-step time grew by less than {f:g}x the batch ratio up to the knee "
                            f"in every seed ({txt})", effect)]
        if any(not any(v) for v in ok.values()):
            return [Verdict("C09", "refuted", f"per-step time grew by {f:g}x the batch ratio or more up to the knee in "
                            f"every seed for some model ({txt})", effect)]
        return [Verdict("C09", "inconclusive", f"seeds disagree ({txt})", effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = _plt()
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

    def params(self, quick: bool) -> dict[str, Any]:
        return {"task": TASK, "batches": [2, 4, 8, 16, 32, 64, 128], "lr": 0.05, "epochs": 4, "drop": 0.02, "flat": 0.005}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"seeds": {}}
        with one_thread():
            for seed in ctx.seeds:
                rows = {"B": [], "val_acc": [], "train_acc": [], "status": [], "steps": []}
                runs = ctx.fit_many([(params["task"], _grid_config(b, params["lr"], params["epochs"], seed))
                                     for b in params["batches"]])
                for b, r in zip(params["batches"], runs):
                    rows["B"].append(b)
                    rows["val_acc"].append(_final(r, "val_acc"))
                    rows["train_acc"].append(_final(r, "train_acc"))
                    rows["status"].append(r.status)
                    rows["steps"].append(r.steps)
                out["seeds"][str(seed)] = rows
        return out

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
        txt = (f"val accuracy at B={data['seeds'][_seed_keys(data)[0]]['B'][-1]} is {fmt_spread(spread(drops))} below the "
               f"peak (best B per seed {peaks_b}); training accuracy drop {fmt_spread(spread(train_drops))}")
        if all(x >= params["drop"] for x in drops):
            return [Verdict("C10", "supported", f"{txt}; at least {params['drop']:.0%} in every seed", effect)]
        if all(x <= params["flat"] for x in drops):
            return [Verdict("C10", "refuted", f"{txt}; within {params['flat']:.1%} of the peak in every seed", effect)]
        return [Verdict("C10", "inconclusive", f"{txt}; not a drop of {params['drop']:.0%} in every seed", effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = _plt()
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
        "(examples) in every cell, B = 2..512 (powers of 2) x LR on a log grid. Per B: the best val accuracy over LR, "
        "and the stable-LR band = LRs that did not diverge and end within 5 points of that B's best (width in "
        "decades, log10(hi/lo)). Best B = the B with the highest best-over-LR val accuracy. Supported if the best B "
        "lies in 2..32 in every seed; refuted if it lies above 32 in every seed; otherwise inconclusive."
    }

    def params(self, quick: bool) -> dict[str, Any]:
        lrs = [0.003125, 0.0125, 0.05, 0.2, 0.8] if quick else [0.003125 * 2**i for i in range(9)]  # up to 0.8
        batches = [2, 8, 32, 128, 512] if quick else [2, 4, 8, 16, 32, 64, 128, 256, 512]
        return {"task": TASK, "batches": batches, "lrs": lrs, "epochs": 4,
                "band_tol": 0.05, "best_range": [2, 32]}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"seeds": {}}
        with one_thread():
            for seed in ctx.seeds:
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
                out["seeds"][str(seed)] = {"B": params["batches"], "lr": params["lrs"], "val_acc": acc, "status": status}
        return out

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
            return [Verdict("C13", "inconclusive", f"every cell diverged in some seed ({txt})", effect)]
        if all(lo <= b <= hi for b in best):
            return [Verdict("C13", "supported", f"{txt}; best B within {lo}..{hi} in every seed", effect)]
        if all(b > hi for b in best):
            return [Verdict("C13", "refuted", f"{txt}; best B above {hi} in every seed", effect)]
        return [Verdict("C13", "inconclusive", f"{txt}; best B not on one side of {hi} in every seed", effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = _plt()
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
        out: dict[str, Any] = {"seeds": {}}
        with one_thread():
            for seed in ctx.seeds:
                arms = []
                specs = self._arms(params)
                runs = ctx.fit_many([(params["task"], TrainConfig(batch_size=a["B"], lr=a["lr"], optimizer="momentum",
                                                                  epochs=params["epochs"], norm=NORM, seed=seed,
                                                                  eval_every=0)) for a in specs])
                for a, r in zip(specs, runs):
                    arms.append({**a, "status": r.status, "epoch": r.series("epoch"), "val_loss": r.series("val_loss"),
                                 "val_acc": r.series("val_acc")})
                out["seeds"][str(seed)] = {"arms": arms}
        return out

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
        if not comps:
            return [Verdict("C12", "inconclusive", "no comparisons", effect)]
        if wins == len(comps):
            return [Verdict("C12", "supported", txt, effect)]
        if wins <= len(comps) / 2:
            return [Verdict("C12", "refuted", txt, effect)]
        return [Verdict("C12", "inconclusive", txt, effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = _plt()
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
        "C15": "digits-mlp (1438 train / 359 val) without normalization; every arm gets the same example budget "
        "(4 epochs) at B = 32, 128, 512 and 1438 (full batch). SGD: momentum 0.9, best val accuracy over the LR grid "
        "per B. L-BFGS: lr 1, strong-Wolfe line search, history 20, lbfgs_max_iter iterations per batch. Valid only "
        "if SGD's best reaches 80% val accuracy (the budget teaches the task); otherwise inconclusive. Supported if "
        "in every seed (a) at the smallest B L-BFGS diverged/failed or ends at least 10 points of val accuracy below "
        "SGD at that B, and (b) at the largest B L-BFGS is within 5 points of SGD's best over all B (competitive). "
        "Refuted if the mean over seeds fails (a) or (b); otherwise inconclusive."
    }

    def params(self, quick: bool) -> dict[str, Any]:
        return {"task": TASK, "task_kwargs": {}, "batches": [32, 128, 512, 1438], "epochs": 4,
                "sgd_lrs": [0.0125, 0.05, 0.2], "lbfgs_max_iter": 10, "far_worse": 0.10, "competitive": 0.05,
                "min_sgd_acc": 0.8}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"seeds": {}}
        task = ctx.task(params["task"], **params["task_kwargs"])
        with one_thread():
            for seed in ctx.seeds:
                sgd_all, sgd_status, lb, lb_status, lb_time, sgd_time = [], [], [], [], [], []
                jobs = []
                for b in params["batches"]:
                    jobs += [(task, _grid_config(b, lr, params["epochs"], seed)) for lr in params["sgd_lrs"]]
                    jobs.append((task, TrainConfig(batch_size=b, lr=1.0, optimizer="lbfgs", epochs=params["epochs"],
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
                out["seeds"][str(seed)] = {"B": params["batches"], "sgd_lrs": params["sgd_lrs"], "sgd_all": sgd_all,
                                           "sgd_status": sgd_status, "sgd_time": sgd_time, "lbfgs": lb,
                                           "lbfgs_status": lb_status, "lbfgs_time": lb_time}
        return out

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
            return [Verdict("C15", "inconclusive", f"SGD's best val accuracy {fmt_spread(sgd_best)} is below "
                            f"{params['min_sgd_acc']:.0%} in some seed: the budget does not teach the task; {txt}", effect)]
        if all(a) and all(b):
            return [Verdict("C15", "supported", txt, effect)]
        if gs["mean"] < fw or gl["mean"] > comp:
            return [Verdict("C15", "refuted", txt, effect)]
        return [Verdict("C15", "inconclusive", txt + "; seeds disagree", effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = _plt()
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
        axes[0].set_title(f"same example budget: {params['epochs']} epochs (all seeds)")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("training time (s, log)")
        axes[1].set_title("cost of the budget")
        fig.suptitle(f"C15: SGD vs L-BFGS across batch sizes ({params['task']}, no norm)")
        fig.tight_layout()
        return [fig]
