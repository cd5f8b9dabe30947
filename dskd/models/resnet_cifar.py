"""CIFAR ResNets (depth 6n+2, three stages) as used by the RepDistiller / mdistiller benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dskd.models.base import FeatureClassifier, init_weights
from dskd.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs with identity or 1x1-projection shortcut, ReLU after the sum."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(FeatureClassifier):
    """Stem 3x3 conv at full resolution, stages at strides 1, 2, 2 (32 -> 8 at CIFAR size)."""

    def __init__(
        self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_chans: int = 3
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, stride=2)
        self.num_features = widths[3]
        self.fc = nn.Linear(self.num_features, num_classes)
        init_weights(self)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_ch, out_ch, stride)]
        layers += [BasicBlock(out_ch, out_ch, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


_NARROW = (16, 16, 32, 64)
_WIDE_X4 = (32, 64, 128, 256)


@register_model
def resnet8(num_classes: int, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(8, _NARROW, num_classes, in_chans)


@register_model
def resnet14(num_classes: int, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(14, _NARROW, num_classes, in_chans)


@register_model
def resnet20(num_classes: int, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(20, _NARROW, num_classes, in_chans)


@register_model
def resnet32(num_classes: int, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(32, _NARROW, num_classes, in_chans)


@register_model
def resnet44(num_classes: int, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(44, _NARROW, num_classes, in_chans)


@register_model
def resnet56(num_classes: int, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(56, _NARROW, num_classes, in_chans)


@register_model
def resnet110(num_classes: int, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(110, _NARROW, num_classes, in_chans)


@register_model
def resnet8x4(num_classes: int, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(8, _WIDE_X4, num_classes, in_chans)


@register_model
def resnet32x4(num_classes: int, in_chans: int = 3) -> CifarResNet:
    return CifarResNet(32, _WIDE_X4, num_classes, in_chans)
