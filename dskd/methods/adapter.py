"""1×1 conv + BN mapping features between widths (DSKD adapter, FitNet regressor, projections)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvAdapter(nn.Module):
    """1×1 conv + BN, `in_ch → out_ch`; identity-initialised conv when the widths match."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        if in_ch == out_ch:
            with torch.no_grad():
                self.conv.weight.copy_(torch.eye(in_ch).reshape(in_ch, in_ch, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same map with detached weights and no running-stat update.

        Used where the adapter is a fixed part of a guide (the teacher classifier's input
        map), so only its own loss trains it and guidance passes leave its BN stats alone.
        """
        y = F.conv2d(x, self.conv.weight.detach().to(x.dtype))
        bn = self.bn
        return F.batch_norm(
            y,
            None if self.training else bn.running_mean,
            None if self.training else bn.running_var,
            bn.weight.detach().to(y.dtype),
            bn.bias.detach().to(y.dtype),
            training=self.training,
            eps=bn.eps,
        )

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Least-squares inverse of the running-stat (eval) map: `out_ch`-features → `in_ch`."""
        bn = self.bn
        with torch.autocast(device_type=y.device.type, enabled=False):
            return self._pseudo_inverse(y, bn)

    def _pseudo_inverse(self, y: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
        scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().double()
        weight = scale[:, None] * self.conv.weight.detach().double().flatten(1)  # out × in
        shift = bn.bias.detach().double() - scale * bn.running_mean.double()
        inverse = torch.linalg.pinv(weight)  # in × out
        centred = y.double() - shift[None, :, None, None]
        return torch.einsum("io,bohw->bihw", inverse, centred).to(y.dtype)


def match_spatial(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a feature map to `size`: average-pool when shrinking, nearest when growing."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="nearest")
