"""Normalization layers: torch's classes extended, never paralleled.

``BatchNorm{1,2,3}d`` *are* ``torch.nn.BatchNorm{1,2,3}d`` (subclasses adding only argument
checks), and Batch Renorm and Ghost BN subclass them and override ``forward``; ``GroupNorm``,
``LayerNorm``, ``RMSNorm`` and ``InstanceNorm{1,2,3}d`` subclass torch's too. So
``isinstance(m, nn.BatchNorm2d)`` holds, state dicts, ``load_state_dict`` (including torch's
handling of a missing ``num_batches_tracked``), ``torch.nn.utils.fusion``, Torch-Pruning,
Lightning and DDP helpers treat them as what they are, and eval mode is torch's own code. timm
makes the same choice for its norm+activation layers ("This is why we inherit from BN instead of
composing it", timm/layers/norm_act.py).

Every layer takes the channel count first, then keywords (``GroupNorm(num_channels,
num_groups)``, the one order that differs from torch's), and checks its arguments, naming the
argument, what is allowed and the value given. torch 2.13's ``bias=`` keyword is accepted
wherever torch's class has it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from batchlab.norm import _checks as C
from batchlab.norm import functional as BF
from batchlab.norm.ghost import GHOST_IMPLS, ghost_batch_norm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "RenormSchedule",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "CaffeBatchNorm",
    "FrozenBatchNorm",
    "GroupNorm",
    "LayerNorm",
    "RMSNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "batchnorm_dims",
    "default_num_groups",
    "is_batchnorm",
]

_BatchNorm = nn.modules.batchnorm._BatchNorm


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch-statistics layer with BatchNorm's parameters and buffers:
    exactly torch's test, ``isinstance(module, nn.modules.batchnorm._BatchNorm)``, which covers
    torch's ``BatchNorm*d``/``SyncBatchNorm`` and batchlab's BatchNorm, BatchRenorm,
    GhostBatchNorm, SyncBatchNorm and BatchNormAct (not FrozenBatchNorm or CaffeBatchNorm,
    whose state differs)."""
    return isinstance(module, _BatchNorm)


def batchnorm_dims(module: nn.Module) -> int:
    """Spatial dims that a batch-norm layer expects, for :func:`create_norm`: 1 for
    ``*1d`` (also right for ``(N, C)`` inputs), 2 for ``*2d`` (and unknown), 3 for ``*3d``."""
    name = type(module).__name__
    if name.endswith("1d"):
        return 1
    if name.endswith("3d"):
        return 3
    return 2


