"""Experiments: one per group of claims in CLAIMS.md, run by ``batchlab reproduce``.

Every module in this package other than ``base`` and ``runner`` defines experiments with the
``@register`` decorator; :func:`load_all` imports them all.
"""

from __future__ import annotations

import importlib
import pkgutil

_FRAMEWORK = {"base", "runner", "report", "kit"}


def load_all() -> None:
    """Import every experiment module of this package (registering its experiments)."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _FRAMEWORK and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
