"""Experiments C16 and C19: decision rules on built data, figures, and cheap smoke runs."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest

from batchlab.experiments.base import ExperimentContext
from batchlab.experiments.schedules import SURFACES, BatchGrowth, Momentum, heavy_ball
from batchlab.store import Store
from tests.helpers.figures import check_figures


def _ctx(tmp_path, exp_id: str, seeds=(0,)) -> ExperimentContext:
    return ExperimentContext(exp_id, True, list(seeds), "cpu", Store(tmp_path / "batchlab.db"), tmp_path)



# ---------------------------------------------------------------- C16


def _c16_data(decay: tuple[float, float], growth: tuple[float, float], growth_steps: int = 500,
              decay_gain: float = 0.02) -> dict:
    def run(acc: float, steps: int, bs: int) -> dict:
        return {"status": "ok", "final_acc": acc, "steps": steps, "epoch": [1.0, 2.0], "step": [steps // 2, steps],
                "val_acc": [0.5, acc], "lr": [0.05, 0.01], "batch_size": [bs, bs]}

    return {"runs": {
        "lr_decay": {s: run(a, 1000, 16) for s, a in zip("01", decay)},
        "batch_growth": {s: run(a, growth_steps, 80) for s, a in zip("01", growth)},
        "constant": {s: run(a - decay_gain, 1000, 16) for s, a in zip("01", decay)},
    }}


def _c16(decay, growth, steps=500, **kw) -> str:
    e = BatchGrowth()
    (v,) = e.decide(_c16_data(decay, growth, steps, **kw), e.params(True))
    return "invalid" if not v.valid else v.verdict


def test_c16_supported_refuted_inconclusive_invalid():
    assert _c16((0.70, 0.72), (0.705, 0.715)) == "supported"
    # decay no better than a constant LR: the task cannot show what growth replaces
    assert _c16((0.70, 0.72), (0.705, 0.715), decay_gain=0.0) == "invalid"
    assert _c16((0.70, 0.72), (0.66, 0.68), decay_gain=-0.01) == "invalid"  # never 'refuted' when invalid
    e = BatchGrowth()
    (v,) = e.decide(_c16_data((0.70, 0.72), (0.705, 0.715)), e.params(True))
    assert v.published["trend_agrees"] is True and "Smith" in v.published["source"]
    assert _c16((0.70, 0.72), (0.66, 0.68)) == "refuted"
    assert _c16((0.70, 0.72), (0.70, 0.72), steps=1000) == "refuted"  # no fewer updates
    assert _c16((0.70, 0.72), (0.71, 0.685)) == "inconclusive"  # one seed 3.5 points worse


def test_c16_plot_and_smoke(tmp_path):
    e = BatchGrowth()
    p = {**e.params(True), "epochs": 0.2, "seeds": [0]}
    data = e.run(_ctx(tmp_path, e.id), p)
    g, d = data["runs"]["batch_growth"]["0"], data["runs"]["lr_decay"]["0"]
    assert g["steps"] < d["steps"] and max(g["batch_size"]) > p["batch0"]
    assert e.decide(data, p)[0].verdict in ("supported", "refuted", "inconclusive")
    check_figures(e.plot(data, p))
    check_figures(e.plot(_c16_data((0.7, 0.72), (0.7, 0.71)), e.params(True)))


# ---------------------------------------------------------------- C19


def _c19_data(sgd_steps: tuple, mom_steps: tuple, surf_gd: tuple = (300, 320), surf_mom: tuple = (60, 70)) -> dict:
    def task_run(st):
        return {"status": "ok", "steps_to_target": st, "step": [0, 100, 200], "val_acc": [0.1, 0.8, 0.95],
                "final_acc": 0.95}

    task = {"sgd": {"0.1": {s: task_run(v) for s, v in zip("01", sgd_steps)},
                    "0.01": {s: task_run(None) for s in "01"}},
            "momentum": {"0.1": {s: task_run(v) for s, v in zip("01", mom_steps)},
                         "0.01": {s: task_run(None) for s in "01"}}}
    surfaces = {}
    for name, spec in SURFACES.items():
        surfaces[name] = {}
        for i, s in enumerate("01"):
            surfaces[name][s] = {"start": list(spec["start"]),
                                 "gd": {"0.1": {"steps": surf_gd[i], "losses": [1, 0], "path": [list(spec["start"]), [0, 0]]}},
                                 "momentum": {"0.1": {"steps": surf_mom[i], "losses": [1, 0],
                                                      "path": [list(spec["start"]), [0, 0]]}}}
    return {"task": task, "surfaces": surfaces}


def _c19(*a, **k) -> str:
    e = Momentum()
    return e.decide(_c19_data(*a, **k), e.params(True))[0].verdict


def test_c19_supported_refuted_inconclusive():
    assert _c19((150, 160), (60, 70)) == "supported"
    assert _c19((60, 70), (150, 160)) == "refuted"  # momentum slower on the task
    assert _c19((150, 160), (60, 70), surf_gd=(50, 60), surf_mom=(100, 120)) == "refuted"  # slower on the surfaces
    assert _c19((150, 60), (60, 70)) == "inconclusive"  # faster on average, not in every seed
    e = Momentum()
    (v,) = e.decide(_c19_data((None, None), (None, None)), e.params(True))
    assert v.verdict == "inconclusive" and not v.valid  # nobody reached the target on the task


def test_c19_credits_momentum_where_plain_gd_never_reaches_the_target():
    # the local-minimum surface: GD never escapes at any LR, momentum does in 23 steps
    data = _c19_data((150, 160), (60, 70))
    for seeds in data["surfaces"]["local_min"].values():
        seeds["gd"]["0.1"]["steps"] = None
        seeds["momentum"]["0.1"]["steps"] = 23
    e = Momentum()
    (v,) = e.decide(data, e.params(True))
    assert v.verdict == "supported", v.reason
    surf = v.effect["surfaces"]["local_min"]
    assert surf["gd_missed"] and surf["faster_every_seed"]
    # both miss: a tie, not a win for either
    for seeds in data["surfaces"]["local_min"].values():
        seeds["momentum"]["0.1"]["steps"] = None
    (v,) = e.decide(data, e.params(True))
    assert v.verdict == "inconclusive" and not v.effect["surfaces"]["local_min"]["faster_every_seed"]


def test_heavy_ball_matches_torch_sgd_momentum():
    import torch

    f = SURFACES["plateau"]["f"]
    w0 = np.array([1.5, 0.4])
    ours = heavy_ball(f, w0, 0.3, 0.9, 20, -1.0)["path"][-1]
    w = torch.tensor(w0, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.3, momentum=0.9)
    for _ in range(20):
        opt.zero_grad()
        w.grad = torch.tensor(f(w.detach().numpy())[1])
        opt.step()
    assert np.allclose(ours, w.detach().numpy())
    for spec in SURFACES.values():  # analytic gradients agree with finite differences
        p, eps = np.array([0.7, -0.3]), 1e-6
        num = [(spec["f"](p + eps * e)[0] - spec["f"](p - eps * e)[0]) / (2 * eps) for e in np.eye(2)]
        assert np.allclose(num, spec["f"](p)[1], atol=1e-5)


def test_c19_plot_and_smoke(tmp_path):
    e = Momentum()
    p = {**e.params(True), "lrs": [0.1], "max_steps": 20, "surface_lrs": [0.1], "surface_steps": 50, "seeds": [0]}
    data = e.run(_ctx(tmp_path, e.id), p)
    assert set(data["task"]) == {"sgd", "momentum"} and set(data["surfaces"]) == set(SURFACES)
    json.dumps(data)
    assert e.decide(data, p)[0].verdict in ("supported", "refuted", "inconclusive")
    check_figures(e.plot(data, p))
    check_figures(e.plot(_c19_data((150, 160), (60, 70)), e.params(True)))


@pytest.mark.parametrize("cls", [BatchGrowth, Momentum])
def test_params_are_json_and_have_rules(cls):
    e = cls()
    for q in (True, False):
        json.dumps(e.params(q))
    assert all(c in e.rules and c in e.statements and c in e.validity for c in e.claims)
