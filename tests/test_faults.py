"""Faults and bad input (issue 13): nothing finished is lost, every bad command line is one clear line
with exit status 2, no configuration hangs, and no data file runs code.

Read-only folders and full disks are real: as root (where permissions do not bind) a small tmpfs is
mounted, read-only or filled up; otherwise a folder without write permission stands in for the
read-only one and the full-disk tests are skipped.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import math
import os
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from batchlab.fileio import OutputError, atomic_write, probe_dir
from batchlab.store import Store, StoreError
from batchlab.train import TrainConfig

FAST = ("--steps", "3", "--quiet", "--threads", "1")  # a digits-mlp run of three steps: about a second


def one_error_line(r, command: str) -> str:
    """The run failed with exit status 2 and exactly one line ``batchlab <command>: error: ...``."""
    assert r.returncode == 2, f"exit {r.returncode}; stderr:\n{r.stderr}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{r.stderr}"
    assert lines[0].startswith(f"batchlab {command}: error: "), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------ fixtures


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nothing can be written in, with ``seed(name, bytes)`` to put files there first."""
    root = tmp_path / "ro"
    if os.geteuid() != 0:
        root.mkdir()

        class Dir:
            path = root

            @staticmethod
            def seed(fn):
                fn(root)
                root.chmod(0o555)

        yield Dir
        root.chmod(0o755)
        return
    with _tmpfs(root, "1m"):

        class Dir:  # noqa: F811 - the root variant
            path = root

            @staticmethod
            def seed(fn):
                fn(root)
                subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)

        yield Dir


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB file system (root only): ``fill()`` leaves it with no free byte."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root")
    with _tmpfs(tmp_path / "disk", "256k") as root:

        class Disk:
            path = root

            @staticmethod
            def fill() -> None:
                with open(root / "filler", "ab", buffering=0) as f:
                    for size in (4096, 512, 1):
                        with contextlib.suppress(OSError):
                            while True:
                                f.write(b"\0" * size)
                with pytest.raises(OSError) as e:  # really full: not one more byte fits
                    with open(root / "filler", "ab", buffering=0) as f:
                        f.write(b"\0")
                assert e.value.errno == errno.ENOSPC

        yield Disk


TASKS_MODULE = '''
"""User tasks for the fault tests."""
import torch
from torch import nn

from batchlab.data.arrays import ArrayDataset
from batchlab.norm import create_norm
from batchlab.tasks import Task


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return ArrayDataset(x, (x[:, 0] > 0).long())


def _model(norm="batch", activation="relu"):
    return nn.Sequential(nn.Linear(4, 8, bias=False), create_norm(norm, 8, dims=0), nn.ReLU(), nn.Linear(8, 2))


def tiny(root=None, name="tiny", n_val=32):
    """``root`` only changes the data, as --data-root does for file-based tasks."""
    seed = 0 if root is None else len(str(root))
    return Task(name=name, model_fn=_model, train_set=_data(64, seed), val_set=_data(n_val, 1), num_classes=2,
                lr=0.1, batch_size=16, epochs=1, norm="batch")
'''


@pytest.fixture(scope="module")
def user_tasks(tmp_path_factory):
    """``faulttasks:tiny`` importable as a ``--task`` entry point."""
    folder = tmp_path_factory.mktemp("usertasks")
    (folder / "faulttasks.py").write_text(TASKS_MODULE)
    sys.path.insert(0, str(folder))
    yield "faulttasks:tiny"
    sys.path.remove(str(folder))
    sys.modules.pop("faulttasks", None)


def _cifar_batch(n: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"fake", b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}


@pytest.fixture
def cifar_root(tmp_path):
    """A CIFAR-10 folder of six tiny batches in the original format."""
    root = tmp_path / "cifar"
    root.mkdir()
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        with open(root / name, "wb") as f:
            pickle.dump(_cifar_batch(seed=i), f, protocol=2)
    return root


def _idx(magic: int, dims: tuple[int, ...], data: bytes) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + data


