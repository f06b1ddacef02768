"""BN-and-training experiments (C01, C02, C03, C05, C06, C07): decision rules on synthetic data
built to make each claim true, false and undecidable; figures; a tiny real run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import pytest

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
    assert vs[0].verdict == "inconclusive" and not vs[0].valid and "neither" in vs[0].reason
    assert vs[1].verdict == "inconclusive" and not vs[1].valid  # BN-x1 never reached the target: no reference


def test_c02_published_steps_beside_the_measured_ones():
    data = _lr_data([_run(60)] * 3, [_run(120)] * 3, [_run(30)] * 3, [_run(None, status="diverged")] * 3)
    data["runs"]["batch/x5"] = {s: _run(20) for s in SEEDS}
    pub = BNLearningRate().decide(data, P_LR)[1].published
    assert pub["published"]["BN-x5"] == 2.1 and pub["published"]["baseline (no BN)"] == 31.0
    assert pub["measured"]["seed-mean steps to target"]["batch/x30"] == 30.0 and pub["trend_agrees"] is True
    slow = _lr_data([_run(60)] * 3, [_run(120)] * 3, [_run(90)] * 3, [_run(None, status="diverged")] * 3)
    slow["runs"]["batch/x5"] = {s: _run(20) for s in SEEDS}
    assert BNLearningRate().decide(slow, P_LR)[1].published["trend_agrees"] is False


def test_bn_lr_figures():
    data = _lr_data([_run(60)] * 3, [_run(120)] * 3, [_run(30)] * 3, [_run(None, status="diverged")] * 3)
    check_figures(BNLearningRate().plot(data, P_LR))


# ------------------------------------------------------------------ C03 / C05

P_SIG = {**BNSigmoid().params(True), "seeds": [0, 1]}


def _sig(acc: float, grads: list[float], sat: list[float]) -> dict[str, Any]:
    r = _run(60, final=acc)
    bins = P_SIG["bins"]
    r.update({"grad_steps": [0, 10, 20], "grad_norms": [grads] * 3, "saturated": sat,
              "dsigmoid_mean": [0.25 * (1 - x) for x in sat], "hist_edges": [i / bins for i in range(bins + 1)],
              "act_hist": [[1.0 / bins] * bins for _ in sat]})
    return r


def _sig_data(none: dict, bn: dict, noaff: dict, none3: dict | None = None, bn3: dict | None = None) -> dict[str, Any]:
    """Depth 4 gets all three arms; depth 3 the same none/BN runs unless given."""
    four = {"none": {s: none for s in SEEDS[:2]}, "bn": {s: bn for s in SEEDS[:2]},
            "bn_noaffine": {s: noaff for s in SEEDS[:2]}}
    three = {"none": {s: none3 or none for s in SEEDS[:2]}, "bn": {s: bn3 or bn for s in SEEDS[:2]}}
    return {"depths": {"3": {"runs": three}, "4": {"runs": four}}}


VANISHING = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]


def test_c03_c05_supported_observed():
    data = _sig_data(_sig(0.3, VANISHING, [0.6] * 4), _sig(0.95, [0.5, 0.5, 0.5, 0.5, 1.0], [0.05] * 4),
                     _sig(0.93, [0.5] * 5, [0.0] * 4))
    assert _verdicts(BNSigmoid(), data, P_SIG) == {"C03": "supported", "C05": "observed"}


def test_c03_c05_refuted_not_observed():
    # no-BN gradients balanced and accuracy close at both depths; BN saturates more than no-BN
    data = _sig_data(_sig(0.94, [0.5] * 5, [0.1] * 4), _sig(0.95, [0.5] * 5, [0.3] * 4), _sig(0.93, [0.5] * 5, [0.0] * 4))
    assert _verdicts(BNSigmoid(), data, P_SIG) == {"C03": "refuted", "C05": "not observed"}
    # BN desaturates but gamma/beta cost more than the tolerance in every seed
    data = _sig_data(_sig(0.3, [1e-3, 1, 1, 1, 1], [0.6] * 4), _sig(0.85, [1] * 5, [0.05] * 4),
                     _sig(0.95, [1] * 5, [0.0] * 4))
    assert _verdicts(BNSigmoid(), data, P_SIG)["C05"] == "not observed"


def test_c03_c05_inconclusive():
    # C03: vanishing at 4 layers, but the 3-layer net trains without BN (the outcome depends on the depth)
    data = _sig_data(_sig(0.3, VANISHING, [0.6] * 4), _sig(0.95, [0.5] * 5, [0.05] * 4),
                     _sig(0.93, [0.5] * 5, [0.0] * 4), none3=_sig(0.94, [0.5] * 5, [0.1] * 3))
    v = BNSigmoid().decide(data, P_SIG)[0]
    assert v.verdict == "inconclusive" and v.valid and "depends on the depth" in v.reason
    none = {"0": _sig(0.3, [1e-3, 1, 1, 1, 1], [0.6] * 4), "1": _sig(0.94, [1, 1, 1, 1, 1.5], [0.06] * 4)}
    bn = {s: _sig(0.95, [1] * 5, [0.07] * 4) for s in SEEDS[:2]}
    data = {"depths": {d: {"runs": {"none": none, "bn": bn, "bn_noaffine": bn}} for d in ("3", "4")}}
    assert _verdicts(BNSigmoid(), data, P_SIG) == {"C03": "inconclusive", "C05": "inconclusive"}


def test_c03_c05_invalid():
    # BN does not train the net at either depth; the no-BN net never saturates
    data = _sig_data(_sig(0.3, VANISHING, [0.01] * 4), _sig(0.5, [0.5] * 5, [0.0] * 4), _sig(0.5, [0.5] * 5, [0.0] * 4))
    vs = BNSigmoid().decide(data, P_SIG)
    assert [(v.claim, v.verdict, v.valid) for v in vs] == [("C03", "inconclusive", False), ("C05", "inconclusive", False)]
    assert "did not saturate" in vs[1].reason


def test_saturation_is_measured_by_the_derivative():
    from batchlab.experiments.bn_activations import saturation_bounds

    lo, hi = saturation_bounds(0.1)
    assert lo * (1 - lo) == pytest.approx(0.1) and hi == pytest.approx(1 - lo) and 0.11 < lo < 0.12
    # the 0.05..0.1 outputs the old 0.05/0.95 threshold called unsaturated are saturated now
    assert 0.07 * (1 - 0.07) < 0.1


def test_bn_sigmoid_figures():
    data = _sig_data(_sig(0.3, VANISHING, [0.6] * 4), _sig(0.95, [0.5] * 5, [0.05] * 4),
                     _sig(0.93, [0.5] * 5, [0.0] * 4), none3=_sig(0.4, VANISHING[1:], [0.5] * 3),
                     bn3=_sig(0.95, [0.5] * 4, [0.05] * 3))
    check_figures(BNSigmoid().plot(data, P_SIG))


# ------------------------------------------------------------------ C06

P_POS = {**BNPosition().params(False), "seeds": [0, 1, 2]}


def _pos_data(before: list[float], after: list[float]) -> dict[str, Any]:
    seeds = [str(i) for i in range(len(before))]
    return {"runs": {"before": {s: _run(60, final=a) for s, a in zip(seeds, before)},
                     "after": {s: _run(60, final=a) for s, a in zip(seeds, after)}}}


def test_c06_equivalence_rule():
    e = BNPosition()
    base = [0.70, 0.71, 0.69, 0.72, 0.70, 0.68, 0.71, 0.70, 0.69, 0.71]
    wiggle = [0.003, -0.002, 0.001, -0.003, 0.002, 0.0, -0.001, 0.002, -0.002, 0.001]
    assert e.decide(_pos_data(base, [b + w for b, w in zip(base, wiggle)]), P_POS)[0].verdict == "supported"
    # after is 4 points worse in every seed: beyond the 1.5-point margin
    assert e.decide(_pos_data(base, [b - 0.04 + w for b, w in zip(base, wiggle)]), P_POS)[0].verdict == "refuted"
    # mean near 0 but seed differences of -6..+4 points: the interval straddles the margin
    noisy = [0.04, -0.06, 0.03, -0.02, 0.05, -0.04, 0.01, -0.05, 0.04, -0.01]
    assert e.decide(_pos_data(base, [b + w for b, w in zip(base, noisy)]), P_POS)[0].verdict == "inconclusive"
    low = [0.2] * 10  # neither placement learns the task
    v = e.decide(_pos_data(low, low), P_POS)[0]
    assert v.verdict == "inconclusive" and not v.valid
    check_figures(e.plot(_pos_data(base, [b + w for b, w in zip(base, wiggle)]), P_POS))


# ------------------------------------------------------------------ C07

P_DS = {**BNDataSize().params(False), "seeds": [0, 1, 2]}


def _ds_data(gap_val: float, gap_train: float, full: float = 0.85) -> dict[str, Any]:
    """no-BN minus BN accuracy gaps at the little-data sizes; equal at the large ones."""
    runs: dict[str, Any] = {"none": {}, "batch": {}}
    for n in P_DS["sizes"]:
        small = n <= P_DS["small_max"]
        for s in SEEDS:
            base = 0.7 + (full - 0.7) * (n > 200)
            runs["batch"].setdefault(str(n), {})[s] = {"status": "ok", "final_val_acc": base, "final_train_acc": 0.9,
                                                       "final_train_loss": 0.1, "steps": 300, "failed_step": None}
            runs["none"].setdefault(str(n), {})[s] = {"status": "ok", "final_val_acc": base + (gap_val if small else 0),
                                                      "final_train_acc": 0.9 + (gap_train if small else 0),
                                                      "final_train_loss": 0.1, "steps": 300, "failed_step": None}
    return {"runs": runs}


def test_c07_rule():
    e = BNDataSize()
    assert e.decide(_ds_data(0.05, 0.05), P_DS)[0].verdict == "observed"
    assert e.decide(_ds_data(-0.05, 0.0), P_DS)[0].verdict == "not observed"
    assert e.decide(_ds_data(0.002, 0.0), P_DS)[0].verdict == "inconclusive"
    v = e.decide(_ds_data(0.05, 0.0), P_DS)[0]  # no BN better, but BN did not under-fit
    assert v.verdict == "inconclusive" and "under-fit" in v.reason
    v = e.decide(_ds_data(0.05, 0.05, full=0.6), P_DS)[0]  # the budget does not teach the task even with all data
    assert v.verdict == "inconclusive" and not v.valid
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
    r = data["depths"]["4"]["runs"]["none"]["0"]
    assert len(r["grad_norms"][0]) == 5 and len(r["saturated"]) == 4 and abs(sum(r["act_hist"][0]) - 1) < 1e-6
    assert len(data["depths"]["3"]["runs"]["bn"]["1"]["saturated"]) == 3
    assert all(0 < d <= 0.25 for d in r["dsigmoid_mean"])
    assert {v.claim for v in s.decide(data, p)} == {"C03", "C05"}
    check_figures(s.plot(data, p))
    again = s.run(ctx, p)  # everything comes back from the store
    assert again == data and ctx.trials_loaded == 10

    d = BNDataSize()
    p = {**d.params(True), "sizes": [64, 1438], "max_steps": 4, "seeds": [0, 1]}
    data = d.run(_ctx(tmp_path, d.id), p)
    assert set(data["runs"]["batch"]) == {"64", "1438"}
    assert d.decide(data, p)[0].claim == "C07"