class _CheckedBatchNorm:
    """torch's batch-norm constructor with every argument checked first (mixed in before a
    torch ``BatchNorm*d``)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        C.check_batchnorm_args(num_features, eps, momentum, affine, track_running_stats, bias)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)  # type: ignore[call-arg]

    def forward(self, input: Tensor) -> Tensor:
        """torch's ``_BatchNorm.forward`` (written out: TorchScript cannot call ``super()``), with
        one branch added: the cumulative average (``momentum=None``) under ``torch.compile``.
        torch's reads ``1 / num_batches_tracked`` as a Python float there, a data-dependent graph
        break; :meth:`_cumulative_compiled` keeps the factor a tensor."""
        self._check_input_dim(input)  # type: ignore[attr-defined]
        factor = 0.0 if self.momentum is None else self.momentum  # type: ignore[attr-defined]
        if self.training and self.track_running_stats:  # type: ignore[attr-defined]
            if self.num_batches_tracked is not None:  # type: ignore[attr-defined]
                self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
                if self.momentum is None:  # type: ignore[attr-defined]
                    if not torch.jit.is_scripting() and torch.compiler.is_compiling():
                        return self._cumulative_compiled(input)
                    factor = 1.0 / float(self.num_batches_tracked)  # type: ignore[attr-defined]
                else:
                    factor = self.momentum  # type: ignore[attr-defined]
        bn_training = self.training or (self.running_mean is None and self.running_var is None)  # type: ignore[attr-defined]
        track = not self.training or self.track_running_stats  # type: ignore[attr-defined]
        return F.batch_norm(input, self.running_mean if track else None, self.running_var if track else None,  # type: ignore[attr-defined]
                            self.weight, self.bias, bn_training, factor, self.eps)  # type: ignore[attr-defined]

    @torch.jit.unused
    def _cumulative_compiled(self, input: Tensor) -> Tensor:
        """Training step with the cumulative average under ``torch.compile`` (the counter is
        already incremented): torch's kernel on batch statistics, then the running buffers
        updated from ``torch.var_mean`` with the factor ``1 / num_batches_tracked`` as a tensor."""
        out = F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)  # type: ignore[attr-defined]
        if input.numel() > 0:  # torch leaves the statistics of an empty batch alone
            with torch.no_grad():
                dims = [0, *range(2, input.dim())]
                var, mean = torch.var_mean(input.detach(), dim=dims, correction=1)
                rm, rv = self.running_mean, self.running_var  # type: ignore[attr-defined]
                factor = (1.0 / self.num_batches_tracked).to(rm.dtype)  # type: ignore[attr-defined]
                rm.lerp_(mean.to(rm.dtype), factor)
                rv.lerp_(var.to(rv.dtype), factor)
        return out


_BN_DOC = """Batch normalization (Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep
    Network Training by Reducing Internal Covariate Shift"): torch's class, with its arguments
    checked.

    Args:
        num_features: channels C of an ``(N, C, *)`` input.
        eps: added to the variance (1e-5); a finite number >= 0.
        momentum: running-statistics update factor in [0, 1] (0.1); None for a cumulative
            average whose factor is ``1 / num_batches_tracked``.
        affine: learn a per-channel scale (``weight``, init 1) and shift (``bias``, init 0).
        track_running_stats: keep ``running_mean``/``running_var``; without them batch
            statistics are used in eval mode too.
        bias: with ``affine``, learn the shift (torch 2.13's keyword).

    Note:
        ``running_var`` is the running average of the *unbiased* (Bessel-corrected) batch
        variance, while normalization uses the *biased* one, exactly as torch does.
    """


class BatchNorm1d(_CheckedBatchNorm, nn.BatchNorm1d):
    __doc__ = _BN_DOC


class BatchNorm2d(_CheckedBatchNorm, nn.BatchNorm2d):
    __doc__ = _BN_DOC


class BatchNorm3d(_CheckedBatchNorm, nn.BatchNorm3d):
    __doc__ = _BN_DOC


_BN_BY_DIMS: dict[int, type[_BatchNorm]] = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}


@dataclasses.dataclass(frozen=True)
class RenormSchedule:
    """Step schedule of Batch Renorm's clipping limits (Ioffe 2017, Sec. 4).

    The paper trains with ``r = 1, d = 0`` (plain batch norm) for the first 5k steps, then
    relaxes ``rmax`` from 1 to 3 by step 40k and ``dmax`` from 0 to 5 by step 25k. Limits grow
    linearly between ``warmup_steps`` and the end steps.
    """

    rmax: float = 3.0  # final clip of r to [1/rmax, rmax]
    dmax: float = 5.0  # final clip of d to [-dmax, dmax]
    warmup_steps: int = 5000  # steps of plain batch norm (rmax=1, dmax=0)
    rmax_steps: int = 40000  # step at which rmax reaches its final value
    dmax_steps: int = 25000  # step at which dmax reaches its final value

    def __post_init__(self) -> None:
        C.check_real("rmax", self.rmax, 1.0)
        C.check_real("dmax", self.dmax, 0.0)
        for name in ("warmup_steps", "rmax_steps", "dmax_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.rmax_steps < self.warmup_steps or self.dmax_steps < self.warmup_steps:
            raise ValueError(
                f"rmax_steps ({self.rmax_steps}) and dmax_steps ({self.dmax_steps}) must be >= warmup_steps ({self.warmup_steps})"
            )

    @classmethod
    def constant(cls, rmax: float = 3.0, dmax: float = 5.0) -> "RenormSchedule":
        """Fixed limits from the first step."""
        return cls(rmax=rmax, dmax=dmax, warmup_steps=0, rmax_steps=0, dmax_steps=0)

    def limits(self, step: int | Tensor) -> tuple[Any, Any]:
        """``(rmax, dmax)`` at training step ``step`` (0-based): floats for an int step, 0-d
        float64 tensors for a tensor step (what ``torch.compile`` traces, so that the compiled
        graph never reads the counter back with ``.item()``)."""
        if isinstance(step, Tensor):
            s: Any = step.to(torch.float64)
            started = (s >= self.warmup_steps).to(torch.float64)
        else:
            s, started = float(step), float(step >= self.warmup_steps)

        def ramp(end: int) -> Any:
            span = end - self.warmup_steps
            if span <= 0:
                return started
            t = (s - self.warmup_steps) / span
            return t.clamp(0.0, 1.0) if isinstance(t, Tensor) else min(1.0, max(0.0, t))

        return 1.0 + (self.rmax - 1.0) * ramp(self.rmax_steps), self.dmax * ramp(self.dmax_steps)


class _BatchRenorm(_CheckedBatchNorm):
    """Batch Renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch
    Dependence in Batch-Normalized Models"); a torch ``BatchNorm*d`` whose training forward
    renormalizes.

    Training normalizes with the batch statistics corrected towards the running ones by the
    stop-gradient factors ``r`` (clipped to ``[1/rmax, rmax]``) and ``d`` (clipped to
    ``[-dmax, dmax]``); inference is torch's batch norm with the running statistics, and the
    state_dict is a BatchNorm's. The limits follow :class:`RenormSchedule` over
    ``num_batches_tracked`` (the training-step counter). With ``track_running_stats`` switched
    off after construction the running statistics still define r and d but stay frozen (and
    the counter, hence the schedule, stops), as torch's BatchNorm freezes them. An empty batch
    gives an empty output and leaves the statistics, as torch's BatchNorm.

    Args:
        num_features: channels C.
        eps, momentum, affine, bias: as :class:`BatchNorm2d` (momentum None = cumulative average).
        track_running_stats: must be True at construction (r and d need running statistics).
        rmax, dmax: final limits (paper: 3 and 5).
        warmup_steps, rmax_steps, dmax_steps: schedule (paper: 5000, 40000, 25000); set all three
            to 0 for constant limits.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 5000,
        rmax_steps: int = 40000,
        dmax_steps: int = 25000,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if track_running_stats is not True:
            raise ValueError(
                f"track_running_stats must be True for Batch Renorm (r and d use the running statistics), got {track_running_stats!r}"
            )
        schedule = RenormSchedule(rmax, dmax, warmup_steps, rmax_steps, dmax_steps)
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, bias=bias)
        self.schedule = schedule

    def current_limits(self) -> tuple[float, float]:
        """``(rmax, dmax)`` for the next training step."""
        return self.schedule.limits(int(self.num_batches_tracked.item()))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", schedule={self.schedule}"  # type: ignore[misc]

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if self.running_mean is None or self.num_batches_tracked is None:
            raise ValueError(f"{type(self).__name__} needs its running statistics in training, got running_mean=None")
        # the step as a tensor while compiling (no .item(), no graph break); eagerly as a Python
        # int, which saves the dozen tiny tensor ops of the schedule and the factor per step
        step: int | Tensor = self.num_batches_tracked.double() if torch.compiler.is_compiling() else int(self.num_batches_tracked.item())
        rmax, dmax = self.schedule.limits(step)
        update = self.track_running_stats
        factor: float | Tensor = 0.0
        if update:
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / (step + 1)
        return BF.batch_renorm(
            x, self.running_mean, self.running_var, self.weight, self.bias, True, factor, self.eps, rmax, dmax, update
        )


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    __doc__ = _BatchRenorm.__doc__


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    __doc__ = _BatchRenorm.__doc__


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):
    __doc__ = _BatchRenorm.__doc__


