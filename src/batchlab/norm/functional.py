"""Pure torch functions behind every batchlab normalization layer.

The modules in :mod:`batchlab.norm.layers` hold parameters and buffers and call these functions.
Where the semantics are identical to a torch kernel (batch, group, layer normalization) the
function dispatches to ``torch.nn.functional`` so forward and backward run in one fused native
kernel. Batch Renorm is expressed through the same native kernel (Ghost BN has its own module,
:mod:`batchlab.norm.ghost`):

* Batch Renorm (Ioffe 2017) multiplies the batch-normalized value by ``r`` and adds ``d``, both
  treated as constants by the gradient (stop-gradient). ``gamma * (xhat * r + d) + beta`` is a
  batch norm with weight ``gamma * r`` and bias ``gamma * d + beta``, so one cheap statistics
  pass (no gradient) to get ``r`` and ``d`` plus the native kernel gives the exact forward and
  backward of the paper.

All functions take and return tensors shaped ``(N, C, *)`` (channel second), as torch does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "batch_norm",
    "batch_renorm",
    "group_norm",
    "layer_norm",
    "instance_norm",
    "check_batch_size",
    "reduce_dims",
    "batch_stats",
    "batch_norm_given_stats",
]


def reduce_dims(x: Tensor) -> tuple[int, ...]:
    """The dimensions that batch statistics reduce over: all but the channel dimension 1."""
    return (0, *range(2, x.dim()))


@torch.jit.unused  # try/except does not script; scripted callers use var_mean (instance_norm)
def batch_stats(x: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over every dimension but 1, without gradient.

    Uses torch's batch-norm statistics kernel (``torch.batch_norm_update_stats``, the one the
    fused forward uses), which on CPU is 5-70x faster than ``torch.var_mean`` over the same
    dimensions; falls back to ``var_mean`` where that kernel is unavailable.

    Args:
        x: input ``(N, C, *)``.
        dtype: the statistics' dtype (default: that of ``x``). The kernel accumulates bf16/fp16
            input in float32; ``stats_dtype`` says when to keep that precision.

    Returns:
        ``(mean, var)``, each ``(C,)``.
    """
    dtype = dtype or x.dtype
    with torch.no_grad():
        if torch.compiler.is_compiling():
            # the statistics kernel has no fake-tensor rule: with a batch size that changes
            # (dynamic shapes) the compiled graph could not be built
            var, mean = torch.var_mean(x.detach().to(dtype), dim=reduce_dims(x), correction=0)
            return mean, var
        try:
            # with no running buffers the kernel returns x's dtype (a bf16 mean of 100 is off by up to
            # 0.25); given float32 ones (left as they are: momentum 0) it returns its float32 accumulators
            wide = dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)
            bufs = (x.new_zeros(x.shape[1], dtype=dtype), x.new_ones(x.shape[1], dtype=dtype)) if wide else (None, None)
            mean, var = torch.batch_norm_update_stats(x, *bufs, 0.0)
            return mean.to(dtype), var.to(dtype)
        except (RuntimeError, AttributeError, NotImplementedError):
            var, mean = torch.var_mean(x.to(dtype) if dtype != x.dtype else x, dim=reduce_dims(x), correction=0)
            return mean, var


def stats_dtype(x: Tensor, buffer: Tensor | None) -> torch.dtype:
    """The dtype batch statistics of ``x`` are kept in next to a layer's ``buffer`` (its running
    mean): as torch's batch norm does under autocast, bf16/fp16 input with float32 buffers has
    float32 statistics (rounding a mean of 100 to bf16 moves it by up to 0.25); otherwise
    ``x``'s own dtype."""
    if x.dtype in (torch.bfloat16, torch.float16) and buffer is not None and buffer.dtype == torch.float32:
        return torch.float32
    return x.dtype


