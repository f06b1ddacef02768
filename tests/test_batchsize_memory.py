"""Memory finder: pure search, fake OOM above a threshold, state restored bitwise."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from batchlab.batchsize import max_batch_size, power_candidates, preserved_state, search_max_batch
from batchlab.train import make_optimizer
from conftest import make_toy_task


@pytest.fixture(autouse=True)
def _accounted_bytes_only(request, monkeypatch):  # type: ignore[no-untyped-def]
    """These tests check the search on the deterministic accounted bytes (limits are computed from a
    first measurement); the resident-peak reading, which varies from run to run, has its own test."""
    if "resident_peak" not in request.node.name:
        import batchlab.batchsize.memory as mem

        monkeypatch.setattr(mem, "peak_rss_over", lambda fn: (fn(), None))


class FakeOOM(nn.Module):
    """Wraps a model; its forward raises like CUDA does when the batch exceeds ``threshold``."""

    def __init__(self, inner: nn.Module, threshold: int, error: type[Exception] = RuntimeError, msg: str | None = None) -> None:
        super().__init__()
        self.inner, self.threshold, self.error = inner, threshold, error
        self.msg = msg or "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)"
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        if x.shape[0] > self.threshold:
            raise self.error(self.msg)
        return self.inner(x)


def test_power_candidates() -> None:
    assert power_candidates(2, 256) == [2, 4, 8, 16, 32, 64, 128, 256]
    assert power_candidates(3, 100) == [4, 8, 16, 32, 64, 100]
    with pytest.raises(ValueError, match="high must be an integer >= low"):
        power_candidates(8, 4)


@pytest.mark.parametrize("threshold", [1, 2, 5, 48, 64, 255, 256, 1000])
def test_search_doubling_and_guess(threshold: int) -> None:
    cands = power_candidates(2, 256)
    expected = max((c for c in cands if c <= threshold), default=None)
    for guess in (None, 2, 16, 64, 256):
        best, tried = search_max_batch(lambda b: b <= threshold, cands, guess=guess)
        assert best == expected, (guess, tried)
        assert len(tried) <= len(cands), tried  # never more than the doubling search's worst case
        assert len({b for b, _ in tried}) == len(tried)  # no size tried twice
    best, tried = search_max_batch(lambda b: b <= 48, cands)
    assert tried == [(2, True), (4, True), (8, True), (16, True), (32, True), (64, False)]


def _fake_task_and_model(threshold: int, **kw):
    task = make_toy_task(n_train=256)
    model = FakeOOM(task.make_model(), threshold, **kw)
    return task, model


def test_max_batch_fake_oom_exact_trials() -> None:
    task, model = _fake_task_and_model(48)
    r = max_batch_size(task, model=model, memory_limit=2**40)
    # probes at 2, 4, 8 predict "everything fits", the check at 256 OOMs, binary search backs off
    assert [p[0] for p in r.probes] == [2, 4, 8]
    assert [t[0] for t in r.tried] == [256, 16, 64, 32]
    assert [t[1] for t in r.tried] == [False, True, False, True]
    assert r.batch_size == 32 and r.capped_by == "memory"


def test_max_batch_capped_at_training_set() -> None:
    task = make_toy_task(n_train=200)
    r = max_batch_size(task, memory_limit=2**40)
    assert r.batch_size == 200 and r.capped_by == "data"
    assert [t[0] for t in r.tried] == [200]


def test_max_batch_memory_limit_respected() -> None:
    task = make_toy_task(n_train=256)
    free = max_batch_size(task, memory_limit=2**40)
    limit = int(free.fixed_bytes + free.per_sample_bytes * 40)  # room for ~40 samples
    r = max_batch_size(task, memory_limit=limit)
    assert r.batch_size == 32
    assert all(t[2] <= limit for t in r.tried if t[1])
    assert all(t[2] > limit for t in r.tried if not t[1])


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {k: (None if p.grad is None else p.grad.clone()) for k, p in model.named_parameters()},
        {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()},
        [dict(g) for g in opt.state_dict()["param_groups"]],
    )


def _assert_same(a, b) -> None:
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    for k in a[1]:
        assert (a[1][k] is None and b[1][k] is None) or torch.equal(a[1][k], b[1][k]), k
    assert a[2].keys() == b[2].keys()
    for i in a[2]:
        for k in a[2][i]:
            assert torch.equal(a[2][i][k], b[2][i][k]), (i, k)
    assert a[3] == b[3]


@pytest.mark.parametrize("error", ["oom", "other"])
def test_state_bitwise_unchanged(error: str) -> None:
    if error == "oom":
        task, model = _fake_task_and_model(48)
    else:
        task, model = _fake_task_and_model(48, error=ValueError, msg="shape mismatch (not an OOM)")
    opt = make_optimizer("momentum", model.parameters(), 0.1)
    # give the optimizer momentum state and the params grads, then put the model in eval mode
    x, y = task.train_set.x[:16], task.train_set.y[:16]
    task.loss(model(x), y).backward()
    opt.step()
    model.eval()
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    before = _snapshot(model, opt)
    if error == "oom":
        r = max_batch_size(task, model=model, optimizer=opt, memory_limit=2**40)
        assert r.batch_size == 32
    else:
        with pytest.raises(ValueError, match="not an OOM"):
            max_batch_size(task, model=model, optimizer=opt, memory_limit=2**40)
    _assert_same(before, _snapshot(model, opt))
    assert not model.training and not model.inner[1].training
    assert torch.rand(3).tolist() == (torch.manual_seed(123), torch.rand(3))[1].tolist()
    assert np.random.rand() == (np.random.seed(7), np.random.rand())[1]
    assert random.random() == (random.seed(9), random.random())[1]


def test_preserved_state_restores_after_exception() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    before = _snapshot(model, opt)
    rng = torch.random.get_rng_state()
    with pytest.raises(KeyError):
        with preserved_state(model, opt):
            model(torch.randn(8, 4)).sum().backward()
            opt.step()
            raise KeyError("boom")
    _assert_same(before, _snapshot(model, opt))
    assert torch.equal(rng, torch.random.get_rng_state())


def test_bad_arguments() -> None:
    task = make_toy_task(n_train=64)
    with pytest.raises(ValueError, match=r"low must be an integer in \[1, 64\].*got 100"):
        max_batch_size(task, low=100)
    with pytest.raises(ValueError, match="high must be an integer >= low"):
        max_batch_size(task, low=8, high=4)
    with pytest.raises(ValueError, match="memory_limit must be a positive number of bytes"):
        max_batch_size(task, memory_limit=-5)


# ------------------------------------------------------------------ any task (issue 17)
class _Recorder(nn.Module):
    """Wraps a keyword-argument model and records the shape of every ``input_ids`` it sees."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, **batch: torch.Tensor):
        self.shapes.append(tuple(batch["input_ids"].shape))
        return self.inner(**batch)


