"""Adapter to the results store and the trial runner: every trial goes through ``run_or_load`` (or a
runner that does), so a rerun costs nothing.

``store`` arguments across :mod:`batchlab.batchsize` accept a :class:`batchlab.store.Store`, a path
(a directory gets ``batchlab.db``) or None (no caching: every call runs). ``runner`` arguments accept
any object with ``run(trials, store, *, kind=...) -> [payload]`` (:class:`batchlab.runs.LocalRunner`,
a Ray runner, or a test's fake).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol


class TrialStore(Protocol):
    def run_or_load(self, key: str, fn: Callable[[], Any], kind: str = "") -> dict[str, Any]: ...


class NullStore:
    """Runs every trial and keeps nothing."""

    def run_or_load(self, key: str, fn: Callable[[], Any], kind: str = "") -> dict[str, Any]:
        out = fn()
        return out.to_dict() if hasattr(out, "to_dict") else dict(out)


def open_store(store: Any) -> TrialStore:
    """A store object for ``store`` (Store, path or None)."""
    if store is None:
        return NullStore()
    if hasattr(store, "run_or_load"):
        return store
    if isinstance(store, (str, os.PathLike)):
        from batchlab.store import Store

        path = os.fspath(store)
        if not path.endswith(".db"):
            return Store.in_dir(path)
        return Store(path)
    raise TypeError(f"store must be a batchlab.store.Store, a path or None, got {type(store).__name__}")


def key_for(fingerprint: dict[str, Any], config: dict[str, Any], **extra: Any) -> str:
    from batchlab.store import run_key

    return run_key(fingerprint, config, **extra)


def run_trials(task: Any, configs: Sequence[Any], fn: Callable[[Any, Any], dict[str, Any]], store: Any, *,
               kind: str, runner: Any = None, backend: Any = None) -> list[dict[str, Any]]:
    """``fn(task, config)`` for every config as :class:`batchlab.runs.Trial` objects (one key formula,
    :func:`batchlab.runs.trial_key`), through the store, in order, by ``runner`` (default: ``backend``,
    e.g. a Ray backend, else :class:`batchlab.runs.LocalRunner`). A test passes a fake runner."""
    from batchlab.runs import LocalRunner, Trial

    run = runner if runner is not None else (backend if backend is not None else LocalRunner())
    return list(run.run([Trial(task, c, fn=fn) for c in configs], store, kind=kind))