@pytest.fixture
def mnist_root(tmp_path):
    """MNIST idx files (8 train, 4 test images); ``train-images`` is a .gz whose deflate stream is corrupt."""
    root = tmp_path / "mnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("t10k", 4)):
        images = _idx(2051, (n, 28, 28), rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes())
        labels = _idx(2049, (n,), rng.integers(0, 10, n, dtype=np.uint8).tobytes())
        (root / f"{split}-images-idx3-ubyte").write_bytes(images)
        (root / f"{split}-labels-idx1-ubyte").write_bytes(labels)
    good = gzip.compress((root / "train-images-idx3-ubyte").read_bytes(), mtime=0)
    bad = good[:10] + b"\x07" + good[11:]  # the first deflate block claims the reserved block type 3
    with pytest.raises(zlib.error):  # the corruption the test is about: inside the deflate stream
        gzip.decompress(bad)
    (root / "train-images-idx3-ubyte").unlink()
    (root / "train-images-idx3-ubyte.gz").write_bytes(bad)
    return root


# ------------------------------------------------------------------------------------ data loss: train --out


def test_train_file_names_carry_task_args_and_data_root(cli, tmp_path, user_tasks):
    out = tmp_path / "out"
    for extra in ([], ["--task-arg", "n_val=16"], ["--data-root", str(tmp_path)], ["--data-root", str(tmp_path / "x")]):
        r = cli("train", "--task", user_tasks, "--out", str(out), *FAST, *extra)
        assert r.returncode == 0, r.stderr
    assert len(list(out.glob("*.json"))) == 4  # four different runs, four files: none lost
    r = cli("train", "--task", "digits-mlp", "--out", str(out), *FAST, "--task-arg", "seed=1")
    assert r.returncode == 0, r.stderr
    r = cli("train", "--task", "digits-mlp", "--out", str(out), *FAST, "--task-arg", "hidden=[32]")
    assert r.returncode == 0, r.stderr
    assert len(list(out.glob("*.json"))) == 6


@pytest.mark.parametrize("name", ["../../escaped", "a/b/c", "/abs/olute", ".hidden"])
def test_train_task_name_never_writes_outside_out(cli, tmp_path, user_tasks, name):
    out = tmp_path / "deep" / "out"
    r = cli("train", "--task", user_tasks, "--task-arg", f"name={name}", "--out", str(out), *FAST)
    assert r.returncode == 0, r.stderr
    written = [p for p in tmp_path.rglob("*.json")]
    assert len(written) == 1 and written[0].parent == out, written
    assert not written[0].name.startswith(".")
    assert json.loads(written[0].read_text())["task"] == name


def test_train_never_overwrites_an_existing_result(cli, tmp_path):
    out = tmp_path / "out"
    assert cli("train", "--task", "digits-mlp", "--out", str(out), *FAST).returncode == 0
    [path] = out.glob("*.json")
    before = path.read_bytes()
    r = cli("train", "--task", "digits-mlp", "--out", str(out), *FAST)
    line = one_error_line(r, "train")
    assert "already exists" in line and "never overwritten" in line
    assert r.stdout == ""  # refused before training
    assert path.read_bytes() == before


def test_train_out_naming_a_file_fails_before_training(cli, tmp_path):
    f = tmp_path / "taken"
    f.write_text("keep me")
    r = cli("train", "--task", "digits-mlp", "--out", str(f), *FAST)
    assert "is a file, not a folder" in one_error_line(r, "train")
    assert r.stdout == "" and f.read_text() == "keep me"


@pytest.mark.parametrize("argv", [
    ["train", "--task", "digits-mlp", *FAST], ["slim", "--task", "digits-cnn"], ["suggest", "--task", "digits-mlp"],
    ["reproduce", "--only", "C01"], ["report", "TMP"],
])
def test_every_command_with_an_out_folder_probes_it_first(cli, tmp_path, argv):
    f = tmp_path / "taken"
    f.write_text("keep me")
    r = cli(*[str(tmp_path) if a == "TMP" else a for a in argv], "--out", str(f))
    assert f"--out '{f}' is a file, not a folder" in one_error_line(r, argv[0])
    assert f.read_text() == "keep me"


