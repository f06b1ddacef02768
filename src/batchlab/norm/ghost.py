"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better:
closing the generalization gap in large batch training of neural networks", Algorithm 1).

The functional core behind :class:`batchlab.norm.GhostBatchNorm2d` and its 1-D/3-D siblings:
each virtual batch of ``virtual_batch_size`` consecutive samples is normalized with its own
statistics and the running statistics are updated once per virtual batch, in order.

Four paths with identical results (up to float rounding), chosen by ``impl``:
``fused`` (a C kernel for ``(N, C)`` inputs, :mod:`batchlab.norm._kernels`), ``native`` (torch's
kernel per virtual batch, writing into slices of one output), ``vectorized`` (one ``(G, V, C, S)``
statistics pass) and, while ``torch.compile`` traces, a plain loop of ``F.batch_norm`` calls
that the compiler can see through (no ``.item()``, no custom kernel, so no graph break).

Second derivatives: the custom autograd functions compute first derivatives with fast
kernels. When the backward itself is differentiated (``create_graph=True``, e.g. a gradient
penalty), their backward recomputes the forward from plain torch operations and lets autograd
differentiate that, so gradients of gradients are exact (tested against a loop of torch's
BatchNorm) at the price of one extra forward in that case only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from batchlab.norm import _kernels
from batchlab.norm.functional import check_batch_size

__all__ = ["GHOST_IMPLS", "ghost_batch_norm"]

GHOST_IMPLS = ("auto", "fused", "native", "vectorized")


def _ghost_sizes(n: int, virtual_batch_size: int) -> list[int]:
    """Sizes of the ghost batches: ``virtual_batch_size`` each, the last one smaller."""
    full = n // virtual_batch_size  # not divmod: torch.compile cannot trace divmod of a symbolic batch size
    rest = n - full * virtual_batch_size
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
    * ``impl="auto"`` (default): ``fused`` where it applies and the kernel could be built, else
      ``native``.

    While ``torch.compile`` traces, every ``impl`` runs as a plain loop of ``F.batch_norm`` calls
    (the compiler fuses it; the C kernel and ``.item()`` would break the graph).

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
    compiling = torch.compiler.is_compiling()
    if impl == "fused" and not compiling and not _kernels.eligible(x):
        raise ValueError(
            f"impl='fused' needs a contiguous 2-D float32/float64 CPU input, got shape {tuple(x.shape)}, "
            f"{x.dtype} on {x.device.type}{'' if x.is_contiguous() else ' (non-contiguous)'}"
        )
    if impl == "fused" and not compiling and not _kernels.available():
        raise RuntimeError(f"impl='fused': the Ghost BN kernel is unavailable ({_kernels.unavailable_reason()})")
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    if x.shape[0] == 0:  # no virtual batch: an empty output, running statistics untouched (as torch)
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    sizes = _ghost_sizes(x.shape[0], virtual_batch_size)
    if sizes[-1] * math.prod(x.shape[2:]) == 1:  # only the smallest virtual batch can hold one value
        check_batch_size(x.narrow(0, 0, sizes[-1]))
    if impl == "vectorized" and len(set(sizes)) != 1:
        raise ValueError(
            f"impl='vectorized' needs the batch size ({x.shape[0]}) to be a multiple of "
            f"virtual_batch_size ({virtual_batch_size})"
        )
    if compiling:
        return _ghost_traceable(x, running_mean, running_var, weight, bias, momentum, eps, sizes, num_batches_tracked)
    k0 = 0 if num_batches_tracked is None else int(num_batches_tracked.item())
    if num_batches_tracked is not None:
        num_batches_tracked.add_(len(sizes))
    if impl == "vectorized":
        return _ghost_vectorized(x, running_mean, running_var, weight, bias, momentum, eps, len(sizes), k0)
    if len(sizes) == 1 and momentum is not None and impl != "fused":
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    if impl == "fused" or (impl == "auto" and _use_fused(x, running_mean, running_var)):
        if impl == "fused" and not _kernels.buffers_ok(x, running_mean, running_var):  # auto checked them
            raise ValueError(
                "impl='fused' needs both running buffers or neither, contiguous (C,) tensors of the input's dtype"
            )
        return _GhostFusedFn.apply(x, weight, bias, running_mean, running_var, momentum, k0, virtual_batch_size, eps)
    if x.dim() > 2 and _layout(x) is not None:
        # Write each virtual batch's output (and, backward, input gradient) straight into one
        # tensor: no concatenation copies, so the cost is torch's BatchNorm plus per-call overhead.
        # In channels_last too: the batch dimension is outermost there as well, so each virtual
        # batch is a dense slice.
        moms = tuple(momentum if momentum is not None else 1.0 / (k0 + i + 1) for i in range(len(sizes)))
        return _GhostNativeFn.apply(x, weight, bias, running_mean, running_var, tuple(sizes), moms, eps)
    outs = []
    for i, chunk in enumerate(x.split(sizes)):
        m = momentum if momentum is not None else 1.0 / (k0 + i + 1)
        outs.append(F.batch_norm(chunk, running_mean, running_var, weight, bias, True, m, eps))
    return torch.cat(outs)


