"""Synchronized batch norm over ``torch.distributed`` ranks, on CPU (gloo) and on accelerators.

torch's ``nn.SyncBatchNorm`` only runs on accelerator tensors. batchlab's :class:`SyncBatchNorm`
*is* an ``nn.SyncBatchNorm`` (a subclass: ``isinstance`` checks, state dicts, pruning, fusion,
precise BN and DDP's own bookkeeping see torch's class) whose forward is torch's on
CUDA/XPU/HPU tensors (fused kernels) and, on every other device, batchlab's, which works with
any backend that implements ``all_reduce`` (gloo on CPU).

One torch check stands in the way on CPU: ``DistributedDataParallel`` refuses any
``nn.SyncBatchNorm`` in a CPU module ("SyncBatchNorm layers only work with GPU modules",
``DistributedDataParallel._passing_sync_batchnorm_handle``), because torch's forward would fail
there. :class:`batchlab.distributed.DistributedDataParallel` is torch's DDP with that check
narrowed to torch's own class: wrap a CPU model with it (``fit_ddp`` does). On accelerators
torch's DDP takes this class as it is.

The CPU path: the forward all-reduces one packed float64
vector ``[count, sum, sum of squares]`` (per channel), the backward all-reduces ``[sum(dy),
sum(dy * xhat)]``. Ranks may hold different batch sizes (even zero); the result equals one batch
norm over the concatenated batch. Each rank's parameter gradients are its local share;
data-parallel training (DDP) sums/averages them as for any parameter.

Speed: every pass over the data is one of torch's native batch-norm kernels: the statistics
(``torch.batch_norm_update_stats``), the normalization (the inference kernel fed with the global
statistics), the backward's two per-channel sums (the inference-mode backward kernel, which
returns exactly ``sum(dy)`` and ``sum(dy * xhat)``) and the input gradient (the inference kernel
again, plus one ``addcmul``). What is left is the two all-reduces.

Numerics: each rank's sums come from its own mean and biased variance (a stable per-channel
reduction) as ``n * mean`` and ``n * (var + mean**2)``, combined in float64. The only
cancellation left is ``E[x^2] - mean^2`` across ranks, in float64: with a 1e6 offset and unit
variance its relative error is about 1e-4, far below float32 input resolution there.

:func:`convert_sync_batchnorm` is batchlab's own rather than torch's
``nn.SyncBatchNorm.convert_sync_batchnorm``: torch's converts every ``_BatchNorm`` subclass,
which would turn Batch Renorm, Ghost BN and BatchNormAct layers into plain synchronized batch
norms (dropping the renormalization, the virtual batches or the activation), and it builds
torch's class, which refuses CPU tensors. batchlab's converts the plain batch norms only (those
whose forward is torch's) into this class, and the classmethod of the same name does the same.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from batchlab.norm import _checks as C
from batchlab.norm import functional as BF
from batchlab.norm._swap import copy_state, replace_modules
from batchlab.norm.layers import _CheckedBatchNorm

__all__ = ["SyncBatchNorm", "sync_batch_norm", "convert_sync_batchnorm", "is_plain_batchnorm"]

_BatchNorm = nn.modules.batchnorm._BatchNorm


def _distributed_world(process_group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _torch_sync_devices() -> tuple[str, ...]:
    """Devices on which torch's own ``nn.SyncBatchNorm`` forward runs (its fused kernels)."""
    return ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name())