def test_train_read_only_out_fails_before_training(cli, readonly_dir):
    readonly_dir.seed(lambda root: None)
    r = cli("train", "--task", "digits-mlp", "--out", str(readonly_dir.path / "sub"), *FAST)
    line = one_error_line(r, "train")
    assert str(readonly_dir.path / "sub") in line and ("read-only" in line or "permission denied" in line)
    assert r.stdout == ""


def test_train_full_disk_fails_before_training(cli, small_disk):
    small_disk.fill()
    r = cli("train", "--task", "digits-mlp", "--out", str(small_disk.path / "out"), *FAST)
    assert "the disk is full" in one_error_line(r, "train")
    assert r.stdout == ""


def test_train_disk_filling_up_during_training_keeps_the_result(cli, small_disk, monkeypatch):
    import batchlab.train

    fit = batchlab.train.fit

    def fit_then_fill(*a, **k):
        result = fit(*a, **k)
        small_disk.fill()  # the disk fills up while training: the probe passed, the write will not
        return result

    monkeypatch.setattr(batchlab.train, "fit", fit_then_fill)
    out = small_disk.path / "out"
    r = cli("train", "--task", "digits-mlp", "--out", str(out), *FAST)
    assert "the disk is full" in one_error_line(r, "train")
    result = json.loads(r.stdout.strip().splitlines()[0])  # the full result, history included
    assert result["status"] == "ok" and result["steps"] == 3 and result["history"]
    assert list(out.iterdir()) == []  # no empty or cut-short JSON, no temporary file


def test_slim_checks_out_before_training(cli, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = cli("slim", "--task", "digits-cnn", "--out", str(f), "--epochs", "0.1")
    assert "is a file, not a folder" in one_error_line(r, "slim")
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text('{"earlier": "result"}')
    r = cli("slim", "--task", "digits-cnn", "--out", str(out), "--epochs", "0.1")
    assert "result.json already exists" in one_error_line(r, "slim")
    assert (out / "result.json").read_text() == '{"earlier": "result"}'
    assert r.stdout == ""


# ------------------------------------------------------------------------------------ data loss: atomic writes


def test_atomic_write_leaves_the_old_file_whole_when_writing_fails(tmp_path):
    path = tmp_path / "outcome.json"
    atomic_write(path, '{"good": 1}')
    with pytest.raises(RuntimeError, match="half way"):
        from batchlab.fileio import atomic_open

        with atomic_open(path) as f:
            f.write(b'{"torn": ')
            raise RuntimeError("half way")
    assert path.read_text() == '{"good": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["outcome.json"]  # no temporary file left
    with pytest.raises(FileExistsError, match="already exists"):
        atomic_write(path, "new", exclusive=True)
    assert path.read_text() == '{"good": 1}'


def test_atomic_write_on_a_full_disk_keeps_the_old_file(small_disk):
    path = small_disk.path / "index.html"
    atomic_write(path, "<p>the earlier report</p>")
    small_disk.fill()
    with pytest.raises(OutputError, match=f"cannot write {path}: the disk is full"):
        atomic_write(path, "x" * 100_000)
    assert path.read_text() == "<p>the earlier report</p>"  # not cut at 4096 bytes, not empty
    assert sorted(p.name for p in small_disk.path.iterdir()) == ["filler", "index.html"]


def test_probe_dir_names_the_folder_and_why(tmp_path, readonly_dir):
    f = tmp_path / "f"
    f.write_text("")
    with pytest.raises(OutputError, match=r"--out '.*/f' is a file, not a folder"):
        probe_dir(f, "--out")
    with pytest.raises(OutputError, match=r"--out '.*/f/sub' cannot be created: a parent is a file"):
        probe_dir(f / "sub", "--out")
    readonly_dir.seed(lambda root: None)
    with pytest.raises(OutputError, match="(read-only|permission denied)"):
        probe_dir(readonly_dir.path, "--out")


def test_torn_outcome_json_does_not_stop_the_next_report(tmp_path):
    from batchlab.experiments.report import load_outcomes, write_reproduce_report

    good = {"id": "ok_exp", "claims": ["C01"], "title": "t", "status": "ok", "verdicts": [
        {"claim": "C01", "verdict": "supported", "reason": "r"}], "params": {}, "figures": [], "wall_time": 1.0,
        "trials_run": 1, "trials_loaded": 0, "quick": True, "seeds": [0], "command": "c", "seed_doc": "000",
        "statements": {}, "rules": {}, "error": None}
    (tmp_path / "ok_exp").mkdir()
    (tmp_path / "ok_exp" / "outcome.json").write_text(json.dumps(good))
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "outcome.json").write_text(json.dumps(good)[:50])
    with pytest.warns(UserWarning, match=r"skipping unreadable .*torn/outcome.json"):
        assert [o["id"] for o in load_outcomes(tmp_path)] == ["ok_exp"]
    with pytest.warns(UserWarning):
        index = write_reproduce_report(tmp_path)
    assert "C01" in index.read_text()


