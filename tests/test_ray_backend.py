"""Ray Tune backend: a local Ray with two workers runs a four-trial sweep and must store exactly the
results of the in-process backend (histories equal except timing). Skipped without the extra."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from batchlab.distributed.ray_backend import RayBackend, add_backend_args, backend_from_args, map_trials
from batchlab.experiments.base import ExperimentContext
from batchlab.store import Store, run_key
from batchlab.train import TrainConfig

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="the 'ray' extra is not installed (pip install 'batchlab[ray]')")
TIMING = {"wall_time", "train_time", "eval_time", "first_step_time"}


@pytest.fixture(scope="module")  # one Ray session for the module: ~30 s to start on a busy 2-core machine
def backend() -> Iterator[RayBackend]:
    if not HAS_RAY:
        pytest.skip("the 'ray' extra is not installed (pip install 'batchlab[ray]')")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    b = RayBackend(num_cpus=2, cpus_per_trial=1)
    t0 = time.perf_counter()
    b.init()
    print(f"\nlocal Ray started in {time.perf_counter() - t0:.1f} s")
    yield b
    b.shutdown()


def _ctx(tmp: Path, backend: Any) -> ExperimentContext:
    return ExperimentContext(experiment_id="ray-test", quick=True, seeds=[0, 1], device="cpu",
                             store=Store(tmp / "store"), out_dir=tmp, backend=backend)


def _jobs() -> list[tuple[str, TrainConfig]]:
    return [
        ("digits-mlp", TrainConfig(batch_size=b, max_steps=8, eval_every=4, lr=0.05, seed=s))
        for b in (32, 64) for s in (0, 1)
    ]


def _strip(d: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in d.items() if k not in TIMING}
    out["history"] = [{k: v for k, v in row.items() if k not in TIMING} for row in d["history"]]
    out["extra"] = {k: v for k, v in d["extra"].items() if k not in TIMING}
    out["final"] = {k: v for k, v in d["final"].items() if k not in TIMING}
    return out


@pytest.mark.slow
@needs_ray
def test_sweep_on_ray_equals_in_process(tmp_path: Path, backend: RayBackend) -> None:
    t0 = time.perf_counter()
    ray_ctx = _ctx(tmp_path / "ray", backend)
    ray_results = ray_ctx.fit_many(_jobs())
    t_ray = time.perf_counter() - t0
    assert backend.trials_launched == 4 and ray_ctx.trials_run == 4 and ray_ctx.trials_loaded == 0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trials ran with cpus_per_trial=1 thread
    try:
        t0 = time.perf_counter()
        local_ctx = _ctx(tmp_path / "local", None)
        local_results = local_ctx.fit_many(_jobs())
        t_local = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    print(f"4 trials: Ray {t_ray:.1f} s, in-process {t_local:.1f} s")

    for job, r, l in zip(_jobs(), ray_results, local_results, strict=True):
        assert r.ok, r.error
        assert len(r.history) == 3
        assert _strip(r.to_dict()) == _strip(l.to_dict()), f"Ray and in-process results differ for {job}"
    # the same keys in both stores, with the same kind
    ray_rows = {rec.key: rec for rec in ray_ctx.store.records()}
    local_rows = {rec.key: rec for rec in local_ctx.store.records()}
    assert ray_rows.keys() == local_rows.keys() and len(ray_rows) == 4
    assert {rec.kind for rec in ray_rows.values()} == {"experiment:ray-test"}

    # a second pass loads everything from the store: nothing goes to Ray
    again = _ctx(tmp_path / "ray", backend).fit_many(_jobs())
    assert backend.trials_launched == 4
    assert [_strip(a.to_dict()) for a in again] == [_strip(r.to_dict()) for r in ray_results]


def _boom(args: Any) -> dict[str, Any]:
    if args == "bad":
        raise RuntimeError("trial exploded")
    return {"status": "ok", "value": args}


@pytest.mark.slow
@needs_ray
def test_pivot_search_on_ray_equals_in_process(tmp_path: Path, backend: RayBackend) -> None:
    """`batchlab suggest --backend ray` and the grid benchmark run their trials through this path."""
    from batchlab.batchsize import pivot_search

    kw = dict(pivot=64, low=32, high=128, seeds=(0, 1), budget_examples=512)
    local = pivot_search("digits-mlp", store=Store(tmp_path / "local"), **kw)
    on_ray = pivot_search("digits-mlp", store=Store(tmp_path / "ray"), backend=backend, **kw)
    assert on_ray.path == local.path and on_ray.best_batch == local.best_batch
    assert [(t.batch_size, t.seed, t.metric, t.status, t.examples) for t in on_ray.trials] == [
        (t.batch_size, t.seed, t.metric, t.status, t.examples) for t in local.trials
    ]
    assert len(Store(tmp_path / "ray").records()) == len(local.trials)


@pytest.mark.slow
@needs_ray
def test_map_trials_records_failures_and_skips_stored(tmp_path: Path, backend: RayBackend) -> None:
    store = Store(tmp_path / "s")
    items = [(run_key({"t": "x"}, {"i": i}), a) for i, a in enumerate(["a", "bad", "c"])]
    store.put(items[2][0], {"status": "ok", "value": "stored"})
    before = backend.trials_launched
    out = map_trials(store, items, _boom, backend=backend, kind="generic")
    assert backend.trials_launched - before == 2  # the stored item was not sent
    assert out[0] == {"status": "ok", "value": "a"}
    assert out[1]["status"] == "failed" and "trial exploded" in out[1]["error"]
    assert out[2]["value"] == "stored"
    # the in-process path gives the same payloads
    local = map_trials(Store(tmp_path / "l"), items[:2], _boom, kind="generic")
    assert local[0] == out[0] and local[1]["status"] == "failed"


@pytest.mark.slow
@needs_ray
def test_driver_writes_when_store_is_not_shared(tmp_path: Path, backend: RayBackend) -> None:
    remote_like = RayBackend(num_cpus=2, shared_store=False)  # joins the running Ray session
    store = Store(tmp_path / "s")
    items = [(run_key({"t": "y"}, {"i": 0}), "z")]
    assert remote_like.map_trials(store, items, _boom) == [{"status": "ok", "value": "z"}]
    assert store.get(items[0][0]) == {"status": "ok", "value": "z"}


def test_backend_args() -> None:
    p = argparse.ArgumentParser()
    add_backend_args(p)
    assert backend_from_args(p.parse_args([])) is None
    with pytest.raises(ValueError, match="--address needs --backend ray"):
        backend_from_args(p.parse_args(["--address", "auto"]))
    with pytest.raises(ValueError, match="--cpus-per-trial needs --backend ray"):  # was ignored without a word
        backend_from_args(p.parse_args(["--cpus-per-trial", "2"]))
    with pytest.raises(SystemExit):
        p.parse_args(["--cpus-per-trial", "0"])
    if HAS_RAY:
        b = backend_from_args(p.parse_args(["--backend", "ray", "--address", "auto", "--cpus-per-trial", "2",
                                            "--gpus-per-trial", "0.5"]))
        assert isinstance(b, RayBackend) and (b.address, b.cpus_per_trial, b.gpus_per_trial) == ("auto", 2.0, 0.5)
        assert b.shared_store is False


def test_backend_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="cpus_per_trial must be positive, got 0"):
        RayBackend(cpus_per_trial=0)
    with pytest.raises(ValueError, match="gpus_per_trial must be >= 0"):
        RayBackend(gpus_per_trial=-1)


def test_an_interrupted_sweep_stores_what_finished_and_says_a_rerun_resumes(tmp_path, monkeypatch) -> None:
    """Ray Tune returns trials without metrics or error when it is interrupted: the finished ones are
    stored and the message says what happened (it said "Ray trial ? crashed ...: None")."""
    import json as _json
    import signal
    from types import SimpleNamespace

    import batchlab.distributed.ray_backend as rb

    def fit_results(todo):  # the first trial finished, the second was stopped
        key0 = todo[0][0]
        done = SimpleNamespace(error=None, config={"trial": 0},
                               metrics={"key": key0, "payload_json": _json.dumps({"status": "ok", "value": 1})})
        return [done, SimpleNamespace(error=None, config={"trial": 1}, metrics={})]

    class Tuner:
        def __init__(self, trainable, param_space, tune_config, run_config):  # type: ignore[no-untyped-def]
            self.todo = trainable

        def fit(self):  # type: ignore[no-untyped-def]
            signal.signal(signal.SIGINT, lambda s, f: None)  # as Tune does; no SIGINT comes
            return fit_results(self.todo)

    tune = SimpleNamespace(with_parameters=lambda f, items, **kw: items, with_resources=lambda t, r: t,
                           Tuner=Tuner, grid_search=lambda xs: xs, TuneConfig=lambda **kw: None,
                           RunConfig=lambda **kw: None)
    ray = SimpleNamespace(is_initialized=lambda: True, cluster_resources=lambda: {"CPU": 2.0})
    monkeypatch.setattr(rb, "_import_ray", lambda: (ray, tune))
    store = Store(tmp_path / "s.db")
    with pytest.raises(RuntimeError, match=r"Ray Tune stopped before 1 of 2 trial\(s\) finished .* a rerun"):
        RayBackend().map_trials(store, [("k0", 0), ("k1", 1)], fn=lambda a: {"status": "ok"})
    assert store.get("k0") == {"status": "ok", "value": 1} and store.get("k1") is None


def test_an_address_nothing_answers_is_refused_at_once() -> None:
    # ray.init would retry for minutes with warnings only
    from batchlab.distributed.ray_backend import _check_reachable

    with pytest.raises(ValueError, match=r"address \(--address\) '127.0.0.1:1': nothing answers there"):
        _check_reachable("127.0.0.1:1")
    _check_reachable("auto")  # other forms are Ray's to resolve


@pytest.mark.slow
@needs_ray
def test_more_gpus_per_trial_than_the_cluster_has_is_refused(backend: RayBackend) -> None:
    # Ray would wait for the GPU forever (a warning a minute); the local Ray here has none
    wanting = RayBackend(num_cpus=2, gpus_per_trial=1)
    with pytest.raises(ValueError, match=r"gpus_per_trial \(--gpus-per-trial\) is 1, more than the Ray cluster has "
                                         r"\(0 GPUs\): no trial could ever start"):
        wanting.check_resources()
    RayBackend(num_cpus=2, cpus_per_trial=1).check_resources()  # what it has is fine


def test_a_sweep_stopped_by_ctrl_c_raises_keyboard_interrupt_after_storing_what_finished(tmp_path, monkeypatch) -> None:
    """Ray Tune answers the first SIGINT itself: it stops the sweep, puts back the handler it found and
    returns. That is an interruption (the CLI exits 130 and says a rerun resumes), not a RuntimeError
    (exit 1 with a traceback); the handler in place before the sweep is restored."""
    import json as _json
    import signal
    from types import SimpleNamespace

    import batchlab.distributed.ray_backend as rb

    class Tuner:  # Tune's _setup_signal_catching, then a SIGINT during the sweep
        def __init__(self, trainable, param_space, tune_config, run_config):  # type: ignore[no-untyped-def]
            self.todo = trainable

        def fit(self):  # type: ignore[no-untyped-def]
            original = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, lambda s, f: signal.signal(signal.SIGINT, original))
            signal.raise_signal(signal.SIGINT)
            done = SimpleNamespace(error=None, config={"trial": 0}, metrics={
                "key": self.todo[0][0], "payload_json": _json.dumps({"status": "ok", "value": 1})})
            return [done, SimpleNamespace(error=None, config={"trial": 1}, metrics={})]

    tune = SimpleNamespace(with_parameters=lambda f, items, **kw: items, with_resources=lambda t, r: t,
                           Tuner=Tuner, grid_search=lambda xs: xs, TuneConfig=lambda **kw: None,
                           RunConfig=lambda **kw: None)
    ray = SimpleNamespace(is_initialized=lambda: True, cluster_resources=lambda: {"CPU": 2.0})
    monkeypatch.setattr(rb, "_import_ray", lambda: (ray, tune))
    before = signal.getsignal(signal.SIGINT)
    store = Store(tmp_path / "s.db")
    with pytest.raises(KeyboardInterrupt):
        RayBackend().map_trials(store, [("k0", 0), ("k1", 1)], fn=lambda a: {"status": "ok"})
    assert store.get("k0") == {"status": "ok", "value": 1} and store.get("k1") is None
    assert signal.getsignal(signal.SIGINT) is before