def check_batch_size(x: Tensor) -> None:
    """Raise torch's error when training would see one value per channel.

    Args:
        x: input of shape ``(N, C, *)``.

    Raises:
        ValueError: ``"Expected more than 1 value per channel when training, got input size
            torch.Size([...])"``, the same message as ``torch.nn.functional.batch_norm``.
    """
    size = x.size()
    n = size[0]
    for s in size[2:]:
        n *= s
    if n == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalization (Ioffe & Szegedy 2015) with torch's exact semantics.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``. With ``training`` the mean and the
    biased variance of the batch (over every dimension but 1) are used and the running buffers,
    when given, are updated in place with ``running = (1 - momentum) * running + momentum * stat``
    where the variance stat is the unbiased (Bessel-corrected) batch variance. Without
    ``training`` the running buffers are used.

    Args:
        x: input ``(N, C, *)``.
        running_mean: per-channel running mean ``(C,)`` or None.
        running_var: per-channel running variance ``(C,)`` or None.
        weight: per-channel scale gamma or None (1).
        bias: per-channel shift beta or None (0).
        training: use batch statistics (and update the running buffers).
        momentum: update factor of the running buffers.
        eps: added to the variance before the square root.

    Returns:
        The normalized tensor, same shape as ``x``.
    """
    # torch's kernel: identical semantics, one fused pass forward and backward.
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def _view_c(t: Tensor, x: Tensor) -> Tensor:
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    rmax: float | Tensor = 3.0,
    dmax: float | Tensor = 5.0,
    update_running: bool = True,
) -> Tensor:
    """Batch Renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch
    Dependence in Batch-Normalized Models", Algorithm 1).

    Training: ``xhat = (x - mean_B) / std_B * r + d`` with ``std_B = sqrt(var_B + eps)``,
    ``std = sqrt(running_var + eps)``, ``r = stopgrad(clip(std_B / std, 1/rmax, rmax))`` and
    ``d = stopgrad(clip((mean_B - running_mean) / std, -dmax, dmax))``; then
    ``y = weight * xhat + bias``. The running buffers are updated as in :func:`batch_norm`
    (unbiased variance) when ``update_running``. Inference uses the running statistics, exactly
    like batch norm. With ``rmax=1, dmax=0`` this is batch norm. An empty batch gives an empty
    output and leaves the running statistics alone, as torch's batch norm does.

    Implementation: ``weight * (xhat_B * r + d) + bias`` equals batch norm with weight
    ``weight * r`` and bias ``weight * d + bias``; since ``r`` and ``d`` carry no gradient, torch's
    batch-norm kernels give the exact gradient of the paper (``dL/dgamma`` picks up the factors
    ``r`` and ``d`` through autograd of those two products). The batch statistics are computed
    once (needed for r and d) and handed to the kernels (:class:`_NormGivenStats`).

    Args:
        x: input ``(N, C, *)``.
        running_mean: running mean ``(C,)`` (required: r and d are defined against it).
        running_var: running variance ``(C,)``.
        weight: gamma or None.
        bias: beta or None.
        training: batch statistics with correction (True) or running statistics (False).
        momentum: update factor of the running buffers (a float, or a 0-d tensor such as the
            cumulative-average factor ``1 / num_batches_tracked``, which ``torch.compile`` can
            trace without reading the counter).
        eps: added to both variances before the square root.
        rmax: clip of ``r`` to ``[1/rmax, rmax]``; >= 1 (a float or 0-d tensor).
        dmax: clip of ``d`` to ``[-dmax, dmax]``; >= 0 (a float or 0-d tensor).
        update_running: move the running buffers (False: they only define r and d, as when
            ``track_running_stats`` is switched off after construction).

    Returns:
        The renormalized tensor, same shape as ``x``.
    """
    if not isinstance(rmax, Tensor) and not rmax >= 1.0:
        raise ValueError(f"rmax must be a finite number >= 1, got {rmax!r}")
    if not isinstance(dmax, Tensor) and not dmax >= 0.0:
        raise ValueError(f"dmax must be a finite number >= 0, got {dmax!r}")
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    if x.numel() == 0:
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    check_batch_size(x)
    kd = stats_dtype(x, running_mean)  # the dtype the kernel gets statistics and affine in
    mean_x, var_x = batch_stats(x, kd)
    with torch.no_grad():
        var_b = var_x.to(running_var.dtype)
        mean_b = mean_x.to(running_mean.dtype)
        inv = torch.rsqrt(running_var + eps)
        r = torch.clamp(torch.sqrt(var_b + eps) * inv, 1.0 / rmax, rmax).to(kd)
        d = torch.clamp((mean_b - running_mean) * inv, -dmax, dmax).to(kd)
        if update_running:
            m = x.numel() // x.shape[1]
            running_mean.mul_(1.0 - momentum).add_(mean_b * momentum)
            running_var.mul_(1.0 - momentum).add_(var_b * (momentum * m / max(m - 1, 1)))
    w = r if weight is None else weight * r
    b = d if weight is None else weight * d
    if bias is not None:
        b = b + bias
    return batch_norm_given_stats(x, w, b, mean_x, var_x, eps)


class _NormGivenStats(torch.autograd.Function):
    """Training-mode batch norm whose batch statistics were computed beforehand.

    Forward is torch's inference kernel fed with the batch mean and biased variance (one
    element-wise pass); backward is torch's training-mode kernel with those statistics as
    ``save_mean``/``save_invstd``, i.e. the exact batch-norm gradient, through the mean and the
    variance too. Saves the second statistics pass that calling the training kernel would do.
    """

    # forward and setup_context apart, so torch.func's transforms (grad, jacrev, functional_call
    # inside them) can differentiate through it
    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, bias, mean, var, eps = inputs
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        ctx.eps = eps
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(gy, x, weight, None, None, mean, invstd, True, ctx.eps, mask)
        return dx, dw if mask[1] else None, db if mask[2] else None, None, None, None


def batch_norm_given_stats(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float = 1e-5
) -> Tensor:
    """Training-mode batch norm with precomputed batch statistics (exact gradient through them).

    Args:
        x: input ``(N, C, *)``.
        weight, bias: affine parameters or None.
        mean, var: the batch mean and *biased* variance of ``x`` per channel (see
            :func:`batch_stats`); they must be the statistics of ``x`` for the gradient to be right.
        eps: added to the variance.

    Returns:
        ``(x - mean) / sqrt(var + eps) * weight + bias``.

    Under ``torch.compile`` this is torch's training-mode batch norm (which recomputes the
    statistics; the compiler fuses the passes): AOTAutograd gave wrong weight gradients for the
    custom function when running buffers were updated in the same graph (torch 2.13, found by
    ``tests/test_norm_compile.py``).
    """
    if torch.compiler.is_compiling():
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    if weight is not None and mean.dtype != weight.dtype:
        # a reduced-precision input with float32 parameters (autocast, a float model fed bf16):
        # torch's kernels take that mix only with the statistics in the parameters' dtype
        mean, var = mean.to(weight.dtype), var.to(weight.dtype)
    return _NormGivenStats.apply(x, weight, bias, mean, var, eps)


def group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """Group Normalization (Wu & He 2018): per sample, statistics over each group of
    ``C / num_groups`` channels and all spatial positions; biased variance; per-channel affine.

    Args:
        x: input ``(N, C, *)``.
        num_groups: number of groups; must divide ``C``.
        weight, bias: per-channel affine ``(C,)`` or None.
        eps: added to the variance.

    Returns:
        The normalized tensor.
    """
    if x.dim() < 2 or x.shape[1] % num_groups:
        raise ValueError(
            f"num_groups must divide the number of channels, got num_groups={num_groups} for input of shape {tuple(x.shape)}"
        )
    return F.group_norm(x, num_groups, weight, bias, eps)


def layer_norm(
    x: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer Normalization (Ba, Kiros & Hinton 2016) over the trailing ``normalized_shape`` dims,
    biased variance, element-wise affine.

    Args:
        x: input ``(*, *normalized_shape)``.
        normalized_shape: the trailing dimensions to normalize over.
        weight, bias: element-wise affine of shape ``normalized_shape`` or None.
        eps: added to the variance.

    Returns:
        The normalized tensor.
    """
    return F.layer_norm(x, tuple(normalized_shape), weight, bias, eps)