# ------------------------------------------------------------------------------------ the results store


def _damage(db: Path) -> None:
    """Overwrite one page in the middle of the file (page 1, the header, stays intact)."""
    size = db.stat().st_size
    page = 4096
    with open(db, "r+b") as f:
        f.seek((size // page // 2) * page)
        f.write(np.random.default_rng(0).integers(0, 256, page, dtype=np.uint8).tobytes())


def _filled_store(path: Path, n: int = 300) -> Path:
    s = Store(path)
    for i in range(n):
        s.put(f"k{i}", {"status": "ok", "i": i, "pad": "x" * 400})
    s.close()
    return s.path


def test_damaged_store_is_refused_at_open_naming_the_file(tmp_path):
    db = _filled_store(tmp_path / "batchlab.db")
    _damage(db)
    with pytest.raises(StoreError, match=f"results store {db} is damaged"):
        Store(db)


def test_reproduce_on_a_damaged_store_keeps_the_earlier_outcomes(cli, tmp_path):
    out = tmp_path / "rep"
    db = _filled_store(out / "batchlab.db")
    _damage(db)
    (out / "bn_lr").mkdir()
    (out / "bn_lr" / "outcome.json").write_text('{"the": "earlier verdicts"}')
    (out / "index.html").write_text("<p>earlier report</p>")
    r = cli("reproduce", "--only", "C01", "--out", str(out), "--quick", "--quiet")
    assert f"results store {db} is damaged" in one_error_line(r, "reproduce")
    assert (out / "bn_lr" / "outcome.json").read_text() == '{"the": "earlier verdicts"}'
    assert (out / "index.html").read_text() == "<p>earlier report</p>"


def test_store_failing_mid_run_keeps_the_earlier_outcome(tmp_path):
    import sqlite3

    from batchlab.experiments.base import Experiment
    from batchlab.experiments.runner import run_experiment

    class StoreBreaks(Experiment):
        id, claims, title, seed_doc = "store_breaks", ("C97",), "store breaks", "000"
        statements, rules = {"C97": "a toy claim"}, {"C97": "never decided"}

        def params(self, quick):
            return {}

        def run(self, ctx, params):
            raise sqlite3.DatabaseError("database disk image is malformed")  # what a store damaged mid-run raises

    (tmp_path / "store_breaks").mkdir()
    (tmp_path / "store_breaks" / "outcome.json").write_text('{"the": "earlier verdict"}')
    with pytest.raises(sqlite3.DatabaseError, match="malformed"):
        run_experiment(StoreBreaks, quick=True, seeds=[0], device="cpu", store=Store(tmp_path / "batchlab.db"),
                       out=tmp_path, progress=False)
    assert (tmp_path / "store_breaks" / "outcome.json").read_text() == '{"the": "earlier verdict"}'  # not "failed"


def test_store_opens_read_only_from_read_only_media(readonly_dir):
    readonly_dir.seed(lambda root: _filled_store(root / "batchlab.db", n=3))
    db = readonly_dir.path / "batchlab.db"
    with pytest.raises(StoreError, match=f"cannot open results store {db}"):
        Store(db)  # a writable open needs write access (WAL): refused, naming the file
    store = Store(db, readonly=True)
    assert len(store) == 3 and store.get("k1")["i"] == 1
    with pytest.raises(StoreError, match="opened read-only"):
        store.put("new", {"status": "ok"})


@pytest.mark.parametrize("case", ["not a database", "folder", "parent is a file"])
def test_every_store_open_failure_names_the_path(tmp_path, case):
    if case == "not a database":
        path = tmp_path / "x.db"
        path.write_bytes(b"this is not sqlite" * 300)
        expect = f"cannot open results store {path}: file is not a database"
    elif case == "folder":
        (tmp_path / "db" / "batchlab.db").mkdir(parents=True)
        path = tmp_path / "db"  # a folder means path/batchlab.db, here a folder too
        expect = f"cannot open results store {path / 'batchlab.db'}: it is a folder"
    else:
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "x.db"
        expect = f"cannot open results store {path}: cannot create its folder"
    with pytest.raises(StoreError, match=expect):
        Store(path)


def test_a_store_that_is_not_a_database_is_one_line(cli, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "batchlab.db").write_bytes(b"garbage" * 1000)
    r = cli("reproduce", "--only", "C01", "--out", str(out), "--quick", "--quiet")
    line = one_error_line(r, "reproduce")
    assert f"results store {out / 'batchlab.db'} is damaged (file is not a database)" in line


# ------------------------------------------------------------------------------------ hangs and silent misconfiguration


@pytest.mark.parametrize("kw,message", [
    ({"batch_growth": (0.5,), "growth_factor": 0}, "growth_factor must be a positive integer, got 0"),
    ({"batch_growth": (0.5,), "growth_factor": -2}, "growth_factor must be a positive integer, got -2"),
    ({"milestones": (0.5, 1.5)}, r"milestones\[1\] must be a fraction of the budget in \[0, 1\], got 1.5"),
    ({"batch_growth": (-0.1,)}, r"batch_growth\[0\] must be a fraction"),
    ({"grad_clip": -1.0}, "grad_clip must be a positive finite gradient norm"),
    ({"gamma": -0.1}, "gamma must be a positive finite factor, got -0.1"),
    ({"divergence_loss": -1.0}, "divergence_loss must be a positive number"),
    ({"momentum": math.nan}, "momentum must be a finite number >= 0, got nan"),
    ({"weight_decay": math.nan}, "weight_decay must be a finite number >= 0, got nan"),
    ({"lr": True}, "lr must be a positive finite number, got True"),
    ({"epochs": math.inf}, "epochs must be a positive finite number, got inf"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
    ({"amp": "yes"}, "amp must be True or False, got 'yes'"),
])
def test_bad_train_config_is_an_error_not_a_hang(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


def test_growth_factor_zero_ends_with_an_error_within_seconds():
    """The configuration that looped forever: run in a child process with a deadline."""
    code = ("from batchlab.tasks import get_task; from batchlab.train import TrainConfig, fit\n"
            "fit(get_task('digits-mlp'), TrainConfig(batch_size=32, epochs=1, batch_growth=(0.5,), growth_factor=0))")
    # before the check this never returned (a batch of 32 * 0**1 = 0 examples never ends the epoch)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "growth_factor must be a positive integer, got 0" in r.stderr


# ------------------------------------------------------------------------------------ bad command lines


@pytest.mark.parametrize("argv,message", [
    (["train", "--task", "digits-mlp", "--device", "foo", *FAST], "argument --device: must be cpu, cuda or cuda:N, got 'foo'"),
    (["suggest", "--task", "digits-mlp", "--device", "foo"], "argument --device: must be cpu, cuda or cuda:N"),
    (["find-max-batch", "--task", "digits-mlp", "--device", "gpu"], "argument --device: must be cpu, cuda or cuda:N"),
    (["throughput", "--task", "digits-mlp", "--device", "cuda:x"], "argument --device: must be cpu, cuda or cuda:N"),
    (["noise-scale", "--task", "digits-mlp", "--device", ""], "argument --device: must be cpu, cuda or cuda:N"),
    (["reproduce", "--device", "tpu"], "argument --device: must be cpu, cuda or cuda:N"),
    (["train", "--task", "digits-mlp", "--norm", "instance", *FAST],
     "--task 'digits-mlp' --norm 'instance': norm 'instance' needs spatial dimensions"),
    (["train", "--task", "digits-mlp", "--task-arg", "hidden=abc", *FAST],
     "--task 'digits-mlp' --task-arg hidden='abc': "),
    (["train", "--task", "digits-mlp", "--milestones", "0.5,1.5", "--schedule", "step", *FAST],
     r"milestones[1] must be a fraction of the budget in [0, 1], got 1.5"),
    (["train", "--task", "digits-mlp", "--task-arg", "=5", *FAST], "argument --task-arg: must look like key=value with a non-empty key"),
    (["reproduce", "--only", ","], "--only must name at least one claim or experiment id (e.g. C10,C17), got ','"),
    (["bn-health", "--task", "digits-mlp", "--norm", "layer", "--epochs", "0"],
     "the model (with --norm 'layer') has no BatchNorm layer, so there is nothing for bn-health to check"),
])
def test_bad_command_line_is_one_line_exit_2(cli, argv, message):
    assert message in one_error_line(cli(*argv), argv[0])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["train", "suggest", "find-max-batch", "throughput", "noise-scale", "reproduce"])
def test_cuda_without_cuda_is_one_line(cli, command):
    argv = [command] if command == "reproduce" else [command, "--task", "digits-mlp"]
    line = one_error_line(cli(*argv, "--device", "cuda"), command)
    assert "'cuda' asks for CUDA, which is not available on this machine" in line


def test_a_task_that_cannot_run_as_given_is_one_line(cli):
    # BatchNorm cannot train on one example: fit raises TaskError naming the task and the step
    r = cli("train", "--task", "digits-mlp", "--batch-size", "1", "--examples", "1", "--quiet", "--threads", "1")
    line = one_error_line(r, "train")
    assert "task 'digits-mlp'" in line and "Expected more than 1 value per channel" in line


def test_checkpoint_that_is_not_one_is_one_line(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n" * 20)
    r = cli("bn-health", "--task", "digits-mlp", "--checkpoint", str(tmp_path / "notes.txt"), "--epochs", "0")
    assert "does not load into digits-mlp's model" in one_error_line(r, "bn-health")  # torch's message has many lines


def test_resnet_depth_that_does_not_exist_is_one_line(cli, cifar_root):
    r = cli("train", "--task", "cifar10-resnet", "--data-root", str(cifar_root), "--task-arg", "depth=7", *FAST)
    assert "depth must be 6n + 2" in one_error_line(r, "train")


def test_corrupt_gzip_is_one_line_naming_the_file(cli, mnist_root):
    r = cli("train", "--task", "mnist-cnn", "--data-root", str(mnist_root), *FAST)
    line = one_error_line(r, "train")
    assert "train-images-idx3-ubyte.gz: cannot read idx file" in line


def test_empty_validation_set_is_refused_before_training(cli, user_tasks):
    r = cli("train", "--task", user_tasks, "--task-arg", "n_val=0", *FAST)
    assert "validation set is empty" in one_error_line(r, "train")
    assert r.stdout == ""


@pytest.mark.parametrize("content", [
    {"status": "ok", "config": [], "history": 5},
    {"status": "ok", "config": {}, "history": [1, 2]},
    [{"status": 3, "config": {}, "history": []}],
    {"status": "ok", "config": {"lr": 1}, "history": [{"step": 1}], "final": []},
])
def test_report_on_json_of_the_wrong_shape_is_one_line(cli, tmp_path, content):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r.json").write_text(json.dumps(content))
    line = one_error_line(cli("report", str(tmp_path / "runs")), "report")
    assert "holds no RunResult JSON file" in line and "r.json: not a RunResult" in line


def test_report_into_a_read_only_folder_is_one_line(cli, tmp_path, readonly_dir):
    result = {"task": "t", "status": "ok", "config": {"batch_size": 8}, "history": [{"step": 1, "val_acc": 0.5}],
              "final": {"val_acc": 0.5}}
    readonly_dir.seed(lambda root: (root / "r.json").write_text(json.dumps(result)))
    line = one_error_line(cli("report", str(readonly_dir.path)), "report")
    assert str(readonly_dir.path / "report") in line
    r = cli("report", str(readonly_dir.path), "--out", str(tmp_path / "elsewhere"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "elsewhere" / "index.html").is_file()


# ------------------------------------------------------------------------------------ security


class _Payload:
    """Unpickling this creates a file: the stand-in for any code a crafted pickle could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_cifar_batch_runs_nothing(cli, cifar_root, tmp_path):
    from batchlab.data.cifar import read_cifar_batch

    marker = tmp_path / "PWNED"
    batch = _cifar_batch()
    batch[b"data"] = _Payload(marker)
    with open(cifar_root / "data_batch_1", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_1: cannot unpickle CIFAR-10 batch: refused to load "
                                         r"(io|builtins)\.open \(nothing was run\)"):
        read_cifar_batch(cifar_root / "data_batch_1")
    r = cli("train", "--task", "cifar10-resnet", "--data-root", str(cifar_root), *FAST)
    assert "refused to load" in one_error_line(r, "train")
    assert not marker.exists()


def test_pickle_naming_an_unknown_module_is_one_line(cli, cifar_root):
    (cifar_root / "test_batch").write_bytes(b"\x80\x02cno_such_module\nthing\nq\x00)\x81q\x01.")
    r = cli("train", "--task", "cifar10-resnet", "--data-root", str(cifar_root), *FAST)
    assert "test_batch: cannot unpickle CIFAR-10 batch: refused to load no_such_module.thing" in one_error_line(r, "train")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_genuine_cifar_batches_still_load(tmp_path, protocol):
    from batchlab.data.cifar import read_cifar_batch

    batch = _cifar_batch(n=3, seed=7)
    with open(tmp_path / "b", "wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    x, y = read_cifar_batch(tmp_path / "b")
    assert x.shape == (3, 3, 32, 32) and np.array_equal(x.reshape(3, -1), batch[b"data"])
    assert y.tolist() == batch[b"labels"]
    # the py2-era layout: numpy.core.multiarray, bytes via _codecs.encode (protocol 2)
    old = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (tmp_path / "old").write_bytes(old)
    assert np.array_equal(read_cifar_batch(tmp_path / "old")[0], x)



def test_norm_converters_refuse_impossible_values():
    import torch

    from batchlab.norm import from_caffe, split_darknet_bn

    blobs = {"mean": torch.zeros(3), "variance": torch.tensor([1.0, -0.5, 1.0]), "scale_factor": torch.tensor([1.0])}
    with pytest.raises(ValueError, match=r"caffe_bn: the variance blob must be finite and >= 0 .* got -0.5"):
        from_caffe(blobs)
    with pytest.raises(ValueError, match="offset must be an integer >= 0, got -1"):
        split_darknet_bn(torch.zeros(100), 4, offset=-1)
    with pytest.raises(ValueError, match="num_features must be an integer >= 1, got 0"):
        split_darknet_bn(torch.zeros(100), 0)
