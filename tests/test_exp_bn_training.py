"""BN-and-training experiments (C01, C02, C03, C05, C06, C07): decision rules on synthetic data
built to make each claim true, false and undecidable; figures; a tiny real run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

from batchlab.experiments.base import ExperimentContext
from batchlab.experiments.bn_activations import BNSigmoid
from batchlab.experiments.bn_training import BNDataSize, BNLearningRate, BNPosition
from batchlab.store import Store
from tests.helpers.figures import check_figures

SEEDS = ["0", "1", "2"]


def _run(hit: float | None, steps: int = 400, status: str = "ok", final: float | None = None,
         **extra: Any) -> dict[str, Any]:
    """A compact run whose val accuracy rises linearly and crosses 0.9 at step ``hit`` (never if None)."""
    hist = []
    for s in range(0, steps + 1, 10):
        acc = 0.1 + 0.8 * s / hit if hit else 0.1 + 0.7 * s / steps
        hist.append({"step": s, "epoch": s / 10, "val_acc": min(acc, 0.97), "train_loss": 2.3 / (1 + s / 50),
                     "train_acc": min(acc, 0.99)})
    if status != "ok":
        hist = hist[:2]
    f = hist[-1]["val_acc"] if final is None else final
    return {"status": status, "failed_step": 10 if status != "ok" else None, "steps": steps, "final_val_acc": f,
            "final_train_acc": min(f + 0.02, 1.0), "final_train_loss": 0.1, "history": hist, **extra}



# ------------------------------------------------------------------ C01 / C02


def _lr_data(bn1: list, none1: list, bn30: list, none30: list) -> dict[str, Any]:
    runs = {"batch/x1": dict(zip(SEEDS, bn1)), "none/x1": dict(zip(SEEDS, none1)),
            "batch/x30": dict(zip(SEEDS, bn30)), "none/x30": dict(zip(SEEDS, none30)),
            "batch/x5": dict(zip(SEEDS, bn1)), "none/x5": dict(zip(SEEDS, none1))}
    return {"runs": runs}


P_LR = {**BNLearningRate().params(False), "seeds": [0, 1, 2]}


def _verdicts(exp: Any, data: dict[str, Any], params: dict[str, Any]) -> dict[str, str]:
    return {v.claim: v.verdict for v in exp.decide(data, params)}


def test_c01_c02_supported():
    data = _lr_data([_run(60)] * 3, [_run(120)] * 3, [_run(30)] * 3, [_run(None, status="diverged")] * 3)
    v = _verdicts(BNLearningRate(), data, P_LR)
    assert v == {"C01": "supported", "C02": "supported"}


def test_c01_c02_refuted():
    # no-BN faster at x1; BN-x30 diverges
    data = _lr_data([_run(120)] * 3, [_run(60)] * 3, [_run(None, status="diverged")] * 3, [_run(50)] * 3)
    v = _verdicts(BNLearningRate(), data, P_LR)
    assert v == {"C01": "refuted", "C02": "refuted"}
    # BN-x30 fine and faster, but no-BN-x30 trains as well as x1: part (b) fails everywhere
    data = _lr_data([_run(60)] * 3, [_run(120)] * 3, [_run(30)] * 3, [_run(100)] * 3)
    assert _verdicts(BNLearningRate(), data, P_LR)["C02"] == "refuted"


def test_c01_c02_inconclusive():
    mixed = _lr_data([_run(60), _run(120), _run(60)], [_run(120), _run(60), _run(120)],
                     [_run(30), _run(None, status="diverged"), _run(30)], [_run(None, status="diverged")] * 3)
    v = _verdicts(BNLearningRate(), mixed, P_LR)
    assert v == {"C01": "inconclusive", "C02": "inconclusive"}
    never = _lr_data([_run(None)] * 3, [_run(None)] * 3, [_run(None)] * 3, [_run(None)] * 3)
    vs = BNLearningRate().decide(never, P_LR)
    assert vs[0].verdict == "inconclusive" and "neither" in vs[0].reason


def test_bn_lr_figures():
    data = _lr_data([_run(60)] * 3, [_run(120)] * 3, [_run(30)] * 3, [_run(None, status="diverged")] * 3)
    check_figures(BNLearningRate().plot(data, P_LR))


# ------------------------------------------------------------------ C03 / C05

P_SIG = {**BNSigmoid().params(True), "seeds": [0, 1]}


def _sig(acc: float, grads: list[float], sat: list[float]) -> dict[str, Any]:
    r = _run(60, final=acc)
    bins = P_SIG["bins"]
    r.update({"grad_steps": [0, 10, 20], "grad_norms": [grads] * 3, "saturated": sat,
              "hist_edges": [i / bins for i in range(bins + 1)],
              "act_hist": [[1.0 / bins] * bins for _ in sat]})
    return r


def _sig_data(none: dict, bn: dict, noaff: dict) -> dict[str, Any]:
    return {"runs": {"none": {s: none for s in SEEDS[:2]}, "bn": {s: bn for s in SEEDS[:2]},
                     "bn_noaffine": {s: noaff for s in SEEDS[:2]}}}


def test_c03_c05_supported():
    data = _sig_data(_sig(0.3, [1e-4, 1e-3, 1e-2, 1e-1, 1.0], [0.6] * 4), _sig(0.95, [0.5, 0.5, 0.5, 0.5, 1.0], [0.05] * 4),
                     _sig(0.93, [0.5] * 5, [0.0] * 4))
    assert _verdicts(BNSigmoid(), data, P_SIG) == {"C03": "supported", "C05": "supported"}


def test_c03_c05_refuted():
    # no-BN gradients balanced and accuracy close; BN saturates more than no-BN
    data = _sig_data(_sig(0.94, [0.5] * 5, [0.1] * 4), _sig(0.95, [0.5] * 5, [0.3] * 4), _sig(0.93, [0.5] * 5, [0.0] * 4))
    assert _verdicts(BNSigmoid(), data, P_SIG) == {"C03": "refuted", "C05": "refuted"}
    # BN desaturates but gamma/beta cost more than the tolerance in every seed
    data = _sig_data(_sig(0.3, [1e-3, 1, 1, 1, 1], [0.6] * 4), _sig(0.85, [1] * 5, [0.05] * 4),
                     _sig(0.95, [1] * 5, [0.0] * 4))
    assert _verdicts(BNSigmoid(), data, P_SIG)["C05"] == "refuted"


def test_c03_c05_inconclusive():
    none = {"0": _sig(0.3, [1e-3, 1, 1, 1, 1], [0.6] * 4), "1": _sig(0.94, [1, 1, 1, 1, 1.5], [0.01] * 4)}
    bn = {s: _sig(0.95, [1] * 5, [0.05] * 4) for s in SEEDS[:2]}
    data = {"runs": {"none": none, "bn": bn, "bn_noaffine": bn}}
    assert _verdicts(BNSigmoid(), data, P_SIG) == {"C03": "inconclusive", "C05": "inconclusive"}


def test_bn_sigmoid_figures():
    data = _sig_data(_sig(0.3, [1e-4, 1e-3, 1e-2, 1e-1, 1.0], [0.6] * 4), _sig(0.95, [0.5] * 5, [0.05] * 4),
                     _sig(0.93, [0.5] * 5, [0.0] * 4))
    check_figures(BNSigmoid().plot(data, P_SIG))


# ------------------------------------------------------------------ C06

P_POS = {**BNPosition().params(False), "seeds": [0, 1, 2]}


def _pos_data(before: list[float], after: list[float]) -> dict[str, Any]:
    return {"runs": {"before": {s: _run(60, final=a) for s, a in zip(SEEDS, before)},
                     "after": {s: _run(60, final=a) for s, a in zip(SEEDS, after)}}}


def test_c06_rule():
    e = BNPosition()
    assert e.decide(_pos_data([0.80, 0.81, 0.79], [0.805, 0.80, 0.795]), P_POS)[0].verdict == "supported"
    assert e.decide(_pos_data([0.80, 0.81, 0.79], [0.75, 0.77, 0.76]), P_POS)[0].verdict == "refuted"
    assert e.decide(_pos_data([0.80, 0.75, 0.79], [0.76, 0.79, 0.78]), P_POS)[0].verdict == "inconclusive"
    # mean within tolerance but one seed far apart: too noisy to call it "within"
    assert e.decide(_pos_data([0.80, 0.75, 0.80], [0.77, 0.78, 0.80]), P_POS)[0].verdict == "inconclusive"
    check_figures(e.plot(_pos_data([0.80, 0.81, 0.79], [0.805, 0.80, 0.795]), P_POS))


# ------------------------------------------------------------------ C07

P_DS = {**BNDataSize().params(False), "seeds": [0, 1, 2]}


def _ds_data(gap_val: float, gap_train: float) -> dict[str, Any]:
    """no-BN minus BN accuracy gaps at the little-data sizes; equal at the large ones."""
    runs: dict[str, Any] = {"none": {}, "batch": {}}
    for n in P_DS["sizes"]:
        small = n <= P_DS["small_max"]
        for s in SEEDS:
            base = 0.7 + 0.05 * (n > 200)
            runs["batch"].setdefault(str(n), {})[s] = {"status": "ok", "final_val_acc": base, "final_train_acc": 0.9,
                                                       "final_train_loss": 0.1, "steps": 300, "failed_step": None}
            runs["none"].setdefault(str(n), {})[s] = {"status": "ok", "final_val_acc": base + (gap_val if small else 0),
                                                      "final_train_acc": 0.9 + (gap_train if small else 0),
                                                      "final_train_loss": 0.1, "steps": 300, "failed_step": None}
    return {"runs": runs}


def test_c07_rule():
    e = BNDataSize()
    assert e.decide(_ds_data(0.05, 0.05), P_DS)[0].verdict == "supported"
    assert e.decide(_ds_data(-0.05, 0.0), P_DS)[0].verdict == "refuted"
    assert e.decide(_ds_data(0.002, 0.0), P_DS)[0].verdict == "inconclusive"
    v = e.decide(_ds_data(0.05, 0.0), P_DS)[0]  # no BN better, but BN did not under-fit
    assert v.verdict == "inconclusive" and "under-fit" in v.reason
    check_figures(e.plot(_ds_data(0.05, 0.05), P_DS))


# ------------------------------------------------------------------ smoke: real (tiny) runs


def _ctx(tmp_path: Path, exp_id: str) -> ExperimentContext:
    return ExperimentContext(exp_id, True, [0, 1], "cpu", Store(tmp_path / "s.db"), tmp_path)


def test_tiny_real_runs(tmp_path: Path):
    e = BNLearningRate()
    p = {**e.params(True), "max_steps": 6, "eval_every": 3, "multipliers": [1, 30], "seeds": [0, 1]}
    data = e.run(_ctx(tmp_path, e.id), p)
    assert len(e.decide(data, p)) == 2
    check_figures(e.plot(data, p))

    s = BNSigmoid()
    p = {**s.params(True), "max_steps": 6, "eval_every": 3, "grad_every": 2, "seeds": [0, 1]}
    ctx = _ctx(tmp_path, s.id)
    data = s.run(ctx, p)
    r = data["runs"]["none"]["0"]
    assert len(r["grad_norms"][0]) == 5 and len(r["saturated"]) == 4 and abs(sum(r["act_hist"][0]) - 1) < 1e-6
    assert {v.claim for v in s.decide(data, p)} == {"C03", "C05"}
    check_figures(s.plot(data, p))
    again = s.run(ctx, p)  # everything comes back from the store
    assert again == data and ctx.trials_loaded == 6

    d = BNDataSize()
    p = {**d.params(True), "sizes": [64, 1438], "max_steps": 4, "seeds": [0, 1]}
    data = d.run(_ctx(tmp_path, d.id), p)
    assert set(data["runs"]["batch"]) == {"64", "1438"}
    assert d.decide(data, p)[0].claim == "C07"
