"""Batch-size experiments (C08-C13, C15): decision rules on synthetic data built to make each claim true,
false and undecidable; figures with titles and axis labels; tiny real runs of the measurements."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import pytest
import torch

from batchlab.experiments.base import ExperimentContext
from batchlab.experiments.batch_sharpness import SharpMinima, eps_sharpness
from batchlab.batchsize.throughput import find_knee
from batchlab.experiments.batch_accuracy import BatchLRGrid, FixedEpochBatch, LRBatchRatio
from batchlab.experiments.batch_compute import GradientNoise, StepTime, loglog_slope
from batchlab.experiments.batch_optimizer import LBFGSBatch
from batchlab.store import Store
from tests.helpers.figures import check_figures

SEEDS = ["0", "1", "2"]


def _params(exp: Any, quick: bool = False) -> dict[str, Any]:
    return {**exp.params(quick), "seeds": [0, 1, 2]}


def _verdict(exp: Any, data: dict[str, Any], quick: bool = False) -> str:
    """The verdict, or ``"invalid"`` when the validity check failed (then it must read inconclusive)."""
    (v,) = exp.decide(data, _params(exp, quick))
    assert v.reason and v.claim in exp.claims
    if not v.valid:
        assert v.verdict == "inconclusive" and v.reason.startswith("validity check failed: ")
        return "invalid"
    return v.verdict



# ------------------------------------------------------------------ helpers


def test_loglog_slope_and_knee():
    sl, r2 = loglog_slope([1, 2, 4, 8], [8, 4, 2, 1])
    assert sl == pytest.approx(-1.0) and r2 == pytest.approx(1.0)
    assert math.isnan(loglog_slope([1], [1])[0])
    assert find_knee([1, 2, 4, 8], [10, 50, 95, 100]) == 4


# ------------------------------------------------------------------ C08


def _noise(slopes: list[float], noise: float = 0.0) -> dict[str, Any]:
    B = [1, 2, 4, 8, 16, 32, 64, 128]
    seeds = {}
    for i, sl in enumerate(slopes):
        std = [3.0 * b**sl * (1 + noise * (-1) ** k) for k, b in enumerate(B)]
        seeds[str(i)] = {"points": {"init": {"B": B, "std": std}, "trained": {"B": B, "std": [2 * x for x in std]}}}
    return {"seeds": seeds}


def test_c08_rule():
    exp = GradientNoise()
    assert _verdict(exp, _noise([-0.5, -0.49, -0.52])) == "supported"
    assert _verdict(exp, _noise([-0.8, -0.75, -0.9])) == "refuted"
    assert _verdict(exp, _noise([-0.45, -0.62, -0.5])) == "inconclusive"  # mean inside, one seed outside
    assert _verdict(exp, _noise([-0.5, -0.5, -0.5], noise=0.6)) == "inconclusive"  # poor power-law fit
    small_n = _noise([-0.5, -0.49, -0.52])
    for d in small_n["seeds"].values():
        d["n_train"] = 500  # B = 128 > N/10: the finite-population factor bends the slope
    assert _verdict(exp, small_n) == "invalid"
    check_figures(exp.plot(_noise([-0.5, -0.49, -0.52]), _params(exp)))


# ------------------------------------------------------------------ C09


def _times(kinds: list[str]) -> dict[str, Any]:
    B = [2**i for i in range(11)]
    shapes = {"flat": lambda b: 1e-3 * (1 + b / 256), "linear": lambda b: 1e-3 * b}
    return {"seeds": {str(i): {"threads": 1, "clock": "thread CPU time", "loadavg_before": [0.1, 0.1, 0.1], "configs": {
        "digits-mlp": {"B": B, "n_train": 1438, "t_step": [shapes[k](b) for b in B]},
        "mnist1d-cnn": {"B": B, "n_train": 4000, "t_step": [shapes["flat"](b) for b in B]}}}
        for i, k in enumerate(kinds)}}


def test_c09_rule():
    exp = StepTime()
    assert _verdict(exp, _times(["flat"] * 3)) == "supported"
    assert _verdict(exp, _times(["linear"] * 3)) == "refuted"  # throughput saturated at B=1: time grows like B
    assert _verdict(exp, _times(["flat", "linear", "flat"])) == "inconclusive"
    s = StepTime.summarize(_times(["flat"])["seeds"]["0"]["configs"]["digits-mlp"], 0.9)
    assert s["knee"] == 1024 and s["knee_at_edge"] and s["epoch_time_knee"] < s["epoch_time_bmin"]
    check_figures(exp.plot(_times(["flat"] * 3), _params(exp)))


# ------------------------------------------------------------------ C10


def _fixed(curves: list[list[float]]) -> dict[str, Any]:
    B = [2, 4, 8, 16, 32, 64, 128]
    return {"seeds": {str(i): {"B": B, "val_acc": list(c), "train_acc": [min(1.0, x + 0.03) for x in c],
                               "status": ["ok"] * len(B), "steps": [100] * len(B)} for i, c in enumerate(curves)}}


def test_c10_rule():
    exp = FixedEpochBatch()
    falling = [0.9, 0.93, 0.95, 0.94, 0.9, 0.85, 0.8]
    flat = [0.9, 0.92, 0.93, 0.93, 0.93, 0.93, 0.931]
    assert _verdict(exp, _fixed([falling] * 3)) == "supported"
    assert _verdict(exp, _fixed([flat] * 3)) == "refuted"
    assert _verdict(exp, _fixed([falling, flat, falling])) == "inconclusive"
    diverged = _fixed([falling] * 3)
    diverged["seeds"]["1"]["val_acc"][-1] = None
    assert _verdict(exp, diverged) == "inconclusive"
    assert _verdict(exp, _fixed([[v - 0.3 for v in falling]] * 3)) == "invalid"  # peak 65%: the task is not learned
    check_figures(exp.plot(_fixed([falling] * 3), _params(exp)))


# ------------------------------------------------------------------ C11


def _sharp(ratio: float, gap_diff: float, train_acc: float = 1.0) -> dict[str, Any]:
    seeds = {}
    for s in SEEDS:
        interp = {"alpha": [-0.5, 0.0, 0.5, 1.0, 1.5], "train_loss": [0.01, 0.001, 0.05, 0.001, 5.0],
                  "val_loss": [0.2, 0.1, 0.2, 0.2, 6.0], "train_acc": [1, 1, 0.98, 1, 0.2],
                  "val_acc": [0.95, 0.97, 0.95, 0.96, 0.2]}
        seeds[s] = {"small": {"status": "ok", "train_acc": train_acc, "val_acc": 0.97, "sharpness": {"0.001": 0.1, "0.0005": 0.05}},
                    "large": {"status": "ok", "train_acc": 1.0, "val_acc": 0.97 - 0.03 - gap_diff + (1 - train_acc) + 0.03,
                              "sharpness": {"0.001": 0.1 * ratio, "0.0005": 0.05 * ratio}},
                    "interp": interp}
    return {"seeds": seeds}


def test_c11_rule():
    exp = SharpMinima()
    assert _verdict(exp, _sharp(10.0, 0.03)) == "supported"
    assert _verdict(exp, _sharp(0.5, 0.03)) == "refuted"  # large-batch minima flatter
    assert _verdict(exp, _sharp(10.0, -0.02)) == "refuted"  # large batch generalizes better
    assert _verdict(exp, _sharp(10.0, 0.005)) == "inconclusive"  # gap difference below 1 point
    assert _verdict(exp, _sharp(10.0, 0.03, train_acc=0.9)) == "invalid"  # not converged: no minimum
    (v,) = exp.decide(_sharp(10.0, 0.03), _params(exp))
    assert v.published["trend_agrees"] is True and "Keskar" in v.published["source"]
    check_figures(exp.plot(_sharp(10.0, 0.03), _params(exp)))


def test_eps_sharpness_is_zero_for_a_flat_loss_and_restores_weights():
    from tests.conftest import make_toy_task

    task = make_toy_task()
    model = task.make_model(norm="none")
    w = [p.detach().clone() for p in model.parameters()]
    s = eps_sharpness(model, task, task.train_set.x, task.train_set.y, 1e-3, 5)
    assert s >= 0.0
    assert all(torch.equal(a, b.detach()) for a, b in zip(w, model.parameters()))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert eps_sharpness(model, task, task.train_set.x, task.train_set.y, 1e-3, 5) < 1.0


# ------------------------------------------------------------------ C12


def _ratio(d_matched: list[float], d_unscaled: float = 0.3, d_over: float | None = 0.5,
           ref_acc: float = 0.95) -> dict[str, Any]:
    epochs = list(range(1, 11))
    ref = [1.0 / e + 0.1 for e in epochs]
    seeds = {}
    for s in SEEDS:
        arms = [{"kind": "reference", "k": 1, "B": 16, "lr": 0.01, "status": "ok", "epoch": epochs, "val_loss": ref,
                 "val_acc": [ref_acc] * len(epochs)}]
        for k, dm in zip([2, 4, 8], d_matched):
            for kind, d in (("matched", dm), ("unscaled", d_unscaled), ("over-scaled", d_over)):
                ok = d is not None
                arms.append({"kind": kind, "k": k, "B": 16 * k, "lr": 0.01 * k, "status": "ok" if ok else "diverged",
                             "epoch": epochs if ok else epochs[:2], "val_loss": [x + (d or 0) for x in (ref if ok else ref[:2])]})
        seeds[s] = {"arms": arms}
    return {"seeds": seeds}


def test_c12_rule():
    exp = LRBatchRatio()
    assert _verdict(exp, _ratio([0.01, 0.02, 0.05])) == "supported"
    assert _verdict(exp, _ratio([0.01, 0.02, 0.05], d_over=None)) == "supported"  # diverged mismatched arm: far
    assert _verdict(exp, _ratio([0.4, 0.4, 0.4])) == "refuted"
    assert _verdict(exp, _ratio([0.01, 0.02, 0.4])) == "inconclusive"  # 6 of 9 comparisons
    assert _verdict(exp, _ratio([0.01, 0.02, 0.05], ref_acc=0.5)) == "invalid"  # the reference does not learn
    (v,) = exp.decide(_ratio([0.01, 0.02, 0.05]), _params(exp))
    assert v.published["trend_agrees"] is True and "Goyal" in v.published["source"]
    d = _ratio([0.01, 0.02, 0.05])
    arm = d["seeds"]["0"]["arms"][1]
    assert LRBatchRatio.distance(arm, d["seeds"]["0"]["arms"][0], 10) == pytest.approx(0.01)
    check_figures(exp.plot(_ratio([0.01, 0.02, 0.05], d_over=None), _params(exp)))


# ------------------------------------------------------------------ C13


def _grid(best_bs: list[int], quick: bool = True, peak_j: int = 3) -> dict[str, Any]:
    """Accuracy peaks at LR index ``peak_j`` and falls 4 points per LR step: the stable band (within 5 points)
    is LR indices peak_j-1..peak_j+1, inside the grid unless peak_j sits at an edge."""
    p = BatchLRGrid().params(quick)
    seeds = {}
    for i, bb in enumerate(best_bs):
        acc, status = [], []
        for b in p["batches"]:
            row, st = [], []
            for j, lr in enumerate(p["lrs"]):
                if b <= 4 and lr >= 0.8:
                    row.append(None)
                    st.append("diverged")
                    continue
                row.append(0.95 - 0.02 * abs(math.log2(b / bb)) - 0.04 * abs(j - peak_j))
                st.append("ok")
            acc.append(row)
            status.append(st)
        seeds[str(i)] = {"B": p["batches"], "lr": p["lrs"], "val_acc": acc, "status": status}
    return {"seeds": seeds}


def test_c13_rule():
    exp = BatchLRGrid()
    assert _verdict(exp, _grid([8, 16, 8]), quick=True) == "observed"
    assert _verdict(exp, _grid([128, 256, 128]), quick=True) == "not observed"
    assert _verdict(exp, _grid([8, 128, 8]), quick=True) == "inconclusive"
    assert _verdict(exp, _grid([8, 16, 8], peak_j=0), quick=True) == "invalid"  # bands cut at the lowest LR
    s = BatchLRGrid.summarize(_grid([8])["seeds"]["0"], 0.05)
    assert s["best_b"] == 8 and s["bands"][0] == [0.003125, 0.05]
    check_figures(exp.plot(_grid([8, 16, 8]), _params(exp, quick=True)))


# ------------------------------------------------------------------ C15


def _lbfgs(lb_small: float | None, lb_large: float, sgd_small: float = 0.95, seeds: int = 3) -> dict[str, Any]:
    B = [32, 256, 2048, 8000]
    lrs = [0.0125, 0.05, 0.2]
    sgd = [sgd_small, sgd_small - 0.1, sgd_small - 0.3, sgd_small - 0.6]
    lb = [lb_small, (lb_large + (lb_small or 0)) / 2, lb_large, lb_large]
    return {"seeds": {str(i): {"B": B, "sgd_lrs": lrs, "sgd_all": [[x - 0.05, x, None] for x in sgd],
                               "sgd_status": [["ok", "ok", "diverged"]] * 4, "sgd_time": [[0.1, 0.1, 0.1]] * 4,
                               "lbfgs": lb, "lbfgs_status": ["ok" if v is not None else "diverged" for v in lb],
                               "lbfgs_time": [5.0, 2.0, 1.0, 1.0]} for i in range(seeds)}}


def test_c15_lbfgs_gets_at_most_sgds_gradient_evaluations():
    p = LBFGSBatch().params(False)
    for b in p["batches"]:
        steps = LBFGSBatch.lbfgs_steps(p, 8000, b)
        assert steps >= 1
        if steps > 1:  # at least one step even where the budget buys less
            assert steps * b * p["lbfgs_max_iter"] * 5 // 4 <= p["epochs"] * 8000


def test_c15_rule():
    exp = LBFGSBatch()
    assert _verdict(exp, _lbfgs(0.5, 0.93)) == "supported"
    assert _verdict(exp, _lbfgs(None, 0.93)) == "supported"  # diverged at small B counts as failing
    assert _verdict(exp, _lbfgs(0.93, 0.94)) == "refuted"  # competitive at small B too
    assert _verdict(exp, _lbfgs(0.5, 0.6)) == "refuted"  # not competitive at large B
    assert _verdict(exp, _lbfgs(0.3, 0.6, sgd_small=0.45)) == "invalid"  # SGD never learns the task
    mixed = _lbfgs(0.5, 0.93)
    mixed["seeds"]["2"] = _lbfgs(0.9, 0.93)["seeds"]["0"]
    assert _verdict(exp, mixed) == "inconclusive"
    check_figures(exp.plot(_lbfgs(None, 0.93), _params(exp)))


# ------------------------------------------------------------------ tiny real runs


def _ctx(tmp_path: Path, exp_id: str) -> ExperimentContext:
    return ExperimentContext(exp_id, True, [0], "cpu", Store(tmp_path / "b.db"), tmp_path)


def test_measurements_run_on_tiny_settings(tmp_path: Path):
    g = GradientNoise()
    p = {**g.params(True), "batches": [1, 2, 4], "n_batches": 4, "train_steps": 2, "seeds": [0]}
    data = g.run(_ctx(tmp_path, g.id), p)
    pts = data["seeds"]["0"]["points"]
    assert set(pts) == {"init", "trained"} and all(x > 0 for x in pts["init"]["std"])
    assert g.decide(data, p)[0].verdict in ("supported", "refuted", "inconclusive")

    st = StepTime()
    p = {**st.params(True), "configs": [{"label": "digits-mlp", "task": "digits-mlp", "kwargs": {}, "max_batch": 4}],
         "repeats": 1, "warmup": 1, "target_s": 0.0, "seeds": [0]}
    data = st.run(_ctx(tmp_path, st.id), p)
    cfg = data["seeds"]["0"]["configs"]["digits-mlp"]
    assert cfg["B"] == [1, 2, 4] and all(t > 0 for t in cfg["t_step"])

    fe = FixedEpochBatch()
    p = {**fe.params(True), "batches": [64, 128], "epochs": 0.2, "seeds": [0]}
    data = fe.run(_ctx(tmp_path, fe.id), p)
    assert data["seeds"]["0"]["B"] == [64, 128] and all(v is not None for v in data["seeds"]["0"]["val_acc"])


def test_sharpness_measurement_runs_on_tiny_settings(tmp_path: Path):
    exp = SharpMinima()
    p = {**exp.params(True), "small": 64, "large": 128, "steps": 3, "ascent_steps": 2, "alphas": [0.0, 0.5, 1.0],
         "seeds": [0]}
    data = exp.run(_ctx(tmp_path, exp.id), p)
    d = data["seeds"]["0"]
    assert d["small"]["status"] == "ok" and d["large"]["sharpness"]["0.001"] >= 0
    assert len(d["interp"]["val_loss"]) == 3
    assert exp.decide(data, p)[0].verdict == "inconclusive"  # 3 steps: not converged
