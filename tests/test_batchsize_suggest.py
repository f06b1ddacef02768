"""suggest() end to end on a tiny task, its JSON, store resume, failure status, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from batchlab.batchsize import Suggestion, suggest
from batchlab.batchsize import search as search_mod
from batchlab.cli import main
from batchlab.store import Store
from batchlab.train import scale_lr
from conftest import make_toy_task

FAST = dict(noise_steps=10, noise_micro_batch=4, repeats=1, budget_epochs=1.0, check_fraction=0.5, high=64)


def test_suggest_end_to_end_and_resume(tmp_path, monkeypatch) -> None:
    task = make_toy_task(n_train=256)
    s = suggest(task, store=Store(tmp_path), **FAST)
    assert s.status == "ok" and s.batch_size in (2, 4, 8, 16, 32, 64)
    assert s.accumulation == 1 and s.micro_batch == s.batch_size
    assert s.lr == pytest.approx(scale_lr(task.lr, task.batch_size, s.batch_size, "linear"))
    assert s.budget_examples == 256 and s.check_examples == 128
    assert len(s.search["trials"]) >= 6 and all(t["examples"] == 128 for t in s.search["trials"])
    assert [c["batch_size"] for c in s.candidates] == [2, 4, 8, 16, 32, 64]
    assert math.isfinite(s.b_noise) and s.rationale and s.summary().startswith("toy: batch size")
    again = Suggestion.from_dict(json.loads(s.to_json()))
    assert again.batch_size == s.batch_size and again.search["path"] == s.search["path"]
    # rerun: every training run comes from the store
    calls = []
    monkeypatch.setattr(search_mod, "fit", lambda *a, **k: calls.append(a) or pytest.fail("trained again"))
    monkeypatch.setattr("batchlab.batchsize.noise.fit", lambda *a, **k: pytest.fail("noise run trained again"))
    s2 = suggest(task, store=Store(tmp_path), **FAST)
    assert calls == [] and s2.batch_size == s.batch_size and s2.search["trials"] == s.search["trials"]


def test_small_batch_with_batchnorm_measures_groupnorm() -> None:
    task = make_toy_task(n_train=128)
    s = suggest(task, **{**FAST, "high": 8})
    assert s.batch_size is not None and s.batch_size <= 8
    assert s.norm_advice is not None and {"group", "precise"} <= set(s.norm_advice["alternatives"])
    assert all(0 <= v <= 1 for v in s.norm_advice["alternatives"].values())
    assert any("BatchNorm" in r for r in s.rationale)


def test_nan_loss_task_is_a_recorded_failure() -> None:
    task = make_toy_task(n_train=128)
    task.loss = lambda logits, y: torch.nn.functional.cross_entropy(logits, y) * math.nan
    s = suggest(task, **{**FAST, "high": 32})
    assert s.status == "failed" and s.batch_size is None and s.lr is None
    assert {t["status"] for t in s.search["trials"]} == {"diverged"}
    assert s.noise["status"] == "diverged"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"low": 64, "high": 8}, "low must be <= high, got low=64 > high=8"),
     ({"low": 200, "high": 256}, r"low must be <= the training-set size \(128 examples\), got 200"),
     ({"check_fraction": 0.0}, r"check_fraction must be in \(0, 1\]")],
)
def test_suggest_bad_input(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        suggest(make_toy_task(n_train=128), **kwargs)


TOY = "conftest:make_toy_task"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["suggest", "--task", TOY, "--low", "64", "--high", "8"], "--low (64) must be <= --high (8)"),
        (["suggest", "--task", TOY, "--low", "4096", "--high", "8192"], "larger than the training set"),
        (["suggest", "--task", TOY, "--seeds", "1"], "--seeds must be >= 2"),
        (["suggest", "--task", "no-such-task"], "unknown task"),
        (["suggest", "--task", TOY, "--budget", "-1"], "must be a positive"),
        (["throughput", "--task", TOY, "--batch-sizes", "8,100000"], "--batch-sizes 100000 is larger than the training set"),
        (["find-max-batch", "--task", TOY, "--memory-limit", "lots"], "must be a size like 4G"),
        (["noise-scale", "--task", TOY, "--micro-batch", "200", "--accumulation", "4"], "larger than the training set"),
        (["noise-scale", "--task", TOY, "--accumulation", "1"], "--accumulation must be >= 2"),
    ],
)
def test_cli_bad_input_exits_2(argv, needle, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_cli_commands(tmp_path, capsys) -> None:
    assert main(["find-max-batch", "--task", TOY, "--memory-limit", "1G"]) == 0
    assert json.loads(capsys.readouterr().out)["batch_size"] == 256
    assert main(["throughput", "--task", TOY, "--batch-sizes", "4,16", "--repeats", "1", "--quiet"]) == 0
    assert "knee" in capsys.readouterr().out
    assert main(["noise-scale", "--task", TOY, "--steps", "5", "--micro-batch", "4", "--quiet"]) == 0
    assert "b_simple" in json.loads(capsys.readouterr().out)
    out = tmp_path / "sg"
    assert main(["suggest", "--task", TOY, "--out", str(out), "--quick", "--high", "32", "--budget", "1", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "toy: batch size" in text and (out / "index.html").exists() and (out / "batchlab.db").exists()
    page = (out / "index.html").read_text()
    assert page.count("<img") >= 5 and "Pivot search" in page and "Full-budget confirmation" in page
    assert "screen&#x27;s candidate" in page or "screen's candidate" in page


def test_suggest_confirms_against_the_incumbent_at_the_full_budget() -> None:
    task = make_toy_task(n_train=256)
    s = suggest(task, **FAST)
    c = s.search["confirm"]
    means = {int(b): v for b, v in s.search["means"].items()}
    screened = max(b for b, v in means.items() if v >= max(means.values()) - s.search["noise"])
    assert len(c["candidates"]) == 2 and screened in c["candidates"] and c["incumbent"] == task.batch_size
    assert c["screened"] == screened
    other = next(b for b in c["candidates"] if b != screened)
    # the task's own batch size, unless the screen chose it (then its neighbour)
    assert other == task.batch_size if screened != task.batch_size else other in (2 * screened, screened // 2)
    assert s.batch_size == c["batch"] in c["candidates"]
    assert s.examples_processed["confirm"] == 2 * s.budget_examples  # one seed each, full budget
    lo, hi = sorted(c["candidates"])
    m = {int(k): v for k, v in c["metrics"].items()}
    assert s.batch_size == (lo if m[lo] > m[hi] else hi)  # the better; the larger on a tie
    assert s.lr == pytest.approx(scale_lr(task.lr, task.batch_size, s.batch_size, "linear"))
    off = suggest(task, **{**FAST, "confirm": False})
    assert off.batch_size == off.search["best_batch"] and off.examples_processed["confirm"] == 0


def test_challenger_is_the_largest_batch_within_the_noise_of_the_screen_best() -> None:
    import importlib

    sg = importlib.import_module("batchlab.batchsize.suggest")
    means = {"8": 0.363, "16": 0.356, "32": 0.332, "4": float("-inf")}
    assert sg._challenger(means, 0.01) == 16
    assert sg._challenger(means, 0.001) == 8
    assert sg._challenger(means, 0.05) == 32
    assert sg._challenger(means, float("nan")) == 8
    assert sg._challenger({"8": 0.5, "16": 0.5}, 0.0) == 16  # exact tie: the larger


def test_confirm_picks_the_better_full_budget_run(monkeypatch) -> None:
    """_confirm's rule on recorded metrics: incumbent vs screened, neighbour when they coincide."""
    from types import SimpleNamespace

    import importlib

    sg = importlib.import_module("batchlab.batchsize.suggest")

    task = make_toy_task(n_train=256)  # batch_size 32
    search = SimpleNamespace(seeds=[0, 1], rule="linear")
    sizes = [2, 4, 8, 16, 32, 64]

    def run(metrics: dict[int, float], screened: int) -> tuple[int, list[int]]:
        store = SimpleNamespace(run_or_load=lambda key, fn, kind: {"status": "ok", "metric": metrics[seen.pop(0)], "examples": 256})
        seen = sorted({screened, *(b for b in metrics if b != screened)})
        b, rec, examples, line = sg._confirm(task, search, screened, sizes, 64, False, 256, "cpu", store, {})
        assert examples == 512 and "confirmed the screen's" in line
        return b, rec["candidates"]

    assert task.batch_size == 32
    assert run({8: 0.90, 32: 0.91}, 8) == (32, [8, 32])
    assert run({8: 0.92, 32: 0.91}, 8) == (8, [8, 32])
    assert run({8: 0.91, 32: 0.91}, 8) == (32, [8, 32])  # tie: the larger
    assert run({32: 0.91, 64: 0.93}, 32) == (64, [32, 64])  # screened == incumbent: x2 neighbour
    assert run({32: 0.90, 64: 0.93}, 64)[1] == [32, 64]


