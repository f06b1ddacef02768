"""Pure torch functions behind every batchlab normalization layer.

The modules in :mod:`batchlab.norm.layers` hold parameters and buffers and call these functions.
Where the semantics are identical to a torch kernel (batch, group, layer normalization) the
function dispatches to ``torch.nn.functional`` so forward and backward run in one fused native
kernel. Batch Renorm and Ghost BN are expressed through the same native kernel:

* Batch Renorm (Ioffe 2017) multiplies the batch-normalized value by ``r`` and adds ``d``, both
  treated as constants by the gradient (stop-gradient). ``gamma * (xhat * r + d) + beta`` is a
  batch norm with weight ``gamma * r`` and bias ``gamma * d + beta``, so one cheap statistics
  pass (no gradient) to get ``r`` and ``d`` plus the native kernel gives the exact forward and
  backward of the paper.
* Ghost BN (Hoffer et al. 2017, Algorithm 1) normalizes each virtual batch with its own
  statistics and updates the running statistics once per virtual batch, in order.

All functions take and return tensors shaped ``(N, C, *)`` (channel second), as torch does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from batchlab.norm import _kernels

__all__ = [
    "batch_norm",
    "batch_renorm",
    "ghost_batch_norm",
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


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over every dimension but 1, without gradient.

    Uses torch's batch-norm statistics kernel (``torch.batch_norm_update_stats``, the one the
    fused forward uses), which on CPU is 5-70x faster than ``torch.var_mean`` over the same
    dimensions; falls back to ``var_mean`` where that kernel is unavailable.

    Args:
        x: input ``(N, C, *)``.

    Returns:
        ``(mean, var)``, each ``(C,)`` in the dtype of ``x``.
    """
    with torch.no_grad():
        try:
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
            return mean.to(x.dtype), var.to(x.dtype)
        except (RuntimeError, AttributeError, NotImplementedError):
            var, mean = torch.var_mean(x, dim=reduce_dims(x), correction=0)
            return mean, var


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
    momentum: float = 0.1,
    eps: float = 1e-5,
    rmax: float = 3.0,
    dmax: float = 5.0,
) -> Tensor:
    """Batch Renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch
    Dependence in Batch-Normalized Models", Algorithm 1).

    Training: ``xhat = (x - mean_B) / std_B * r + d`` with ``std_B = sqrt(var_B + eps)``,
    ``std = sqrt(running_var + eps)``, ``r = stopgrad(clip(std_B / std, 1/rmax, rmax))`` and
    ``d = stopgrad(clip((mean_B - running_mean) / std, -dmax, dmax))``; then
    ``y = weight * xhat + bias``. The running buffers are updated as in :func:`batch_norm`
    (unbiased variance). Inference uses the running statistics, exactly like batch norm.
    With ``rmax=1, dmax=0`` this is batch norm.

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
        momentum: update factor of the running buffers.
        eps: added to both variances before the square root.
        rmax: clip of ``r`` to ``[1/rmax, rmax]``; must be >= 1.
        dmax: clip of ``d`` to ``[-dmax, dmax]``; must be >= 0.

    Returns:
        The renormalized tensor, same shape as ``x``.
    """
    if rmax < 1.0:
        raise ValueError(f"rmax must be >= 1, got {rmax}")
    if dmax < 0.0:
        raise ValueError(f"dmax must be >= 0, got {dmax}")
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
    check_batch_size(x)
    mean_x, var_x = batch_stats(x)
    with torch.no_grad():
        var_b = var_x.to(running_var.dtype)
        mean_b = mean_x.to(running_mean.dtype)
        inv = torch.rsqrt(running_var + eps)
        r = (torch.sqrt(var_b + eps) * inv).clamp_(1.0 / rmax, rmax).to(x.dtype)
        d = ((mean_b - running_mean) * inv).clamp_(-dmax, dmax).to(x.dtype)
        m = x.numel() // x.shape[1]
        running_mean.mul_(1.0 - momentum).add_(mean_b, alpha=momentum)
        running_var.mul_(1.0 - momentum).add_(var_b * (m / max(m - 1, 1)), alpha=momentum)
    w = r if weight is None else weight * r
    b = d if weight is None else weight * d
    if bias is not None:
        b = b + bias
    return _NormGivenStats.apply(x, w, b, mean_x, var_x, eps)


class _NormGivenStats(torch.autograd.Function):
    """Training-mode batch norm whose batch statistics were computed beforehand.

    Forward is torch's inference kernel fed with the batch mean and biased variance (one
    element-wise pass); backward is torch's training-mode kernel with those statistics as
    ``save_mean``/``save_invstd``, i.e. the exact batch-norm gradient, through the mean and the
    variance too. Saves the second statistics pass that calling the training kernel would do.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float):  # type: ignore[override]
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        ctx.eps = eps
        ctx.has_bias = bias is not None
        return y

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
    """
    return _NormGivenStats.apply(x, weight, bias, mean, var, eps)


