"""Run sweep and experiment trials as Ray Tune trials, locally or on a Ray cluster.

``RayBackend()`` starts a local Ray (``ray.init(num_cpus=...)``) the first time it is used;
``RayBackend(address="auto")`` or ``address="ray://head:10001"`` joins a running cluster. Each
missing trial becomes one Ray Tune trial (``tune.Tuner(trainable, param_space={"trial":
tune.grid_search([...])})``) with ``cpus_per_trial`` / ``gpus_per_trial`` reserved for it, so Ray
runs as many at once as the resources allow. The results store stays the single source of truth:

- the driver looks every key up first; stored trials are loaded, never sent to Ray;
- a trial opens the SQLite store *by path* and runs :func:`batchlab.store.run_many` on its one item,
  so it is stored with exactly the key, kind and failure handling of the in-process path (an
  exception becomes a stored ``"failed"`` result) -- an interrupted sweep resumes where it stopped;
- the trial also reports its payload to Tune, and the driver inserts any payload that is not in the
  store yet. With ``shared_store=False`` (the default when joining a cluster, whose nodes may not
  see the driver's disk -- and SQLite must not live on a network file system) only the driver writes.

Ray is an optional extra (``pip install 'batchlab[ray]'``); it is imported when a backend is used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from batchlab.argtypes import nonneg_float, positive_float
from batchlab.runs import Trial, open_store, run_trial
from batchlab.store import Store, run_many

__all__ = ["RayBackend", "add_backend_args", "backend_from_args", "map_trials"]


def _import_ray() -> tuple[Any, Any]:
    try:
        import ray
        from ray import tune
    except ImportError as e:
        raise ImportError(
            f"the Ray backend needs Ray Tune (>= 2.9): pip install 'batchlab[ray]' (import failed: {e})"
        ) from e
    return ray, tune


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) address must answer a TCP connection: ``ray.init``
    would otherwise retry for minutes with warnings only. "auto" and other forms are left to Ray."""
    import re
    import socket

    m = re.fullmatch(r"(?:ray://)?([^:/\s]+):(\d+)", address.strip())
    if m is None:
        return
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"address (--address) {address!r}: nothing answers there ({e.strerror or e}); start the Ray "
                         "cluster first (ray start --head) or leave --address out for a local Ray") from e


def _trial(config: dict[str, Any], *, items: list[tuple[str, Any]], fn: Callable[[Any], Any], store_path: str | None,
           kind: str, retry_failed: bool, threads: int) -> dict[str, Any]:
    """The Tune trainable: one item of ``items`` (chosen by ``config["trial"]``)."""
    import torch

    torch.set_num_threads(threads)
    key, args = items[config["trial"]]
    if store_path is not None:
        payload = run_many(Store(store_path), [(key, args)], fn, progress=False, kind=kind, retry_failed=retry_failed)[0]
    else:
        scratch = tempfile.mkdtemp(prefix="batchlab-trial-")
        try:  # the same failure handling as run_many, in a throw-away store
            payload = run_many(Store(scratch), [(key, args)], fn, progress=False, kind=kind)[0]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"key": key, "status": str(payload.get("status", "ok")), "payload_json": json.dumps(payload, allow_nan=True)}


