"""CIFAR MobileNetV2 (RepDistiller's `mobile_half`: expansion 6, width 0.5, 1280-d head conv)."""

from __future__ import annotations

import torch
from torch import nn

from dskd.models.base import FeatureClassifier, conv_bn_relu, init_weights
from dskd.models.registry import register_model


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection; residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.use_residual = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(
            conv_bn_relu(in_ch, hidden, 1),
            conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            conv_bn_relu(hidden, out_ch, 1, relu=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(FeatureClassifier):
    """Stride-2 stem, seven inverted-residual stages, 1x1 conv to `last_channel` (32 -> 2)."""

    # (expansion, channels, repeats, first stride); expansion None = use T
    _SETTING = (
        (1, 16, 1, 1),
        (None, 24, 2, 1),
        (None, 32, 3, 2),
        (None, 64, 4, 2),
        (None, 96, 3, 1),
        (None, 160, 3, 2),
        (None, 320, 1, 1),
    )

    def __init__(
        self, expansion: int, width: float, num_classes: int, in_chans: int = 3
    ) -> None:
        super().__init__()
        in_ch = int(32 * width)
        self.conv1 = conv_bn_relu(in_chans, in_ch, 3, stride=2)
        stages: list[nn.Module] = []
        for t, channels, repeats, stride in self._SETTING:
            out_ch = int(channels * width)
            blocks = []
            for i in range(repeats):
                blocks.append(InvertedResidual(in_ch, out_ch, stride if i == 0 else 1, t or expansion))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        last_channel = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = conv_bn_relu(in_ch, last_channel, 1)
        self.num_features = last_channel
        self.fc = nn.Linear(self.num_features, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.blocks(self.conv1(x)))


@register_model
def mobilenetv2(num_classes: int, in_chans: int = 3) -> CifarMobileNetV2:
    return CifarMobileNetV2(6, 0.5, num_classes, in_chans)
