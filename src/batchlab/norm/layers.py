"""Normalization layers: thin modules holding parameters and buffers around
:mod:`batchlab.norm.functional`.

``BatchNorm{1,2,3}d`` have torch's constructor, state_dict keys (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``) and numerics, so a torch checkpoint
loads into them and back. Every layer takes the channel count first, then keywords.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from batchlab.norm import functional as BF

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
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "default_num_groups",
    "is_batchnorm",
]


def _dims_message(allowed: tuple[int, ...]) -> str:
    return " or ".join(f"{d}D" for d in allowed)


class _NormBase(nn.Module):
    """Parameters and running buffers shared by batch and instance norm (torch's layout)."""

    _version = 2
    _allowed_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None (cumulative average), got {momentum}")
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **fk))
            self.bias = nn.Parameter(torch.empty(num_features, **fk))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **fk))
            self.register_buffer("running_var", torch.ones(num_features, **fk))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, counter 0."""
        if self.track_running_stats and self.running_mean is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Running statistics reset; weight 1 and bias 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input_dim(self, x: Tensor) -> None:
        if self._allowed_dims and x.dim() not in self._allowed_dims:
            raise ValueError(f"expected {_dims_message(self._allowed_dims)} input (got {x.dim()}D input)")

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[no-untyped-def]
        # Checkpoints from before torch added num_batches_tracked (version < 2) load with 0.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class _BatchNormBase(_NormBase):
    """Shared logic of every batch-statistics layer: when to use batch statistics, which
    buffers to pass, the momentum factor (``None`` = cumulative moving average)."""

    def _use_batch_stats(self) -> bool:
        # Batch statistics in training, and in eval when there are no running buffers.
        return self.training or (self.running_mean is None and self.running_var is None)

    def _buffers_for_call(self) -> tuple[Tensor | None, Tensor | None]:
        # Buffers are updated only when tracked and training; in eval they normalize.
        if not self.training or self.track_running_stats:
            return self.running_mean, self.running_var
        return None, None

    def _step_factor(self) -> float:
        """Increment the counter (training with tracked stats) and return the update factor."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return factor


class _BatchNorm(_BatchNormBase):
    """Batch normalization (Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network
    Training by Reducing Internal Covariate Shift") with torch's semantics.

    Args:
        num_features: channels C of an ``(N, C, *)`` input.
        eps: added to the variance (1e-5).
        momentum: running-statistics update factor (0.1); None for a cumulative average whose
            factor is ``1 / num_batches_tracked``.
        affine: learn a per-channel scale (``weight``, init 1) and shift (``bias``, init 0).
        track_running_stats: keep ``running_mean``/``running_var``; without them batch
            statistics are used in eval mode too.

    Note:
        ``running_var`` is the running average of the *unbiased* (Bessel-corrected) batch
        variance, while normalization uses the *biased* one, exactly as torch does.
    """

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if self.training:
            BF.check_batch_size(x)
        factor = self._step_factor()
        rm, rv = self._buffers_for_call()
        return BF.batch_norm(x, rm, rv, self.weight, self.bias, self._use_batch_stats(), factor, self.eps)


class BatchNorm1d(_BatchNorm):
    __doc__ = _BatchNorm.__doc__
    _allowed_dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    __doc__ = _BatchNorm.__doc__
    _allowed_dims = (4,)


