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


def _fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def run_trials(task: Any, configs: Sequence[Any], fn: Callable[[Any, Any], dict[str, Any]], store: Any, *,
               kind: str, runner: Any = None, backend: Any = None) -> list[dict[str, Any]]:
    """``fn(task, config)`` for every config, through the store, in order: with ``runner``
    (``runner.run([batchlab.runs.Trial], store, kind=)``), a parallel ``backend``
    (``backend.map_trials``) or in this process."""
    st = open_store(store)
    if runner is not None:
        from batchlab.runs import Trial

        return list(runner.run([Trial(task, c, fn=fn) for c in configs], st, kind=kind))
    fp = task.fingerprint()
    keys = [key_for(fp, c.to_dict(), kind=kind, trial_fn=_fn_name(fn)) for c in configs]
    if backend is not None:
        from batchlab.batchsize.search import trial_job

        return list(backend.map_trials(st, [(k, (fn, task, c)) for k, c in zip(keys, configs)], trial_job, kind=kind))
    return [st.run_or_load(k, lambda c=c: fn(task, c), kind=kind) for k, c in zip(keys, configs)]