class _GhostBatchNorm(_CheckedBatchNorm):
    """Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017, "Train longer, generalize
    better: closing the generalization gap in large batch training of neural networks"); a torch
    ``BatchNorm*d`` whose training forward normalizes virtual batches.

    In training, statistics come from consecutive virtual batches of ``virtual_batch_size``
    samples; running statistics are updated once per virtual batch (``num_batches_tracked``
    counts virtual batches). Eval is torch's batch norm; the state_dict is a BatchNorm's.

    Args:
        num_features: channels C.
        virtual_batch_size: samples per virtual batch (e.g. 32 or 128).
        eps, momentum, affine, track_running_stats, bias: as :class:`BatchNorm2d`.
        impl: "auto" (default: "fused" for contiguous 2-D float CPU inputs when the C kernel
            can be built, else "native"), "fused" (one C-kernel call for all virtual batches),
            "native" (torch's batch-norm kernel per virtual batch) or "vectorized" (one
            ``(G, N/G, C, S)`` statistics pass; batch must divide). See
            :func:`batchlab.norm.ghost.ghost_batch_norm`.
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        impl: str = "auto",
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        C.check_positive_int("virtual_batch_size", virtual_batch_size)
        if impl not in GHOST_IMPLS:
            raise ValueError(f"impl must be one of {', '.join(map(repr, GHOST_IMPLS))}, got {impl!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.virtual_batch_size = virtual_batch_size
        self.impl = impl

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"  # type: ignore[misc]

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on every submodule before compiling: say why, instead of
        # TorchScript's error about an f-string deep inside ghost_batch_norm
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script (the batch is split into virtual batches "
            "in Python); use torch.compile or torch.export, or convert_norm(model, 'batch') before scripting "
            "(eval outputs are the same: eval mode is torch's batch norm)")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        # torch's rules: buffers updated only when tracked and training, used whenever present in eval
        track = self.training and self.track_running_stats
        use_buffers = not self.training or self.track_running_stats
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        # eval without running statistics is torch's batch norm over the whole batch, not per virtual
        # batch; with them the batch size plays no part (and is not read: torch.jit.trace makes it a tensor)
        vbs = self.virtual_batch_size if self.training or not use_batch else max(1, int(x.shape[0]))
        return ghost_batch_norm(
            x, self.running_mean if use_buffers else None, self.running_var if use_buffers else None,
            self.weight, self.bias, use_batch, self.momentum, self.eps, vbs,
            self.num_batches_tracked if track else None, self.impl,
        )


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    __doc__ = _GhostBatchNorm.__doc__


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    __doc__ = _GhostBatchNorm.__doc__


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    __doc__ = _GhostBatchNorm.__doc__


class CaffeBatchNorm(nn.Module):
    """Caffe's ``BatchNorm`` layer (no affine; Caffe puts gamma/beta in a following ``Scale``).

    Blobs, kept as buffers with Caffe's order and meaning: ``mean`` (accumulated mean M),
    ``variance`` (accumulated unbiased variance V) and ``scale_factor`` (one value s). Training
    with batch statistics normalizes with the batch mean and biased variance and accumulates
    ``s = lambda * s + 1``, ``M = lambda * M + mean_B``, ``V = lambda * V + m / (m - 1) * var_B``
    with ``m = N * spatial``. Global statistics are ``M / s`` and ``V / s`` (0 when s == 0).
    An empty batch gives an empty output and accumulates nothing.
    See caffe/src/caffe/layers/batch_norm_layer.cpp. Not a torch BatchNorm subclass: its state
    (three blobs, no affine) is not a BatchNorm's.

    Args:
        num_features: channels C.
        eps: added to the variance (Caffe default 1e-5).
        moving_average_fraction: lambda in [0, 1] (Caffe default 0.999).
        use_global_stats: True always normalizes with the accumulated statistics, False always
            with batch statistics; None (default) follows the mode like Caffe's phase default
            (batch statistics in training, global in eval).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        moving_average_fraction: float = 0.999,
        use_global_stats: bool | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        C.check_positive_int("num_features", num_features)
        C.check_eps(eps)
        C.check_real("moving_average_fraction", moving_average_fraction, 0.0, 1.0)
        if use_global_stats not in (None, True, False):
            raise TypeError(f"use_global_stats must be None, True or False, got {use_global_stats!r}")
        self.num_features = num_features
        self.eps = eps
        self.moving_average_fraction = moving_average_fraction
        self.use_global_stats = use_global_stats
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.register_buffer("mean", torch.zeros(num_features, **fk))
        self.register_buffer("variance", torch.zeros(num_features, **fk))
        self.register_buffer("scale_factor", torch.zeros(1, **fk))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, moving_average_fraction={self.moving_average_fraction}, "
            f"use_global_stats={self.use_global_stats}"
        )

    def global_stats(self) -> tuple[Tensor, Tensor]:
        """``(M / s, V / s)``, zeros when ``s == 0`` (Caffe's rule)."""
        s = self.scale_factor
        f = torch.where(s == 0, torch.zeros_like(s), 1.0 / torch.where(s == 0, torch.ones_like(s), s))
        return self.mean * f, self.variance * f

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected input (N, {self.num_features}, *), got shape {tuple(x.shape)}")
        use_global = (not self.training) if self.use_global_stats is None else self.use_global_stats
        if use_global:
            mean, var = self.global_stats()
            return BF.batch_norm(x, mean, var, None, None, False, 0.0, self.eps)
        if x.numel() == 0:  # nothing to normalize or accumulate (torch's kernel handles the shapes)
            return F.batch_norm(x, None, None, None, None, True, 0.0, self.eps)
        BF.check_batch_size(x)
        mean_b, var_b = BF.batch_stats(x, BF.stats_dtype(x, self.mean))
        if self.training:
            with torch.no_grad():
                m = x.numel() // x.shape[1]
                corr = m / (m - 1) if m > 1 else 1.0
                lam = self.moving_average_fraction
                self.scale_factor.mul_(lam).add_(1.0)
                self.mean.mul_(lam).add_(mean_b.to(self.mean.dtype))
                self.variance.mul_(lam).add_(var_b.to(self.variance.dtype), alpha=corr)
        return BF.batch_norm_given_stats(x, None, None, mean_b, var_b, self.eps)


class FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics and affine (detectron2's and torchvision's
    ``FrozenBatchNorm2d``), on any ``(N, C, *)`` input.

    Always normalizes with the running statistics, has no trainable parameters (weight and bias
    are buffers) and ignores ``train()``, so it stays frozen. State_dict keys are a
    BatchNorm's, so checkpoints load both ways; :meth:`unfreeze` gives a trainable BatchNorm
    back. Deliberately *not* a torch BatchNorm subclass: tools that find BatchNorms to train,
    prune or synchronize must leave it alone.

    eps policy: ``eps`` is explicit and is what normalization uses. :meth:`from_batchnorm` keeps
    the source layer's eps unless told otherwise, since that is the eps the statistics were
    used with; pass ``eps=`` to override it, e.g. ``eps=0.0`` for detection weights trained
    with torchvision's old frozen layers (whose eps was 0 before it became 1e-5; torchvision's
    ``overwrite_eps`` does the same).

    Args:
        num_features: channels C.
        eps: added to the variance; a finite number >= 0.
        dims: spatial dimensions of the layer :meth:`unfreeze` returns (1, 2 or 3).
        affine: whether the layer :meth:`unfreeze` returns has a weight and bias (the frozen
            layer always applies its weight and bias buffers, ones and zeros without affine).
        bias: with ``affine``, whether it has a bias (torch 2.13's keyword: a BatchNorm made with
            ``bias=False`` has no bias in its state dict, and neither has its frozen copy).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, device: Any = None, dtype: torch.dtype | None = None, *,
                 dims: int = 2, affine: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.affine = bool(affine)
        self.has_bias = bool(affine) and bool(bias)
        # requires_grad of the source layer's weight and bias, restored by unfreeze
        self.affine_requires_grad = (True, True)
        C.check_positive_int("num_features", num_features)
        C.check_eps(eps)
        if dims not in _BN_BY_DIMS:
            raise ValueError(f"dims must be one of {sorted(_BN_BY_DIMS)}, got {dims!r}")
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.dims = dims
        # without affine the weight and bias are not part of the state dict, as for a BatchNorm
        # with affine=False, so checkpoints load both ways
        self.register_buffer("weight", torch.ones(num_features, **fk), persistent=self.affine)
        self.register_buffer("bias", torch.zeros(num_features, **fk), persistent=self.has_bias)
        self.register_buffer("running_mean", torch.zeros(num_features, **fk))
        self.register_buffer("running_var", torch.ones(num_features, **fk))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # a checkpoint without the counter (older torch, a plain dict) keeps this layer's, as
        # torch's BatchNorm and torchvision's FrozenBatchNorm2d load it
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = self.num_batches_tracked.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, eps: float | None = None) -> "FrozenBatchNorm":
        """A frozen copy of a batch-norm layer with running statistics.

        Args:
            bn: a batch norm with running statistics (torch's or batchlab's).
            eps: None (default) keeps ``bn.eps``; a number overrides it (see the class notes).
        """
        if getattr(bn, "running_mean", None) is None:
            raise ValueError(f"can only freeze a batch norm with running statistics, got {type(bn).__name__} without them")
        rm = bn.running_mean
        w, b = getattr(bn, "weight", None), getattr(bn, "bias", None)
        out = cls(bn.num_features, bn.eps if eps is None else eps, device=rm.device, dtype=rm.dtype, dims=batchnorm_dims(bn),
                  affine=w is not None, bias=b is not None)
        out.affine_requires_grad = (bool(getattr(w, "requires_grad", True)), bool(getattr(b, "requires_grad", True)))
        with torch.no_grad():
            out.running_mean.copy_(rm)
            out.running_var.copy_(bn.running_var)
            if getattr(bn, "num_batches_tracked", None) is not None:
                out.num_batches_tracked.copy_(bn.num_batches_tracked)
            if getattr(bn, "weight", None) is not None:
                out.weight.copy_(bn.weight)
            if getattr(bn, "bias", None) is not None:
                out.bias.copy_(bn.bias)
        return out

    def unfreeze(self, momentum: float | None = 0.1) -> _BatchNorm:
        """A trainable :class:`BatchNorm1d`/`2d`/`3d` (by ``dims``) with this layer's eps,
        statistics and counter, and, when the frozen layer came from an affine one, its weight
        and bias as parameters with their ``requires_grad``; in this layer's train/eval mode."""
        ref = self.running_mean
        bn = _BN_BY_DIMS[self.dims](self.num_features, self.eps, momentum, affine=self.affine, device=ref.device,
                                    dtype=ref.dtype, bias=self.has_bias or not self.affine)
        bn.load_state_dict(self.state_dict())
        if self.affine:
            bn.weight.requires_grad_(self.affine_requires_grad[0])
            if bn.bias is not None:
                bn.bias.requires_grad_(self.affine_requires_grad[1])
        return bn.train(self.training)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}" + ("" if self.affine else ", affine=False")
                + (", bias=False" if self.affine and not self.has_bias else ""))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def default_num_groups(num_channels: int, preferred: int = 8) -> int:
    """The largest group count ``<= preferred`` that divides ``num_channels``."""
    g = max(1, min(preferred, num_channels))
    while num_channels % g:
        g -= 1
    return g