def instance_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Instance Normalization (Ulyanov et al. 2016): per sample and channel, statistics over the
    spatial positions (biased variance). This is group norm with one channel per group.

    With ``use_input_stats`` and running buffers, the buffers are updated like torch's
    ``instance_norm``: ``running = (1 - momentum) * running + momentum * mean_n(stat_n)`` where
    ``stat_n`` is the per-instance mean and unbiased variance. Without ``use_input_stats`` the
    running statistics normalize the input.

    Args:
        x: input ``(N, C, *)`` with at least one spatial dimension.
        running_mean, running_var: running buffers ``(C,)`` or None.
        weight, bias: per-channel affine or None.
        use_input_stats: per-instance statistics (True) or running statistics (False).
        momentum: update factor of the running buffers.
        eps: added to the variance.

    Returns:
        The normalized tensor.
    """
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("use_input_stats=False needs running_mean and running_var, got None")
        if not x.is_contiguous():  # torch's instance norm returns the contiguous layout here
            return F.instance_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    if not x.is_contiguous() and x.numel() > 0:
        # channels_last: torch's instance norm (a batch norm over N*C channels) is the fast one
        # here (group norm with C groups is 2x slower); same numbers and buffer updates
        return F.instance_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    spatial = 1
    for d in x.shape[2:]:  # not math.prod: TorchScript has no builtin for it
        spatial *= d
    if spatial <= 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {x.size()}")
    if running_mean is not None and running_var is not None and x.numel() > 0:  # an empty batch moves nothing
        n, c = x.shape[0], x.shape[1]
        if torch.jit.is_scripting():
            var, mean = torch.var_mean(x.detach().reshape(1, n * c, -1), dim=[0, 2], correction=0)
        else:
            mean, var = batch_stats(x.reshape(1, n * c, -1))  # per instance, biased
        with torch.no_grad():
            var = var * (spatial / (spatial - 1))
            running_mean.mul_(1 - momentum).add_(mean.view(n, c).mean(0).to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.view(n, c).mean(0).to(running_var.dtype), alpha=momentum)
    return F.group_norm(x, x.shape[1], weight, bias, eps)
