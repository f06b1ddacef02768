"""Tasks: what to train (model, data, loss, metric, default optimizer), by name or built by the user.

- :mod:`batchlab.tasks.task`: the :class:`Task` type.
- :mod:`batchlab.tasks.registry`: :func:`register_task`, :func:`get_task`, :func:`list_tasks`.
- :mod:`batchlab.tasks.builtin`: the built-in tasks (imported here, so they are always registered).
"""

from batchlab.tasks.task import METRICS, Task, TaskError, accuracy, describe_batch
from batchlab.tasks.registry import get_task, list_tasks, register_task
from batchlab.tasks import builtin  # noqa: F401,E402  (registers the built-in tasks)

__all__ = ["METRICS", "Task", "TaskError", "accuracy", "describe_batch", "get_task", "list_tasks", "register_task"]
