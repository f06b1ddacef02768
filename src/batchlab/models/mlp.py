"""A multi-layer perceptron as a flat ``nn.Sequential``: [Flatten, (Linear, Norm, Act) x k, Linear]."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from batchlab.models.common import check_activation, has_norm, make_activation, make_norm
from batchlab.norm.registry import NormSpec

NORM_POSITIONS = ("before", "after")


class MLP(nn.Sequential):
    """Fully connected classifier; inputs of any shape (N, ...) are flattened first.

    Each hidden layer is ``Linear -> Norm -> Act`` (``norm_position="before"`` the activation, as
    in Ioffe & Szegedy 2015) or ``Linear -> Act -> Norm`` ("after"). A Linear directly followed by
    a real normalization has no bias (the norm's shift replaces it). The flat ``nn.Sequential``
    layout lets BN folding and channel pruning find each Linear/Norm pair by position.

    Args:
        in_features: flattened input size.
        hidden: widths of the hidden layers (may be empty: a linear model).
        num_classes: output size.
        norm: name ("batch", "group", "layer", "none"...), class or partial for ``create_norm``
            with ``dims=0``. "instance" needs spatial positions and is rejected for an MLP.
        activation: "relu", "sigmoid" or "tanh".
        norm_position: "before" or "after" the activation.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (100, 100, 100),
        num_classes: int = 10,
        *,
        norm: NormSpec = "batch",
        activation: str = "relu",
        norm_position: str = "before",
    ) -> None:
        if norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position must be one of {', '.join(NORM_POSITIONS)}; got {norm_position!r}")
        check_activation(activation)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            nl = make_norm(norm, h, dims=0)
            if norm_position == "before":
                layers += [nn.Linear(width, h, bias=not has_norm(nl)), nl, make_activation(activation)]
            else:
                layers += [nn.Linear(width, h), make_activation(activation), nl]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
        self.in_features = in_features
        self.num_classes = num_classes