class RayBackend:
    """Trials as Ray Tune trials; results in the same SQLite store as in-process runs.

    Args:
        address: a running cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); None
            starts a local Ray with ``num_cpus`` CPUs.
        cpus_per_trial: CPUs reserved per trial (also the trial's torch thread count).
        gpus_per_trial: GPUs reserved per trial (fractions allowed, e.g. 0.5).
        num_cpus: CPUs of the local Ray (default: all of this machine's); ignored with ``address``.
        shared_store: whether trials write the store themselves (they must see its path and it must
            be on a local disk); default True for a local Ray, False with ``address``.
        storage_path: where Tune keeps its own trial folders (default: a temporary folder,
            removed afterwards); on a multi-node cluster give a shared path or a cloud URI.
        max_concurrent: cap on trials running at once (default: as many as the resources allow).
    """

    def __init__(
        self,
        address: str | None = None,
        cpus_per_trial: float = 1,
        gpus_per_trial: float = 0,
        *,
        num_cpus: int | None = None,
        shared_store: bool | None = None,
        storage_path: str | None = None,
        max_concurrent: int = 0,
    ) -> None:
        if not cpus_per_trial > 0:
            raise ValueError(f"cpus_per_trial must be positive, got {cpus_per_trial!r}")
        if not gpus_per_trial >= 0:
            raise ValueError(f"gpus_per_trial must be >= 0, got {gpus_per_trial!r}")
        if num_cpus is not None and (not isinstance(num_cpus, int) or num_cpus < 1):
            raise ValueError(f"num_cpus must be a positive integer, got {num_cpus!r}")
        if not isinstance(max_concurrent, int) or max_concurrent < 0:
            raise ValueError(f"max_concurrent must be an integer >= 0, got {max_concurrent!r}")
        self.address = address
        self.cpus_per_trial = cpus_per_trial
        self.gpus_per_trial = gpus_per_trial
        self.num_cpus = num_cpus
        self.shared_store = (address is None) if shared_store is None else shared_store
        self.storage_path = storage_path
        self.max_concurrent = max_concurrent
        self.trials_launched = 0  # trials sent to Ray by this backend (stored ones are not)

    def __repr__(self) -> str:
        return (f"RayBackend(address={self.address!r}, cpus_per_trial={self.cpus_per_trial}, "
                f"gpus_per_trial={self.gpus_per_trial})")

    # ---------------------------------------------------------------- Ray session
    def init(self) -> None:
        """Connect to the cluster or start the local Ray (no-op when Ray is already up)."""
        ray, _ = _import_ray()
        if ray.is_initialized():
            return
        if self.address is None:
            ray.init(num_cpus=self.num_cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            _check_reachable(self.address)
            ray.init(address=self.address, log_to_driver=False, configure_logging=False)

    def check_resources(self) -> None:
        """Refuse a trial that asks for more CPUs or GPUs than the whole cluster has: Ray would wait for
        them forever (a warning a minute, no error). Starts or connects to Ray (:meth:`init`)."""
        ray, _ = _import_ray()
        self.init()
        have = ray.cluster_resources()
        for flag, kind, per in (("cpus_per_trial", "CPU", self.cpus_per_trial), ("gpus_per_trial", "GPU", self.gpus_per_trial)):
            if per > have.get(kind, 0.0):
                raise ValueError(f"{flag} (--{flag.replace('_', '-')}) is {per:g}, more than the Ray cluster has "
                                 f"({have.get(kind, 0.0):g} {kind}s): no trial could ever start")

    def shutdown(self) -> None:
        """Stop the local Ray (or disconnect from the cluster)."""
        ray, _ = _import_ray()
        if ray.is_initialized():
            ray.shutdown()

    # ---------------------------------------------------------------- generic
    def map_trials(
        self,
        store: Store,
        items: Iterable[tuple[str, Any]],
        fn: Callable[[Any], Any] = run_trial,
        *,
        kind: str = "",
        retry_failed: bool = False,
    ) -> list[dict[str, Any]]:
        """Like :func:`batchlab.store.run_many`, but the missing items run as Ray Tune trials.

        Args:
            store: the results store; items already in it are loaded, not run.
            items: ``(key, args)`` pairs; ``fn(args)`` computes one result (a JSON-able dict or an
                object with ``to_dict()``). ``fn`` and ``args`` are pickled to the workers.
            fn: the trial function (default :func:`batchlab.runs.run_trial`: ``args`` a Trial or its portable form).
            kind: label stored with new rows.
            retry_failed: run again items stored as ``"failed"``/``"oom"``.

        Returns:
            The stored payloads, in the order of ``items``.
        """
        items = list(items)
        pending: dict[str, Any] = {}
        for key, args in items:
            rec = store.record(key)
            if (rec is None or (retry_failed and rec.status in ("failed", "oom"))) and key not in pending:
                pending[key] = args
        if pending:
            self._run(store, list(pending.items()), fn, kind, retry_failed)
        out = []
        for key, _ in items:
            payload = store.get(key)
            if payload is None:
                raise RuntimeError(f"trial {key[:12]} finished on Ray but its result is not in {store.path}")
            out.append(payload)
        return out

    def _run(self, store: Store, todo: list[tuple[str, Any]], fn: Callable[[Any], Any], kind: str, retry_failed: bool) -> None:
        ray, tune = _import_ray()
        self.check_resources()  # starts or connects to Ray first
        threads = max(1, int(self.cpus_per_trial))
        trainable = tune.with_parameters(
            _trial, items=todo, fn=fn, store_path=str(store.path) if self.shared_store else None, kind=kind,
            retry_failed=retry_failed, threads=threads,
        )
        trainable = tune.with_resources(trainable, {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial})
        storage = self.storage_path or tempfile.mkdtemp(prefix="batchlab-ray-")
        # Ray Tune catches the first Ctrl-C itself (it stops the sweep and returns the trials that
        # finished) and then puts back the handler it found: finding our marker there afterwards is how
        # an interrupted sweep is told from one whose trials the cluster lost
        marker, saved_handler = _install_interrupt_marker()
        try:
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(list(range(len(todo))))},
                tune_config=tune.TuneConfig(max_concurrent_trials=self.max_concurrent or None),
                run_config=tune.RunConfig(storage_path=storage, name=f"batchlab-{kind or 'trials'}".replace(":", "-"),
                                          verbose=0),
            )
            grid = tuner.fit()
            self.trials_launched += len(todo)
            crashed, unfinished = [], 0
            for res in grid:  # every finished trial is stored before anything is raised
                if res.error is None and res.metrics and "payload_json" in res.metrics:
                    m = res.metrics
                    store.put(m["key"], json.loads(m["payload_json"]), kind=kind,
                              overwrite=retry_failed and not self.shared_store)
                elif res.error is not None:
                    key = todo[res.config["trial"]][0] if res.config else "?"
                    crashed.append(f"{key[:12]}: {res.error!r}")
                else:
                    unfinished += 1
            if crashed:
                raise RuntimeError(f"{len(crashed)} Ray trial(s) crashed before reporting a result (the finished ones "
                                   f"are stored; a rerun resumes): {crashed[0]}")
            tune_catches_sigint = not int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0") or 0)
            if unfinished and tune_catches_sigint and marker is not None and signal.getsignal(signal.SIGINT) is marker:
                raise KeyboardInterrupt(f"the Ray sweep was interrupted with {unfinished} of {len(todo)} trial(s) "
                                        "unfinished; the finished ones are stored, and a rerun runs only the rest")
            if unfinished:
                raise RuntimeError(f"Ray Tune stopped before {unfinished} of {len(todo)} trial(s) finished (interrupted, "
                                   "or the cluster lost them); the finished ones are stored, and a rerun of the same "
                                   "command runs only the rest")
        finally:
            if marker is not None:
                signal.signal(signal.SIGINT, saved_handler)
            if self.storage_path is None:
                shutil.rmtree(storage, ignore_errors=True)

    # ---------------------------------------------------------------- the runner interface
    def run(self, trials: Sequence[Trial], store: Any = None, *, kind: str = "", progress: bool = False,
            retry_failed: bool = False) -> list[dict[str, Any]]:
        """:class:`batchlab.runs.Runner` on Ray: the missing trials run concurrently as Ray Tune
        trials, with the same keys and failure handling as :class:`batchlab.runs.LocalRunner`.

        A trial whose task came from the registry (a built-in name or a ``package.module:function``
        entry point) is shipped as that name and its arguments: the worker builds the task itself,
        no tensors cross the network. Other tasks are pickled whole.
        """
        if store is None:
            raise ValueError("RayBackend.run needs a results store (a Store or a path): the trials report through it")
        st = open_store(store)
        return self.map_trials(st, [(t.key(), t.portable()) for t in trials], run_trial, kind=kind,
                               retry_failed=retry_failed)


