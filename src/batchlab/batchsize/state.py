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
    rng_torch = torch.random.get_rng_state()
    rng_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    rng_np = np.random.get_state()
    rng_py = random.getstate()
    params = buffers = grads = modes = None
    opt_state = None
    if model is not None:
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        grads = {k: (None if v.grad is None else v.grad.detach().clone()) for k, v in model.named_parameters()}
        modes = [m.training for m in model.modules()]
    if optimizer is not None:
        opt_state = _clone_tree(optimizer.state_dict())
    try:
        yield
    finally:
        if model is not None:
            assert params is not None and buffers is not None and grads is not None and modes is not None
            with torch.no_grad():
                for k, v in model.named_parameters():
                    v.copy_(params[k])
                    g = grads[k]
                    v.grad = None if g is None else g.clone()
                for k, v in model.named_buffers():
                    v.copy_(buffers[k])
            for m, mode in zip(model.modules(), modes):
                m.training = mode
        if optimizer is not None:
            optimizer.load_state_dict(opt_state)  # type: ignore[arg-type]
            # load_state_dict casts state to the params' dtype/device but keeps empty state empty.
        torch.random.set_rng_state(rng_torch)
        if rng_cuda is not None:
            torch.cuda.set_rng_state_all(rng_cuda)
        np.random.set_state(rng_np)
        random.setstate(rng_py)
