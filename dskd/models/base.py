"""Shared classifier contract: features -> global average pool -> `fc`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeatureClassifier(nn.Module):
    """Base for every zoo model so distillers, exporters and profilers see one interface.

    Subclasses build `self.fc` (an `nn.Linear` over `num_features` inputs) and
    implement `forward_features`; the head is shared.
    """

    num_features: int
    fc: nn.Linear

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last feature map, B x num_features x H x W."""
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool + flatten + linear: logits from the last feature map.

        pre_logits=True stops before `fc` and returns the pooled B x num_features vector (timm's
        convention), so a method that needs pooled features does not pool by hand.
        """
        pooled = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def init_weights(model: nn.Module) -> None:
    """He-normal convs, unit BN, small linear weights: the usual CIFAR-zoo initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def conv_bn_relu(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    """Conv (no bias) + BN (+ ReLU), 'same' padding for odd kernels."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
