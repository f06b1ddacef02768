"""CIFAR-style residual networks (He et al., 2016, section 4.2): depth 6n+2, widths 16/32/64."""

from __future__ import annotations

import torch
import torch.nn as nn

from batchlab.models.common import check_activation, has_norm, make_activation, make_norm
from batchlab.norm.registry import NormSpec


class BasicBlock(nn.Module):
    """Two 3x3 convs with norms; a 1x1 conv + norm shortcut when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, norm: NormSpec, activation: str) -> None:
        super().__init__()
        self.bn1 = make_norm(norm, out_ch, dims=2)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=not has_norm(self.bn1))
        self.act1 = make_activation(activation)
        self.bn2 = make_norm(norm, out_ch, dims=2)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=not has_norm(self.bn2))
        self.act2 = make_activation(activation)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            sn = make_norm(norm, out_ch, dims=2)
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=not has_norm(sn)), sn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet for 32x32 images: a 3x3 stem, three stages of ``n`` basic blocks, average pool, Linear.

    Args:
        depth: 6n + 2 layers (8, 14, 20, 32, 44, 56, 110 ...).
        num_classes: output size.
        in_channels: image channels.
        widths: channels of the three stages (16, 32, 64 in the paper).
        norm: for ``create_norm(..., dims=2)``.
        activation: "relu", "sigmoid" or "tanh".

    The shortcut where the shape changes is a strided 1x1 conv with a norm (the paper's option B)
    rather than zero-padding, so every tensor addition has matching, prunable channels.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        norm: NormSpec = "batch",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth!r}")
        check_activation(activation)
        n = (depth - 2) // 6
        self.depth = depth
        self.bn1 = make_norm(norm, widths[0], dims=2)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=not has_norm(self.bn1))
        self.act1 = make_activation(activation)
        stages = []
        ch = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(ch, w, stride, norm=norm, activation=activation))
                ch = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet8(num_classes: int = 10, *, norm: NormSpec = "batch", activation: str = "relu", **kw: object) -> ResNet:
    """ResNet-8 (n = 1), about 78k parameters."""
    return ResNet(8, num_classes, norm=norm, activation=activation, **kw)  # type: ignore[arg-type]


def resnet20(num_classes: int = 10, *, norm: NormSpec = "batch", activation: str = "relu", **kw: object) -> ResNet:
    """ResNet-20 (n = 3), about 0.27M parameters."""
    return ResNet(20, num_classes, norm=norm, activation=activation, **kw)  # type: ignore[arg-type]