def _hf_task(**kw):
    from byo import hf_style

    return hf_style.make_task(n_train=96, n_val=40, max_len=40, **kw)


def test_user_task_measured_on_the_longest_examples() -> None:
    task = _hf_task()
    lengths = [len(task.train_set[i]["input_ids"]) for i in range(len(task.train_set))]
    model = _Recorder(task.make_model())
    r = max_batch_size(task, model=model, memory_limit=2**40)
    assert r.batch_size == 96 and r.capped_by == "data" and r.n_examples == 96
    # every trial batch is padded to the longest example of the data set, whatever its size
    assert model.shapes and {s[1] for s in model.shapes} == {max(lengths)}
    assert r.longest["scanned"] == 96
    assert r.longest["ratio"] == pytest.approx(max(lengths) / (sum(lengths) / len(lengths)), rel=0.2)
    assert r.longest["ratio"] > 1.2


def test_user_task_memory_limit_and_margin() -> None:
    from byo import char_gpt

    task = char_gpt.make_task(n_chars=6000, block_size=16, n_embd=32)
    free = max_batch_size(task, memory_limit=2**40, margin=0.0, high=256)
    limit = int(free.fixed_bytes + free.per_sample_bytes * 100)
    r0 = max_batch_size(task, memory_limit=limit, margin=0.0, high=256)
    r5 = max_batch_size(task, memory_limit=limit, margin=0.5, high=256)
    assert r0.batch_size == 64, r0.tried
    assert r5.budget_bytes == pytest.approx(limit * 0.5) and r5.margin == 0.5
    assert r5.batch_size is not None and r5.batch_size < r0.batch_size
    assert all(t[2] <= r5.budget_bytes for t in r5.tried if t[1])
    assert all(t[2] > r5.budget_bytes for t in r5.tried if not t[1] and t[2] == t[2])


