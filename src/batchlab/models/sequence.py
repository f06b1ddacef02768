"""A small classifier for padded sequences (see :mod:`batchlab.data.sequence` for the layout)."""

from __future__ import annotations

import torch
import torch.nn as nn

from batchlab.models.common import check_activation, has_norm, make_activation, make_norm
from batchlab.norm.registry import NormSpec


def apply_token_norm(layer: nn.Module, h: torch.Tensor, mask: torch.Tensor, masked: bool) -> torch.Tensor:
    """Normalize (N, L, C) token features over the feature dimension, token by token.

    The norm sees tokens as rows of an (N * L, C) matrix (``dims=0``): LayerNorm normalizes each
    token alone, BatchNorm uses statistics over all rows. With ``masked`` only real tokens are
    passed to the norm (padding is left as is), so BatchNorm's statistics ignore padding;
    without it padding rows take part, as in a naive implementation.
    """
    n, length, c = h.shape
    if not masked:
        return layer(h.reshape(n * length, c)).reshape(n, length, c)
    out = h.clone()
    out[mask] = layer(h[mask])
    return out


class SequenceBlock(nn.Module):
    """Residual position-wise block: ``h + Linear(Act(Norm(Linear(h))))``."""

    def __init__(self, width: int, *, norm: NormSpec, activation: str, masked_norm: bool) -> None:
        super().__init__()
        self.norm = make_norm(norm, width, dims=0)
        self.fc1 = nn.Linear(width, width, bias=not has_norm(self.norm))
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(width, width)
        self.masked_norm = masked_norm

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = apply_token_norm(self.norm, self.fc1(h), mask, self.masked_norm)
        return h + self.fc2(self.act(z))


class SequenceNet(nn.Module):
    """Linear token projection, ``depth`` residual position-wise blocks, masked mean pool, Linear.

    Input ``x`` is (N, L, D + 1): D feature channels and a last mask channel (1 = real token).
    Padding never reaches the output through the pooling; it reaches BatchNorm's statistics
    unless ``masked_norm=True``.

    Args:
        in_features: D, the feature channels (the mask channel not counted).
        num_classes: output size.
        width: hidden size of every token.
        depth: number of residual blocks.
        norm: for ``create_norm(..., dims=0)`` applied per token over the feature dimension.
            "instance" needs spatial positions and is rejected.
        activation: "relu", "sigmoid" or "tanh".
        masked_norm: normalize real tokens only.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        width: int = 64,
        depth: int = 2,
        norm: NormSpec = "layer",
        activation: str = "relu",
        masked_norm: bool = False,
    ) -> None:
        super().__init__()
        check_activation(activation)
        self.in_features = in_features
        self.proj = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(
            SequenceBlock(width, norm=norm, activation=activation, masked_norm=masked_norm) for _ in range(depth)
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.in_features + 1:
            raise ValueError(
                f"SequenceNet expects x of shape (N, L, {self.in_features + 1}) (features + mask channel), "
                f"got {tuple(x.shape)}"
            )
        mask = x[..., -1] > 0.5
        m = mask.unsqueeze(-1).to(x.dtype)
        h = self.proj(x[..., :-1]) * m  # padding starts as zeros
        for block in self.blocks:
            h = block(h, mask)
        pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        return self.head(pooled)
