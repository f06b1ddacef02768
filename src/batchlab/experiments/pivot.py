"""C14: the pivot search over batch sizes (powers of 2 around 128) against the full grid 2..512."""

from __future__ import annotations

import math
from typing import Any

from batchlab.experiments.base import Experiment, ExperimentContext, Verdict, one_thread, register, spread
from batchlab.experiments.kit import pyplot
from batchlab.train import TrainConfig, default_lr_rule, scale_lr




@register
class PivotSearch(Experiment):
    id = "pivot_search"
    claims = ("C14",)
    title = "Pivot search over batch sizes (halve or double from 128) vs the full power-of-2 grid"
    seed_doc = "000"
    statements = {
        "C14": "Search the batch size as powers of 2 around 128: halve (or double) while it helps, within 2..512."
    }
    rules = {
        "C14": "digits-mlp, every trial the same budget in examples, momentum SGD with the LR scaled linearly from "
        "the task's (0.05 at B=128), the same seeds. The full grid trains every power of 2 in 2..512; "
        "batchlab.batchsize.pivot_search starts at 128 and halves or doubles while the seed-mean val accuracy "
        "improves by more than the pooled seed-to-seed std. Cost = training examples of the distinct trials. "
        "The budget is 2 epochs, so that the best batch lies far from 128 (checked below). Cost = training "
        "examples and training time of the distinct trials, each as a fraction of the grid's. The null is 'stay at "
        "128' (no search). Supported if |log2(search result) - log2(grid best)| <= 1, the search cost <= 50% of the "
        "grid's in examples and in time, and the search result beats staying at 128 by more than the pooled seed "
        "std. Refuted if the cost is > 50% (examples or time), or the result is more than one power of 2 from the "
        "grid best AND its accuracy is below the grid best's by more than the pooled seed std, or it does not beat "
        "128. Otherwise (more than one power of 2 away but within noise: a flat optimum) inconclusive."
    }
    validity = {
        "C14": "The grid's best batch must lie two or more powers of 2 from the starting point 128 (and beat 128 by "
        "more than the seed std); otherwise 'stay at 128' is already as good and the search has nothing to find."
    }
    COST_FRACTION = 0.5
    MAX_OCTAVES = 1

    def params(self, quick: bool) -> dict[str, Any]:
        return {"task": "digits-mlp", "pivot": 128, "low": 2, "high": 512, "lr": 0.05, "lr_batch": 128,
                "optimizer": "momentum", "epochs": 2}

    def _config(self, p: dict[str, Any], n: int, b: int, seed: int, device: str) -> TrainConfig:
        rule = default_lr_rule(p["optimizer"])
        return TrainConfig(batch_size=b, accumulation=1, lr=scale_lr(p["lr"], p["lr_batch"], b, rule),
                           optimizer=p["optimizer"], max_examples=max(1, round(p["epochs"] * n)), seed=seed,
                           norm=None, device=device, eval_train=False)

    def run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        with one_thread(ctx.device):
            return self._run(ctx, params)

    def _run(self, ctx: ExperimentContext, params: dict[str, Any]) -> dict[str, Any]:
        from batchlab.batchsize.search import pivot_search

        task = ctx.task(params["task"])
        n = len(task.train_set)
        grid: dict[str, dict[str, Any]] = {}
        b = params["low"]
        while b <= params["high"]:
            for seed in ctx.seeds:
                r = ctx.fit(task, self._config(params, n, b, seed, ctx.device))
                grid.setdefault(str(b), {})[str(seed)] = {
                    "status": r.status, "metric": r.metric("val_acc") if r.ok else math.nan, "examples": r.examples,
                    "train_time": r.train_time, "steps": r.steps}
            b *= 2

        def trial_fn(t: Any, cfg: TrainConfig) -> dict[str, Any]:  # the search's trials go through ctx.fit too
            r = ctx.fit(t, cfg)
            return {"status": r.status, "metric": r.metric("val_acc") if r.ok else math.nan, "examples": r.examples,
                    "time": r.train_time, "steps": r.steps, "error": r.error}

        res = pivot_search(task, params["pivot"], params["low"], params["high"], seeds=list(ctx.seeds),
                           budget_epochs=params["epochs"], lr=params["lr"], lr_batch=params["lr_batch"],
                           optimizer=params["optimizer"], device=ctx.device, store=None, trial_fn=trial_fn)
        return {"grid": grid, "search": {"best_batch": res.best_batch, "path": res.path, "means": res.means,
                                         "noise": res.noise, "stop_reason": res.stop_reason,
                                         "budget_examples": res.budget_examples, "notes": res.notes}}

    def decide(self, data: dict[str, Any], params: dict[str, Any]) -> list[Verdict]:
        rule = (f"rule: |log2(search) - log2(grid best)| <= {self.MAX_OCTAVES}, search cost <= "
                f"{self.COST_FRACTION:.0%} of the grid's examples and time, better than staying at the pivot; refuted if cost > {self.COST_FRACTION:.0%} or "
                f"farther AND worse than the grid best by more than the seed std")
        grid, search = data["grid"], data["search"]

        def score(runs: dict[str, Any]) -> float:
            vals = [r["metric"] for r in runs.values()]
            return -math.inf if not vals or any(not math.isfinite(v) for v in vals) else sum(vals) / len(vals)

        means = {int(b): score(r) for b, r in grid.items()}
        ok = {b: m for b, m in means.items() if m > -math.inf}
        grid_examples = sum(r["examples"] for runs in grid.values() for r in runs.values())
        grid_time = sum(r["train_time"] for runs in grid.values() for r in runs.values())
        path = [int(b) for b in search.get("path", [])]
        search_examples = sum(r["examples"] for b in path if str(b) in grid for r in grid[str(b)].values())
        search_time = sum(r["train_time"] for b in path if str(b) in grid for r in grid[str(b)].values())
        effect: dict[str, Any] = {
            "grid_mean_acc": {str(b): m for b, m in sorted(means.items())},
            "grid_best": max(ok, key=ok.get) if ok else None, "search_best": search.get("best_batch"),
            "search_path": path, "cost_fraction_examples": search_examples / grid_examples if grid_examples else math.nan,
            "cost_fraction_train_time": search_time / grid_time if grid_time else math.nan,
            "noise": search.get("noise"), "thresholds": {"cost": self.COST_FRACTION, "octaves": self.MAX_OCTAVES},
        }
        if not ok or search.get("best_batch") is None:
            return [Verdict("C14", "inconclusive", f"{rule}. Every grid or search trial failed", effect)]
        gb, sb = effect["grid_best"], int(search["best_batch"])
        octaves = abs(math.log2(sb) - math.log2(gb))
        effect["octaves_apart"] = octaves
        gap = ok[gb] - means.get(sb, -math.inf)
        effect["acc_gap_grid_best_minus_search"] = gap
        noise = float(search.get("noise") or 0.0)
        nums = (f"grid best B={gb} (acc {ok[gb]:.3f}), search B={sb} (acc {means.get(sb, math.nan):.3f}) via path "
                f"{path}; {octaves:g} powers of 2 apart; cost {effect['cost_fraction_examples']:.0%} of the grid's "
                f"examples ({effect['cost_fraction_train_time']:.0%} of its training time); seed std {noise:.3f}")
        pivot = int(params["pivot"])
        at_pivot = means.get(pivot, -math.inf)
        effect["acc_at_pivot"] = at_pivot
        effect["grid_best_octaves_from_pivot"] = abs(math.log2(gb) - math.log2(pivot))
        nums += f"; staying at {pivot}: acc {at_pivot:.3f}"
        if effect["grid_best_octaves_from_pivot"] < 2 or not ok[gb] - at_pivot > noise:
            return [Verdict.invalid("C14", f"the grid's best batch B={gb} is within one power of 2 of {pivot} or not "
                                    f"better than {pivot} by more than the seed std, so 'stay at {pivot}' is already "
                                    f"as good. {nums}", effect)]
        beats_null = means.get(sb, -math.inf) - at_pivot > noise
        if effect["cost_fraction_examples"] > self.COST_FRACTION or effect["cost_fraction_train_time"] > self.COST_FRACTION:
            return [Verdict("C14", "refuted", f"{rule}. The search was not cheap: {nums}", effect)]
        if not beats_null:
            return [Verdict("C14", "refuted", f"{rule}. The search did not beat staying at {pivot}: {nums}", effect)]
        if octaves <= self.MAX_OCTAVES:
            return [Verdict("C14", "supported", f"{rule}. {nums}", effect)]
        if gap > noise:
            return [Verdict("C14", "refuted", f"{rule}. The search stopped far from the grid best and worse: {nums}",
                            effect)]
        return [Verdict("C14", "inconclusive", f"{rule}. Far from the grid's arg-max but within seed noise (flat "
                        f"optimum): {nums}", effect)]

    def plot(self, data: dict[str, Any], params: dict[str, Any]) -> list[Any]:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        grid, search = data["grid"], data["search"]
        bs = sorted(grid, key=int)
        sp = [spread(r["metric"] for r in grid[b].values()) for b in bs]
        x = [int(b) for b in bs]
        ax = axes[0]
        ax.errorbar(x, [s["mean"] for s in sp], yerr=[[s["mean"] - s["min"] for s in sp], [s["max"] - s["mean"] for s in sp]],
                    fmt="o-", color="C7", capsize=3, label="full grid (mean, min..max over seeds)")
        path = [int(b) for b in search.get("path", [])]
        means = {int(b): m for b, m in search.get("means", {}).items()}
        ax.plot(path, [means.get(b, math.nan) for b in path], "C3--", lw=1)
        for i, b in enumerate(path):
            ax.annotate(str(i + 1), (b, means.get(b, math.nan)), textcoords="offset points", xytext=(4, 6), color="C3")
        ax.plot(path, [means.get(b, math.nan) for b in path], "o", color="C3", ms=9, mfc="none", mew=2, zorder=5,
                label="pivot search (order of visits)")
        if search.get("best_batch"):
            ax.axvline(search["best_batch"], color="C3", ls=":", label=f"search result B={search['best_batch']}")
        fin = [(b, s["mean"]) for b, s in zip(x, sp) if math.isfinite(s["mean"])]
        if fin:
            gb = max(fin, key=lambda t: t[1])[0]
            ax.axvspan(gb / 2, gb * 2, color="C2", alpha=0.1, label=f"grid best B={gb} +- one power of 2")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size B (examples, log2 scale)")
        ax.set_ylabel("final validation accuracy (fraction)")
        ax.set_title(f"{params['task']}, {params['epochs']} epochs per trial, lr = {params['lr']} * B/{params['lr_batch']}")
        ax.legend(fontsize=8)
        ax = axes[1]
        ex = [sum(r["examples"] for r in grid[b].values()) for b in bs]
        tt = [sum(r["train_time"] for r in grid[b].values()) for b in bs]
        in_path = ["C3" if int(b) in path else "C7" for b in bs]
        ax.bar(range(len(bs)), tt, color=in_path)
        ax.set_xticks(range(len(bs)), bs)
        ax.set_xlabel("batch size B (red: visited by the search)")
        ax.set_ylabel("training time of the trials (s, all seeds)")
        frac_ex = sum(e for b, e in zip(bs, ex) if int(b) in path) / max(1, sum(ex))
        frac_t = sum(t for b, t in zip(bs, tt) if int(b) in path) / max(1e-9, sum(tt))
        ax.set_title(f"Cost: search = {frac_ex:.0%} of the grid's examples, {frac_t:.0%} of its time")
        fig.suptitle("C14: pivot search vs full grid")
        fig.tight_layout()
        return [fig]
