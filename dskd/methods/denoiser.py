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

    def forward(self, x: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        y = self.block(x)
        if film is not None:  # scale/shift AFTER the block's last BN, so the norm cannot remove it
            scale, shift = film
            y = torch.addcmul(shift, y, 1.0 + scale)
        return x + y


class Denoiser(nn.Module):
    """Learned per-channel timestep embedding, two bottlenecks, then 1×1 conv + BN → noise.

    The final BN makes the output unit-variance per channel at initialisation, the scale
    of the Gaussian noise it must predict.

    `time_cond = "add"` (the original) only adds the embedding to the input, and the BNs
    remove a per-channel constant: with one t for the whole batch, as sampling calls it in
    train mode, ε_θ barely depends on t (issue 14). `"film"` also applies a learned per-t
    scale and shift after each bottleneck's last BN and after the output BN, where no norm
    follows on that path; zero-initialised, so it starts as the "add" denoiser.
    """

    TIME_CONDS = ("add", "film")

    def __init__(self, channels: int, num_train_timesteps: int = 1000, time_cond: str = "add") -> None:
        super().__init__()
        if time_cond not in self.TIME_CONDS:
            raise ValueError(f"time_cond must be one of {self.TIME_CONDS}, got {time_cond!r}")
        self.channels = channels
        self.time_cond = time_cond
        self.time_embed = nn.Embedding(num_train_timesteps, channels)
        self.blocks = nn.Sequential(Bottleneck(channels), Bottleneck(channels))
        self.out = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        if time_cond == "film":  # (scale, shift) for both bottlenecks and the output: 6 × C per step
            self.time_film = nn.Embedding(num_train_timesteps, 6 * channels)
            nn.init.zeros_(self.time_film.weight)

    @staticmethod
    def _rows(table: nn.Embedding, t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Embedding rows for t as B×D×1×1 (or 1×D×1×1 for one host-side t), in x's dtype."""
        if not isinstance(t, torch.Tensor):  # one step for the whole batch: a row of the table, broadcast
            return table.weight[int(t)].to(x.dtype).view(1, -1, 1, 1)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        rows = table(t.to(x.device, torch.long)).to(x.dtype)
        return rows.view(*rows.shape, 1, 1)

    def forward(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        h = x + self._rows(self.time_embed, t, x)
        if self.time_cond == "add":
            return self.out(self.blocks(h))
        s1, b1, s2, b2, s3, b3 = self._rows(self.time_film, t, x).chunk(6, dim=1)
        h = self.blocks[1](self.blocks[0](h, (s1, b1)), (s2, b2))
        return torch.addcmul(b3, self.out(h), 1.0 + s3)
