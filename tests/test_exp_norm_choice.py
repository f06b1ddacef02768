"""Experiments C17, C18, C20: decision rules on built data, figures, and cheap smoke runs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import pytest
import torch
import torch.nn as nn

from batchlab.experiments.base import ExperimentContext
from batchlab.experiments.norm_choice import BNEvalStats, NormBatch, SeqNorm, batch_stats_eval
from batchlab.store import Store
from tests.helpers.figures import check_figures


def _ctx(tmp_path, exp_id: str, seeds=(0,)) -> ExperimentContext:
    return ExperimentContext(exp_id, True, list(seeds), "cpu", Store(tmp_path / "batchlab.db"), tmp_path)



# ---------------------------------------------------------------- C17


def _c17_task(bn: dict[int, tuple[float, float]], gn: dict[int, tuple[float, float]],
              none32: float = 0.90, per_device: dict[int, tuple[float, float]] | None = None) -> dict:
    """One task's data: the equal-epochs arm's ``bn``, ``gn`` (and no norm at 32), and BN's per-device arm
    (default: the same accuracies as ``bn`` at 2 and 4)."""
    acc = {n: {str(b): {"0": v[0], "1": v[1]} for b, v in t.items()} for n, t in (("batch", bn), ("group", gn))}
    acc["none"] = {"32": {"0": none32, "1": none32}}
    dev = per_device if per_device is not None else {g: bn[g] for g in (2, 4)}
    return {"acc": acc, "status": {}, "devices": {str(g): {"0": v[0], "1": v[1]} for g, v in dev.items()}}


def _c17_data(bn, gn, none32: float = 0.90, second: dict | None = None) -> dict:
    """Task 'a' with the given accuracies; task 'b' the same unless ``second`` is given."""
    return {"tasks": {"a": _c17_task(bn, gn, none32), "b": second or _c17_task(bn, gn, none32)}}


def _c17(bn, gn, **kw) -> str:
    e = NormBatch()
    (v,) = e.decide(_c17_data(bn, gn, **kw), e.params(True))
    return "invalid" if not v.valid else v.verdict


FLAT = {2: (0.95, 0.95), 4: (0.95, 0.955), 32: (0.955, 0.95), 128: (0.94, 0.94)}
DROP = {2: (0.85, 0.86), 4: (0.92, 0.91), 32: (0.96, 0.96), 128: (0.95, 0.95)}
SAME = {2: (0.96, 0.955), 4: (0.96, 0.96), 32: (0.96, 0.955), 128: (0.95, 0.95)}


def test_c17_supported_refuted_inconclusive_invalid():
    assert _c17(DROP, FLAT) == "supported"  # BN loses 5+ points at small batch in every seed, GN flat
    assert _c17(SAME, FLAT) == "refuted"  # BN as good at 2 and 4 as at 32 in every seed
    assert _c17(DROP, {2: (0.85, 0.86), 4: (0.9, 0.9), 32: (0.96, 0.96), 128: (0.95, 0.95)}) == "refuted"  # GN steep
    # seeds disagree: one shows a big drop, the other the opposite
    assert _c17({2: (0.90, 0.99), 4: (0.90, 0.99), 32: (0.96, 0.955), 128: (0.95, 0.95)}, FLAT) == "inconclusive"
    # the two tasks disagree
    assert _c17(DROP, FLAT, second=_c17_task(SAME, FLAT)) == "inconclusive"
    # no normalization is as good as BN at 32 on both tasks: the tasks cannot show BN degrading
    assert _c17(SAME, FLAT, none32=0.97) == "invalid"
    # ... on one task only: that task is left out, the other decides
    assert _c17(DROP, FLAT, second=_c17_task(SAME, FLAT, none32=0.97)) == "supported"


def test_c17_bn_drop_comes_from_the_per_device_arm():
    e = NormBatch()
    # equal epochs: BN as good at 2 and 4 as at 32 (more steps make up for it); per device: BN loses 6+ points
    t = _c17_task(SAME, FLAT, per_device={2: (0.88, 0.89), 4: (0.90, 0.91)})
    (v,) = e.decide({"tasks": {"a": t}}, e.params(True))
    assert v.verdict == "supported"
    r = v.effect["a"]
    assert r["bn_drop"]["mean"] == pytest.approx((0.96 - 0.89) / 2 + (0.955 - 0.90) / 2)
    assert r["bn_drop_one_device"]["mean"] == pytest.approx(0.0, abs=0.005)
    # and the reverse: the equal-epochs arm drops, the per-device arm does not -> refuted
    t = _c17_task(DROP, FLAT, per_device={2: (0.96, 0.96), 4: (0.96, 0.96)})
    assert e.decide({"tasks": {"a": t}}, e.params(True))[0].verdict == "refuted"
    # no per-device runs (a store of the earlier edition): undecided, never judged from the other arm
    t = _c17_task(DROP, FLAT)
    t.pop("devices")
    (v,) = e.decide({"tasks": {"a": t}}, e.params(True))
    assert v.verdict == "inconclusive" and "per device" in v.reason


def test_c17_per_task_settings_and_their_gpu_scale():
    e = NormBatch()
    for quick in (True, False):
        p = e.params(quick)
        assert p["tasks"] == ["digits-mlp", "shapes32-cnn", "shapes32-vgg"]
        sp = e.task_params(p, "shapes32-cnn")
        assert sp["lr32"] == 0.025 and {2, 4, 32} <= set(sp["batches"]) and {"batch", "group", "none"} <= set(sp["norms"])
        assert e.task_params(p, "shapes32-vgg") == sp  # the two CNNs differ in depth only
        assert e.task_params(p, "digits-mlp")["lr32"] == 0.05
        g = e.params_for(quick, "cuda")
        assert e.task_params(g, "shapes32-cnn")["epochs"] == 4 * sp["epochs"]
        assert e.task_params(g, "shapes32-vgg")["epochs"] == 4 * sp["epochs"]
        assert e.task_params(g, "digits-mlp")["epochs"] == 4 * p["epochs"]


def test_c17_prints_wu_and_he_beside_the_measured_numbers():
    e = NormBatch()
    (v,) = e.decide(_c17_data(DROP, FLAT), e.params(True))
    pub = v.published
    assert pub["published"]["BN"] == [23.6, 23.7, 24.8, 27.3, 34.7] and pub["published"]["GN"][-1] == 24.1
    assert pub["trend_agrees"] == {"a": True, "b": True}
    assert pub["measured"]["a"]["BN_drop_points"] == pytest.approx(100 * (0.96 - (0.855 + 0.915) / 2))
    (v,) = e.decide(_c17_data(SAME, FLAT), e.params(True))
    assert v.published["trend_agrees"] == {"a": False, "b": False}


def test_c17_plot_and_smoke(tmp_path):
    e = NormBatch()
    p = {"tasks": ["digits-mlp", "shapes32-cnn"], "norms": ["batch", "group", "none"], "batches": [2, 32],
         "devices": [2], "epochs": 0.0223, "lr32": 0.05, "seeds": [0],  # 32 digits: whole batches
         "per_task": {"shapes32-cnn": {"epochs": 0.01, "norms": ["batch", "none"]}}}
    ctx = _ctx(tmp_path, e.id)
    data = e.run(ctx, p)
    t = data["tasks"]["digits-mlp"]
    assert set(t["acc"]) == {"batch", "group", "none"} and set(t["acc"]["batch"]) == {"2", "32"}
    assert set(t["devices"]) == {"2"} and t["status"]["batch_per_device"]["2"]["0"] == "ok"
    assert set(data["tasks"]["shapes32-cnn"]["acc"]) == {"batch", "none"}  # its own grid from per_task
    assert e.decide(data, p)[0].verdict in ("supported", "refuted", "inconclusive")
    check_figures(e.plot(data, p))
    check_figures(e.plot(_c17_data({2: (0.8, 0.81), 4: (0.9, 0.9), 32: (0.95, 0.96)},
                                   {2: (0.95, 0.95), 4: (0.95, 0.95), 32: (0.95, 0.95)}), e.params(True)))
    assert ctx.trials_run == 12  # 6 + 4 equal-epochs runs, one per-device run per task
    e.run(ctx, p)  # everything is cached now
    assert ctx.trials_run == 12


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


def test_c18_invalid_when_the_bn_net_does_not_learn():
    e = BNEvalStats()
    data = _c18_data({0.01: (0.02, 0.03), 0.1: (0.0, 0.003)})
    for seeds in data["runs"].values():
        for r in seeds.values():
            r["acc_ema"] = r["acc_precise"] = 0.5
    (v,) = e.decide(data, {**e.params(True), "momenta": [0.01, 0.1]})
    assert v.verdict == "inconclusive" and not v.valid


def test_batch_stats_eval_leaves_the_running_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(64, 5) * 3 + 1
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


def _c20_data(diffs: dict[int, tuple[float, float]], mean_error: float = 0.5) -> dict:
    acc, curves, stats = {}, {}, {}
    for L, (d0, d1) in diffs.items():
        acc[str(L)] = {"layer": {"0": 0.95, "1": 0.95}, "batch": {"0": 0.95 - d0, "1": 0.95 - d1},
                       "batch_masked": {"0": 0.95, "1": 0.95}}
        curves[str(L)] = {a: {s: {"step": [0, 10], "val_acc": [0.3, v]} for s, v in acc[str(L)][a].items()}
                          for a in acc[str(L)]}
        stats[str(L)] = {"padding_fraction": 1 - 18 / L, "mean_error_in_std": mean_error, "abs_log_var_ratio": 0.4,
                         "batch_std_of_mean_with_padding": 0.1, "batch_std_of_mean_real_only": 0.05}
    return {"acc": acc, "curves": curves, "padding_stats": stats}


def _c20(diffs, **kw) -> str:
    e = SeqNorm()
    p = {**e.params(True), "pads": list(diffs)}
    (v,) = e.decide(_c20_data(diffs, **kw), p)
    return "invalid" if not v.valid else v.verdict


def test_c20_supported_refuted_inconclusive_invalid():
    assert _c20({32: (0.0, 0.01), 64: (0.03, 0.05)}) == "supported"
    assert _c20({32: (0.0, 0.01), 64: (-0.03, -0.02)}) == "refuted"
    assert _c20({32: (0.0, 0.01), 64: (-0.04, 0.01)}) == "inconclusive"
    # padding leaves BN's statistics alone: the task cannot show the effect
    assert _c20({32: (0.0, 0.01), 64: (-0.03, -0.02)}, mean_error=0.01) == "invalid"


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
    assert all(c in e.rules and c in e.statements and c in e.validity for c in e.claims)
