"""DiffKD-sized noise predictor ε_θ(x_t, t) on feature maps: small next to any teacher."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def make_norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm (the original) or GroupNorm (per-sample statistics: no batch coupling).

    GroupNorm's statistics come from one sample alone, so the noise estimate for a sample does
    not depend on which other samples (or timesteps) share its batch, and train and eval mode
    compute the same function: the DDIM chain sees the denoiser L_diff trained.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return ContiguousGroupNorm(math.gcd(channels, 8), channels)


class ContiguousGroupNorm(nn.GroupNorm):
    """GroupNorm in float32 on a contiguous copy, output in the input's dtype.

    Measured on CPU (torch 2.13): the kernel on channels-last maps (as the trainer lays them out)
    and in bf16 (under autocast) is each several times slower; these maps are small, the copies
    are not. Statistics in float32 are also the more accurate ones.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.group_norm(x.contiguous().float(), self.num_groups, self.weight, self.bias, self.eps)
        return out.to(x.dtype)


class Bottleneck(nn.Module):
    """Residual 1×1 → 3×3 → 1×1 bottleneck (C → C/4 → C), norm+ReLU inside, linear sum out."""

    def __init__(self, channels: int, reduction: int = 4, norm: str = "batch") -> None:
        super().__init__()
        mid = max(channels // reduction, 1)
        self.block = nn.Sequential(
            nn.Conv2d(channels, mid, 1, bias=False),
            make_norm(norm, mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            make_norm(norm, mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, channels, 1, bias=False),
            make_norm(norm, channels),
        )

    def forward(self, x: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        y = self.block(x)
        if film is not None:  # scale/shift AFTER the block's last norm, so the norm cannot remove it
            scale, shift = film
            y = torch.addcmul(shift, y, 1.0 + scale)
        return x + y


class Denoiser(nn.Module):
    """Learned per-channel timestep embedding, two bottlenecks, then 1×1 conv + norm → noise.

    The final norm makes the output unit-variance at initialisation, the scale of the
    Gaussian noise it must predict.

    `time_cond = "add"` (the original) only adds the embedding to the input, and the norms
    remove a per-channel constant: with one t for the whole batch, as sampling calls it in
    train mode, a BatchNorm denoiser barely depends on t (issue 14). `"film"` also applies a
    learned per-t scale and shift after each bottleneck's last norm and after the output norm,
    where no norm follows on that path; zero-initialised, so it starts as the "add" denoiser.
    `norm = "group"` replaces every BatchNorm by a GroupNorm (see `make_norm`).

    The constructor's defaults are the original denoiser (the DiffKD-style baseline builds it
    so); DSKD passes its own options (`denoiser_time`, `denoiser_norm`).
    """

    TIME_CONDS = ("add", "film")
    NORMS = ("batch", "group")

    def __init__(self, channels: int, num_train_timesteps: int = 1000, time_cond: str = "add",
                 norm: str = "batch") -> None:
        super().__init__()
        if time_cond not in self.TIME_CONDS:
            raise ValueError(f"time_cond must be one of {self.TIME_CONDS}, got {time_cond!r}")
        if norm not in self.NORMS:
            raise ValueError(f"norm must be one of {self.NORMS}, got {norm!r}")
        self.channels = channels
        self.time_cond = time_cond
        self.norm = norm
        self.time_embed = nn.Embedding(num_train_timesteps, channels)
        self.blocks = nn.Sequential(Bottleneck(channels, norm=norm), Bottleneck(channels, norm=norm))
        self.out = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), make_norm(norm, channels))
        if time_cond == "film":  # (scale, shift) for both bottlenecks and the output: 6 × C per step
            self.time_film = nn.Embedding(num_train_timesteps, 6 * channels)
            nn.init.zeros_(self.time_film.weight)

    @staticmethod
    def _rows(table: nn.Embedding, t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Embedding rows for t as B×D×1×1 (or 1×D×1×1 for one host-side t), in x's dtype."""
        if not isinstance(t, torch.Tensor):  # one step for the whole batch: a row of the table, broadcast
            return table.weight[max(int(t), 0)].to(x.dtype).view(1, -1, 1, 1)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        rows = table(t.to(x.device, torch.long).clamp(min=0)).to(x.dtype)
        return rows.view(*rows.shape, 1, 1)

    def forward(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        h = x + self._rows(self.time_embed, t, x)
        if self.time_cond == "add":
            return self.out(self.blocks(h))
        s1, b1, s2, b2, s3, b3 = self._rows(self.time_film, t, x).chunk(6, dim=1)
        h = self.blocks[1](self.blocks[0](h, (s1, b1)), (s2, b2))
        return torch.addcmul(b3, self.out(h), 1.0 + s3)