def _layout(x: Tensor) -> torch.memory_format | None:
    """The dense layout of ``x`` whose batch slices are dense too: contiguous or channels_last
    (2-D or 3-D images), else None."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def _ghost_traceable(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    sizes: list[int],
    num_batches_tracked: Tensor | None,
) -> Tensor:
    """Ghost BN from plain torch operations only, for ``torch.compile``. With ``momentum=None`` the cumulative-average factor ``1 / (k + i + 1)`` stays
    a tensor (reading the counter with ``.item()`` would break the graph)."""
    outs = []
    k = None if num_batches_tracked is None else num_batches_tracked.detach().double()
    for i, chunk in enumerate(x.split(sizes)):
        if momentum is not None or running_mean is None or running_var is None:
            outs.append(F.batch_norm(chunk, running_mean, running_var, weight, bias, True, 0.0 if momentum is None else momentum, eps))
            continue
        outs.append(F.batch_norm(chunk, None, None, weight, bias, True, 0.0, eps))
        with torch.no_grad():
            var, mean = torch.var_mean(chunk, dim=(0, *range(2, chunk.dim())), correction=1)
            f = 1.0 / (k + (i + 1)) if k is not None else torch.tensor(1.0 / (i + 1))
            f = f.to(running_mean.dtype)
            running_mean.mul_(1 - f).add_(mean.to(running_mean.dtype) * f)
            running_var.mul_(1 - f).add_(var.to(running_var.dtype) * f)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(len(sizes))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _regrad(x: Tensor, weight: Tensor | None, bias: Tensor | None, gy: Tensor, sizes: list[int], eps: float, needs: tuple[bool, ...]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Input, weight and bias gradients as differentiable functions (``create_graph=True``): the
    forward recomputed from torch's batch norm per virtual batch and differentiated by autograd."""
    with torch.enable_grad():
        y = torch.cat([F.batch_norm(c, None, None, weight, bias, True, 0.0, eps) for c in x.split(sizes)])
        wanted = [(i, t) for i, t in enumerate((x, weight, bias)) if t is not None and needs[i]]
        grads = torch.autograd.grad(y, [t for _, t in wanted], gy, create_graph=True, allow_unused=True)
    out: list[Tensor | None] = [None, None, None]
    for (i, _), g in zip(wanted, grads):
        out[i] = g
    return out[0], out[1], out[2]


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
        ctx.save_for_backward(x, weight, bias, dmean, invstd)
        ctx.v, ctx.has_bias, ctx.eps = v, bias is not None, eps
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, weight, bias, dmean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients
            return (*_regrad(x, weight, bias, gy, _ghost_sizes(x.shape[0], ctx.v), ctx.eps, ctx.needs_input_grad[:3]), None, None, None, None, None, None)
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
        start = 0
        if x.dtype in (torch.float16, torch.bfloat16):
            # the dtype of the saved statistics depends on the device and the parameters' dtype:
            # let torch allocate them (one copy of the output per virtual batch)
            means, invstds = [], []
            for size, m in zip(sizes, moms):
                out, sm, si = aten.native_batch_norm(x.narrow(0, start, size), weight, bias, running_mean, running_var,
                                                     True, m, eps)
                y.narrow(0, start, size).copy_(out)
                means.append(sm)
                invstds.append(si)
                start += size
            save_mean, save_invstd = torch.stack(means), torch.stack(invstds)
        else:
            save_mean = torch.empty(len(sizes), c, dtype=x.dtype, device=x.device)
            save_invstd = torch.empty_like(save_mean)
            for i, (size, m) in enumerate(zip(sizes, moms)):
                aten.native_batch_norm.out(
                    x.narrow(0, start, size), weight, bias, running_mean, running_var, True, m, eps,
                    out=y.narrow(0, start, size), save_mean=save_mean[i], save_invstd=save_invstd[i],
                )
                start += size
        ctx.save_for_backward(x, weight, bias, save_mean, save_invstd)
        ctx.sizes, ctx.eps, ctx.has_bias = sizes, eps, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        aten = torch.ops.aten
        x, weight, bias, save_mean, save_invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients
            return (*_regrad(x, weight, bias, gy, list(ctx.sizes), ctx.eps, ctx.needs_input_grad[:3]), None, None, None, None, None)
        gy = gy.contiguous(memory_format=_layout(x) or torch.contiguous_format)
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
        # bf16/fp16 input is normalized in float32 and returned in its own dtype, as torch's batch
        # norm does (statistics in the input's format are off by far more than its rounding)
        xw = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        xv = xw.reshape(groups, n // groups, c, -1)
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
        ctx.save_for_backward(xhat, weight, invstd, x, bias)
        ctx.has_bias, ctx.eps = bias is not None, eps
        var_u = var * (xv.shape[1] * xv.shape[3]) / max(xv.shape[1] * xv.shape[3] - 1, 1)
        ctx.mark_non_differentiable(mean, var_u)
        return y.reshape(x.shape).to(x.dtype), mean.view(groups, c), var_u.view(groups, c)

    @staticmethod
    def backward(ctx, gy: Tensor, _gm: Tensor, _gv: Tensor):  # type: ignore[override]
        xhat, weight, invstd, x, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients
            sizes = [xhat.shape[1]] * xhat.shape[0]
            return (*_regrad(x, weight, bias, gy, sizes, ctx.eps, ctx.needs_input_grad[:3]), None, None)
        c = xhat.shape[2]
        gv = gy.reshape(xhat.shape).to(xhat.dtype)
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
        return dx.reshape(gy.shape).to(gy.dtype), gw, gb, None, None


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
