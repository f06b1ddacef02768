"""Precise BN: population statistics of every batch norm, recomputed over many batches.

After training, the running averages of batch norm lag behind the weights and mix statistics of
old weights. Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"; fvcore's
``update_bn_stats``) runs the fixed model over ``num_batches`` batches and sets each layer's
``running_mean``/``running_var`` to the population statistics of its inputs.

Pooling: each batch contributes its count ``n_b``, mean ``mu_b`` and biased variance
``v_b``. The population mean is ``sum n_b mu_b / n`` and ``E[x^2] = sum n_b (v_b + mu_b^2) / n``,
so neither depends on how the data was split into batches. We combine the same quantities with
Chan et al.'s pairwise update in float64 (algebraically identical, and free of the cancellation
in ``E[x^2] - mu^2``). As torch keeps an unbiased ``running_var`` (fvcore's note: it is a
Bessel-corrected average), the population variance is stored times ``n / (n - 1)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from batchlab.norm.functional import batch_stats
from batchlab.norm.layers import is_batchnorm

__all__ = ["precise_bn"]


class _Pooled:
    """Per-channel count, mean and sum of squared deviations (M2), pooled over batches."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        nb = x.numel() // x.shape[1]
        if nb == 0:
            return
        x = x.detach()
        # a bf16/fp16 batch (under autocast): its statistics in float32 before pooling in float64, not
        # rounded to the input's precision first
        mean_b, var_b = batch_stats(x, torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else None)
        mean_b, m2_b = mean_b.double(), var_b.double() * nb
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = nb, mean_b, m2_b
            return
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b + delta * delta * (self.n * nb / n)
        self.n = n


def _inputs(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise TypeError(f"loader must yield tensors or (x, y) tuples/lists, got {type(batch).__name__}; for other batches "
                    "(a dict, a model taking keyword arguments) give forward=lambda model, batch: model(**batch) or similar")


@torch.no_grad()
def precise_bn(model: nn.Module, loader: Iterable[Any], num_batches: int, *,
               forward: Callable[[nn.Module, Any], Any] | None = None) -> dict[str, int]:
    """Recompute the running statistics of every batch norm in ``model`` as population
    statistics over ``num_batches`` batches of ``loader``.

    Batch norms run in training mode (batch statistics, as during training) while every other
    module runs in eval mode (dropout off). The model's modes, the layers' momentum and
    ``num_batches_tracked`` are restored and the hooks removed in ``finally``, also on error; the
    running statistics change only when every batch was seen.

    Args:
        model: the network; its batch norms (torch's or batchlab's, with running statistics)
            are updated in place.
        loader: any iterable of batches: tensors or ``(x, y, ...)`` tuples whose first element
            is the model input. Inputs are moved to the device of the model's first parameter.
        num_batches: batches to use (>= 1).
        forward: ``forward(model, batch)`` for models that do not take one tensor (a task's
            ``forward_batch``: dict batches, several inputs); its batches must already be on the
            model's device (e.g. ``batchlab.train.iterate_batches(task, b, device=...)``).

    Returns:
        ``{layer name: number of values per channel pooled}`` for each updated layer.

    Raises:
        ValueError: ``num_batches`` < 1, the model has no batch norm with running statistics, or
            the loader yields fewer than ``num_batches`` batches (then nothing is changed).
    """
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
    bns = {name: m for name, m in model.named_modules() if is_batchnorm(m) and m.running_mean is not None}
    if not bns:
        raise ValueError("precise_bn: the model has no batch norm with running statistics (track_running_stats=True)")
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    modes = {m: m.training for m in model.modules()}
    saved = {name: (m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for name, m in bns.items()}
    buffers = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in bns.items()}
    done = False
    pooled = {name: _Pooled() for name in bns}
    handles = []
    try:
        model.eval()
        for name, m in bns.items():
            m.train()
            m.momentum = 0.0  # the forward must not move the buffers; we set them at the end

            def hook(mod: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
                pooled[_name].add(args[0])

            handles.append(m.register_forward_pre_hook(hook))
        seen = 0
        for batch in loader:
            if seen >= num_batches:
                break
            if forward is not None:
                forward(model, batch)
            else:
                x = _inputs(batch)
                if device is not None and isinstance(x, Tensor):
                    x = x.to(device)
                model(x)
            seen += 1
        if seen < num_batches:
            raise ValueError(f"precise_bn: loader yielded {seen} batches, fewer than num_batches={num_batches}; running statistics left unchanged")
        counts: dict[str, int] = {}
        for name, m in bns.items():
            p = pooled[name]
            if p.mean is None or p.m2 is None:
                continue  # layer not reached by the forward
            var = p.m2 / max(p.n - 1, 1)  # unbiased, as torch's running_var
            m.running_mean.copy_(p.mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
            counts[name] = p.n
        done = True
        return counts
    finally:
        for h in handles:
            h.remove()
        for name, m in bns.items():
            momentum, nbt = saved[name]
            m.momentum = momentum
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)
            if not done:  # momentum 0 keeps them, except 0 * NaN; be exact on every error path
                m.running_mean.copy_(buffers[name][0])
                m.running_var.copy_(buffers[name][1])
        for mod, mode in modes.items():
            mod.training = mode
