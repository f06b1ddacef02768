"""Task variants held out from the development of ``suggest``'s method, for
``suggest_vs_grid.py``. They were fixed before any of their grids was run; the benchmark loads
them as entry points (``heldout_tasks:NAME``; the benchmark's folder is on ``sys.path`` when it
runs as a script)::

    .venv/bin/python benchmarks/suggest_vs_grid.py --max-epochs 10 --replicate --out benchmarks/out/heldout \\
        --tasks heldout_tasks:hard_sequence heldout_tasks:wide_mnist1d heldout_tasks:noisy_synthetic
"""

from __future__ import annotations

from batchlab.tasks import Task, get_task


def hard_sequence() -> Task:
    """sequence-cls with a weaker signal and more noise (the default saturates at ~99.5%)."""
    return get_task("sequence-cls", signal_fraction=0.1, noise=0.6, seed=1)


def wide_mnist1d() -> Task:
    """MNIST-1D from another generator seed with a wider, shallower MLP."""
    return get_task("mnist1d-mlp", hidden=(256, 256), seed=1)


def noisy_synthetic() -> Task:
    """A noisier, higher-dimensional Gaussian mixture from another seed."""
    return get_task("synthetic-mlp", dim=32, noise=1.5, seed=3)
