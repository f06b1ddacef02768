"""The task registry: built-in tasks by name, a user's own task as ``package.module:function``."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from batchlab.tasks.task import Task

TaskFactory = Callable[..., Task]
_TASKS: dict[str, tuple[TaskFactory, str]] = {}


def register_task(name: str, description: str = "") -> Callable[[TaskFactory], TaskFactory]:
    def deco(fn: TaskFactory) -> TaskFactory:
        _TASKS[name] = (fn, description or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


def list_tasks() -> dict[str, str]:
    """Registered task names with a one-line description."""
    return {k: v[1] for k, v in sorted(_TASKS.items())}


def get_task(spec: str | Task, **kwargs: Any) -> Task:
    """A task by registry name or ``package.module:function`` entry point.

    Args:
        spec: a name from :func:`list_tasks`, an entry point, or a Task (returned as is).
        kwargs: passed to the task factory (e.g. ``root=`` for file-based tasks, ``n_samples=``).
    """
    if isinstance(spec, Task):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"task must be a registered name or 'package.module:function', got {spec!r}")
    if ":" in spec:
        return _load_entry_point(spec, **kwargs)
    if spec not in _TASKS:
        raise ValueError(f"unknown task {spec!r}; known tasks: {', '.join(sorted(_TASKS))} (or 'package.module:function')")
    return _with_spec(_TASKS[spec][0](**kwargs), spec, kwargs)


def _load_entry_point(spec: str, **kwargs: Any) -> Task:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ValueError(f"task entry point must look like 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} of task entry point {spec!r}: {e}") from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (task entry point {spec!r})")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"task entry point {spec!r} is not callable")
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:  # the arguments themselves do not fit (a TypeError inside the function is its own)
        raise ValueError(f"task entry point {spec!r} does not take these arguments ({', '.join(kwargs) or 'none'}): {e}") from e
    except ValueError:
        pass  # no signature to check (a builtin): the call says
    try:
        task = fn(**kwargs)
    except TypeError as e:
        raise ValueError(f"task entry point {spec!r} raised TypeError with arguments "
                         f"{', '.join(f'{k}={v!r}' for k, v in kwargs.items()) or 'none'}: {e}") from e
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - the user's code: one line naming the entry point
        raise ValueError(f"task entry point {spec!r} raised {type(e).__name__}: {e}") from e
    if not isinstance(task, Task):
        raise ValueError(f"task entry point {spec!r} returned {type(task).__name__}, expected batchlab.tasks.Task")
    return _with_spec(task, spec, kwargs)


def _with_spec(task: Task, spec: str, kwargs: dict[str, Any]) -> Task:
    """Remember how the task was built, so another process (a Ray worker) can build it again."""
    if task.spec is None:
        task.spec = (spec, dict(kwargs))
    return task