def map_trials(
    store: Store,
    items: Iterable[tuple[str, Any]],
    fn: Callable[[Any], Any] = run_trial,
    *,
    backend: RayBackend | None = None,
    kind: str = "",
    retry_failed: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Run the missing ``(key, args)`` items with ``backend`` (None: in this process, one after another)."""
    if backend is None:
        return run_many(store, items, fn, progress=progress, kind=kind, retry_failed=retry_failed)
    return backend.map_trials(store, items, fn, kind=kind, retry_failed=retry_failed)


# -------------------------------------------------------------------------------------- CLI


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """``--backend {local,ray} [--address ADDR] [--cpus-per-trial N] [--gpus-per-trial N]``."""
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="where trials run: in this process (local) or as Ray Tune trials (ray)")
    p.add_argument("--address", default=None,
                   help="with --backend ray: a running Ray cluster (auto, HOST:6379 or ray://HOST:10001); "
                   "default: start a local Ray")
    p.add_argument("--cpus-per-trial", type=positive_float, default=None, help="with --backend ray: CPUs per trial (default 1)")
    p.add_argument("--gpus-per-trial", type=nonneg_float, default=None, help="with --backend ray: GPUs per trial (default 0)")


def backend_from_args(args: argparse.Namespace) -> RayBackend | None:
    """The backend chosen by :func:`add_backend_args` flags (None: in-process)."""
    if getattr(args, "backend", "local") != "ray":
        for flag in ("address", "cpus_per_trial", "gpus_per_trial"):
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --backend ray (trials run in this process otherwise)")
        return None
    _import_ray()  # a clear error now rather than after the first stored trial
    cpus = 1.0 if args.cpus_per_trial is None else args.cpus_per_trial
    gpus = 0.0 if args.gpus_per_trial is None else args.gpus_per_trial
    return RayBackend(address=args.address, cpus_per_trial=cpus, gpus_per_trial=gpus)


def _install_interrupt_marker() -> tuple[Any, Any]:
    """Put a SIGINT handler of our own in place (it raises KeyboardInterrupt, as Python's default
    does) and return it with the one it replaced; ``(None, None)`` off the main thread, where signal
    handlers cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        return None, None

    def marker(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    saved = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, marker)
    return marker, saved
