"""Built-in tasks, file-based tasks, entry points and their errors, fingerprints, default LRs."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from batchlab.data import mnist1d as mnist1d_mod
from batchlab.data.arrays import ArrayDataset
from batchlab.tasks import Task, get_task, list_tasks

sys.path.insert(0, str(Path(__file__).parent))
from test_data import make_cifar_folder, make_mnist_folder  # noqa: E402

GENERATED = {
    "digits-mlp": {},
    "digits-cnn": {},
    "mnist1d-mlp": {"n_samples": 200},
    "mnist1d-cnn": {"n_samples": 200},
    "synthetic-mlp": {"n_samples": 300},
    "sequence-cls": {"n_samples": 300},
    "shapes32-cnn": {"n_samples": 200},
    "shapes32-vgg": {"n_samples": 200},
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BATCHLAB_DATA", raising=False)
    mnist1d_mod._cached.cache_clear()


# a user's own task, loaded through its entry point below
def user_task(n: int = 40) -> Task:
    g = torch.Generator().manual_seed(0)
    train = ArrayDataset(torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g))
    val = ArrayDataset(torch.randn(10, 3, generator=g), torch.randint(0, 2, (10,), generator=g))
    return Task(name="user", model_fn=lambda norm, activation: nn.Linear(3, 2), train_set=train, val_set=val, num_classes=2)


def not_a_task() -> int:
    return 42


def test_list_tasks_has_builtins() -> None:
    names = list_tasks()
    for name in [*GENERATED, "mnist-cnn", "cifar10-resnet"]:
        assert name in names and names[name]


@pytest.mark.parametrize("name", list(GENERATED))
def test_generated_task_builds_and_runs(name: str) -> None:
    task = get_task(name, **GENERATED[name])
    assert task.name == name and task.batch_size == 128 and task.lr > 0 and task.epochs > 0
    for ds in (task.train_set, task.val_set):
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert int(ds.y.min()) >= 0 and int(ds.y.max()) < task.num_classes
    model = task.make_model()
    out = model(task.train_set.x[:16])
    assert out.shape == (16, task.num_classes)
    task.make_model(norm="none", activation="tanh")(task.val_set.x[:4])


@pytest.mark.parametrize("name", list(GENERATED))
def test_fingerprint_cheap_deterministic_and_seed_sensitive(name: str) -> None:
    a = get_task(name, **GENERATED[name])
    t0 = time.perf_counter()
    fa = a.fingerprint()
    assert time.perf_counter() - t0 < 0.5
    assert fa == get_task(name, **GENERATED[name]).fingerprint() == a.fingerprint()
    other = get_task(name, **{**GENERATED[name], "seed": 7})
    assert other.fingerprint()["checksum"] != fa["checksum"]


def test_mnist_task_from_root_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_mnist_folder(tmp_path / "data" / "mnist", gz=True)
    task = get_task("mnist-cnn", root=root)
    assert task.train_set.x.shape == (12, 1, 28, 28)
    assert task.make_model()(task.train_set.x).shape == (12, 10)
    monkeypatch.setenv("BATCHLAB_DATA", str(tmp_path / "data"))  # mnist/ subfolder is found
    assert len(get_task("mnist-cnn").val_set) == 6


def test_cifar_task_from_root_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar_folder(tmp_path / "data" / "cifar-10-batches-py", n=2)
    task = get_task("cifar10-resnet", root=tmp_path / "data", depth=8)
    assert task.train_set.x.shape == (10, 3, 32, 32) and task.name == "cifar10-resnet8"
    assert task.make_model()(task.val_set.x).shape == (2, 10)
    monkeypatch.setenv("BATCHLAB_DATA", str(tmp_path / "data"))
    assert get_task("cifar10-resnet").name == "cifar10-resnet"


def test_file_tasks_without_root_say_what_is_expected() -> None:
    with pytest.raises(ValueError, match=r"task 'mnist-cnn' reads local files: pass root=FOLDER \(or set BATCHLAB_DATA=FOLDER\); expected in that folder: train-images-idx3-ubyte\[\.gz\]"):
        get_task("mnist-cnn")
    with pytest.raises(ValueError, match=r"task 'cifar10-resnet' reads local files.*data_batch_1, .*test_batch \(directly or in cifar-10-batches-py/\)"):
        get_task("cifar10-resnet")


def test_file_tasks_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"MNIST folder .* is missing train-images-idx3-ubyte\[\.gz\]"):
        get_task("mnist-cnn", root=tmp_path)
    with pytest.raises(ValueError, match=r"CIFAR-10 folder .* is missing data_batch_1"):
        get_task("cifar10-resnet", root=tmp_path)


def test_unknown_task_and_bad_entry_points() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'nope-task'; known tasks: .*digits-mlp"):
        get_task("nope-task")
    with pytest.raises(ValueError, match=r"unknown task 'foo'; known tasks: .*\(or 'package.module:function'\)"):
        get_task("foo")
    with pytest.raises(ValueError, match=r"task entry point must look like 'package.module:function', got 'foo:'"):
        get_task("foo:")
    with pytest.raises(ValueError, match=r"cannot import module 'nonexistent.mod' of task entry point 'nonexistent.mod:fn'"):
        get_task("nonexistent.mod:fn")
    with pytest.raises(ValueError, match=r"module 'batchlab.tasks' has no attribute 'nope'"):
        get_task("batchlab.tasks:nope")
    with pytest.raises(ValueError, match=r"returned int, expected batchlab.tasks.Task"):
        get_task(f"{__name__}:not_a_task")
    # an argument it does not have, against a TypeError raised inside it by a bad value
    with pytest.raises(ValueError, match=r"does not take these arguments \(m\): .*unexpected keyword argument 'm'"):
        get_task(f"{__name__}:user_task", m=3)
    with pytest.raises(ValueError, match=r"user_task' raised TypeError with arguments n='x'"):
        get_task(f"{__name__}:user_task", n="x")


def test_user_task_entry_point() -> None:
    task = get_task(f"{__name__}:user_task", n=24)
    assert task.name == "user" and len(task.train_set) == 24
    assert task.make_model()(task.val_set.x).shape == (10, 2)


def test_digits_mlp_default_lr_trains_at_batch_128() -> None:
    """The documented claim: digits-mlp passes 90% validation accuracy within a few epochs."""
    torch.manual_seed(0)
    task = get_task("digits-mlp")
    model = task.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=task.lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        model.train()
        for x, y in task.train_set.batches(task.batch_size, generator=g):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = task.metric(model(task.val_set.x), task.val_set.y)
    assert acc > 0.9, acc
