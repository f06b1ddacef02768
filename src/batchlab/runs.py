"""Trials: one description of a training run, one key formula for the results store, one runner
interface.

Every sweep, search and experiment describes its runs as :class:`Trial` objects and hands them to
a runner: :class:`LocalRunner` (in this process, one after another) or
:class:`batchlab.distributed.ray_backend.RayBackend` (as Ray Tune trials). Both look each trial's
:meth:`Trial.key` up in the results store first, so a finished trial is loaded, never rerun, and a
failing trial is stored with its status while the sweep goes on. A test substitutes any object with
the same ``run`` method.

The key of a trial is :func:`trial_key`: the hash of the task's fingerprint (model, data), the
config and whatever else changes the result (``extra``: a model variant, a custom trial function).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch.nn as nn

from batchlab.store import Store, run_key, run_many
from batchlab.tasks import Task, get_task
from batchlab.train import RunResult, TrainConfig, fit

__all__ = ["LocalRunner", "Runner", "Trial", "open_store", "run_trial", "trial_key"]

TrialFn = Callable[[Task, TrainConfig], Any]


def trial_key(task: Task | Mapping[str, Any], config: TrainConfig | Mapping[str, Any], **extra: Any) -> str:
    """The results-store key of training ``task`` with ``config`` (``extra``: anything else that
    changes the result). The one formula every tool uses."""
    fp = task.fingerprint() if isinstance(task, Task) else task
    cfg = config.to_dict() if isinstance(config, TrainConfig) else config
    return run_key(fp, cfg, **extra)


def _fn_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


@dataclass(frozen=True)
class Trial:
    """One run to do: ``fn(task, config)`` (default: :func:`batchlab.train.fit`).

    Attributes:
        task: the task.
        config: the run's config.
        fn: a custom trial function returning a JSON-able dict or an object with ``to_dict()``
            (its qualified name is part of the key); None trains with ``fit``.
        model_fn: build the model yourself (a variant the task cannot make); give ``variant``.
        variant: part of the key, for anything the config does not say.
    """

    task: Task
    config: TrainConfig
    fn: TrialFn | None = None
    model_fn: Callable[[], nn.Module] | None = None
    variant: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.task, Task):
            raise TypeError(f"Trial.task must be a batchlab Task, got {type(self.task).__name__}")
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"Trial.config must be a TrainConfig, got {type(self.config).__name__}")
        if self.model_fn is not None and not self.variant:
            raise ValueError("Trial: a model_fn needs a variant string naming it (it is part of the results-store key)")

    def key(self) -> str:
        extra: dict[str, Any] = {"variant": self.variant}
        if self.fn is not None:
            extra["trial_fn"] = _fn_name(self.fn)
        return trial_key(self.task, self.config, **extra)

    def portable(self) -> Trial | tuple[Any, ...]:
        """What to send to another process: the task's registry spec and the config when the task
        has one (the worker builds the task itself, no tensors shipped), else the trial."""
        if self.task.spec is None:
            return self
        return ("spec", self.task.spec, self.config.to_dict(), self.fn, self.model_fn)


_WORKER_TASKS: dict[str, Task] = {}


def run_trial(trial: Trial | tuple[Any, ...]) -> dict[str, Any]:
    """Run one trial (or its :meth:`Trial.portable` form) and return its JSON-able payload."""
    if isinstance(trial, tuple):
        _, (name, kwargs), config, fn, model_fn = trial
        cache = name + repr(sorted(kwargs.items()))
        if cache not in _WORKER_TASKS:
            _WORKER_TASKS[cache] = get_task(name, **kwargs)
        trial = Trial(_WORKER_TASKS[cache], TrainConfig.from_dict(config), fn, model_fn,
                      variant="portable" if model_fn is not None else "")
    if trial.fn is not None:
        out = trial.fn(trial.task, trial.config)
        return out.to_dict() if hasattr(out, "to_dict") else dict(out)
    model = trial.model_fn() if trial.model_fn is not None else None
    return fit(trial.task, trial.config, model=model, raise_errors=False).to_dict()


class _NoStore:
    """A store that keeps nothing: every trial runs."""

    def record(self, key: str) -> None:
        return None

    def run_or_load(self, key: str, fn: Callable[[], Any], kind: str = "", retry_failed: bool = False) -> dict[str, Any]:
        out = fn()
        return out.to_dict() if hasattr(out, "to_dict") else dict(out)


def open_store(store: Any) -> Any:
    """A store object for ``store``: a :class:`Store` as is, a path (a folder gets ``batchlab.db``),
    or None (nothing kept: every trial runs)."""
    import os

    if store is None:
        return _NoStore()
    if hasattr(store, "run_or_load"):
        return store
    if isinstance(store, (str, os.PathLike)):
        path = os.fspath(store)
        return Store(path) if path.endswith(".db") else Store.in_dir(path)
    raise TypeError(f"store must be a batchlab.store.Store, a path or None, got {type(store).__name__}")


class Runner(Protocol):
    """Runs trials through a results store and returns their payloads in order."""

    def run(self, trials: Sequence[Trial], store: Any = None, *, kind: str = "", progress: bool = False,
            retry_failed: bool = False) -> list[dict[str, Any]]: ...


class LocalRunner:
    """Trials in this process, one after another, through the store (finished ones are loaded, a
    failing trial is stored with its status and the rest go on)."""

    def run(self, trials: Sequence[Trial], store: Any = None, *, kind: str = "", progress: bool = False,
            retry_failed: bool = False) -> list[dict[str, Any]]:
        st = open_store(store)
        if isinstance(st, Store):
            return run_many(st, [(t.key(), t) for t in trials], run_trial, progress=progress, kind=kind,
                            retry_failed=retry_failed)
        return [st.run_or_load(t.key(), lambda t=t: run_trial(t), kind=kind) for t in trials]


def results(payloads: Sequence[Mapping[str, Any]]) -> list[RunResult]:
    """Payloads of ``fit`` trials as :class:`RunResult` objects (a failed trial's stored error
    payload becomes a result with that status)."""
    out = []
    for p in payloads:
        if "config" in p and "task" in p:
            out.append(RunResult.from_dict(dict(p)))
        else:
            out.append(RunResult(task="?", config={}, status=p.get("status", "failed"), error=p.get("error")))
    return out
