"""CIFAR VGG with BatchNorm and no FC stack (RepDistiller's `vgg8`/`vgg13` = the `_bn` variants)."""

from __future__ import annotations

import torch
from torch import nn

from dskd.models.base import FeatureClassifier, init_weights
from dskd.models.registry import register_model


def _stage(in_ch: int, widths: list[int]) -> nn.Sequential:
    """3x3 conv (with bias, as in the reference) + BN + ReLU per width."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_ch, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_ch = width
    return nn.Sequential(*layers)


class CifarVGG(FeatureClassifier):
    """Five conv stages; 2x2 max-pool after the first three (32 -> 4), none before the last.

    The reference also pools after stage 3 for 64x64 inputs; this zoo targets CIFAR-sized
    inputs and keeps the forward free of shape-dependent branches for ONNX export.
    """

    def __init__(self, stages: list[list[int]], num_classes: int, in_chans: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        in_ch = in_chans
        for i, widths in enumerate(stages):
            blocks.append(_stage(in_ch, widths))
            if i < 3:
                blocks.append(nn.MaxPool2d(2, 2))
            in_ch = widths[-1]
        self.features = nn.Sequential(*blocks)
        self.num_features = in_ch
        self.fc = nn.Linear(self.num_features, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@register_model
def vgg8(num_classes: int, in_chans: int = 3) -> CifarVGG:
    return CifarVGG([[64], [128], [256], [512], [512]], num_classes, in_chans)


@register_model
def vgg13(num_classes: int, in_chans: int = 3) -> CifarVGG:
    stages = [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]
    return CifarVGG(stages, num_classes, in_chans)
