"""batchlab: measure batch size and normalization choices for PyTorch models.

The main names are importable from the top level (loaded on first use, so ``import batchlab`` is
cheap): ``Task``, ``fit``, ``TrainConfig``, ``suggest``, ``executable_batch_size``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Task": "batchlab.tasks",
    "TaskError": "batchlab.tasks",
    "get_task": "batchlab.tasks",
    "fit": "batchlab.train",
    "TrainConfig": "batchlab.train",
    "RunResult": "batchlab.train",
    "suggest": "batchlab.batchsize",
    "executable_batch_size": "batchlab.integrations.accelerate",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'batchlab' has no attribute {name!r}")
