"""The gradient noise scale from one batch split in two halves (the integrations' accumulation-free path).

Without gradient accumulation a training step computes one gradient, on batch B. Running the two
halves of that batch through the model again gives two gradients on B/2 each; their squared norms
(small batch) and the squared norm of their mean (big batch, the whole batch's gradient for a loss
that is a mean over examples) feed :meth:`batchlab.batchsize.GradientNoiseScale.update`. One extra
forward and backward per measured step, with ``torch.autograd.grad`` (``.grad`` is not touched and
no DDP hook fires); the RNG (dropout) and the model's buffers (BatchNorm statistics) are restored,
so training continues exactly as without the measurement.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn


def rows(value: Any, n: int, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of every tensor in ``value`` whose first dimension is the batch size ``n``
    (tensors nested in mappings, tuples, named tuples and lists; other values as they are)."""
    if isinstance(value, torch.Tensor):
        return value[lo:hi] if value.dim() > 0 and value.shape[0] == n else value
    if isinstance(value, Mapping):
        return {k: rows(v, n, lo, hi) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(rows(v, n, lo, hi) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(rows(v, n, lo, hi) for v in value)
    return value


def _sqnorm(ts: Sequence[torch.Tensor]) -> float:
    return float(sum(t.detach().double().square().sum() for t in ts)) if ts else 0.0


def split_sqnorms(model: nn.Module, params: Sequence[torch.Tensor], n: int,
                  loss_of_rows: Callable[[int, int], torch.Tensor | None]) -> tuple[float, float, int] | None:
    """``(small, big, half)``: the mean squared gradient norm of the two halves of a batch of ``n``
    and the squared norm of their mean, or None when ``n < 2`` or ``loss_of_rows`` gives no loss.

    Args:
        model: whose buffers are restored afterwards.
        params: the parameters the gradients are taken of.
        n: examples in the batch; the halves are rows ``[0, n//2)`` and ``[n//2, 2*(n//2))``.
        loss_of_rows: ``loss_of_rows(lo, hi)`` runs rows ``lo:hi`` through the model and returns
            their mean loss (None: nothing to measure).
    """
    h = n // 2
    if h < 1:
        return None
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    cuda = sorted({p.device.index for p in params if p.device.type == "cuda" and p.device.index is not None})
    grads = []
    try:
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            for lo, hi in ((0, h), (h, 2 * h)):
                loss = loss_of_rows(lo, hi)
                if loss is None:
                    return None
                got = torch.autograd.grad(loss, list(params), allow_unused=True)
                grads.append([torch.zeros_like(p) if g is None else g for g, p in zip(got, params)])
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
    g1, g2 = grads
    small = 0.5 * (_sqnorm(g1) + _sqnorm(g2))
    big = 0.25 * _sqnorm(torch._foreach_add(g1, g2))
    return small, big, h
