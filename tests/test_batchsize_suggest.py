"""suggest() end to end on a tiny task, its JSON, store resume, failure status, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from batchlab.batchsize import Suggestion, suggest
from batchlab.cli import main
from batchlab.store import Store
from batchlab.train import scale_lr
from conftest import make_toy_task

FAST = dict(budget_epochs=8.0, high=64, objective="epochs")


def test_suggest_end_to_end_and_resume(tmp_path, monkeypatch) -> None:
    task = make_toy_task(n_train=256)
    s = suggest(task, store=Store(tmp_path), **FAST)
    assert s.status == "ok" and s.batch_size in (2, 4, 8, 16, 32, 64)
    assert s.accumulation == 1 and s.micro_batch == s.batch_size
    assert s.lr == pytest.approx(scale_lr(task.lr, task.batch_size, s.batch_size, "linear"))
    assert s.budget_examples == 8 * 256 and s.cost_budget == 8 * 256 and s.total_examples <= s.cost_budget
    assert [c["batch_size"] for c in s.predict.candidates] == [2, 4, 8, 16, 32, 64]
    assert s.search.trials and all(t["examples"] >= 1 for t in s.search.trials)
    assert math.isfinite(s.b_noise) and s.rationale and s.summary().startswith("toy: batch size")
    again = Suggestion.from_dict(json.loads(s.to_json()))
    assert again.batch_size == s.batch_size and json.dumps(again.search.rungs) == json.dumps(s.search.rungs)
    # rerun: every training run comes from the store
    monkeypatch.setattr("batchlab.batchsize.search.fit", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr("batchlab.batchsize.noise.fit", lambda *a, **k: pytest.fail("noise run trained again"))
    s2 = suggest(task, store=Store(tmp_path), **FAST)
    assert s2.batch_size == s.batch_size and s2.search.trials == s.search.trials


def test_small_batch_with_batchnorm_measures_the_alternatives_or_says_why_not() -> None:
    task = make_toy_task(n_train=256)
    s = suggest(task, **{**FAST, "high": 8, "cost_budget": 40 * 256})
    assert s.batch_size is not None and s.batch_size <= 8
    adv = s.advise.norm_advice
    assert adv is not None and "small for BatchNorm" in adv["message"]
    # the two made for small batches (Ghost BN at a batch below its virtual batch would be BatchNorm itself)
    assert set(adv["alternatives"]) == {"group", "renorm"} and all(0 <= v["mean"] <= 1 for v in adv["alternatives"].values())
    # advice is given only when the budget separates an alternative from BatchNorm
    assert bool(adv["advised"]) == ("consider" in adv["message"])
    tight = suggest(task, **{**FAST, "high": 8})  # one full run: the check must fit in what is left, or not run
    assert tight.total_examples <= tight.cost_budget
    if tight.advise.norm_advice is not None and not tight.advise.norm_advice["alternatives"]:
        assert "not measured: the cost budget has" in tight.advise.norm_advice["message"]


def test_nan_loss_task_is_a_recorded_failure() -> None:
    task = make_toy_task(n_train=256)
    task.loss = lambda logits, y: torch.nn.functional.cross_entropy(logits, y) * math.nan
    s = suggest(task, **{**FAST, "high": 32})
    assert s.status == "failed" and s.batch_size is None and s.lr is None
    assert {t["status"] for t in s.search.trials} == {"diverged"}
    assert s.measure.noise["status"] == "diverged"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"low": 64, "high": 8}, "low must be <= high, got low=64 > high=8"),
     ({"low": 200, "high": 256}, r"low must be <= the training-set size \(128 examples\), got 200"),
     ({"cost_budget": 0}, r"cost_budget must be a positive number of examples, got 0"),
     ({"seeds": (0,)}, r"seeds must hold at least two distinct seeds"),
     ({"eta": 1}, r"eta must be an integer >= 2, got 1")],
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
        (["suggest", "--task", TOY, "--objective", "epochs", "--time-budget", "3"], "--time-budget needs --objective time"),
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
    assert main(["suggest", "--task", TOY, "--out", str(out), "--quick", "--high", "32", "--budget", "8", "--quiet",
                 "--objective", "epochs"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("toy: batch size") and (out / "index.html").exists() and (out / "batchlab.db").exists()
    page = (out / "index.html").read_text()
    assert page.count("<img") >= 2 and "Successive halving" in page and "Candidates: time and quality" in page
    assert page.index("Recommendation") < page.index("Candidates: time and quality") < page.index("Evidence")
    # the same command on the finished folder shows the answer and rewrites nothing (the wall time of
    # the run that made it was replaced by the rerun's)
    before = (out / "suggestion.json").read_bytes()
    assert main(["suggest", "--task", TOY, "--out", str(out), "--quick", "--high", "32", "--budget", "8", "--quiet",
                 "--objective", "epochs"]) == 0
    again = capsys.readouterr().out
    assert again.startswith(text.splitlines()[0]) and "nothing was run" in again
    assert (out / "suggestion.json").read_bytes() == before


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


class _SlowPairs(torch.utils.data.Dataset):
    """A Dataset whose every item takes ``delay`` seconds (decoding, augmentation)."""

    def __init__(self, n: int, delay: float, fail_at: int | None = None) -> None:
        self.n, self.delay = n, delay
        self.x, self.y = torch.randn(n, 8), torch.randint(0, 3, (n,))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import time

        time.sleep(self.delay)
        return self.x[i], self.y[i]


class _FailsAt16(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 16:
            raise RuntimeError("this model cannot take 16")
        return self.lin(x)


def test_throughput_reports_the_data_pipeline_and_a_failing_size_apart() -> None:
    from batchlab import Task
    from batchlab.batchsize import throughput

    slow = Task.from_torch("slow", lambda: torch.nn.Linear(8, 3), _SlowPairs(128, 0.004), _SlowPairs(16, 0.0),
                           batch_size=8, lr=0.1)
    r = throughput(slow, [4, 8], warmup=0, repeats=1)
    # 4 ms per item read in this process: at most 250 examples/s, whatever the step time says
    assert r.data_batch == 8 and 60 < r.data_examples_per_sec < 260
    assert all(e > r.data_examples_per_sec for e in r.examples_per_sec)  # the steps alone are faster
    assert throughput(make_toy_task(n_train=64), [4], warmup=0, repeats=1).data_examples_per_sec is None  # in memory
    bad = Task.from_torch("bad", _FailsAt16, _SlowPairs(64, 0.0), _SlowPairs(16, 0.0), batch_size=8, lr=0.1)
    r = throughput(bad, [8, 16, 32], warmup=0, repeats=1)
    assert r.status == ["ok", "failed", "ok"] and "RuntimeError: this model cannot take 16" in r.errors[1]
    assert math.isnan(r.step_time_raw[1]) and math.isfinite(r.step_time[2])


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
    assert s.search.trials and all(t["status"] != "ok" for t in s.search.trials)
    page = write_suggestion_report(s, tmp_path).read_text()
    assert "diverged" in page


def test_throughput_times_a_padded_batch_of_typical_length() -> None:
    # one random batch per size: a small batch padded to 28 tokens where 34 is typical looked faster
    from batchlab.batchsize.throughput import _elements, _representative_batch

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 9, (int(n),), generator=g) for n in torch.randint(2, 40, (200,), generator=g)]

    def pad(items):  # type: ignore[no-untyped-def]
        t = max(len(s) for s in items)
        x = torch.zeros(len(items), t, dtype=torch.long)
        for i, s in enumerate(items):
            x[i, : len(s)] = s
        return x, torch.zeros(len(items), dtype=torch.long)

    from batchlab import Task

    task = Task.from_torch("padded", lambda: torch.nn.Embedding(9, 2), seqs, seqs, collate_fn=pad, forward=lambda m, b: m(b[0]).mean(1))
    sizes = sorted(_elements(task.sample_batch(4, seed=s)) for s in range(5))
    assert _elements(_representative_batch(task, 4, torch.device("cpu"))) == sizes[2]  # the median of the 5
    fixed = make_toy_task(n_train=64)
    assert torch.equal(_representative_batch(fixed, 8, torch.device("cpu"))[0], fixed.sample_batch(8, seed=0)[0])
