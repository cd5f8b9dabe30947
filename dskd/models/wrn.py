"""Wide ResNets (pre-activation, depth 6n+4) as used by the RepDistiller / mdistiller benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dskd.models.base import FeatureClassifier, init_weights
from dskd.models.registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; a width/stride change projects the *pre-activated* input."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        shortcut = x if self.shortcut is None else self.shortcut(act)
        return out + shortcut


class WideResNet(FeatureClassifier):
    """Stem conv, three pre-activation stages, final BN-ReLU before pooling."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_chans: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.block1 = self._stage(widths[0], widths[1], blocks, 1)
        self.block2 = self._stage(widths[1], widths[2], blocks, 2)
        self.block3 = self._stage(widths[2], widths[3], blocks, 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.num_features = widths[3]
        self.fc = nn.Linear(self.num_features, num_classes)
        init_weights(self)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [PreActBlock(in_ch, out_ch, stride)]
        layers += [PreActBlock(out_ch, out_ch, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return F.relu(self.bn1(x))


@register_model
def wrn_16_2(num_classes: int, in_chans: int = 3) -> WideResNet:
    return WideResNet(16, 2, num_classes, in_chans)


@register_model
def wrn_40_1(num_classes: int, in_chans: int = 3) -> WideResNet:
    return WideResNet(40, 1, num_classes, in_chans)


@register_model
def wrn_40_2(num_classes: int, in_chans: int = 3) -> WideResNet:
    return WideResNet(40, 2, num_classes, in_chans)