class BatchNorm3d(_BatchNorm):
    __doc__ = _BatchNorm.__doc__
    _allowed_dims = (5,)


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
        if self.rmax < 1:
            raise ValueError(f"rmax must be >= 1, got {self.rmax}")
        if self.dmax < 0:
            raise ValueError(f"dmax must be >= 0, got {self.dmax}")
        for name in ("warmup_steps", "rmax_steps", "dmax_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.rmax_steps < self.warmup_steps or self.dmax_steps < self.warmup_steps:
            raise ValueError(
                f"rmax_steps ({self.rmax_steps}) and dmax_steps ({self.dmax_steps}) must be >= warmup_steps ({self.warmup_steps})"
            )

    @classmethod
    def constant(cls, rmax: float = 3.0, dmax: float = 5.0) -> "RenormSchedule":
        """Fixed limits from the first step."""
        return cls(rmax=rmax, dmax=dmax, warmup_steps=0, rmax_steps=0, dmax_steps=0)

    def limits(self, step: int) -> tuple[float, float]:
        """``(rmax, dmax)`` at training step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return 1.0, 0.0

        def ramp(end: int) -> float:
            span = end - self.warmup_steps
            return 1.0 if span <= 0 else min(1.0, (step - self.warmup_steps) / span)

        return 1.0 + (self.rmax - 1.0) * ramp(self.rmax_steps), self.dmax * ramp(self.dmax_steps)


class _BatchRenorm(_BatchNormBase):
    """Batch Renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch
    Dependence in Batch-Normalized Models").

    Training normalizes with the batch statistics corrected towards the running ones by the
    stop-gradient factors ``r`` (clipped to ``[1/rmax, rmax]``) and ``d`` (clipped to
    ``[-dmax, dmax]``); inference is plain batch norm with the running statistics, so the
    state_dict is a BatchNorm's. The limits follow :class:`RenormSchedule` over
    ``num_batches_tracked`` (the training-step counter).

    Args:
        num_features: channels C.
        eps, momentum, affine: as :class:`BatchNorm2d` (momentum None = cumulative average).
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
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if track_running_stats is not True:
            raise ValueError(
                f"track_running_stats must be True for Batch Renorm (r and d use the running statistics), got {track_running_stats!r}"
            )
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.schedule = RenormSchedule(rmax, dmax, warmup_steps, rmax_steps, dmax_steps)

    def current_limits(self) -> tuple[float, float]:
        """``(rmax, dmax)`` for the next training step."""
        return self.schedule.limits(int(self.num_batches_tracked.item()))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", schedule={self.schedule}"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training:
            return BF.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        BF.check_batch_size(x)
        rmax, dmax = self.current_limits()
        factor = self._step_factor()
        return BF.batch_renorm(
            x, self.running_mean, self.running_var, self.weight, self.bias, True, factor, self.eps, rmax, dmax
        )


class BatchRenorm1d(_BatchRenorm):
    __doc__ = _BatchRenorm.__doc__
    _allowed_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    __doc__ = _BatchRenorm.__doc__
    _allowed_dims = (4,)


class BatchRenorm3d(_BatchRenorm):
    __doc__ = _BatchRenorm.__doc__
    _allowed_dims = (5,)


class _GhostBatchNorm(_BatchNormBase):
    """Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017, "Train longer, generalize
    better: closing the generalization gap in large batch training of neural networks").

    In training, statistics come from consecutive virtual batches of ``virtual_batch_size``
    samples; running statistics are updated once per virtual batch (``num_batches_tracked``
    counts virtual batches). Eval is plain batch norm; the state_dict is a BatchNorm's.

    Args:
        num_features: channels C.
        virtual_batch_size: samples per virtual batch (e.g. 32 or 128).
        eps, momentum, affine, track_running_stats: as :class:`BatchNorm2d`.
        impl: "auto" (default: "fused" for contiguous 2-D float CPU inputs when the C kernel
            can be built, else "native"), "fused" (one C-kernel call for all virtual batches),
            "native" (torch's batch-norm kernel per virtual batch) or "vectorized" (one
            ``(G, N/G, C, S)`` statistics pass; batch must divide). See
            :func:`batchlab.norm.functional.ghost_batch_norm`.
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
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
        if impl not in BF.GHOST_IMPLS:
            raise ValueError(f"impl must be one of {', '.join(map(repr, BF.GHOST_IMPLS))}, got {impl!r}")
        self.virtual_batch_size = virtual_batch_size
        self.impl = impl

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        rm, rv = self._buffers_for_call()
        counter = self.num_batches_tracked if (self.training and self.track_running_stats) else None
        return BF.ghost_batch_norm(
            x, rm, rv, self.weight, self.bias, self._use_batch_stats(), self.momentum, self.eps,
            self.virtual_batch_size, counter, self.impl,
        )


class GhostBatchNorm1d(_GhostBatchNorm):
    __doc__ = _GhostBatchNorm.__doc__
    _allowed_dims = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm):
    __doc__ = _GhostBatchNorm.__doc__
    _allowed_dims = (4,)


class GhostBatchNorm3d(_GhostBatchNorm):
    __doc__ = _GhostBatchNorm.__doc__
    _allowed_dims = (5,)


class CaffeBatchNorm(nn.Module):
    """Caffe's ``BatchNorm`` layer (no affine; Caffe puts gamma/beta in a following ``Scale``).

    Blobs, kept as buffers with Caffe's order and meaning: ``mean`` (accumulated mean M),
    ``variance`` (accumulated unbiased variance V) and ``scale_factor`` (one value s). Training
    with batch statistics normalizes with the batch mean and biased variance and accumulates
    ``s = lambda * s + 1``, ``M = lambda * M + mean_B``, ``V = lambda * V + m / (m - 1) * var_B``
    with ``m = N * spatial``. Global statistics are ``M / s`` and ``V / s`` (0 when s == 0).
    See caffe/src/caffe/layers/batch_norm_layer.cpp.

    Args:
        num_features: channels C.
        eps: added to the variance (Caffe default 1e-5).
        moving_average_fraction: lambda (Caffe default 0.999).
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
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not 0.0 <= moving_average_fraction <= 1.0:
            raise ValueError(f"moving_average_fraction must be in [0, 1], got {moving_average_fraction}")
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
        BF.check_batch_size(x)
        mean_b, var_b = BF.batch_stats(x)
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
    """Batch norm with fixed statistics and affine (detectron2's ``FrozenBatchNorm2d``).

    Always normalizes with the running statistics, has no trainable parameters (weight and bias
    are buffers) and ignores ``train()``, so it stays frozen. State_dict keys are a
    BatchNorm's, so checkpoints load both ways. Works on any ``(N, C, *)`` input.

    Args:
        num_features: channels C.
        eps: added to the variance.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **fk))
        self.register_buffer("bias", torch.zeros(num_features, **fk))
        self.register_buffer("running_mean", torch.zeros(num_features, **fk))
        self.register_buffer("running_var", torch.ones(num_features, **fk))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> "FrozenBatchNorm":
        """A frozen copy of a batch-norm layer with running statistics."""
        if getattr(bn, "running_mean", None) is None:
            raise ValueError(f"can only freeze a batch norm with running statistics, got {type(bn).__name__} without them")
        rm = bn.running_mean
        out = cls(bn.num_features, bn.eps, device=rm.device, dtype=rm.dtype)
        with torch.no_grad():
            out.running_mean.copy_(rm)
            out.running_var.copy_(bn.running_var)
            if getattr(bn, "num_batches_tracked", None) is not None:
                out.num_batches_tracked.copy_(bn.num_batches_tracked)
            if getattr(bn, "weight", None) is not None:
                out.weight.copy_(bn.weight)
                out.bias.copy_(bn.bias)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        return BF.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def default_num_groups(num_channels: int, preferred: int = 8) -> int:
    """The largest group count ``<= preferred`` that divides ``num_channels``."""
    g = max(1, min(preferred, num_channels))
    while num_channels % g:
        g -= 1
    return g


class GroupNorm(nn.Module):
    """Group Normalization (Wu & He 2018, "Group Normalization").

    Note the argument order: channels first (batchlab's convention, as in timm), unlike
    ``torch.nn.GroupNorm(num_groups, num_channels)``. Attribute names and state_dict keys
    (``weight``, ``bias``) are torch's.

    Args:
        num_channels: channels C.
        num_groups: groups; must divide C. None picks the largest divisor of C that is <= 8.
        eps: added to the variance.
        affine: per-channel weight (1) and bias (0).
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        if num_groups is None:
            num_groups = default_num_groups(num_channels)
        if not isinstance(num_groups, int) or num_groups < 1 or num_channels % num_groups:
            raise ValueError(
                f"num_groups must be a positive divisor of num_channels ({num_channels}), got {num_groups!r} "
                "(batchlab's GroupNorm takes num_channels first)"
            )
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, **fk))
            self.bias = nn.Parameter(torch.zeros(num_channels, **fk))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, affine={self.affine}"

    def forward(self, x: Tensor) -> Tensor:
        return BF.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(nn.Module):
    """Layer Normalization (Ba, Kiros & Hinton 2016) over the trailing ``normalized_shape``
    dimensions; torch's constructor and state_dict.

    Args:
        normalized_shape: int or shape of the trailing dims.
        eps: added to the variance.
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
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if not shape or any(not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"normalized_shape must be a positive int or a tuple of them, got {normalized_shape!r}")
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.normalized_shape = shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(shape, **fk))
            self.bias = nn.Parameter(torch.zeros(shape, **fk)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"

    def forward(self, x: Tensor) -> Tensor:
        return BF.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class _InstanceNorm(_NormBase):
    """Instance Normalization (Ulyanov, Vedaldi & Lempitsky 2016) with torch's defaults
    (``affine=False``, ``track_running_stats=False``); unbatched inputs are accepted.

    Args:
        num_features: channels C.
        eps: added to the variance.
        momentum: running-statistics factor (used only with ``track_running_stats``; None
            means no update, as in torch).
        affine: per-channel weight and bias.
        track_running_stats: keep running statistics and use them in eval mode.
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
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        unbatched = x.dim() == self._allowed_dims[0]
        if unbatched:
            x = x.unsqueeze(0)
        if x.shape[1] != self.num_features and self.affine:
            raise ValueError(
                f"expected input's size at dim=1 to match num_features ({self.num_features}), got {x.shape[1]}"
            )
        use_input_stats = self.training or not self.track_running_stats
        momentum = self.momentum if self.momentum is not None else 0.0
        rm = self.running_mean if self.track_running_stats else None
        rv = self.running_var if self.track_running_stats else None
        if use_input_stats and not self.training:
            rm = rv = None  # eval without tracked stats never updates buffers
        y = BF.instance_norm(x, rm, rv, self.weight, self.bias, use_input_stats, momentum, self.eps)
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__
    _allowed_dims = (2, 3)


class InstanceNorm2d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__
    _allowed_dims = (3, 4)


class InstanceNorm3d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__
    _allowed_dims = (4, 5)


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch-statistics layer with BatchNorm's buffers: torch's
    ``BatchNorm*d``/``SyncBatchNorm`` or batchlab's BatchNorm, BatchRenorm, GhostBatchNorm and
    SyncBatchNorm (not FrozenBatchNorm or CaffeBatchNorm, whose state differs)."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, _BatchNormBase))