def _ghost_sizes(n: int, virtual_batch_size: int) -> list[int]:
    """Sizes of the ghost batches: ``virtual_batch_size`` each, the last one smaller."""
    full, rest = divmod(n, virtual_batch_size)
    return [virtual_batch_size] * full + ([rest] if rest else [])


def ghost_batch_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    virtual_batch_size: int = 32,
    num_batches_tracked: Tensor | None = None,
    impl: str = "auto",
) -> Tensor:
    """Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017, "Train longer, generalize
    better", Algorithm 1).

    In training the batch is cut into consecutive virtual batches of ``virtual_batch_size``
    samples (the last one may be smaller) and each is normalized with its own statistics. The
    running buffers are updated once per virtual batch, in order, exactly as a loop of torch
    ``BatchNorm`` calls over the chunks would update them; ``num_batches_tracked`` (when given)
    counts virtual batches and ``momentum=None`` gives their cumulative average. Inference uses
    the running statistics.

    Implementations with identical results (up to float rounding):

    * ``impl="fused"``: for contiguous ``(N, C)`` float32/float64 CPU inputs, one call of a small
      C kernel does the forward (and one the backward) of all virtual batches, each virtual
      batch's passes running from cache (:mod:`batchlab.norm._kernels`; compiled on first use
      with the system C compiler).
    * ``impl="native"``: torch's fused batch-norm kernel per virtual batch; for
      contiguous inputs with spatial dims each call writes straight into a slice of one output
      (and of one input gradient), otherwise outputs are concatenated. Fastest on CPU (see
      docs/norm.md for measurements).
    * ``impl="vectorized"``: the batch is viewed as ``(G, N/G, C, S)``, the statistics of all
      virtual batches are computed in one go and a custom autograd function computes the
      backward; needs ``N`` divisible by ``virtual_batch_size``. Unfused element-wise passes make
      it slower than the native kernel on CPU; kept as the readable statement of the math and as
      a cross-check in the tests.
    * ``impl="auto"`` (default): ``fused`` where it applies and the kernel could be built (not
      while ``torch.compile`` traces), else ``native``.

    Args:
        x: input ``(N, C, *)``.
        running_mean, running_var: running buffers ``(C,)`` or None.
        weight, bias: affine parameters or None.
        training: ghost-batch statistics (True) or running statistics (False).
        momentum: update factor per virtual batch; None for the cumulative average.
        eps: added to the variance.
        virtual_batch_size: samples per virtual batch (>= 1).
        num_batches_tracked: counter buffer incremented by the number of virtual batches.
        impl: "auto", "fused", "native" or "vectorized".

    Returns:
        The normalized tensor, same shape as ``x``.
    """
    if not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
    if impl not in GHOST_IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, GHOST_IMPLS))}, got {impl!r}")
    if impl == "fused" and not _kernels.eligible(x):
        raise ValueError(
            f"impl='fused' needs a contiguous 2-D float32/float64 CPU input, got shape {tuple(x.shape)}, "
            f"{x.dtype} on {x.device.type}{'' if x.is_contiguous() else ' (non-contiguous)'}"
        )
    if impl == "fused" and not _kernels.available():
        raise RuntimeError(f"impl='fused': the Ghost BN kernel is unavailable ({_kernels.unavailable_reason()})")
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    if x.shape[0] == 0:  # no virtual batch: an empty output, running statistics untouched (as torch)
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    sizes = _ghost_sizes(x.shape[0], virtual_batch_size)
    if sizes[-1] * math.prod(x.shape[2:]) == 1:  # only the smallest virtual batch can hold one value
        check_batch_size(x.narrow(0, 0, sizes[-1]))
    k0 = 0 if num_batches_tracked is None else int(num_batches_tracked.item())
    if num_batches_tracked is not None:
        num_batches_tracked.add_(len(sizes))
    if impl == "vectorized":
        if len(set(sizes)) != 1:
            raise ValueError(
                f"impl='vectorized' needs the batch size ({x.shape[0]}) to be a multiple of "
                f"virtual_batch_size ({virtual_batch_size})"
            )
        return _ghost_vectorized(x, running_mean, running_var, weight, bias, momentum, eps, len(sizes), k0)
    if len(sizes) == 1 and momentum is not None and impl != "fused":
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    if impl == "fused" or (impl == "auto" and _use_fused(x, running_mean, running_var)):
        if impl == "fused" and not _kernels.buffers_ok(x, running_mean, running_var):  # auto checked them
            raise ValueError(
                "impl='fused' needs both running buffers or neither, contiguous (C,) tensors of the input's dtype"
            )
        return _GhostFusedFn.apply(x, weight, bias, running_mean, running_var, momentum, k0, virtual_batch_size, eps)
    if x.dim() > 2 and x.is_contiguous():
        # Write each virtual batch's output (and, backward, input gradient) straight into one
        # tensor: no concatenation copies, so the cost is torch's BatchNorm plus per-call overhead.
        moms = tuple(momentum if momentum is not None else 1.0 / (k0 + i + 1) for i in range(len(sizes)))
        return _GhostNativeFn.apply(x, weight, bias, running_mean, running_var, tuple(sizes), moms, eps)
    outs = []
    for i, chunk in enumerate(x.split(sizes)):
        m = momentum if momentum is not None else 1.0 / (k0 + i + 1)
        outs.append(F.batch_norm(chunk, running_mean, running_var, weight, bias, True, m, eps))
    return torch.cat(outs)