def test_throughput_min_over_interleaved_repeats_and_time_bound() -> None:
    from batchlab.batchsize import throughput

    task = make_toy_task(n_train=256)
    # min_time huge: fast sizes get extra rounds up to max_repeats (no time limit reached)
    r = throughput(task, [4, 16], warmup=1, repeats=2, max_repeats=5, min_time=1e9, time_limit=1e9, extra_examples=10**6)
    assert [len(t) for t in r.step_times_all] == [5, 5]
    assert r.step_time_raw == [min(t) for t in r.step_times_all]
    assert r.step_time == [min(r.step_time_raw[i:]) for i in range(2)]  # non-decreasing in the batch
    assert all(m >= t for m, t in zip(r.step_time_median, r.step_time))
    assert r.examples_processed == (1 + 5) * (4 + 16)
    # the extra rounds' examples are capped (default sum(sizes) // 4 = 5), smallest sizes first
    r = throughput(task, [4, 16], warmup=0, repeats=1, max_repeats=50, min_time=1e9, time_limit=1e9)
    assert [len(t) for t in r.step_times_all] == [2, 1] and r.examples_processed == 20 + 4
    # time limit 0: only the mandatory rounds
    r = throughput(task, [4, 16], warmup=0, repeats=3, max_repeats=50, min_time=1e9, time_limit=0.0)
    assert [len(t) for t in r.step_times_all] == [3, 3] and r.examples_processed == 3 * 20
    # min_time 0 and no extra examples: nothing beyond the mandatory rounds either
    r = throughput(task, [8], warmup=0, repeats=2, max_repeats=50, min_time=0.0, extra_examples=0)
    assert len(r.step_times_all[0]) == 2 and r.knee == 8


