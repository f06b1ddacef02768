"""Small convolutional classifiers for 1-D signals (MNIST-1D) and images (digits, MNIST)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from batchlab.models.common import check_activation, has_norm, make_activation, make_norm
from batchlab.norm.registry import NormSpec


def conv_norm_act(
    conv: type[nn.Conv1d] | type[nn.Conv2d],
    in_ch: int,
    out_ch: int,
    *,
    kernel_size: int,
    stride: int = 1,
    norm: NormSpec,
    activation: str,
    dims: int,
) -> nn.Sequential:
    """``Conv -> Norm -> Act`` with ``bias=False`` on the conv when the norm is real."""
    nl = make_norm(norm, out_ch, dims=dims)
    c = conv(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=not has_norm(nl))
    return nn.Sequential(c, nl, make_activation(activation))


class CNN1d(nn.Module):
    """Strided 1-D CNN: ``len(channels)`` blocks of Conv1d(stride 2) -> Norm -> Act, then Linear.

    After the convolutions the features are flattened (position matters in MNIST-1D, so no
    global pooling). The default has about 12k parameters.

    Args:
        in_channels: input channels (1 for MNIST-1D).
        num_classes: output size.
        channels: output channels of each conv block.
        input_length: signal length L of the (N, in_channels, L) input.
        kernel_size: odd kernel width.
        norm: for ``create_norm(..., dims=1)``.
        activation: "relu", "sigmoid" or "tanh".
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 32, 32),
        *,
        input_length: int = 40,
        kernel_size: int = 5,
        norm: NormSpec = "batch",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        check_activation(activation)
        blocks, ch, length = [], in_channels, input_length
        for c in channels:
            blocks.append(conv_norm_act(nn.Conv1d, ch, c, kernel_size=kernel_size, stride=2, norm=norm,
                                        activation=activation, dims=1))
            ch, length = c, (length + 1) // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(ch * length, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CNN2d(nn.Module):
    """Small image CNN: blocks of Conv3x3 -> Norm -> Act -> MaxPool(2), then flatten and Linear.

    Defaults (16 and 32 channels) suit 8x8 digits (8 -> 4 -> 2); for 28x28 MNIST pass
    ``input_size=28`` (28 -> 14 -> 7).

    Args:
        in_channels: image channels.
        num_classes: output size.
        channels: output channels of each block; each block halves height and width.
        input_size: height (= width) of the input images.
        norm: for ``create_norm(..., dims=2)``.
        activation: "relu", "sigmoid" or "tanh".
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32),
        *,
        input_size: int = 8,
        norm: NormSpec = "batch",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        check_activation(activation)
        blocks: list[nn.Module] = []
        ch, size = in_channels, input_size
        for c in channels:
            if size < 2:
                raise ValueError(f"input_size={input_size} is too small for {len(channels)} pooling blocks")
            blocks += [conv_norm_act(nn.Conv2d, ch, c, kernel_size=3, norm=norm, activation=activation, dims=2),
                       nn.MaxPool2d(2)]
            ch, size = c, size // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(ch * size * size, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