def _normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel in one pass: torch's inference
    batch-norm kernel, except on ``(N, C)`` inputs, where that kernel is 2 to 5x slower on CPU than
    one broadcast ``addcmul`` (measured at (512, 512): 72 to 146 us against 27 to 32 us)."""
    if x.dim() != 2:
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)  # bf16 input, fp32 statistics: torch's mixed path
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return torch.addcmul(shift, x, scale).to(x.dtype)


class _SyncBatchNormFn(torch.autograd.Function):
    # Written for few operations: at (512, 512) per rank a batch-norm step is 0.3 ms, so each
    # of the tensor operations on C-length vectors here (a few microseconds each) counts.
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        momentum: float | Tensor,
        process_group: Any,
    ) -> Tensor:
        c = x.shape[1]
        n_local = x.numel() // c if c else 0
        if n_local > 0:
            if torch.compiler.is_compiling():  # batch_norm_update_stats has no fake-tensor kernel
                var_l, mean_l = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
            else:
                mean_l, var_l = torch.batch_norm_update_stats(x, None, None, 0.0)
            # [n * mean, n * E[x^2], n] in float64
            packed = torch.cat([mean_l, torch.addcmul(var_l, mean_l, mean_l), mean_l.new_ones(1)]).double().mul_(n_local)
        else:
            packed = torch.zeros(2 * c + 1, dtype=torch.float64, device=x.device)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)
        if torch.compiler.is_compiling():
            # the global count stays a tensor: a Python number read from it is a data-dependent
            # branch that torch.compile(fullgraph=True) refuses (no check of count > 1 here)
            count: Any = packed[-1]
            unbias: Any = count / (count - 1)
        else:
            count = int(round(packed[-1].item()))
            if count <= 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()} (global count {count})")
            unbias = count / (count - 1)
        moments = packed[: 2 * c].view(2, c).div_(count)  # mean, E[x^2]
        mean64 = moments[0]
        moments[1].addcmul_(mean64, mean64, value=-1.0).clamp_(min=0.0)  # now the biased variance
        if running_mean is not None and running_var is not None:
            # momentum may be a tensor (the cumulative average under torch.compile)
            running_mean.mul_(1 - momentum).add_((mean64 * momentum).to(running_mean.dtype))
            running_var.mul_(1 - momentum).add_((moments[1] * (momentum * unbias)).to(running_var.dtype))
        # statistics in the parameters' dtype (float32 for a bf16/fp16 input, as torch's batch norm keeps them)
        stat_dtype = weight.dtype if weight is not None else torch.promote_types(x.dtype, torch.float32)
        mean, var = moments.to(stat_dtype).unbind(0)
        y = _normalize(x, mean, var, weight, bias, eps)  # one pass with the global statistics
        ctx.save_for_backward(x, weight, mean, var)
        ctx.count, ctx.eps = count, eps
        ctx.process_group = process_group
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor):  # type: ignore[override]
        x, weight, mean, var = ctx.saved_tensors
        c = x.shape[1]
        eps = ctx.eps
        if x.numel() > 0:
            # inference-mode backward kernel: grad_weight = sum(dy * xhat), grad_bias = sum(dy),
            # one fused pass (an empty input would divide by zero inside it)
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                gy, x, None, mean, var, None, None, False, eps, [False, True, True]
            )
            packed = torch.cat([sum_dy, sum_dy_xhat]).double()
        else:
            packed = torch.zeros(2 * c, dtype=torch.float64, device=x.device)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=ctx.process_group)
        k = torch.rsqrt(var.double() + eps)
        if weight is not None:
            k.mul_(weight.double())
        # dx = k * (dy - mean(dy) - xhat * mean(dy * xhat)) = k * dy + [inference BN of x with
        # weight -k * mean(dy * xhat) and bias -k * mean(dy)]
        wb = packed.view(2, c).mul_(k).mul_(-1.0 / ctx.count).to(mean.dtype)  # rows: bias, weight
        dx = _normalize(x, mean, var, wb[1], wb[0], eps)
        dx.addcmul_(gy, k.to(x.dtype).view((1, c) + (1,) * (x.dim() - 2)))
        if x.numel() == 0:
            sum_dy_xhat = sum_dy = x.new_zeros(c)
        gw = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        gb = sum_dy if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, gw, gb, None, None, None, None, None


def sync_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: Any = None,
) -> Tensor:
    """Training-mode batch norm with statistics over all ranks of ``process_group``.

    Falls back to :func:`batchlab.norm.functional.batch_norm` when ``torch.distributed`` is not
    initialized or the group has one rank.

    Args:
        x: local input ``(N_rank, C, *)``; ``N_rank`` may differ between ranks.
        running_mean, running_var: buffers updated with the global mean and unbiased variance.
        weight, bias: affine parameters or None.
        momentum: update factor of the running buffers.
        eps: added to the variance.
        process_group: group to synchronize over (None: the default group).

    Returns:
        The normalized local tensor.
    """
    if _distributed_world(process_group) <= 1:
        return BF.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    return _SyncBatchNormFn.apply(x, weight, bias, running_mean, running_var, eps, momentum, process_group)


class SyncBatchNorm(nn.SyncBatchNorm):
    """Batch norm synchronized across data-parallel ranks (Peng et al. 2018, MegDet "cross-GPU
    batch norm"): torch's ``nn.SyncBatchNorm`` (a subclass: constructor, state_dict,
    ``process_group``), also on CPU. With torch's DDP on a CPU model, use
    :class:`batchlab.distributed.DistributedDataParallel` (see the module notes).

    On CUDA/XPU/HPU tensors the forward is ``nn.SyncBatchNorm.forward`` (fused kernels);
    elsewhere (CPU with gloo) batchlab's, with unequal per-rank batch sizes allowed. Outside a
    distributed run (or with one rank) it is a plain batch norm. Eval uses running statistics.
    Second derivatives are not available through the synchronized path (first derivatives
    only, as torch's).

    Args:
        num_features: channels C of an ``(N, C, *)`` input.
        eps, momentum, affine, track_running_stats, bias: as :class:`batchlab.norm.BatchNorm2d`.
        process_group: group to synchronize over (None: the default group).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        C.check_batchnorm_args(num_features, eps, momentum, affine, track_running_stats, bias)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype, bias=bias)

    _cumulative_compiled = _CheckedBatchNorm._cumulative_compiled  # for the one-rank path's forward

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type in _torch_sync_devices():
            return super().forward(x)
        self._check_input_dim(x)
        self._check_non_zero_input_channels(x)
        world = _distributed_world(self.process_group) if self.training else 1
        if world <= 1:  # torch's batch norm (batchlab's forward of it, which compiles with momentum=None)
            return _CheckedBatchNorm.forward(self, x)  # type: ignore[arg-type]
        factor: Any = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a tensor under compile (a Python float is a graph break there)
                n = self.num_batches_tracked
                factor = 1.0 / n if torch.compiler.is_compiling() else 1.0 / float(n)
        track = self.track_running_stats
        return _SyncBatchNormFn.apply(
            x, self.weight, self.bias, self.running_mean if track else None, self.running_var if track else None,
            self.eps, factor, self.process_group,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:  # type: ignore[override]
        """:func:`convert_sync_batchnorm` (batchlab's, not torch's: see the module notes)."""
        return convert_sync_batchnorm(module, process_group)


def is_plain_batchnorm(module: nn.Module) -> bool:
    """A batch norm whose forward is torch's own (torch's and batchlab's ``BatchNorm*d``, or a
    user subclass that only adds to the constructor), not yet synchronized: what
    :func:`convert_sync_batchnorm` may replace without changing what the layer computes."""
    return (
        isinstance(module, _BatchNorm)
        and not isinstance(module, nn.SyncBatchNorm)
        and type(module).forward in (_BatchNorm.forward, _CheckedBatchNorm.forward)
    )


def convert_sync_batchnorm(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every plain batch norm in ``model`` (see :func:`is_plain_batchnorm`) by
    :class:`SyncBatchNorm`, keeping parameters, buffers, ``requires_grad``, ``bias=`` and mode.
    Batch Renorm, Ghost BN and norm+activation layers are left as they are (torch's converter
    would make plain synchronized batch norms of them).

    Works in place like torch's ``SyncBatchNorm.convert_sync_batchnorm``; returns the model (a
    new module when ``model`` itself is a batch norm).

    Args:
        model: the module tree.
        process_group: group for the new layers.

    Returns:
        The converted model.
    """

    def make(name: str, old: nn.Module) -> nn.Module:
        ref = old.running_mean if old.running_mean is not None else old.weight
        switched_off = not old.track_running_stats and old.running_mean is not None  # off after construction
        new = SyncBatchNorm(
            old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats or switched_off, process_group,
            device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype,
            bias=not old.affine or old.bias is not None,
        )
        copy_state(old, new, name)
        if switched_off:  # torch's layer keeps the buffers and normalizes with them in eval mode: so does this one
            new.track_running_stats = False
        if hasattr(old, "qconfig"):
            new.qconfig = old.qconfig
        return new

    return replace_modules(model, is_plain_batchnorm, make)
