"""Shared fixtures: a tiny in-memory task that trains in milliseconds."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from batchlab.data.arrays import ArrayDataset
from batchlab.norm import create_norm
from batchlab.tasks import Task


def make_toy_task(n_train: int = 256, n_val: int = 128, dim: int = 8, classes: int = 3, seed: int = 0) -> Task:
    """Linearly separable-ish blobs and a one-hidden-layer MLP with a norm layer."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 2

    def sample(n: int) -> ArrayDataset:
        y = torch.randint(0, classes, (n,), generator=g)
        x = centers[y] + torch.randn(n, dim, generator=g)
        return ArrayDataset(x, y)

    train, val = sample(n_train), sample(n_val)

    def model_fn(norm: object = "batch", activation: str = "relu") -> nn.Module:
        act = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[activation]
        return nn.Sequential(nn.Linear(dim, 16, bias=False), create_norm(norm, 16, dims=0), act(), nn.Linear(16, classes))

    return Task(name="toy", model_fn=model_fn, train_set=train, val_set=val, num_classes=classes, lr=0.1, batch_size=32, epochs=2)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tests' tensors and models are tiny: one intra-op thread is as fast as two and avoids
    OpenMP workers spin-waiting when other processes share the 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def toy_task() -> Task:
    return make_toy_task()


class CliRun:
    """Exit status and captured output of one in-process ``batchlab`` command."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process (fast) and return its exit status and output."""
    from batchlab.cli import main

    def call(*args: str) -> CliRun:
        try:
            code = main(list(args))
        except SystemExit as e:
            code = int(e.code or 0)
        out = capsys.readouterr()
        return CliRun(code, out.out, out.err)

    return call