def test_monotone_step_times_and_settling() -> None:
    from batchlab.batchsize.throughput import _settled, monotone_step_times

    # a contention spike at B=4 (10x slower than B=8) is repaired; NaN (OOM) stays NaN
    r = monotone_step_times([2, 4, 8, 16], [1e-3, 1e-2, 1.1e-3, math.nan])
    assert r[:3] == [1e-3, 1.1e-3, 1.1e-3] and math.isnan(r[3])
    assert monotone_step_times([8, 2, 4], [3.0, 5.0, 1.0]) == [3.0, 1.0, 1.0]  # order of sizes does not matter
    assert _settled([1.0, 1.2]) and not _settled([1.0, 3.0]) and not _settled([1.0]) and not _settled([])


def test_a_failed_suggestion_still_writes_its_report(tmp_path) -> None:
    """A task whose loss is NaN from the first step: every trial is recorded as failed, no batch is
    recommended, and the report still renders (with the failed trials listed)."""
    import torch

    from batchlab.batchsize.report import write_suggestion_report

    task = make_toy_task(n_train=256)
    task.loss = lambda logits, y: torch.nn.functional.cross_entropy(logits, y) * float("nan")
    s = suggest(task, **{**FAST, "store": tmp_path})
    assert s.status == "failed" and s.batch_size is None
    assert s.search["trials"] and all(t["status"] != "ok" for t in s.search["trials"])
    page = write_suggestion_report(s, tmp_path).read_text()
    assert "diverged" in page
