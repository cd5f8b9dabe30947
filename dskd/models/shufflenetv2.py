"""CIFAR ShuffleNetV2 (RepDistiller's `ShuffleV2`, net size 1: 1x1 stem, no stem pooling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dskd.models.base import FeatureClassifier, conv_bn_relu, init_weights
from dskd.models.registry import register_model


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave channel groups without reading runtime shapes (keeps ONNX batch dynamic)."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class ShuffleUnit(nn.Module):
    """Split channels in half, transform the second half, concatenate, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.split = channels // 2
        half = channels - self.split
        self.branch = nn.Sequential(
            conv_bn_relu(half, half, 1),
            conv_bn_relu(half, half, 3, groups=half, relu=False),
            conv_bn_relu(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, change = x[:, : self.split], x[:, self.split :]
        return channel_shuffle(torch.cat([keep, self.branch(change)], 1))


class DownUnit(nn.Module):
    """Two stride-2 branches over the full input, concatenated to `out_ch`, then shuffled."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = out_ch // 2
        self.left = nn.Sequential(
            conv_bn_relu(in_ch, in_ch, 3, stride=2, groups=in_ch, relu=False),
            conv_bn_relu(in_ch, mid, 1),
        )
        self.right = nn.Sequential(
            conv_bn_relu(in_ch, mid, 1),
            conv_bn_relu(mid, mid, 3, stride=2, groups=mid, relu=False),
            conv_bn_relu(mid, mid, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1))


class CifarShuffleNetV2(FeatureClassifier):
    """1x1 stem, three stages each opened by a DownUnit (32 -> 4), 1x1 conv to the head width."""

    def __init__(
        self,
        stage_channels: tuple[int, int, int],
        stage_units: tuple[int, int, int],
        head_channels: int,
        num_classes: int,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_ch = 24
        stages: list[nn.Module] = []
        for out_ch, units in zip(stage_channels, stage_units, strict=True):
            stages.append(nn.Sequential(DownUnit(in_ch, out_ch), *(ShuffleUnit(out_ch) for _ in range(units))))
            in_ch = out_ch
        self.layers = nn.Sequential(*stages)
        self.conv2 = nn.Conv2d(in_ch, head_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head_channels)
        self.num_features = head_channels
        self.fc = nn.Linear(self.num_features, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return F.relu(self.bn2(self.conv2(x)))


@register_model
def shufflenetv2(num_classes: int, in_chans: int = 3) -> CifarShuffleNetV2:
    return CifarShuffleNetV2((116, 232, 464), (3, 7, 3), 1024, num_classes, in_chans)
