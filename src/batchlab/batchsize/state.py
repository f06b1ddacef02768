"""Snapshot and restore everything a probing step may change: model, optimizer, RNG.

Lightning's batch-size tuner checkpoints to disk and Accelerate's finder restores nothing; here the
snapshot lives in memory and is restored in ``finally``, so the caller's model, optimizer and every
random generator are bitwise unchanged afterwards, also when the probe raised.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn as nn


def _clone_tree(obj: object) -> object:
    """Deep copy with tensors cloned (``copy.deepcopy`` shares nothing, but be explicit for tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone_tree(v) for v in obj)
    return copy.deepcopy(obj)


class Snapshot:
    """Model, optimizer and RNG state captured now; :meth:`restore` puts it back (any number of times).

    What is captured and restored is listed under :func:`preserved_state`; a finder that must keep
    the outcome of a successful try (the Accelerate-style decorator, whose successful try *is* the
    training run) restores only after a failed one.
    """

    def __init__(self, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model, self.optimizer = model, optimizer
        self.rng_torch = torch.random.get_rng_state()
        self.rng_cuda = (torch.cuda.get_rng_state_all()
                         if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
        self.rng_np = np.random.get_state()
        self.rng_py = random.getstate()
        self.params = self.buffers = self.grads = None
        self.modes: list[bool] | None = None
        self.opt_state = None
        if model is not None:
            self.params = {k: v.detach().clone() for k, v in model.named_parameters()}
            self.buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
            self.grads = {k: (None if v.grad is None else v.grad.detach().clone()) for k, v in model.named_parameters()}
            self.modes = [m.training for m in model.modules()]
        if optimizer is not None:
            self.opt_state = _clone_tree(optimizer.state_dict())

    def restore(self) -> None:
        model, optimizer = self.model, self.optimizer
        if model is not None:
            assert self.params is not None and self.buffers is not None and self.grads is not None
            assert self.modes is not None
            with torch.no_grad():
                for k, v in model.named_parameters():
                    v.copy_(self.params[k])
                    g = self.grads[k]
                    v.grad = None if g is None else g.clone()
                for k, v in model.named_buffers():
                    v.copy_(self.buffers[k])
            for m, mode in zip(model.modules(), self.modes):
                m.training = mode
        if optimizer is not None:
            # load_state_dict casts state to the params' dtype/device; it keeps its own copy
            optimizer.load_state_dict(_clone_tree(self.opt_state))  # type: ignore[arg-type]
        torch.random.set_rng_state(self.rng_torch)
        if self.rng_cuda is not None:
            torch.cuda.set_rng_state_all(self.rng_cuda)
        np.random.set_state(self.rng_np)
        random.setstate(self.rng_py)


@contextlib.contextmanager
def preserved_state(model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
    """Run the body, then put model, optimizer and RNG state back exactly as they were.

    Restored in ``finally`` (so also after an exception, which still propagates):

    - the model's parameters and buffers (values copied back in place, so references held by the
      optimizer stay valid), its ``.grad`` tensors and its train/eval mode;
    - the optimizer's ``state_dict`` (momentum buffers, step counts, param-group settings such as lr);
    - the torch CPU generator, every CUDA generator (when CUDA is initialised), NumPy's global
      generator and Python's ``random``.
    """
    snap = Snapshot(model, optimizer)
    try:
        yield
    finally:
        snap.restore()
