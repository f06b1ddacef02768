"""Adapter to the results store: every trial goes through ``run_or_load`` so a rerun costs nothing.

``store`` arguments across :mod:`batchlab.batchsize` accept a :class:`batchlab.store.Store`, a path
(a directory gets ``batchlab.db``) or None (no caching: every call runs).
"""

from __future__ import annotations

import os
from collections.abc import Callable
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
