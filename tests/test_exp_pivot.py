"""Experiment C14: decision rule on built data, figure, and a cheap smoke run."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from batchlab.experiments.base import ExperimentContext
from batchlab.experiments.pivot import PivotSearch
from batchlab.store import Store


def _data(acc_by_b: dict[int, tuple[float, float]], path: list[int], best: int, noise: float = 0.005) -> dict:
    grid = {str(b): {s: {"status": "ok", "metric": v, "examples": 1000, "train_time": 10.0 / b, "steps": 1000 // b}
                     for s, v in zip("01", vals)} for b, vals in acc_by_b.items()}
    means = {str(b): sum(acc_by_b[b]) / 2 for b in path}
    return {"grid": grid, "search": {"best_batch": best, "path": path, "means": means, "noise": noise,
                                     "stop_reason": "test", "budget_examples": 1000, "notes": []}}


PEAK16 = {2: (0.80, 0.81), 4: (0.88, 0.87), 8: (0.93, 0.93), 16: (0.96, 0.96), 32: (0.95, 0.95), 64: (0.93, 0.93),
          128: (0.90, 0.90), 256: (0.85, 0.85), 512: (0.75, 0.75)}


def _v(data) -> str:
    e = PivotSearch()
    (v,) = e.decide(data, e.params(True))
    return "invalid" if not v.valid else v.verdict


def test_c14_supported_refuted_inconclusive_invalid():
    peak32 = {b: PEAK16[max(2, b // 2)] for b in PEAK16}
    assert _v(_data(peak32, [128, 64, 32, 16], 32)) == "supported"  # exact, 4 of 9 sizes, beats staying at 128
    assert _v(_data(peak32, [128, 64, 32], 64)) == "supported"  # one power of 2 away
    assert _v(_data(PEAK16, [128, 64, 256], 128)) == "refuted"  # stayed at 128: does not beat the null
    assert _v(_data(PEAK16, [128, 64, 256, 32, 16, 8], 16)) == "refuted"  # 6 of 9 sizes: over 50% of the examples
    assert _v(_data(peak32, [128, 64, 32, 2], 32)) == "refuted"  # 4 of 9 sizes but B=2 costs over half the time
    shallow = {**PEAK16, 32: (0.955, 0.955), 64: (0.95, 0.95)}
    assert _v(_data(shallow, [128, 64, 256], 64, noise=0.012)) == "inconclusive"  # 2 octaves off, within noise
    peak64 = {b: PEAK16[max(2, b // 4)] for b in PEAK16}
    assert _v(_data(peak64, [128, 64, 256, 32], 64)) == "invalid"  # the optimum is next to 128: nothing to find


def test_c14_plot_and_smoke(tmp_path):
    e = PivotSearch()
    p = {**e.params(True), "low": 64, "high": 256, "pivot": 128, "epochs": 0.2, "seeds": [0, 1]}
    ctx = ExperimentContext(e.id, True, [0, 1], "cpu", Store(tmp_path / "batchlab.db"), tmp_path)
    data = e.run(ctx, p)
    assert set(data["grid"]) == {"64", "128", "256"}
    assert set(data["search"]["path"]) <= {64, 128, 256}
    assert ctx.trials_run == 6  # the search's trials were all loaded from the grid's
    json.dumps(data)
    assert e.decide(data, p)[0].verdict in ("supported", "refuted", "inconclusive")
    for figs in (e.plot(data, p), e.plot(_data(PEAK16, [128, 64, 256, 32, 16, 8], 16), e.params(True))):
        for fig in figs:  # noqa: B007
            for ax in fig.axes:
                if ax.has_data():
                    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
            plt.close(fig)