def test_eval_batch_found_separately() -> None:
    task = _hf_task()
    train = max_batch_size(task, memory_limit=2**40, margin=0.0)
    limit = int(train.fixed_bytes + train.per_sample_bytes * 20)
    tr = max_batch_size(task, memory_limit=limit, margin=0.0)
    ev = max_batch_size(task, memory_limit=limit, margin=0.0, mode="eval")
    assert tr.mode == "train" and ev.mode == "eval"
    assert ev.n_examples == 40  # the validation split, and never searched past it
    assert max(t[0] for t in ev.tried) <= 40
    assert ev.per_sample_bytes < tr.per_sample_bytes / 2  # no saved activations, no gradients
    assert tr.batch_size == 16 and ev.batch_size == 40, (tr.tried, ev.tried)
    with pytest.raises(ValueError, match="mode must be one of train, eval, got 'test'"):
        max_batch_size(task, mode="test")


def test_caller_rng_untouched() -> None:
    """Issue 13: building the model inside the finder advanced the caller's RNG."""
    task = _hf_task()
    for t in (task, make_toy_task(n_train=64)):
        torch.manual_seed(5)
        np.random.seed(5)
        random.seed(5)
        max_batch_size(t, memory_limit=2**40)
        got = (torch.rand(2).tolist(), np.random.rand(), random.random())
        torch.manual_seed(5)
        np.random.seed(5)
        random.seed(5)
        assert got == (torch.rand(2).tolist(), np.random.rand(), random.random())


def test_margin_and_scan_arguments() -> None:
    task = make_toy_task(n_train=64)
    with pytest.raises(ValueError, match=r"margin must be a number in \[0, 1\), got 1.0"):
        max_batch_size(task, margin=1.0)
    with pytest.raises(ValueError, match="scan must be a positive integer, got 0"):
        max_batch_size(task, scan=0)


def _resident_peak_available() -> bool:
    from batchlab.batchsize.memory import peak_rss_over

    return peak_rss_over(lambda: None)[1] is not None


@pytest.mark.skipif(not _resident_peak_available(), reason="needs Linux's /proc/self/clear_refs")
def test_cpu_step_bytes_see_what_the_accounting_misses_with_the_resident_peak() -> None:
    # a convolution's temporary buffers live inside one kernel: autograd never saves them, so the
    # accounted bytes were ~60% of what the step held, and a --memory-limit was exceeded by that much
    from batchlab.batchsize.memory import accounted_step_bytes, cpu_step_bytes, peak_rss_over
    from batchlab.tasks import Task

    _, delta = peak_rss_over(lambda: torch.empty(64 << 20, dtype=torch.uint8).fill_(1))
    assert delta is not None and delta >= 64 << 20  # a known allocation is seen

    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, 64, 64, generator=g), i % 10) for i in range(40)]
    task = Task.from_torch(name="conv64", model=net, train=data, val=data[:8])
    torch.manual_seed(0)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = (torch.stack([x for x, _ in data[:32]]), torch.tensor([y for _, y in data[:32]]))
    accounted_step_bytes(task, model, opt, batch)  # warm-up: the first step allocates more than the next
    accounted = accounted_step_bytes(task, model, opt, batch)
    measured = cpu_step_bytes(task, model, opt, batch)
    assert measured > accounted * 1.2, (measured, accounted)
