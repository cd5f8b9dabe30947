"""DiffKD-sized noise predictor ε_θ(x_t, t) on feature maps: small next to any teacher."""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    """Residual 1×1 → 3×3 → 1×1 bottleneck (C → C/4 → C), BN+ReLU inside, linear sum out."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        mid = max(channels // reduction, 1)
        self.block = nn.Sequential(
            nn.Conv2d(channels, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Denoiser(nn.Module):
    """Learned per-channel timestep embedding, two bottlenecks, then 1×1 conv + BN → noise.

    The final BN makes the output unit-variance per channel at initialisation, the scale
    of the Gaussian noise it must predict.
    """

    def __init__(self, channels: int, num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.channels = channels
        self.time_embed = nn.Embedding(num_train_timesteps, channels)
        self.blocks = nn.Sequential(Bottleneck(channels), Bottleneck(channels))
        self.out = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            t = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        elif t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(t.to(x.device, torch.long))
        h = x + emb.to(x.dtype)[:, :, None, None]
        return self.out(self.blocks(h))
