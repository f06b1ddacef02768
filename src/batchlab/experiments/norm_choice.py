"""C17, C18, C20: which normalization, and how its statistics are gathered.

- C17 (``norm_batch``): BN, GN, LN, IN and no norm across per-device batch 2..128, on a BatchNorm1d MLP
  (digits-mlp) and two CNNs on generated 32x32 RGB images (shapes32-cnn and shapes32-vgg, ``batchlab.data.shapes32``). The
  CNN task replaced digits-cnn (8x8 grey digits), where even no normalization reached ~97% at batch 2,
  so that task could not show BN degrading (its validity check failed). Shapes-32's per-image colour and
  brightness jitter was meant to make a batch of 2 images' channel statistics far from the data set's,
  which is what BN at batch 2 normalizes with in training (measured: BN at B=2 was no worse than at
  B=32 there; docs/reproduce.md). Pre-registered before its first C17 run: the
  validity check below (no normalization must end below BN at B=32, seed-mean) decides whether a task
  counts; the rule and thresholds are unchanged from the digits-cnn edition. The per-task LR lr32 and
  epochs of shapes32-cnn were chosen from BN and GN runs at B=32 only (lr32 0.05 left them at 64% /
  48% after 4 epochs; 0.025 gave 92% / 94% after 8), never from a small-batch run.
  shapes32-vgg (added 2026-12-01, pre-registered in docs/reproduce.md before any small-batch run of it): a
  VGG-style net pooling to 1x1, whose last norms see 4x4 and 2x2 maps of image-level features, the statistics a
  batch of 2 images estimates badly; lr32 from BN and GN at B=32, 8 epochs, seed 0: 0.025 and 0.05 tied
  exactly (1115 of 1200 validation answers right), so shapes32-cnn's 0.025 was kept.
  The per-device arm (added 2026-12-01, pre-registered in docs/reproduce.md before any run of it): Wu & He's
  batch is images per GPU, the batch BN's statistics come from, while the optimizer sees every GPU's images.
  One CPU emulates D devices of g examples with :class:`batchlab.norm.GhostBatchNorm2d` (``virtual_batch_size``
  g; each virtual batch is one device's batch, its running statistics updated per virtual batch): the
  optimizer batch stays 32 (lr32, the same epochs), so only BN's statistics change with g. The equal-epochs
  arm (one device, B = g) confounds g with the number of steps (B = 2 takes 16 times the steps of 32; no
  normalization gained 13 points from it on shapes32-vgg); the rule's BN drop now comes from the per-device
  arm, the GN range still from the equal-epochs arm (GN has no batch dimension, so under a fixed optimizer
  batch it is the same run at every g).
- C18 (``bn_eval_stats``): evaluating a BN net with EMA running statistics, precise (population)
  statistics and the batch's own statistics, across the EMA momentum.
- C20 (``seq_norm``): BN vs LN on padded variable-length sequences, and what padding does to BN's
  batch statistics.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from batchlab.experiments.base import Experiment, ExperimentContext, Verdict, fmt_spread, one_thread, register, spread
from batchlab.experiments.kit import pyplot, seeded_model
from batchlab.norm import convert_norm, precise_bn
from batchlab.train.config import TrainConfig

NORM_LABELS = {"batch": "BatchNorm", "group": "GroupNorm", "layer": "LayerNorm", "instance": "InstanceNorm",
               "none": "no norm"}
NORM_COLORS = {"batch": "C3", "group": "C0", "layer": "C2", "instance": "C4", "none": "C7"}





def _per_device_model(task: Any, g: int) -> nn.Module:
    """``task``'s BN model with each BN's training statistics over virtual batches of ``g`` examples (one
    emulated device each; eval is torch's batch norm with the running statistics, as before)."""
    return convert_norm(task.make_model(norm="batch"), "ghost", virtual_batch_size=g)


def _seed_values(table: dict[str, dict[str, float]], key: str) -> dict[str, float]:
    """``table[seed][key]`` for every seed that has it."""
    return {s: v[key] for s, v in table.items() if key in v and v[key] is not None}


# ----------------------------------------------------------------------------------------------
# C17: norm layers across the per-device batch size
# ----------------------------------------------------------------------------------------------


@register
class NormBatch(Experiment):
    id = "norm_batch"
    claims = ("C17",)
    title = "BN, GN, LN, IN and no norm across the per-device batch size"
    seed_doc = "001, 004"
    statements = {
        "C17": "With small batches, BN statistics are unreliable and results get worse; GroupNorm does not depend "
        "on the batch size (Wu & He)."
    }
    rules = {
        "C17": "Three tasks: digits-mlp (MLP 64-100-100-100-10, norm after each hidden Linear: BatchNorm1d statistics "
        "over B examples) and shapes32-cnn (generated 32x32 RGB shapes, 10 classes, random colour, position, "
        "clutter and noise; 3 conv blocks of 8/16/32 channels, norm after each conv: BN statistics over B x H x W "
        "positions) and shapes32-vgg (the same images; 5 conv blocks of 8/16/32/64/64 channels pooling to 1x1, so "
        "the last norms see 4x4 and 2x2 maps). Two arms, momentum SGD, final val accuracy, lr32 and epochs per task "
        "(see the parameters). Equal-epochs arm (one device): every norm trained for the same number of epochs at "
        "each batch B with the linear LR rule lr = lr32 * B / 32 (Goyal et al.; Wu & He use the same rule). "
        "Per-device arm (Wu & He's images per GPU): the optimizer batch fixed at 32 with lr32, BN's statistics over "
        "each device's g examples, D = 32 / g devices emulated by Ghost BN (virtual batch g), g in the parameters' "
        "'devices'; g = 32 is the equal-epochs arm's BN run at B = 32. Per task: "
        "BN drop = acc(BN, g=32) - mean(acc(BN, g=2), acc(BN, g=4)) per seed, from the per-device arm; GN range = "
        "max - min over B in 2..32 of GN's seed-mean accuracy, from the equal-epochs arm. A task supports the claim "
        "if the BN drop is >= 2 points in the mean and > 0 in every seed AND the GN range is <= 2 points; it refutes "
        "it if the BN drop is < 0.5 points in the mean and below 2 points in every seed (no seed shows the effect), "
        "or the GN range is > 4 points; otherwise it is undecided. Over the tasks that pass the validity check: "
        "supported if every one supports, refuted if every one refutes, otherwise inconclusive. The equal-epochs "
        "arm's BN drop is reported beside it."
    }
    validity = {
        "C17": "Per task: normalization must matter at the large batch, i.e. no normalization ends below BN at B=32 "
        "(seed-mean val accuracy). A task where it does not cannot show BN degrading; with no valid task the verdict "
        "is inconclusive."
    }
    BN_MARGIN = 0.02
    BN_NONE = 0.005
    GN_FLAT = 0.02
    GN_STEEP = 0.04
    #: Wu & He 2018, ResNet-50 ImageNet val error (%) by images per GPU (REFERENCE.md)
    PUBLISHED = {"source": "Wu & He 2018 (GroupNorm), ResNet-50 ImageNet val error (%) by images per GPU",
                 "images_per_gpu": [32, 16, 8, 4, 2],
                 "BN": [23.6, 23.7, 24.8, 27.3, 34.7], "GN": [24.1, 24.2, 24.0, 24.2, 24.1],
                 "at_32": {"LN": 25.3, "IN": 28.4}}

    def params(self, quick: bool) -> dict[str, Any]:
        # shapes32-cnn / -vgg: lr32 and epochs from BN/GN runs at B=32 only (module docstring); a smaller grid than
        # digits-mlp's, since one 32x32 RGB run at B=2 costs about 20 digits-mlp runs
        if quick:
            image = {"epochs": 4, "lr32": 0.025}
            return {"tasks": ["digits-mlp", "shapes32-cnn", "shapes32-vgg"], "norms": ["batch", "group", "none"],
                    "batches": [2, 4, 32], "devices": [2, 4], "epochs": 3, "lr32": 0.05,
                    "per_task": {"shapes32-cnn": image, "shapes32-vgg": dict(image)}}
        image = {"epochs": 8, "lr32": 0.025, "norms": ["batch", "group", "none"], "batches": [2, 4, 8, 32, 128]}
        return {"tasks": ["digits-mlp", "shapes32-cnn", "shapes32-vgg"],
                "norms": ["batch", "group", "layer", "instance", "none"],
                "batches": [2, 4, 8, 16, 32, 64, 128], "devices": [2, 4, 8], "epochs": 4, "lr32": 0.05,
                "per_task": {"shapes32-cnn": image, "shapes32-vgg": dict(image)}}

    @staticmethod
    def task_params(params: dict[str, Any], name: str) -> dict[str, Any]:
        """``params`` with task ``name``'s entries in ``params["per_task"]`` (epochs, lr32, norms, batches) applied."""
        return {**params, **params.get("per_task", {}).get(name, {})}

    def scale_up(self, params: dict[str, Any], factor: int) -> dict[str, Any]:
        out = super().scale_up(params, factor)
        out["per_task"] = {name: super(NormBatch, self).scale_up(p, factor)
                           for name, p in params.get("per_task", {}).items()}
        return out

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        with one_thread(ctx.device):
            return {"tasks": {name: self._run(ctx, self.task_params(params, name), name) for name in params["tasks"]}}

    def _run(self, ctx: ExperimentContext, params: dict[str, Any], name: str) -> dict[str, Any]:
        task = ctx.task(name)
        acc: dict[str, dict[str, dict[str, float]]] = {}
        status: dict[str, dict[str, dict[str, str]]] = {}
        for norm in params["norms"]:
            if norm == "instance" and name.endswith("-mlp"):
                continue  # one value per channel per example: nothing to normalize
            for b in params["batches"]:
                for seed in ctx.seeds:
                    cfg = TrainConfig(batch_size=b, lr=params["lr32"] * b / 32, optimizer="momentum",
                                      epochs=params["epochs"], norm=norm, seed=seed, eval_train=False)
                    r = ctx.fit(task, cfg)
                    acc.setdefault(norm, {}).setdefault(str(b), {})[str(seed)] = (
                        r.metric("val_acc") if r.ok else math.nan)
                    status.setdefault(norm, {}).setdefault(str(b), {})[str(seed)] = r.status
        devices: dict[str, dict[str, float]] = {}
        if "batch" in params["norms"]:
            for g in params.get("devices", []):
                for seed in ctx.seeds:
                    r = self._per_device(ctx, task, params, g, seed)
                    devices.setdefault(str(g), {})[str(seed)] = r.metric("val_acc") if r.ok else math.nan
                    status.setdefault("batch_per_device", {}).setdefault(str(g), {})[str(seed)] = r.status
        return {"acc": acc, "status": status, "devices": devices}

    #: the optimizer batch of the per-device arm (D = TOTAL / g devices of g examples each)
    TOTAL = 32

    @classmethod
    def per_device_runs(cls, acc: dict[str, Any], devices: dict[str, Any] | None) -> dict[str, Any]:
        """BN's runs by examples per device g; g = TOTAL is the equal-epochs arm's BN run at B = TOTAL (one
        device of TOTAL), when there is one."""
        runs = dict(devices or {})
        if str(cls.TOTAL) in acc.get("batch", {}):
            runs[str(cls.TOTAL)] = acc["batch"][str(cls.TOTAL)]
        return runs

    def _per_device(self, ctx: ExperimentContext, task: Any, params: dict[str, Any], g: int, seed: int) -> Any:
        """BN with statistics over ``g`` examples per emulated device, the optimizer batch fixed at 32 (lr32)."""
        cfg = TrainConfig(batch_size=self.TOTAL, lr=params["lr32"], optimizer="momentum", epochs=params["epochs"],
                          norm="batch", seed=seed, eval_train=False)
        build = functools.partial(_per_device_model, task, g)
        return ctx.fit(task, cfg, model_fn=seeded_model(seed, build),
                       variant=f"BN per device: GhostBatchNorm virtual_batch_size={g}")

    def judge_task(self, acc: dict[str, Any], devices: dict[str, Any] | None = None) -> dict[str, Any]:
        """The rule and the validity check on one task's accuracies (``acc``: the equal-epochs arm,
        ``devices``: BN's per-device arm by g): ``outcome`` is supported / refuted / undecided / invalid,
        with the numbers."""

        def drop(t: dict[str, Any]) -> dict[str, float]:
            if not all(k in t for k in ("2", "4", "32")):
                return {}
            out = {}
            for s in t["32"]:
                vals = [t[k].get(s, math.nan) for k in ("2", "4", "32")]
                if all(math.isfinite(v) for v in vals):
                    out[s] = vals[2] - (vals[0] + vals[1]) / 2
                elif math.isfinite(vals[2]):
                    out[s] = vals[2]  # a diverged small-batch run counts as accuracy 0
            return out

        per_device = self.per_device_runs(acc, devices)
        bn, gn = drop(per_device), drop(acc.get("group", {}))
        bn_one = drop(acc.get("batch", {}))
        gn_means = {b: spread(v.values())["mean"] for b, v in acc.get("group", {}).items() if int(b) <= 32}
        gn_means = {b: m for b, m in gn_means.items() if math.isfinite(m)}
        at32 = {n: spread(acc.get(n, {}).get("32", {}).values())["mean"] for n in ("batch", "none")}
        res: dict[str, Any] = {
            "bn_drop": spread(bn.values()), "bn_drop_one_device": spread(bn_one.values()),
            "gn_drop": spread(gn.values()),
            "gn_range_b_le_32": (max(gn_means.values()) - min(gn_means.values())) if len(gn_means) >= 2 else math.nan,
            "bn_minus_none_at_32": at32["batch"] - at32["none"],
            "mean_acc": {n: {b: spread(v.values()) for b, v in t.items()} for n, t in acc.items()},
            "mean_acc_per_device": {g: spread(v.values()) for g, v in per_device.items()},
        }
        bn_s, gn_range = res["bn_drop"], res["gn_range_b_le_32"]
        res["text"] = (f"BN drop per device {fmt_spread(bn_s)} (fractions; one device, equal epochs: "
                       f"{fmt_spread(res['bn_drop_one_device'])}), GN drop {fmt_spread(res['gn_drop'])}, GN range over "
                       f"B<=32 {gn_range:.3f}, BN - none at B=32 {res['bn_minus_none_at_32']:+.3f}")
        if not bn or len(gn_means) < 2:
            res["outcome"], res["why"] = "undecided", "BN per device or GN lacks runs at 2, 4 and 32"
        elif not res["bn_minus_none_at_32"] > 0:
            res["outcome"], res["why"] = "invalid", "no normalization is not worse than BN at B=32"
        elif (bn_s["mean"] < self.BN_NONE and bn_s["max"] < self.BN_MARGIN) or gn_range > self.GN_STEEP:
            res["outcome"] = "refuted"
            res["why"] = ("GN depends on B" if gn_range > self.GN_STEEP
                          else "BN at 2-4 per device is not worse than at 32 in any seed")
        elif bn_s["mean"] >= self.BN_MARGIN and bn_s["min"] > 0 and gn_range <= self.GN_FLAT:
            res["outcome"], res["why"] = "supported", "BN degrades at 2-4 per device, GN flat"
        else:
            res["outcome"], res["why"] = "undecided", "between the thresholds"
        return res

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        rule = (f"rule per task: BN drop per device (acc@32 - mean acc@2,4, optimizer batch 32) >= {self.BN_MARGIN:.0%} "
                f"and > 0 every seed, GN range (equal epochs) "
                f"over B<=32 <= {self.GN_FLAT:.0%}; refuted if BN drop < {self.BN_NONE:.1%} (mean) and < "
                f"{self.BN_MARGIN:.0%} every seed, or GN range > {self.GN_STEEP:.0%}; over the valid tasks")
        per = {name: self.judge_task(t["acc"], t.get("devices")) for name, t in data["tasks"].items()}
        effect: dict[str, Any] = {name: {k: v for k, v in r.items() if k != "text"} for name, r in per.items()}
        effect["thresholds"] = {"bn_margin": self.BN_MARGIN, "bn_none": self.BN_NONE, "gn_flat": self.GN_FLAT,
                                "gn_steep": self.GN_STEEP}
        nums = "; ".join(f"{name}: {r['outcome']} ({r['why']}): {r['text']}" for name, r in per.items())
        valid = [r for r in per.values() if r["outcome"] != "invalid"]
        published = self.published_vs(per)
        if not valid:
            return [Verdict.invalid("C17", f"on no task was no normalization worse than BN at B=32. {nums}", effect,
                                    published)]
        outcomes = {r["outcome"] for r in valid}
        verdict = "supported" if outcomes == {"supported"} else "refuted" if outcomes == {"refuted"} else "inconclusive"
        return [Verdict("C17", verdict, f"{rule}. {nums}", effect, published=published)]

    def published_vs(self, per: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Wu & He's table next to the measured accuracies; the trend agrees where BN loses more at 2-4 images
        per device than GN does at 2-4 (BN drop > GN drop) and GN is flat (range <= the rule's flat threshold)."""
        p = self.PUBLISHED
        pub_bn_drop = (p["BN"][-1] + p["BN"][-2]) / 2 - p["BN"][0]
        pub_gn_drop = (p["GN"][-1] + p["GN"][-2]) / 2 - p["GN"][0]
        measured = {}
        agrees = {}
        for name, r in per.items():
            bn_d, gn_d = r["bn_drop"]["mean"], r["gn_drop"]["mean"]
            measured[name] = {"BN_drop_points": 100 * bn_d, "GN_drop_points": 100 * gn_d,
                              "BN_drop_points_one_device": 100 * r["bn_drop_one_device"]["mean"],
                              "accuracy_by_B": {n: {b: round(100 * v["mean"], 1) for b, v in t.items()}
                                                for n, t in r["mean_acc"].items() if n in ("batch", "group")},
                              "BN_accuracy_per_device": {g: round(100 * v["mean"], 1)
                                                         for g, v in r["mean_acc_per_device"].items()}}
            agrees[name] = bool(bn_d > gn_d and r["gn_range_b_le_32"] <= self.GN_FLAT)
        return {"source": p["source"], "published": {k: p[k] for k in ("images_per_gpu", "BN", "GN", "at_32")},
                "published_trend": f"BN error +{pub_bn_drop:.1f} points at 2-4 images vs 32, GN {pub_gn_drop:+.1f}",
                "measured": measured, "trend_agrees": agrees}

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        return [self._plot_task(name, t, self.task_params(params, name)) for name, t in data["tasks"].items()]

    def _per_device_curve(self, data: dict[str, Any]) -> dict[int, float]:
        """BN's seed-mean accuracy by examples per device g (none without per-device runs)."""
        if not data.get("devices"):
            return {}
        runs = self.per_device_runs(data["acc"], data["devices"])
        return {int(g): spread(v.values())["mean"] for g, v in sorted(runs.items(), key=lambda kv: int(kv[0]))}

    def _plot_task(self, name: str, data: dict[str, Any], params: dict[str, Any]) -> Any:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        ax = axes[0]
        for norm, t in data["acc"].items():
            bs = sorted(t, key=int)
            sp = [spread(t[b].values()) for b in bs]
            x = [int(b) for b in bs]
            m = [s["mean"] for s in sp]
            ax.plot(x, m, "o-", color=NORM_COLORS.get(norm), label=NORM_LABELS.get(norm, norm))
            ax.fill_between(x, [s["min"] for s in sp], [s["max"] for s in sp], color=NORM_COLORS.get(norm), alpha=0.15)
        dev = self._per_device_curve(data)
        if dev:
            ax.plot(list(dev), [m for m in dev.values()], "s--", color=NORM_COLORS["batch"],
                    label=f"BatchNorm per device (optimizer batch {self.TOTAL})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch B (solid) / examples per device g (dashed), log2 scale")
        ax.set_ylabel("final validation accuracy (fraction)")
        ax.set_title(f"{name}, {params['epochs']} epochs, lr = {params['lr32']} * B/32 (mean, min..max)")
        ax.legend()
        ax = axes[1]
        for norm, t in data["acc"].items():
            if "32" not in t:
                continue
            ref = spread(t["32"].values())["mean"]
            bs = sorted(t, key=int)
            ax.plot([int(b) for b in bs], [100 * (ref - spread(t[b].values())["mean"]) for b in bs], "o-",
                    color=NORM_COLORS.get(norm), label=NORM_LABELS.get(norm, norm))
        if dev and self.TOTAL in dev:
            ax.plot(list(dev), [100 * (dev[self.TOTAL] - m) for m in dev.values()], "s--", color=NORM_COLORS["batch"],
                    label="BatchNorm per device")
        ax.axhline(100 * self.BN_MARGIN, color="k", ls="--", lw=0.8, label=f"BN margin {self.BN_MARGIN:.0%}")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch B (solid) / examples per device g (dashed), log2 scale")
        ax.set_ylabel("accuracy lost vs B=32 (percentage points)")
        ax.set_title("Drop relative to batch 32 (cf. Wu & He, Fig. 1)")
        ax.legend()
        fig.suptitle(f"C17: normalization layers vs batch size ({name})")
        fig.tight_layout()
        return fig


# ----------------------------------------------------------------------------------------------
# C18: EMA vs precise vs batch statistics at evaluation
# ----------------------------------------------------------------------------------------------

_BN = nn.modules.batchnorm._BatchNorm


def _batch_chunks(n: int, b: int) -> list[tuple[int, int]]:
    """``[start, end)`` chunks of ``b`` covering ``n``; a last chunk of 1 is merged into the previous."""
    chunks = [(s, min(s + b, n)) for s in range(0, n, b)]
    if len(chunks) > 1 and chunks[-1][1] - chunks[-1][0] < 2:
        chunks[-2] = (chunks[-2][0], n)
        chunks.pop()
    return chunks


@torch.no_grad()
def batch_stats_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Any, batch_size: int) -> tuple[float, float]:
    """Loss and metric with every BN layer normalizing by the evaluation batch's own statistics."""
    m = copy.deepcopy(model)
    m.eval()
    for mod in m.modules():
        if isinstance(mod, _BN):
            mod.train()
            mod.momentum = 0.0  # leave the (copied) running stats alone
    outs = [m(x[s:e]) for s, e in _batch_chunks(x.shape[0], batch_size)]
    logits = torch.cat(outs)
    return float(task.loss(logits, y)), float(task.metric(logits, y))


def _stat_distance(ema: list[tuple[torch.Tensor, torch.Tensor]], pop: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """How far EMA statistics are from population ones: mean |d mean| / pop std, mean |log var ratio|."""
    dm, dv = [], []
    for (em, ev), (pm, pv) in zip(ema, pop):
        dm.append(float(((em - pm).abs() / (pv + 1e-5).sqrt()).mean()))
        dv.append(float(((ev + 1e-5) / (pv + 1e-5)).log().abs().mean()))
    return {"mean_shift_in_std": float(np.mean(dm)), "abs_log_var_ratio": float(np.mean(dv))}


@register
class BNEvalStats(Experiment):
    id = "bn_eval_stats"
    claims = ("C18",)
    title = "BN at test time: EMA running statistics vs precise population statistics vs batch statistics"
    seed_doc = "002, 004"
    statements = {
        "C18": "At test time BN uses statistics gathered in training; how they are gathered matters "
        "(Rethinking 'Batch' in BatchNorm)."
    }
    rules = {
        "C18": "digits-mlp with BatchNorm (3 hidden layers), trained at batch 16 for a fixed number of epochs with "
        "BN momentum m (torch convention: weight of the new batch) in the grid. The same trained weights are "
        "evaluated three ways: EMA running stats, precise stats (population mean/var pooled over the whole training "
        "set in train-mode batches of 16), and each val batch's own stats (batches of 16). Per momentum, gap = "
        "acc(precise) - acc(EMA) per seed. Supported if the seed-mean gap is >= -0.5 points at every momentum. "
        "Refuted if at some momentum the seed-mean gap is < -1 point and negative in every seed. Otherwise "
        "inconclusive. The gaps (and batch-stat accuracy) are reported per momentum. Precise stats come from the "
        "library's batchlab.norm.precise_bn (the same code `batchlab` users call)."
    }
    validity = {
        "C18": "The BN net must learn the task: seed-mean EMA val accuracy >= 80% at the task's usual momentum 0.1 "
        "(or the best momentum tested). Otherwise there is nothing for the statistics to preserve."
    }
    TOL = 0.005
    REFUTE = 0.01

    def params(self, quick: bool) -> dict[str, Any]:
        if quick:
            return {"task": "digits-mlp", "batch_size": 16, "epochs": 4, "lr": 0.02, "momenta": [0.01, 0.1, 0.9]}
        return {"task": "digits-mlp", "batch_size": 16, "epochs": 6, "lr": 0.02,
                "momenta": [0.001, 0.01, 0.1, 0.5, 0.9]}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        with one_thread(ctx.device):
            return self._run(ctx, params)

    def _run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in params["momenta"]:
            for seed in ctx.seeds:
                key = {k: params[k] for k in ("task", "batch_size", "epochs", "lr")}
                out.setdefault(str(m), {})[str(seed)] = ctx.cached(
                    "eval_stats", {**key, "bn_momentum": m, "seed": seed},
                    lambda m=m, seed=seed: self._one(ctx, params, m, seed))
        return {"runs": out}

    def _one(self, ctx: ExperimentContext, p: dict[str, Any], m: float, seed: int) -> dict[str, Any]:
        from batchlab.train.loop import evaluate, fit

        task = ctx.task(p["task"])
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = task.make_model(norm=functools.partial(nn.BatchNorm1d, momentum=m))
        cfg = TrainConfig(batch_size=p["batch_size"], lr=p["lr"], optimizer="momentum", epochs=p["epochs"],
                          seed=seed, eval_train=False, device=ctx.device)
        res = fit(task, cfg, model=model, raise_errors=False)
        if not res.ok:
            return {"status": res.status, "error": res.error}
        model = model.cpu()
        vx, vy = task.val_set.x, task.val_set.y
        _, acc_ema = evaluate(model, vx, vy, task)
        bns = [mod for mod in model.modules() if isinstance(mod, _BN)]
        ema = [(b.running_mean.clone(), b.running_var.clone()) for b in bns]
        _, acc_batch = batch_stats_eval(model, vx, vy, task, p["batch_size"])
        chunks = [task.train_set.x[a:b] for a, b in _batch_chunks(len(task.train_set.x), p["batch_size"])]
        precise_bn(model, chunks, num_batches=len(chunks))
        pop = [(b.running_mean.clone(), b.running_var.clone()) for b in bns]
        _, acc_precise = evaluate(model, vx, vy, task)
        return {"status": "ok", "acc_ema": acc_ema, "acc_precise": acc_precise, "acc_batch": acc_batch,
                "steps": res.steps, **_stat_distance(ema, pop)}

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        rule = (f"rule: seed-mean acc(precise) - acc(EMA) >= -{self.TOL:.1%} at every momentum; refuted if < "
                f"-{self.REFUTE:.0%} and negative in every seed at some momentum")
        per: dict[str, Any] = {}
        for m, seeds in data["runs"].items():
            ok = [r for r in seeds.values() if r.get("status") == "ok"]
            if not ok:
                continue
            per[m] = {
                "gap_precise_minus_ema": spread(r["acc_precise"] - r["acc_ema"] for r in ok),
                "gap_batch_minus_ema": spread(r["acc_batch"] - r["acc_ema"] for r in ok),
                "acc_ema": spread(r["acc_ema"] for r in ok), "acc_precise": spread(r["acc_precise"] for r in ok),
                "acc_batch": spread(r["acc_batch"] for r in ok),
                "ema_mean_shift_in_std": spread(r["mean_shift_in_std"] for r in ok),
            }
        effect = {"per_momentum": per, "thresholds": {"tol": self.TOL, "refute": self.REFUTE}}
        if not per:
            return [Verdict.invalid("C18", f"no run finished. {rule}", effect)]
        best_ema = max(v["acc_ema"]["mean"] for v in per.values())
        if not best_ema >= 0.8:
            return [Verdict.invalid("C18", f"the BN net did not learn the task (best seed-mean EMA accuracy "
                                    f"{best_ema:.3f} < 0.8). {rule}", effect)]
        gaps = "; ".join(f"m={m}: {fmt_spread(v['gap_precise_minus_ema'])}" for m, v in
                         sorted(per.items(), key=lambda kv: float(kv[0])))
        bad = [m for m, v in per.items() if v["gap_precise_minus_ema"]["mean"] < -self.REFUTE
               and v["gap_precise_minus_ema"]["max"] < 0]
        if bad:
            return [Verdict("C18", "refuted", f"{rule}. Precise stats worse than EMA at momentum {', '.join(bad)}. "
                            f"Gaps precise - EMA: {gaps}", effect)]
        missing = [m for m in (str(x) for x in params["momenta"]) if m not in per]
        if not missing and all(v["gap_precise_minus_ema"]["mean"] >= -self.TOL for v in per.values()):
            return [Verdict("C18", "supported", f"{rule}. Gaps precise - EMA: {gaps}", effect)]
        why = f"no finished run at momentum {', '.join(missing)}" if missing else "a gap between the thresholds"
        return [Verdict("C18", "inconclusive", f"{rule}. {why}. Gaps precise - EMA: {gaps}", effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        ms = sorted(data["runs"], key=float)
        ax = axes[0]
        for key, label, color in (("acc_ema", "EMA running stats", "C3"), ("acc_precise", "precise (population) stats", "C0"),
                                  ("acc_batch", f"batch stats (eval batch {params['batch_size']})", "C2")):
            sp = [spread(r.get(key) for r in data["runs"][m].values() if r.get("status") == "ok") for m in ms]
            x = [float(m) for m in ms]
            ax.errorbar(x, [s["mean"] for s in sp], yerr=[[s["mean"] - s["min"] for s in sp], [s["max"] - s["mean"] for s in sp]],
                        fmt="o-", color=color, capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("BN momentum m (weight of the newest batch, log scale)")
        ax.set_ylabel("validation accuracy (fraction)")
        ax.set_title(f"{params['task']}, batch {params['batch_size']}, {params['epochs']} epochs (mean, min..max)")
        ax.legend()
        ax = axes[1]
        sp = [spread(r.get("mean_shift_in_std") for r in data["runs"][m].values() if r.get("status") == "ok") for m in ms]
        sv = [spread(r.get("abs_log_var_ratio") for r in data["runs"][m].values() if r.get("status") == "ok") for m in ms]
        x = [float(m) for m in ms]
        ax.plot(x, [s["mean"] for s in sp], "o-", color="C1", label="|EMA mean - population mean| / population std")
        ax.plot(x, [s["mean"] for s in sv], "s--", color="C5", label="|log(EMA var / population var)|")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("BN momentum m (log scale)")
        ax.set_ylabel("distance of EMA stats from population stats (log scale)")
        ax.set_title("How far the EMA statistics are off (mean over channels and layers)")
        ax.legend()
        fig.suptitle("C18: which statistics BN uses at test time")
        fig.tight_layout()
        return [fig]


# ----------------------------------------------------------------------------------------------
# C20: BN vs LN on padded sequences
# ----------------------------------------------------------------------------------------------

SEQ_ARMS = {"layer": "LayerNorm", "batch": "BatchNorm (padding in stats)", "batch_masked": "BatchNorm (real tokens only)"}
SEQ_COLORS = {"layer": "C2", "batch": "C3", "batch_masked": "C1"}


def _padded_task(ctx: ExperimentContext, p: dict[str, Any], pad_to: int) -> Any:
    """The sequence task with every sequence right-padded with zeros (mask 0) to ``pad_to`` positions."""
    from batchlab.data.sequence import SequenceDataset
    from batchlab.tasks import Task

    base = ctx.task(p["task"], n_samples=p["n_samples"], max_len=p["max_len"])
    if pad_to == p["max_len"]:
        return base
    key = f"_padded_{pad_to}"
    if key not in ctx._tasks:
        def pad(ds: Any) -> Any:
            extra = torch.zeros(ds.x.shape[0], pad_to - ds.x.shape[1], ds.x.shape[2], dtype=ds.x.dtype)
            return SequenceDataset(torch.cat([ds.x, extra], dim=1), ds.y)

        ctx._tasks[key] = Task(
            name=base.name, model_fn=base.model_fn, train_set=pad(base.train_set), val_set=pad(base.val_set),
            num_classes=base.num_classes, optimizer=base.optimizer, lr=base.lr, batch_size=base.batch_size,
            epochs=base.epochs, norm=base.norm, description=base.description + f", padded to {pad_to}",
            info={**base.info, "pad_to": pad_to})
    return ctx._tasks[key]


@torch.no_grad()
def padding_stats(task: Any, batch_size: int, n_batches: int, seed: int) -> dict[str, float]:
    """BN's batch statistics at the first norm layer of a fresh SequenceNet, with and without padding.

    For ``n_batches`` random training batches, the per-channel mean and variance of the norm's
    input are computed over all positions (as an unmasked BN does) and over real tokens only.
    Returns the padding fraction, the mean |mean error| and |log var ratio| (relative to the
    real-token statistics, in units of the real-token std), and the batch-to-batch std of the
    per-channel means, both ways.
    """
    from batchlab.models.sequence import SequenceNet

    torch.manual_seed(seed)
    x = task.train_set.x
    model = SequenceNet(x.shape[-1] - 1, task.num_classes, norm="batch")
    block = model.blocks[0]
    g = torch.Generator().manual_seed(seed)
    mean_all, mean_real, err_m, err_v, pad = [], [], [], [], []
    for _ in range(n_batches):
        xb = x[torch.randint(x.shape[0], (batch_size,), generator=g)]
        mask = xb[..., -1] > 0.5
        h = model.proj(xb[..., :-1]) * mask.unsqueeze(-1)
        z = block.fc1(h)
        flat, real = z.reshape(-1, z.shape[-1]), z[mask]
        ma, va = flat.mean(0), flat.var(0, unbiased=False)
        mr, vr = real.mean(0), real.var(0, unbiased=False)
        mean_all.append(ma)
        mean_real.append(mr)
        err_m.append(float(((ma - mr).abs() / (vr + 1e-5).sqrt()).mean()))
        err_v.append(float(((va + 1e-5) / (vr + 1e-5)).log().abs().mean()))
        pad.append(1.0 - float(mask.float().mean()))
    return {
        "padding_fraction": float(np.mean(pad)),
        "mean_error_in_std": float(np.mean(err_m)),
        "abs_log_var_ratio": float(np.mean(err_v)),
        "batch_std_of_mean_with_padding": float(torch.stack(mean_all).std(0).mean()),
        "batch_std_of_mean_real_only": float(torch.stack(mean_real).std(0).mean()),
    }


@register
class SeqNorm(Experiment):
    id = "seq_norm"
    claims = ("C20",)
    title = "LayerNorm vs BatchNorm on padded variable-length sequences"
    seed_doc = "004"
    statements = {"C20": "NLP models use LayerNorm rather than BatchNorm because sequences vary in length."}
    rules = {
        "C20": "sequence-cls (lengths 4..32, position-wise residual net, masked mean pool), sequences padded to L "
        "positions (L in the grid: more padding), same steps, batch and LR for every arm. Arms: LayerNorm; "
        "BatchNorm over all positions (padding enters its statistics, as in a naive implementation); BatchNorm over "
        "real tokens only (for reference). Per L, diff = acc(LN) - acc(BN over all positions) per seed. Supported if "
        "the seed-mean diff is >= -0.5 points at every L. Refuted if at some L the seed-mean diff is < -1 point and "
        "negative in every seed. Otherwise inconclusive. The effect of padding on BN's batch statistics (mean and "
        "variance with vs without padded positions) is measured and shown for every L."
    }
    validity = {
        "C20": "Padding must disturb BN's batch statistics at all: at the longest padded length, BN's per-batch mean "
        "with padded positions differs from the real-token mean by >= 0.1 (in units of the real-token std)."
    }
    PAD_EFFECT = 0.1
    TOL = 0.005
    REFUTE = 0.01

    def params(self, quick: bool) -> dict[str, Any]:
        base = {"task": "sequence-cls", "n_samples": 4000, "max_len": 32, "batch_size": 32, "lr": 0.05,
                "stat_batches": 20}
        if quick:
            return {**base, "pads": [32, 64], "max_steps": 200}
        return {**base, "pads": [32, 64, 128], "max_steps": 400}

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        with one_thread(ctx.device):
            return self._run(ctx, params)

    def _run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        from batchlab.models.sequence import SequenceNet

        acc: dict[str, dict[str, dict[str, float]]] = {}
        curves: dict[str, dict[str, Any]] = {}
        stats: dict[str, Any] = {}
        for L in params["pads"]:
            task = _padded_task(ctx, params, L)
            dim = task.train_set.x.shape[-1] - 1
            stats[str(L)] = ctx.cached("padding_stats", {"pad_to": L, "batch_size": params["batch_size"],
                                                         "n_batches": params["stat_batches"], "n": params["n_samples"]},
                                       lambda task=task: padding_stats(task, params["batch_size"], params["stat_batches"], 0))
            for arm in SEQ_ARMS:
                for seed in ctx.seeds:
                    cfg = TrainConfig(batch_size=params["batch_size"], lr=params["lr"], optimizer="momentum",
                                      max_steps=params["max_steps"], eval_every=max(1, params["max_steps"] // 8),
                                      eval_train=False, seed=seed, norm="batch" if arm != "layer" else "layer")
                    if arm == "batch_masked":
                        r = ctx.fit(task, cfg, model_fn=lambda dim=dim, task=task: SequenceNet(
                            dim, task.num_classes, norm="batch", masked_norm=True), variant="masked_bn")
                    else:
                        r = ctx.fit(task, cfg)
                    acc.setdefault(str(L), {}).setdefault(arm, {})[str(seed)] = r.metric("val_acc") if r.ok else math.nan
                    curves.setdefault(str(L), {}).setdefault(arm, {})[str(seed)] = {
                        "step": r.series("step"), "val_acc": r.series("val_acc")}
        return {"acc": acc, "curves": curves, "padding_stats": stats}

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        rule = (f"rule: seed-mean acc(LN) - acc(BN with padding) >= -{self.TOL:.1%} at every padded length; refuted "
                f"if < -{self.REFUTE:.0%} and negative in every seed at some length")
        diffs: dict[str, dict[str, float]] = {}
        for L, arms in data["acc"].items():
            ln, bn = arms.get("layer", {}), arms.get("batch", {})
            d = {}
            for s in ln:
                if s in bn and math.isfinite(ln[s]):
                    d[s] = ln[s] - (bn[s] if math.isfinite(bn[s]) else 0.0)
            if d:
                diffs[L] = d
        ps = data.get("padding_stats", {})
        effect = {"ln_minus_bn": {L: spread(d.values()) for L, d in diffs.items()},
                  "acc": {L: {a: spread(v.values()) for a, v in arms.items()} for L, arms in data["acc"].items()},
                  "padding_stats": ps, "thresholds": {"tol": self.TOL, "refute": self.REFUTE}}
        pad_note = "; ".join(
            f"L={L}: {100 * s['padding_fraction']:.0f}% padding, BN mean off by {s['mean_error_in_std']:.2f} std, "
            f"|log var ratio| {s['abs_log_var_ratio']:.2f}" for L, s in sorted(ps.items(), key=lambda kv: int(kv[0])))
        if not diffs:
            return [Verdict("C20", "inconclusive", f"{rule}. No finished LN/BN pair", effect)]
        longest = max(ps, key=int) if ps else None
        if longest is None or not ps[longest]["mean_error_in_std"] >= self.PAD_EFFECT:
            return [Verdict.invalid("C20", f"padding did not move BN's batch mean by {self.PAD_EFFECT} std at the "
                                    f"longest length ({pad_note or 'no padding statistics'})", effect)]
        nums = "; ".join(f"L={L}: {fmt_spread(effect['ln_minus_bn'][L])}" for L in sorted(diffs, key=int))
        bad = [L for L, s in effect["ln_minus_bn"].items() if s["mean"] < -self.REFUTE and s["max"] < 0]
        if bad:
            return [Verdict("C20", "refuted", f"{rule}. LN worse than BN at L={', '.join(bad)}. LN - BN: {nums}. "
                            f"Padding: {pad_note}", effect)]
        missing = [str(L) for L in params["pads"] if str(L) not in diffs]
        if not missing and all(s["mean"] >= -self.TOL for s in effect["ln_minus_bn"].values()):
            return [Verdict("C20", "supported", f"{rule}. LN - BN: {nums}. Padding: {pad_note}", effect)]
        why = f"no runs at L={', '.join(missing)}" if missing else "a difference between the thresholds"
        return [Verdict("C20", "inconclusive", f"{rule}. {why}. LN - BN: {nums}. Padding: {pad_note}", effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
        Ls = sorted(data["acc"], key=int)
        ps = data.get("padding_stats", {})
        xfrac = [100 * ps[L]["padding_fraction"] if L in ps else float(L) for L in Ls]
        ax = axes[0]
        for arm, label in SEQ_ARMS.items():
            sp = [spread(data["acc"][L].get(arm, {}).values()) for L in Ls]
            ax.errorbar(xfrac, [s["mean"] for s in sp], yerr=[[s["mean"] - s["min"] for s in sp], [s["max"] - s["mean"] for s in sp]],
                        fmt="o-", capsize=3, color=SEQ_COLORS[arm], label=label)
        ax.set_xlabel("padding fraction of the positions (%)")
        ax.set_ylabel("final validation accuracy (fraction)")
        ax.set_title(f"Accuracy vs padding ({params['max_steps']} steps, batch {params['batch_size']}; mean, min..max)")
        ax.legend()
        ax = axes[1]
        L0 = Ls[-1]
        for arm, label in SEQ_ARMS.items():
            for i, (s, c) in enumerate(sorted(data["curves"][L0].get(arm, {}).items())):
                ax.plot(c["step"], c["val_acc"], color=SEQ_COLORS[arm], alpha=0.8, label=label if i == 0 else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation accuracy (fraction)")
        ax.set_title(f"Training curves at L={L0} (every seed)")
        ax.legend()
        ax = axes[2]
        if ps:
            ax.plot(xfrac, [ps[L]["mean_error_in_std"] for L in Ls], "o-", color="C3",
                    label="|mean(all positions) - mean(real tokens)| / std(real)")
            ax.plot(xfrac, [ps[L]["abs_log_var_ratio"] for L in Ls], "s-", color="C4",
                    label="|log var(all positions) / var(real tokens)|")
            ax.plot(xfrac, [ps[L]["batch_std_of_mean_with_padding"] for L in Ls], "^--", color="C5",
                    label="batch-to-batch std of the mean, with padding")
            ax.plot(xfrac, [ps[L]["batch_std_of_mean_real_only"] for L in Ls], "v--", color="C2",
                    label="batch-to-batch std of the mean, real tokens")
        ax.set_xlabel("padding fraction of the positions (%)")
        ax.set_ylabel("error of BN's batch statistics (std units / log ratio)")
        ax.set_title("Padding distorts BN's batch statistics (first norm layer, init)")
        ax.legend(fontsize=8)
        fig.suptitle("C20: LayerNorm vs BatchNorm on padded sequences")
        fig.tight_layout()
        return [fig]
