"""Experiments C17, C18, C20: decision rules on built data, figures, and cheap smoke runs."""

from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")
import pytest
import torch
import torch.nn as nn

from batchlab.experiments.base import ExperimentContext
from batchlab.experiments.norm_choice import (
    BNEvalStats, NormBatch, SeqNorm, batch_stats_eval, population_bn_stats,
)
from batchlab.store import Store
from tests.helpers.figures import check_figures


def _ctx(tmp_path, exp_id: str, seeds=(0,)) -> ExperimentContext:
    return ExperimentContext(exp_id, True, list(seeds), "cpu", Store(tmp_path / "batchlab.db"), tmp_path)



# ---------------------------------------------------------------- C17


def _c17_data(bn: dict[int, tuple[float, float]], gn: dict[int, tuple[float, float]]) -> dict:
    acc = {n: {str(b): {"0": v[0], "1": v[1]} for b, v in t.items()} for n, t in (("batch", bn), ("group", gn))}
    return {"acc": acc, "status": {}}


def _c17(bn, gn) -> str:
    e = NormBatch()
    return e.decide(_c17_data(bn, gn), e.params(True))[0].verdict


def test_c17_supported_refuted_inconclusive():
    flat = {2: (0.95, 0.95), 4: (0.95, 0.955), 32: (0.955, 0.95), 128: (0.94, 0.94)}
    # BN loses 5+ points at small batch in every seed, GN flat
    assert _c17({2: (0.85, 0.86), 4: (0.92, 0.91), 32: (0.96, 0.96), 128: (0.95, 0.95)}, flat) == "supported"
    # BN as good at 2 and 4 as at 32 in every seed
    assert _c17({2: (0.96, 0.955), 4: (0.96, 0.96), 32: (0.96, 0.955), 128: (0.95, 0.95)}, flat) == "refuted"
    # GN depends strongly on B
    assert _c17({2: (0.85, 0.86), 4: (0.92, 0.91), 32: (0.96, 0.96), 128: (0.95, 0.95)},
                {2: (0.85, 0.86), 4: (0.9, 0.9), 32: (0.96, 0.96), 128: (0.95, 0.95)}) == "refuted"
    # seeds disagree: one shows a big drop, the other the opposite
    assert _c17({2: (0.90, 0.99), 4: (0.90, 0.99), 32: (0.96, 0.955), 128: (0.95, 0.95)}, flat) == "inconclusive"


def test_c17_plot_and_smoke(tmp_path):
    e = NormBatch()
    p = {"task": "digits-cnn", "norms": ["batch", "group"], "batches": [2, 32], "epochs": 0.02, "lr32": 0.05,
         "seeds": [0]}
    ctx = _ctx(tmp_path, e.id)
    data = e.run(ctx, p)
    assert set(data["acc"]) == {"batch", "group"} and set(data["acc"]["batch"]) == {"2", "32"}
    assert e.decide(data, p)[0].verdict in ("supported", "refuted", "inconclusive")
    check_figures(e.plot(data, p))
    check_figures(e.plot(_c17_data({2: (0.8, 0.81), 4: (0.9, 0.9), 32: (0.95, 0.96)},
                                 {2: (0.95, 0.95), 4: (0.95, 0.95), 32: (0.95, 0.95)}), e.params(True)))
    assert ctx.trials_run == 4
    e.run(ctx, p)  # everything is cached now
    assert ctx.trials_run == 4


# ---------------------------------------------------------------- C18


def _c18_data(gaps: dict[float, tuple[float, float]]) -> dict:
    runs = {}
    for m, (g0, g1) in gaps.items():
        runs[str(m)] = {s: {"status": "ok", "acc_ema": 0.9, "acc_precise": 0.9 + g, "acc_batch": 0.88,
                            "mean_shift_in_std": 0.1, "abs_log_var_ratio": 0.05, "steps": 100}
                        for s, g in (("0", g0), ("1", g1))}
    return {"runs": runs}


def _c18(gaps) -> str:
    e = BNEvalStats()
    p = {**e.params(True), "momenta": list(gaps)}
    return e.decide(_c18_data(gaps), p)[0].verdict


def test_c18_supported_refuted_inconclusive():
    assert _c18({0.01: (0.02, 0.03), 0.1: (0.0, 0.003), 0.9: (0.01, 0.0)}) == "supported"
    assert _c18({0.01: (0.02, 0.03), 0.1: (-0.02, -0.03), 0.9: (0.01, 0.0)}) == "refuted"
    assert _c18({0.01: (0.02, 0.03), 0.1: (-0.03, 0.01), 0.9: (0.01, 0.0)}) == "inconclusive"


