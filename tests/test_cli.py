"""The command line: output, files and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from batchlab.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchlab.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("tasks", "train", "report", "reproduce"):
        assert cmd in r.stdout


def test_python_dash_m_batchlab_is_the_command():
    r = subprocess.run([sys.executable, "-m", "batchlab", "tasks"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "shapes32-vgg" in r.stdout


def test_tasks_lists_builtins(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("digits-mlp", "digits-cnn", "mnist1d-mlp", "mnist1d-cnn", "mnist-cnn", "cifar10-resnet"):
        assert name in out


def test_train_writes_json_and_report(tmp_path: Path, capsys):
    out = tmp_path / "runs"
    for b in ("32", "128"):
        assert main(["train", "--task", "digits-mlp", "--batch-size", b, "--epochs", "2", "--out", str(out), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n}\n")[0] + "\n}")
    assert summary["status"] == "ok" and summary["config"]["batch_size"] == 32
    assert summary["final"]["val_acc"] > 0.5
    files = sorted(out.glob("*.json"))
    assert len(files) == 2
    full = json.loads(files[0].read_text())
    assert len(full["history"]) == 2
    assert main(["report", str(out)]) == 0
    index = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert index == out / "report" / "index.html"
    assert index.exists() and "<img" in index.read_text()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),
        (["--batch-size", "-4"], "argument --batch-size: must be a positive integer, got '-4'"),
        (["--batch-size", "1.5"], "argument --batch-size: must be a positive integer, got '1.5'"),
        (["--batch-size", "5000"], "--batch-size 5000 is larger than the training set of digits-mlp (1438 examples)"),
        (["--batch-size", "600", "--accumulation", "3"],
         "--batch-size 600 x --accumulation 3 = 1800 is larger than the training set of digits-mlp (1438 examples)"),
        (["--optimizer", "rmsprop"], "argument --optimizer: invalid choice: 'rmsprop'"),
        (["--lr", "-1"], "argument --lr: must be a positive finite number, got '-1'"),
        (["--norm", "weird"], "--norm 'weird' is unknown; known:"),
    ],
)
def test_bad_train_arguments_exit_2_with_one_line(cli, args, message):
    r = cli("train", "--task", "digits-mlp", "--epochs", "1", *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert message in lines[0]


def test_unknown_task_and_bad_entry_point_exit_2(cli):
    r = run_cli("train", "--task", "no-such-task")
    assert r.returncode == 2 and "unknown task 'no-such-task'; known tasks:" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("train", "--task", "nonexistent_mod_xyz:make")
    assert r.returncode == 2 and "cannot import module 'nonexistent_mod_xyz'" in r.stderr


def test_report_of_a_missing_folder_exits_2(cli, tmp_path: Path):
    r = cli("report", str(tmp_path / "nope"))
    assert r.returncode == 2 and "is not a folder" in r.stderr


def test_reproduce_markdown_file_that_cannot_be_written_is_refused_before_any_run(cli, tmp_path: Path):
    r = cli("reproduce", "--quick", "--only", "C10", "--out", str(tmp_path / "out"), "--markdown",
            str(tmp_path / "missing" / "x.md"))
    assert r.returncode == 2 and "--markdown" in r.stderr and "does not exist" in r.stderr
    assert not (tmp_path / "out" / "data.json").exists() and not list((tmp_path / "out").glob("*/outcome.json"))


def test_reproduce_only_unknown_claim_exits_2(cli, tmp_path: Path):
    r = cli("reproduce", "--only", "C99", "--out", str(tmp_path))
    assert r.returncode == 2 and "--only 'C99' matches no experiment" in r.stderr


def test_bn_health_reports_every_bn_layer(cli):
    r = cli("bn-health", "--task", "digits-mlp", "--epochs", "0", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [layer["kind"] for layer in report["layers"]] == ["BatchNorm1d"] * 3
    assert all(0.0 <= layer["saturated_fraction"] <= 1.0 for layer in report["layers"])


def test_bn_health_refuses_a_batch_larger_than_the_validation_set(cli):
    r = cli("bn-health", "--task", "digits-mlp", "--batch-size", "100000")
    assert r.returncode == 2 and "--batch-size 100000 is larger than the validation set of digits-mlp (359" in r.stderr


def test_bn_health_bad_checkpoint_exits_2(cli, tmp_path: Path):
    r = cli("bn-health", "--task", "digits-mlp", "--checkpoint", str(tmp_path / "missing.pt"))
    assert r.returncode == 2 and "--checkpoint" in r.stderr and "is not a file" in r.stderr


def test_out_folders_are_never_taken_over_by_another_command_or_settings(tmp_path) -> None:
    import argparse

    from batchlab.cli.common import CliError, claim_out

    def ns(command: str, **kw) -> argparse.Namespace:
        return argparse.Namespace(**{"command": command, "quiet": True, "threads": 1, "out": str(tmp_path), **kw})

    claim_out(tmp_path, ns("suggest", task="digits-mlp", seeds=2))
    claim_out(tmp_path, ns("suggest", task="digits-mlp", seeds=2, threads=2))  # a rerun resumes; threads don't count
    # no result yet (a run refused on its arguments, or stopped before its first trial): another setting may use it
    claim_out(tmp_path, ns("suggest", task="mnist1d-mlp", seeds=2))
    from batchlab.store import Store

    with Store(tmp_path / "batchlab.db") as store:  # one finished trial: now the folder is the run's
        store.put("k", {"status": "ok"}, kind="x")
    with pytest.raises(CliError, match=r"with other settings \(task='mnist1d-mlp' \(now 'digits-mlp'\)\); results are "
                                       r"never overwritten"):
        claim_out(tmp_path, ns("suggest", task="digits-mlp", seeds=2))
    with pytest.raises(CliError, match=r"holds the results of `batchlab suggest`; results are never overwritten"):
        claim_out(tmp_path, ns("reproduce", quick=True, seeds=None, device="cpu"), keys=("quick", "seeds", "device"))
    # a command without a task (reproduce, report) reruns into its own folder with the same settings
    again = tmp_path / "again"
    again.mkdir()
    claim_out(again, ns("reproduce", quick=True, seeds=None, device="cpu"), keys=("quick", "seeds", "device"))
    with Store(again / "batchlab.db") as store:
        store.put("k", {"status": "ok"}, kind="x")
    claim_out(again, ns("reproduce", quick=True, seeds=None, device="cpu"), keys=("quick", "seeds", "device"))
    # a folder with results but no owner file (an older version's, or the file deleted): whose results
    # they are, with which settings, is unknown, so nothing may write there
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "suggestion.json").write_text("{}")
    r = run_cli("report", str(tmp_path), "--out", str(legacy))
    assert r.returncode == 2 and "holds results (of `batchlab suggest`) but no .batchlab-command.json" in r.stderr, r.stderr
    assert (legacy / "suggestion.json").read_text() == "{}"
    done = tmp_path / "cb"
    done.mkdir()
    (done / "critical_batch.json").write_text('{"measured": "earlier"}')
    r = run_cli("critical-batch", "--task", "mnist1d-mlp", "--quick", "--out", str(done))
    assert r.returncode == 2 and "holds results (of `batchlab critical-batch`) but no" in r.stderr, r.stderr
    assert (done / "critical_batch.json").read_text() == '{"measured": "earlier"}'
    # a damaged owner file next to results: refused too (it used to switch the check off)
    (legacy / ".batchlab-command.json").write_text("{bad")
    r = run_cli("suggest", "--task", "digits-mlp", "--quick", "--out", str(legacy))
    assert r.returncode == 2 and ".batchlab-command.json (which settings they were made with) cannot be read" in r.stderr
    assert (legacy / "suggestion.json").read_text() == "{}"
    # a run refused on its arguments leaves no result: the corrected command can use the folder
    fresh = tmp_path / "cb2"
    r = run_cli("critical-batch", "--task", "digits-mlp", "--quick", "--out", str(fresh), "--batch-size", "5000")
    assert r.returncode == 2 and "batch_size" in r.stderr and not (fresh / "critical_batch.json").exists()
    claim_out(fresh, ns("critical-batch", task="digits-mlp", quick=True, batch_size=64))


def test_a_folder_in_use_by_another_run_is_refused_and_freed_when_it_ends(tmp_path) -> None:
    # two runs with other settings on one new folder both "succeeded" and one result was lost
    import argparse

    from batchlab.cli.common import _lock_out, release_out_locks

    take = [sys.executable, "-c", f"from pathlib import Path; from batchlab.cli.common import _lock_out; _lock_out(Path({str(tmp_path)!r}))"]
    _lock_out(tmp_path)  # this process is "the other run"
    try:
        r = run_cli("reproduce", "--quick", "--only", "C10", "--out", str(tmp_path))
        assert r.returncode == 2 and "is in use by another batchlab run" in r.stderr, r.stderr
        assert not (tmp_path / "C10").exists() and not (tmp_path / ".batchlab-command.json").exists()
        assert subprocess.run(take, capture_output=True).returncode != 0
    finally:
        release_out_locks()
    r = subprocess.run(take, capture_output=True, text=True)  # the lock went with the command
    assert r.returncode == 0, r.stderr
    assert argparse


def test_report_of_another_folder_is_refused_and_of_the_same_refreshed(tmp_path) -> None:
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for folder, batch in ((a, "32"), (b, "64")):
        assert main(["train", "--task", "digits-mlp", "--batch-size", batch, "--epochs", "1", "--out", str(folder), "--quiet"]) == 0
    assert run_cli("report", str(a), "--out", str(out)).returncode == 0
    assert run_cli("report", str(a), "--out", str(out)).returncode == 0  # the same source: rebuilt
    r = run_cli("report", str(b), "--out", str(out))
    assert r.returncode == 2 and "with other settings (source=" in r.stderr, r.stderr


def test_an_unknown_option_is_named_by_the_command_and_not_taken_as_an_abbreviation() -> None:
    r = run_cli("critical-batch", "--task", "digits-mlp", "--seed", "1")  # --seed is not --seeds
    assert r.returncode == 2 and r.stderr.strip() == "batchlab critical-batch: error: unrecognized arguments: --seed 1"


def test_retry_failed_forgets_only_failed_and_oom_results(tmp_path, capsys) -> None:
    from batchlab.cli.batchsize import _forget_failures
    from batchlab.store import Store

    with Store(tmp_path / "batchlab.db") as st:
        for key, status in (("a", "ok"), ("b", "failed"), ("c", "oom"), ("d", "diverged")):
            st.put(key, {"status": status}, kind="x")
    _forget_failures(tmp_path)
    assert "2 stored failed or out-of-memory result(s) will run again" in capsys.readouterr().out
    with Store(tmp_path / "batchlab.db", readonly=True) as st:
        assert sorted(r.key for r in st.records()) == ["a", "d"]  # a diverged run is a result of its settings


def test_noise_scale_without_a_defined_estimate_says_why_and_exits_1(cli, monkeypatch) -> None:
    import batchlab.batchsize as bs
    from batchlab.batchsize.noise import NoiseScaleResult

    monkeypatch.setattr(bs, "noise_scale", lambda *a, **k: NoiseScaleResult(
        b_simple=float("nan"), micro_batch=8, accumulation=4, steps=20, lr=0.1, beta=0.95, status="ok",
        examples_processed=640))
    r = cli("noise-scale", "--task", "digits-mlp", "--steps", "20")
    assert r.returncode == 1 and "B_simple is not defined here: the estimate of |G|^2 stayed <= 0" in r.stderr


def test_train_records_a_model_that_fails_mid_run_as_a_failed_result(tmp_path) -> None:
    # it exited 2 with "error:" (a usage error) and wrote nothing: the run's history was lost
    (tmp_path / "flaky_task.py").write_text(
        "import torch\n"
        "from batchlab import Task\n"
        "class Flaky(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin, self.calls = torch.nn.Linear(4, 2), 0\n"
        "    def forward(self, x):\n"
        "        self.calls += 1\n"
        "        if self.training and self.calls > 5:\n"
        "            raise RuntimeError('the model broke on this batch')\n"
        "        return self.lin(x)\n"
        "def make_task():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    data = [(torch.randn(4, generator=g), i % 2) for i in range(64)]\n"
        "    return Task.from_torch('flaky', Flaky, data, data, batch_size=8)\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "batchlab.cli", "train", "--task", "flaky_task:make_task", "--epochs", "2",
                        "--quiet", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1, r.stderr
    assert "training failed at step" in r.stderr and "the model broke on this batch" in r.stderr
    saved = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert saved["status"] == "failed" and "the model broke on this batch" in saved["error"]


def test_data_root_for_a_task_without_data_files_blames_the_flag(tmp_path) -> None:
    r = run_cli("train", "--task", "digits-mlp", "--data-root", str(tmp_path), "--epochs", "1")
    assert r.returncode == 2 and "--data-root is for tasks that read data files" in r.stderr, r.stderr