GHOST_IMPLS = ("auto", "fused", "native", "vectorized")


def _use_fused(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None) -> bool:
    return (
        _kernels.eligible(x)
        and _kernels.buffers_ok(x, running_mean, running_var)
        and not torch.compiler.is_compiling()
        and _kernels.available()
    )


class _GhostFusedFn(torch.autograd.Function):
    """Ghost BN of a 2-D input with the fused C kernel (forward and backward one call each)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None, momentum: float | None, k0: int, v: int, eps: float):  # type: ignore[override]
        y, dmean, invstd = _kernels.ghost_forward(x, weight, bias, running_mean, running_var, momentum, k0, v, eps)
        ctx.save_for_backward(x, weight, dmean, invstd)
        ctx.v, ctx.has_bias = v, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, weight, dmean, invstd = ctx.saved_tensors
        want_w = weight is not None and ctx.needs_input_grad[1]
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        dx, gw, gb = _kernels.ghost_backward(gy, x, dmean, invstd, weight, ctx.v, want_w, want_b)
        if gw is not None and gw.dtype != weight.dtype:
            gw = gw.to(weight.dtype)
        if gb is not None and weight is not None and gb.dtype != weight.dtype:
            gb = gb.to(weight.dtype)
        return dx, gw, gb, None, None, None, None, None, None


def _update_running_sequential(
    running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var_u: Tensor, momentum: float | None, k0: int
) -> None:
    """Apply G sequential running-statistics updates (one per virtual batch, in order) in closed
    form: ``r <- (1 - m) r + m s_i`` for i = 1..G, or the cumulative average when ``momentum`` is
    None (``k0`` batches already averaged)."""
    if running_mean is None or running_var is None:
        return
    groups = mean.shape[0]
    with torch.no_grad():
        if momentum is None:
            wr = k0 / (k0 + groups)
            ws = torch.full((groups,), 1.0 / (k0 + groups), dtype=torch.float64)
        else:
            wr = (1.0 - momentum) ** groups
            ws = torch.tensor([momentum * (1.0 - momentum) ** (groups - 1 - i) for i in range(groups)], dtype=torch.float64)
        ws = ws.to(device=mean.device)
        running_mean.mul_(wr).add_((ws @ mean.double()).to(running_mean.dtype))
        running_var.mul_(wr).add_((ws @ var_u.double()).to(running_var.dtype))


class _GhostNativeFn(torch.autograd.Function):
    """Ghost BN with torch's fused batch-norm kernels, one call per virtual batch, writing into
    slices of one output (forward) and one input gradient (backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None, sizes: tuple[int, ...], moms: tuple[float, ...], eps: float):  # type: ignore[override]
        aten = torch.ops.aten
        c = x.shape[1]
        y = torch.empty_like(x)
        save_mean = torch.empty(len(sizes), c, dtype=torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype, device=x.device)
        save_invstd = torch.empty_like(save_mean)
        start = 0
        for i, (size, m) in enumerate(zip(sizes, moms)):
            aten.native_batch_norm.out(
                x.narrow(0, start, size), weight, bias, running_mean, running_var, True, m, eps,
                out=y.narrow(0, start, size), save_mean=save_mean[i], save_invstd=save_invstd[i],
            )
            start += size
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        ctx.sizes, ctx.eps, ctx.has_bias = sizes, eps, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        aten = torch.ops.aten
        x, weight, save_mean, save_invstd = ctx.saved_tensors
        gy = gy.contiguous()
        c = x.shape[1]
        want_w = weight is not None and ctx.needs_input_grad[1]
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        pdtype = weight.dtype if weight is not None else x.dtype
        dx = torch.empty_like(x)
        gw, gb = torch.zeros(c, dtype=pdtype, device=x.device), torch.zeros(c, dtype=pdtype, device=x.device)
        tw, tb = torch.empty_like(gw), torch.empty_like(gb)
        # The out= overload wants all three outputs defined: ask for all (the reductions are
        # computed for the input gradient anyway) with weight 1 standing in for "no affine".
        w = weight if weight is not None else torch.ones(c, dtype=pdtype, device=x.device)
        start = 0
        for i, size in enumerate(ctx.sizes):
            aten.native_batch_norm_backward.out(
                gy.narrow(0, start, size), x.narrow(0, start, size), w, None, None,
                save_mean[i], save_invstd[i], True, ctx.eps, [True, True, True],
                out0=dx.narrow(0, start, size), out1=tw, out2=tb,
            )
            if want_w:
                gw += tw
            if want_b:
                gb += tb
            start += size
        return dx, gw if want_w else None, gb if want_b else None, None, None, None, None, None


