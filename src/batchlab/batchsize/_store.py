"""Trials of :mod:`batchlab.batchsize` through the one trial runner and results store of
:mod:`batchlab.runs`: every trial is a :class:`batchlab.runs.Trial` keyed by
:func:`batchlab.runs.trial_key`, so a rerun (or a resumed, interrupted search) trains nothing twice.

``store`` arguments accept a :class:`batchlab.store.Store`, a path (a directory gets ``batchlab.db``)
or None (nothing kept: every call runs); ``runner`` arguments any object with
``run(trials, store, *, kind=...) -> [payload]`` (:class:`batchlab.runs.LocalRunner`, the Ray
backend, or a test's fake).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from batchlab.runs import LocalRunner, Trial, open_store, trial_key

__all__ = ["open_store", "run_trials", "trial_key"]


def run_trials(task: Any, configs: Sequence[Any], fn: Callable[[Any, Any], dict[str, Any]], store: Any, *,
               kind: str, runner: Any = None, backend: Any = None) -> list[dict[str, Any]]:
    """``fn(task, config)`` for every config as :class:`batchlab.runs.Trial` objects, through the store,
    in order, by ``runner`` (default: ``backend``, e.g. a Ray backend, else :class:`LocalRunner`)."""
    run = runner if runner is not None else (backend if backend is not None else LocalRunner())
    return list(run.run([Trial(task, c, fn=fn) for c in configs], store, kind=kind))