def test_population_stats_are_split_invariant_and_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(64, 5) * 3 + 1
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    population_bn_stats(m1, x, 64)
    population_bn_stats(m2, x, 8)
    # the first BN's input does not depend on the batch split: the stats are the population's
    h = model[0](x).detach()
    assert torch.allclose(m1[1].running_mean, h.mean(0), atol=1e-5)
    assert torch.allclose(m1[1].running_var, h.var(0, unbiased=True), atol=1e-4)
    assert torch.allclose(m2[1].running_mean, m1[1].running_mean, atol=1e-5)
    assert torch.allclose(m2[1].running_var, m1[1].running_var, atol=1e-4)
    assert m1.training  # mode restored
    before = model[1].running_mean.clone()
    loss, acc = batch_stats_eval(model, x, torch.zeros(64, dtype=torch.long), type("T", (), {
        "loss": staticmethod(nn.functional.cross_entropy), "metric": staticmethod(lambda a, b: 0.5)}), 16)
    assert acc == 0.5 and torch.equal(model[1].running_mean, before)


def test_one_thread_restores():
    from batchlab.experiments.base import one_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with one_thread("cuda"):  # nothing changes for a GPU run
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_c18_plot_and_smoke(tmp_path):
    e = BNEvalStats()
    p = {"task": "digits-mlp", "batch_size": 16, "epochs": 0.1, "lr": 0.02, "momenta": [0.1], "seeds": [0]}
    data = e.run(_ctx(tmp_path, e.id), p)
    r = data["runs"]["0.1"]["0"]
    assert r["status"] == "ok" and 0 <= r["acc_precise"] <= 1 and 0 <= r["acc_batch"] <= 1
    assert e.decide(data, p)[0].verdict in ("supported", "refuted", "inconclusive")
    check_figures(e.plot(data, p))
    check_figures(e.plot(_c18_data({0.01: (0.02, 0.03), 0.1: (0.0, 0.003)}), e.params(True)))


# ---------------------------------------------------------------- C20


def _c20_data(diffs: dict[int, tuple[float, float]]) -> dict:
    acc, curves, stats = {}, {}, {}
    for L, (d0, d1) in diffs.items():
        acc[str(L)] = {"layer": {"0": 0.95, "1": 0.95}, "batch": {"0": 0.95 - d0, "1": 0.95 - d1},
                       "batch_masked": {"0": 0.95, "1": 0.95}}
        curves[str(L)] = {a: {s: {"step": [0, 10], "val_acc": [0.3, v]} for s, v in acc[str(L)][a].items()}
                          for a in acc[str(L)]}
        stats[str(L)] = {"padding_fraction": 1 - 18 / L, "mean_error_in_std": 0.5, "abs_log_var_ratio": 0.4,
                         "batch_std_of_mean_with_padding": 0.1, "batch_std_of_mean_real_only": 0.05}
    return {"acc": acc, "curves": curves, "padding_stats": stats}


def _c20(diffs) -> str:
    e = SeqNorm()
    p = {**e.params(True), "pads": list(diffs)}
    return e.decide(_c20_data(diffs), p)[0].verdict


def test_c20_supported_refuted_inconclusive():
    assert _c20({32: (0.0, 0.01), 64: (0.03, 0.05)}) == "supported"
    assert _c20({32: (0.0, 0.01), 64: (-0.03, -0.02)}) == "refuted"
    assert _c20({32: (0.0, 0.01), 64: (-0.04, 0.01)}) == "inconclusive"


def test_c20_plot_and_smoke(tmp_path):
    e = SeqNorm()
    p = {"task": "sequence-cls", "n_samples": 200, "max_len": 12, "batch_size": 16, "lr": 0.05, "stat_batches": 3,
         "pads": [12, 24], "max_steps": 8, "seeds": [0]}
    data = e.run(_ctx(tmp_path, e.id), p)
    assert set(data["acc"]) == {"12", "24"} and set(data["acc"]["24"]) == {"layer", "batch", "batch_masked"}
    ps = data["padding_stats"]
    assert ps["24"]["padding_fraction"] > ps["12"]["padding_fraction"] > 0
    assert e.decide(data, p)[0].verdict in ("supported", "refuted", "inconclusive")
    check_figures(e.plot(data, p))
    check_figures(e.plot(_c20_data({32: (0.0, 0.01), 64: (0.03, 0.05)}), e.params(True)))


@pytest.mark.parametrize("cls", [NormBatch, BNEvalStats, SeqNorm])
def test_params_are_json_and_have_rules(cls):
    import json

    e = cls()
    for q in (True, False):
        json.dumps(e.params(q))
    assert all(c in e.rules and c in e.statements for c in e.claims)
