"""Deep sigmoid MLPs with and without BatchNorm: vanishing gradients (C03), saturation and the
affine parameters (C05)."""

from __future__ import annotations

import functools
import math
from typing import Any

from batchlab.experiments.base import Experiment, ExperimentContext, Verdict, fmt_spread, register, spread
from batchlab.experiments.kit import pyplot
from batchlab.experiments.base import one_thread
from batchlab.experiments.bn_training import _band, compact
from batchlab.train import Callback, StepContext, TrainConfig, fit

ARMS = ("none", "bn", "bn_noaffine")
ARM_LABEL = {"none": "no BN", "bn": "BN (gamma, beta)", "bn_noaffine": "BN without gamma/beta"}
ARM_COLOR = {"none": "C3", "bn": "C0", "bn_noaffine": "C2"}


class GradNorms(Callback):
    """The L2 norm of each Linear layer's weight gradient every ``every`` steps (before the update)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.steps: list[int] = []
        self.norms: list[list[float]] = []
        self.linears: list[Any] = []

    def on_train_begin(self, ctx: StepContext) -> None:
        import torch.nn as nn

        self.linears = [m for m in ctx.model.modules() if isinstance(m, nn.Linear)]

    def on_before_step(self, ctx: StepContext) -> None:
        if ctx.step % self.every == 0:
            self.steps.append(ctx.step)
            self.norms.append([float(m.weight.grad.norm()) if m.weight.grad is not None else math.nan
                               for m in self.linears])


def sigmoid_run(task: Any, arm: str, seed: int, p: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """Train one deep sigmoid MLP; return its curves, per-layer gradient norms, and per-layer
    activation histograms and saturated fractions on the validation set after training."""
    import numpy as np
    import torch
    import torch.nn as nn

    from batchlab.norm import create_norm

    norm: Any = {"none": "none", "bn": "batch",
                 "bn_noaffine": functools.partial(create_norm, "batch", dims=0, affine=False)}[arm]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = task.model_fn(norm=norm, activation="sigmoid")
    cfg = TrainConfig(batch_size=p["batch_size"], lr=p["lr"], max_steps=p["max_steps"], eval_every=p["eval_every"],
                      seed=seed, norm="none" if arm == "none" else "batch", activation="sigmoid", device=device)
    grads = GradNorms(p["grad_every"])
    r = fit(task, cfg, model=model, callbacks=[grads], raise_errors=False)
    out = compact(r)
    out["grad_steps"] = grads.steps
    out["grad_norms"] = grads.norms  # [logged step][Linear layer, input side first]
    acts: list[Any] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: acts.append(o.detach().flatten().cpu()))
             for m in model.modules() if isinstance(m, nn.Sigmoid)]
    model.eval()
    with torch.no_grad():
        model(task.val_set.x.to(device))
    for h in hooks:
        h.remove()
    edges = np.linspace(0.0, 1.0, p["bins"] + 1)
    out["hist_edges"] = edges.tolist()
    out["act_hist"] = [(np.histogram(a.numpy(), bins=edges)[0] / a.numel()).tolist() for a in acts]
    # saturation measured by the derivative backprop multiplies by: sigmoid'(z) = s (1 - s), at most 0.25
    out["dsigmoid_mean"] = [float((a * (1 - a)).mean()) for a in acts]
    out["saturated"] = [float((a * (1 - a) < p["dsig_sat"]).float().mean()) for a in acts]
    return out


def saturation_bounds(dsig_sat: float) -> tuple[float, float]:
    """The sigmoid outputs s with s (1 - s) = ``dsig_sat``: saturated units lie below the first or above the second."""
    lo = (1 - math.sqrt(1 - 4 * dsig_sat)) / 2
    return lo, 1 - lo


@register
class BNSigmoid(Experiment):
    id = "bn_sigmoid"
    claims = ("C03", "C05")
    title = "BatchNorm in a deep sigmoid MLP: vanishing gradients, saturation, gamma and beta"
    seed_doc = "002, 000, 004"
    statements = {
        "C03": "With sigmoid activations, a net without BN barely trains (vanishing gradients); with BN it trains.",
        "C05": "BN keeps activations out of saturation; gamma/beta give back the expressiveness that normalization "
        "takes away.",
    }
    rules = {
        "C03": "digits-mlp input with D hidden layers of 100 sigmoid units, D = 3 (the BN paper's MNIST test) and "
        "D = 4 (one layer deeper), batch 60, SGD+momentum 0.9 at the task's lr 0.05, same steps for both arms. "
        "Gradient ratio per seed = median over logged steps of |grad W_last| / |grad W_first| (output layer vs first "
        "hidden layer, weight gradients). Per depth: holds if, in every seed, the no-BN ratio is >= 10 AND no-BN's "
        "final validation accuracy is at least 10 points below BN's; fails if in every seed the ratio is < 10, or in "
        "every seed the accuracy gap is < 10 points; otherwise undecided. Supported if it holds at both depths, "
        "refuted if it fails at both, otherwise inconclusive (the outcome depends on the depth; both are reported).",
        "C05": "Reported as measured, on the 4-layer nets plus BN without affine (gamma/beta off). Saturation is "
        "measured by the derivative backprop multiplies by: a unit is saturated when sigmoid'(z) = s(1 - s) < 0.1 "
        "(40% of its maximum 0.25; sigmoid output outside [0.113, 0.887]), per hidden layer, on the validation set "
        "after training; the mean sigmoid'(z) per layer is reported too. (a) In every seed, the most saturated "
        "layer of the BN net has a lower saturated fraction than the most saturated layer of the no-BN net; (b) mean "
        "final validation accuracy with gamma/beta is at least that without them minus 1 point. Observed if (a) and "
        "(b); not observed if (a) fails in every seed, or affine-on is more than 1 point below affine-off in every "
        "seed; otherwise inconclusive.",
    }
    validity = {
        "C03": "Per depth, BN must train the net (seed-mean BN val accuracy >= 80%); a depth where it does not is "
        "left out, and with no valid depth the verdict is inconclusive.",
        "C05": "The no-BN net must saturate somewhere for BN to prevent it: its most saturated layer has >= 5% "
        "saturated units in the seed mean.",
    }
    reported = ("C05",)

    def params(self, quick: bool) -> dict[str, Any]:
        return {"task": "digits-mlp", "depths": [3, 4], "width": 100, "c05_depth": 4, "batch_size": 60, "lr": 0.05,
                "max_steps": 800 if quick else 1500, "eval_every": 25 if quick else 50, "grad_every": 10,
                "bins": 40, "dsig_sat": 0.1, "min_saturation": 0.05, "min_bn_acc": 0.8, "ratio_factor": 10.0,
                "acc_gap": 0.10, "affine_tol": 0.01}

    @staticmethod
    def at_depth(params: dict[str, Any], depth: int) -> dict[str, Any]:
        """The settings of one depth's nets (``hidden`` = depth x width)."""
        p = {k: v for k, v in params.items() if k not in ("depths", "seeds")}
        return {**p, "hidden": [params["width"]] * int(depth)}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for depth in params["depths"]:
            p = self.at_depth(params, depth)
            task = ctx.task(params["task"], hidden=tuple(p["hidden"]))
            runs: dict[str, dict[str, Any]] = {}
            arms = ARMS if depth == params["c05_depth"] else ("none", "bn")
            for arm in arms:
                for seed in ctx.seeds:
                    key = {**p, "arm": arm, "seed": seed, "task_fingerprint": task.fingerprint(), "version": 2}
                    with one_thread(ctx.device):
                        runs.setdefault(arm, {})[str(seed)] = ctx.cached(
                            "sigmoid_mlp", key, lambda a=arm, s=seed, p=p, t=task: sigmoid_run(t, a, s, p, ctx.device))
            out[str(depth)] = {"runs": runs}
        return {"depths": out}

    @staticmethod
    def grad_ratio(run: dict[str, Any]) -> float:
        import numpy as np

        g = np.asarray(run["grad_norms"], dtype=float)
        if g.size == 0:
            return math.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            r = g[:, -1] / g[:, 0]
        r = r[np.isfinite(r)]
        return float(np.median(r)) if r.size else math.nan

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        return [self._c03(data, params), self._c05(data["depths"][str(params["c05_depth"])], params)]

    def _c03(self, data: dict[str, Any], p: dict[str, Any]) -> Verdict:
        per = {d: self._c03_depth(v, p) for d, v in sorted(data["depths"].items(), key=lambda kv: int(kv[0]))}
        effect = {f"depth {d}": v.effect for d, v in per.items()}
        nums = " | ".join(f"{d} layers: {v.verdict} - {v.reason}" for d, v in per.items())
        valid = {d: v for d, v in per.items() if v.valid}
        if not valid:
            return Verdict.invalid("C03", f"BN did not train the net at any depth; {nums}", effect)
        got = {v.verdict for v in valid.values()}
        if got == {"supported"}:
            return Verdict("C03", "supported", f"holds at every valid depth; {nums}", effect)
        if got == {"refuted"}:
            return Verdict("C03", "refuted", f"fails at every valid depth; {nums}", effect)
        return Verdict("C03", "inconclusive", f"the outcome depends on the depth; {nums}", effect)

    def _c03_depth(self, data: dict[str, Any], p: dict[str, Any]) -> Verdict:
        none, bn = data["runs"]["none"], data["runs"]["bn"]
        seeds = sorted(none, key=int)
        ratio = [self.grad_ratio(none[s]) for s in seeds]
        ratio_bn = [self.grad_ratio(bn[s]) for s in seeds]
        gap = [bn[s]["final_val_acc"] - (none[s]["final_val_acc"] if none[s]["status"] == "ok" else 0.0) for s in seeds]
        big_ratio = [r >= p["ratio_factor"] for r in ratio]
        big_gap = [g >= p["acc_gap"] for g in gap]
        effect = {"ratio_none": ratio, "ratio_bn": ratio_bn, "ratio_none_spread": spread(ratio),
                  "ratio_bn_spread": spread(ratio_bn), "acc_gap": gap, "acc_gap_spread": spread(gap),
                  "acc_none": spread(none[s]["final_val_acc"] for s in seeds),
                  "acc_bn": spread(bn[s]["final_val_acc"] for s in seeds),
                  "thresholds": {"ratio_factor": p["ratio_factor"], "acc_gap": p["acc_gap"]}}
        nums = (f"no-BN |grad last|/|grad first| {fmt_spread(effect['ratio_none_spread'])} (BN "
                f"{fmt_spread(effect['ratio_bn_spread'])}); final val accuracy no BN {fmt_spread(effect['acc_none'])}, "
                f"BN {fmt_spread(effect['acc_bn'])}, gap {fmt_spread(effect['acc_gap_spread'])}")
        if bn_bad := [s for s in seeds if bn[s]["status"] != "ok"]:
            return Verdict.invalid("C03", f"the BN run did not finish in seeds {bn_bad}; {nums}", effect)
        if not effect["acc_bn"]["mean"] >= p["min_bn_acc"]:
            return Verdict.invalid("C03", f"BN did not train the net (val accuracy < {p['min_bn_acc']:.0%}); {nums}", effect)
        if all(big_ratio) and all(big_gap):
            return Verdict("C03", "supported", f"in every seed the first layer's gradient was >= {p['ratio_factor']:g}x "
                           f"smaller and no BN ended >= {p['acc_gap'] * 100:g} points below BN; {nums}", effect)
        if not any(big_ratio):
            return Verdict("C03", "refuted", f"the no-BN gradient ratio stayed below {p['ratio_factor']:g} in every "
                           f"seed; {nums}", effect)
        if not any(big_gap):
            return Verdict("C03", "refuted", f"no BN trained to within {p['acc_gap'] * 100:g} points of BN in every "
                           f"seed; {nums}", effect)
        return Verdict("C03", "inconclusive", f"seeds disagree (ratio >= {p['ratio_factor']:g}: {big_ratio}, gap >= "
                       f"{p['acc_gap']:g}: {big_gap}); {nums}", effect)

    def _c05(self, data: dict[str, Any], p: dict[str, Any]) -> Verdict:
        runs = data["runs"]
        seeds = sorted(runs["none"], key=int)

        def worst(r: dict[str, Any]) -> float:
            return max(r["saturated"]) if r.get("saturated") else math.nan

        sat_none = [worst(runs["none"][s]) for s in seeds]
        sat_bn = [worst(runs["bn"][s]) for s in seeds]
        sat_noaff = [worst(runs["bn_noaffine"][s]) for s in seeds]
        acc_on = [runs["bn"][s]["final_val_acc"] for s in seeds]
        acc_off = [runs["bn_noaffine"][s]["final_val_acc"] for s in seeds]
        diff = [a - b for a, b in zip(acc_on, acc_off)]
        tol = p["affine_tol"]
        lower = [b < n for b, n in zip(sat_bn, sat_none)]
        effect = {"worst_layer_saturated_none": spread(sat_none), "worst_layer_saturated_bn": spread(sat_bn),
                  "worst_layer_saturated_bn_noaffine": spread(sat_noaff),
                  "saturated_per_layer": {arm: [runs[arm][s].get("saturated") for s in seeds] for arm in ARMS},
                  "mean_dsigmoid_per_layer": {arm: [runs[arm][s].get("dsigmoid_mean") for s in seeds] for arm in ARMS},
                  "acc_affine_on": spread(acc_on), "acc_affine_off": spread(acc_off), "acc_diff_on_minus_off": spread(diff),
                  "acc_none": spread(runs["none"][s]["final_val_acc"] for s in seeds),
                  "thresholds": {"dsig_sat": p["dsig_sat"], "affine_tol": tol, "min_saturation": p["min_saturation"]}}
        per_layer = "; ".join(
            f"{ARM_LABEL[arm]} per layer " + "/".join(f"{100 * spread(x[i] for x in effect['saturated_per_layer'][arm])['mean']:.0f}%"
                                                    for i in range(len(effect['saturated_per_layer'][arm][0])))
            for arm in ARMS if effect["saturated_per_layer"][arm] and effect["saturated_per_layer"][arm][0])
        nums = (f"saturated (sigmoid' < {p['dsig_sat']:g}) in the most saturated layer: no BN "
                f"{fmt_spread(effect['worst_layer_saturated_none'])}, BN {fmt_spread(effect['worst_layer_saturated_bn'])}, "
                f"BN w/o affine {fmt_spread(effect['worst_layer_saturated_bn_noaffine'])} ({per_layer}); val accuracy "
                f"BN with gamma/beta {fmt_spread(effect['acc_affine_on'])}, without {fmt_spread(effect['acc_affine_off'])} "
                f"(difference {fmt_spread(effect['acc_diff_on_minus_off'])})")
        if any(math.isnan(x) for x in sat_none + sat_bn):
            return Verdict.invalid("C05", f"no activations measured for some run; {nums}", effect)
        if not effect["worst_layer_saturated_none"]["mean"] >= p["min_saturation"]:
            return Verdict.invalid("C05", f"the no-BN net did not saturate (most saturated layer below "
                                   f"{p['min_saturation']:.0%}): nothing for BN to prevent on this task; {nums}", effect)
        mean_diff = sum(diff) / len(diff)
        if all(lower) and mean_diff >= -tol:
            return Verdict("C05", "observed", f"BN lowered the worst layer's saturated fraction in every seed and "
                           f"gamma/beta did not cost accuracy (tolerance {tol * 100:g} point); {nums}", effect)
        if not any(lower):
            return Verdict("C05", "not observed", f"BN did not lower the worst layer's saturation in any seed; {nums}",
                           effect)
        if all(x < -tol for x in diff):
            return Verdict("C05", "not observed", f"BN with gamma/beta was more than {tol * 100:g} point worse than "
                           f"without in every seed; {nums}", effect)
        return Verdict("C05", "inconclusive", f"mixed: BN lower saturation per seed {lower}, mean accuracy difference "
                       f"{mean_diff:+.3f}; {nums}", effect)

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        figs = [self._plot_c03(data["depths"][d]["runs"], self.at_depth(params, int(d)))
                for d in sorted(data["depths"], key=int)]
        figs.append(self._plot_c05(data["depths"][str(params["c05_depth"])]["runs"],
                                   self.at_depth(params, params["c05_depth"])))
        return figs

    def _plot_c03(self, runs: dict[str, Any], params: dict[str, Any]) -> Any:
        import numpy as np

        plt = pyplot()
        seeds = sorted(runs["none"], key=int)

        fig, axes = plt.subplots(1, 4, figsize=(23, 4.8))
        arch = f"{len(params['hidden'])}x{params['hidden'][0]} sigmoid MLP, batch {params['batch_size']}"
        for ax, key, ylabel in ((axes[0], "train_loss", "training loss (cross-entropy, log scale)"),
                                (axes[1], "val_acc", "validation accuracy (fraction)")):
            for arm in ("none", "bn"):
                ok = [r for r in runs[arm].values() if r["history"]]
                _band(ax, ok, key, ARM_LABEL[arm] + " (mean, min..max)", ARM_COLOR[arm])
            if key == "train_loss":
                ax.set_yscale("log")
            else:
                ax.set_ylim(0, 1)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{arch}: {'training loss' if key == 'train_loss' else 'validation accuracy'}")
            ax.legend(fontsize=8)
        ax = axes[2]
        n_layers = len(runs["none"][seeds[0]]["grad_norms"][0]) if runs["none"][seeds[0]]["grad_norms"] else 0
        width = 0.38
        for k, arm in enumerate(("none", "bn")):
            per_seed = np.array([np.nanmean(np.asarray(runs[arm][s]["grad_norms"], dtype=float), 0) for s in seeds
                                 if runs[arm][s]["grad_norms"]])
            if per_seed.size == 0:
                continue
            xs = np.arange(per_seed.shape[1]) + (k - 0.5) * width
            ax.bar(xs, per_seed.mean(0), width, color=ARM_COLOR[arm], alpha=0.8, label=ARM_LABEL[arm])
            ax.errorbar(xs, per_seed.mean(0), yerr=[per_seed.mean(0) - per_seed.min(0), per_seed.max(0) - per_seed.mean(0)],
                        fmt="none", ecolor="k", capsize=3)
        ax.set_yscale("log")
        ax.set_xticks(range(n_layers), [f"hidden {i + 1}" for i in range(n_layers - 1)] + ["output"])
        ax.set_xlabel("Linear layer (input side first)")
        ax.set_ylabel("weight-gradient L2 norm, mean over steps (log)")
        ax.set_title("Per-layer gradient norms (bars: mean of seeds, whiskers: min..max)")
        ax.legend()
        ax = axes[3]
        r0 = runs["none"][seeds[0]]
        g = np.asarray(r0["grad_norms"], dtype=float)
        for j in range(g.shape[1] if g.ndim == 2 else 0):
            ax.plot(r0["grad_steps"], g[:, j], color=plt.cm.viridis(j / max(1, g.shape[1] - 1)),
                    label=f"{'output' if j == g.shape[1] - 1 else f'hidden {j + 1}'}")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("weight-gradient L2 norm (log)")
        ax.set_title(f"No BN, seed {seeds[0]}: gradient norm per layer over training")
        ax.legend(fontsize=8)
        fig.suptitle(f"C03: {len(params['hidden'])}-layer sigmoid MLP with and without BN (digits)")
        fig.tight_layout()
        return fig

    def _plot_c05(self, runs: dict[str, Any], params: dict[str, Any]) -> Any:
        import numpy as np

        plt = pyplot()
        seeds = sorted(runs["none"], key=int)
        sat_lo, sat_hi = saturation_bounds(params["dsig_sat"])
        r0 = {arm: runs[arm][seeds[0]] for arm in ARMS}
        n_act = len(r0["none"]["act_hist"])
        fig, axes = plt.subplots(len(ARMS), n_act + 1, figsize=(4 * (n_act + 1), 3.0 * len(ARMS)), squeeze=False)
        for i, arm in enumerate(ARMS):
            edges = np.asarray(r0[arm]["hist_edges"])
            centers = (edges[:-1] + edges[1:]) / 2
            for j, h in enumerate(r0[arm]["act_hist"]):
                ax = axes[i][j]
                ax.bar(centers, h, width=edges[1] - edges[0], color=ARM_COLOR[arm], alpha=0.85)
                ax.axvspan(0, sat_lo, color="k", alpha=0.1)
                ax.axvspan(sat_hi, 1, color="k", alpha=0.1)
                ax.set_title(f"{ARM_LABEL[arm]}, layer {j + 1}: {r0[arm]['saturated'][j]:.0%} saturated", fontsize=9)
                ax.set_xlabel("sigmoid output")
                ax.set_ylabel("fraction of units x examples")
            ax = axes[i][n_act]
            if i == 0:
                for a in ARMS:
                    sats = np.array([runs[a][s]["saturated"] for s in seeds], dtype=float)
                    ax.errorbar(np.arange(1, sats.shape[1] + 1), sats.mean(0),
                                yerr=[sats.mean(0) - sats.min(0), sats.max(0) - sats.mean(0)],
                                fmt="o-", color=ARM_COLOR[a], capsize=3, label=ARM_LABEL[a])
                ax.set_xticks(range(1, len(r0["none"]["saturated"]) + 1))
                ax.set_xlabel("hidden layer")
                ax.set_ylabel(f"saturated fraction (sigmoid' < {params['dsig_sat']:g})")
                ax.set_title("Saturation per layer, all seeds (mean, min..max)", fontsize=9)
                ax.legend(fontsize=8)
            elif i == 1:
                accs = [[runs[a][s]["final_val_acc"] for s in seeds] for a in ARMS]
                ax.bar(range(len(ARMS)), [np.mean(v) for v in accs], color=[ARM_COLOR[a] for a in ARMS], alpha=0.8)
                for k, v in enumerate(accs):
                    ax.plot([k] * len(v), v, "k.", ms=8)
                ax.set_xticks(range(len(ARMS)), ["no BN", "BN", "BN no affine"])
                ax.set_ylabel("final validation accuracy (fraction)")
                ax.set_title("Accuracy: affine on / off (bars: mean, dots: seeds)", fontsize=9)
                ax.set_xlabel("arm")
            else:
                ax.axis("off")
        fig.suptitle(f"C05: sigmoid activations on the validation set after training (seed {seeds[0]}; shaded: "
                     f"saturated, sigmoid'(z) < {params['dsig_sat']:g})")
        fig.tight_layout()
        return fig