class _GhostNormFn(torch.autograd.Function):
    """Normalize ``x`` viewed as ``(G, V, C, S)`` with statistics per ``(G, C)``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float):  # type: ignore[override]
        n, c = x.shape[0], x.shape[1]
        xv = x.reshape(groups, n // groups, c, -1)
        if xv.shape[3] > 1:
            # Row statistics over the contiguous last dim, combined exactly over V (equal counts).
            var_r, mean_r = torch.var_mean(xv, dim=3, correction=0)
            mean = mean_r.mean(1, keepdim=True)
            var = (var_r + (mean_r - mean).square()).mean(1, keepdim=True)
            mean, var = mean.unsqueeze(-1), var.unsqueeze(-1)
        else:
            # (N, C) input: a two-pass mean/variance over dim 1 from plain sums; torch's Welford
            # var_mean over a middle dimension is ~50x slower on CPU.
            mean = xv.mean(1, keepdim=True)
            xc = xv - mean
            var = (xc * xc).mean(1, keepdim=True)
        invstd = torch.rsqrt(var + eps)
        xhat = torch.addcmul(-mean * invstd, xv, invstd)
        if weight is not None:
            b = bias.view(1, 1, c, 1) if bias is not None else torch.zeros_like(weight).view(1, 1, c, 1)
            y = torch.addcmul(b, xhat, weight.view(1, 1, c, 1))
        elif bias is not None:
            y = xhat + bias.view(1, 1, c, 1)
        else:
            y = xhat.clone()
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.has_bias = bias is not None
        var_u = var * (xv.shape[1] * xv.shape[3]) / max(xv.shape[1] * xv.shape[3] - 1, 1)
        ctx.mark_non_differentiable(mean, var_u)
        return y.view(x.shape), mean.view(groups, c), var_u.view(groups, c)

    @staticmethod
    def backward(ctx, gy: Tensor, _gm: Tensor, _gv: Tensor):  # type: ignore[override]
        xhat, weight, invstd = ctx.saved_tensors
        c = xhat.shape[2]
        gv = gy.reshape(xhat.shape)
        m = xhat.shape[1] * xhat.shape[3]
        if xhat.shape[3] > 1:
            sg = gv.sum(3).sum(1, keepdim=True).unsqueeze(-1)
            sgx = torch.linalg.vecdot(gv, xhat).sum(1, keepdim=True).unsqueeze(-1)
        else:
            sg = gv.sum(1, keepdim=True)
            sgx = (gv * xhat).sum(1, keepdim=True)
        k1 = invstd if weight is None else weight.view(1, 1, c, 1) * invstd
        # dx = w * invstd * (g - mean(g) - xhat * mean(g * xhat))
        dx = torch.addcmul(-k1 * sg / m, xhat, -k1 * sgx / m).addcmul_(gv, k1)
        gw = sgx.sum((0, 1, 3)) if weight is not None and ctx.needs_input_grad[1] else None
        gb = sg.sum((0, 1, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx.view(gy.shape), gw, gb, None, None


def _ghost_vectorized(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    groups: int,
    k0: int,
) -> Tensor:
    y, mean, var_u = _GhostNormFn.apply(x, weight, bias, groups, eps)
    _update_running_sequential(running_mean, running_var, mean, var_u, momentum, k0)
    return y


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
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    spatial = math.prod(x.shape[2:])
    if spatial <= 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {x.size()}")
    if running_mean is not None and running_var is not None:
        n, c = x.shape[0], x.shape[1]
        mean, var = batch_stats(x.reshape(1, n * c, -1))  # per instance, biased
        with torch.no_grad():
            var = var * (spatial / (spatial - 1))
            running_mean.mul_(1 - momentum).add_(mean.view(n, c).mean(0).to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.view(n, c).mean(0).to(running_var.dtype), alpha=momentum)
    return F.group_norm(x, x.shape[1], weight, bias, eps)