class GroupNorm(nn.GroupNorm):
    """Group Normalization (Wu & He 2018, "Group Normalization"): torch's class with the channel
    count first.

    Note the argument order: channels first (batchlab's convention, as in timm), unlike
    ``torch.nn.GroupNorm(num_groups, num_channels)``. Attributes, forward and state_dict keys
    (``weight``, ``bias``) are torch's.

    Args:
        num_channels: channels C.
        num_groups: groups; must divide C. None picks the largest divisor of C that is <= 8.
        eps: added to the variance; a finite number >= 0.
        affine: per-channel weight (1) and bias (0).
        bias: with ``affine``, learn the bias (torch 2.13's keyword).
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        C.check_positive_int("num_channels", num_channels)
        if num_groups is None:
            num_groups = default_num_groups(num_channels)
        if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1 or num_channels % num_groups:
            raise ValueError(
                f"num_groups must be a positive divisor of num_channels ({num_channels}), got {num_groups!r} "
                "(batchlab's GroupNorm takes num_channels first)"
            )
        C.check_eps(eps)
        C.check_bool("affine", affine)
        C.check_bool("bias", bias)
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, affine={self.affine}"


class LayerNorm(nn.LayerNorm):
    """Layer Normalization (Ba, Kiros & Hinton 2016) over the trailing ``normalized_shape``
    dimensions: torch's class, with its arguments checked.

    Args:
        normalized_shape: int or shape of the trailing dims.
        eps: added to the variance; a finite number >= 0.
        elementwise_affine: learn element-wise weight (1) and bias (0).
        bias: learn the bias (with ``elementwise_affine``).
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...] | list[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = C.check_normalized_shape(normalized_shape)
        C.check_eps(eps)
        C.check_bool("elementwise_affine", elementwise_affine)
        C.check_bool("bias", bias)
        super().__init__(shape, eps, elementwise_affine, bias, device, dtype)


class RMSNorm(nn.RMSNorm):
    """Root-mean-square normalization (Zhang & Sennrich 2019, "Root Mean Square Layer
    Normalization"): ``y = x / sqrt(mean(x**2) + eps) * weight`` over the trailing
    ``normalized_shape`` dims; torch's ``nn.RMSNorm`` (same constructor, forward and
    state_dict), with its arguments checked.

    Args:
        normalized_shape: int or shape of the trailing dims.
        eps: added to the mean square; None (torch's default) uses ``torch.finfo(x.dtype).eps``.
        elementwise_affine: learn an element-wise weight (init 1); RMSNorm has no bias.
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...] | list[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = C.check_normalized_shape(normalized_shape)
        C.check_eps(eps, allow_none=True)
        C.check_bool("elementwise_affine", elementwise_affine)
        super().__init__(shape, eps, elementwise_affine, device, dtype)


class _CheckedInstanceNorm:
    """Instance Normalization (Ulyanov, Vedaldi & Lempitsky 2016): torch's class with torch's
    defaults (``affine=False``, ``track_running_stats=False``), its arguments checked, and the
    normalization computed as group norm with one channel per group (faster on CPU than torch's
    reshape into a batch norm over ``N * C`` channels; same numbers). Unbatched inputs accepted.

    Args:
        num_features: channels C.
        eps: added to the variance.
        momentum: running-statistics factor (used only with ``track_running_stats``; None
            means no update, as in torch).
        affine: per-channel weight and bias.
        track_running_stats: keep running statistics and use them in eval mode.
        bias: with ``affine``, learn the bias (torch 2.13's keyword).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        C.check_batchnorm_args(num_features, eps, momentum, affine, track_running_stats, bias)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)  # type: ignore[call-arg]

    def _apply_instance_norm(self, x: Tensor) -> Tensor:
        # torch's rule: buffers, where there are any, move whenever the input's statistics are used
        # (also with track_running_stats switched off after construction) and normalize otherwise
        use_input_stats = self.training or not self.track_running_stats
        return BF.instance_norm(
            x, self.running_mean, self.running_var,  # type: ignore[attr-defined]
            self.weight, self.bias, use_input_stats,  # type: ignore[attr-defined]
            self.momentum if self.momentum is not None else 0.0, self.eps,  # type: ignore[attr-defined]
        )


class InstanceNorm1d(_CheckedInstanceNorm, nn.InstanceNorm1d):
    __doc__ = _CheckedInstanceNorm.__doc__


class InstanceNorm2d(_CheckedInstanceNorm, nn.InstanceNorm2d):
    __doc__ = _CheckedInstanceNorm.__doc__


class InstanceNorm3d(_CheckedInstanceNorm, nn.InstanceNorm3d):
    __doc__ = _CheckedInstanceNorm.__doc__

