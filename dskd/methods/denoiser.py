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
    PRECISIONS = ("autocast", "float32", "auto")

    def __init__(self, channels: int, num_train_timesteps: int = 1000, time_cond: str = "add",
                 norm: str = "batch", precision: str = "autocast") -> None:
        super().__init__()
        if time_cond not in self.TIME_CONDS:
            raise ValueError(f"time_cond must be one of {self.TIME_CONDS}, got {time_cond!r}")
        if norm not in self.NORMS:
            raise ValueError(f"norm must be one of {self.NORMS}, got {norm!r}")
        if precision not in self.PRECISIONS:
            raise ValueError(f"precision must be one of {self.PRECISIONS}, got {precision!r}")
        self.channels = channels
        self.time_cond = time_cond
        self.norm = norm
        self.precision = precision
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

    def runs_float32(self, device: torch.device) -> bool:
        """Whether calls on `device` leave the caller's autocast for float32 (issue 15).

        "auto" does so on CPU only, where the GroupNorms run in float32 anyway and bf16 convolutions
        on these small maps (16-64 channels, 8×8) save nothing; float32 is the exact arithmetic of the
        oracle, and its no-grad chain calls run NCHW (`_fused_layout`, `_conv`), which made a whole
        DSKD step cheaper than under bf16 autocast in every run of bench/step_cost.py's v4 tables
        (rows dskd and dskd_v2_bf16). On a GPU the caller's autocast stays.
        """
        return self.precision == "float32" or (self.precision == "auto" and device.type == "cpu")

    def forward(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        if self.runs_float32(x.device):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self._forward_any(x.float(), t)
        return self._forward_any(x, t)

    def _forward_any(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        if self.norm == "group":
            return self._forward_fused(x, t)
        return self.forward_modules(x, t)

    def forward_modules(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Module by module (each GroupNorm on a contiguous float32 copy): the BatchNorm path, and
        the oracle the fused GroupNorm path is tested against (tests/test_denoiser_time.py)."""
        h = x + self._rows(self.time_embed, t, x)
        if self.time_cond == "add":
            return self.out(self.blocks(h))
        s1, b1, s2, b2, s3, b3 = self._rows(self.time_film, t, x).chunk(6, dim=1)
        h = self.blocks[1](self.blocks[0](h, (s1, b1)), (s2, b2))
        return torch.addcmul(b3, self.out(h), 1.0 + s3)

    def _forward_fused(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The GroupNorm denoiser in one layout (channels-last) with float32 between the convs (issue 15).

        Same function as `forward_modules`, fewer and cheaper ops: no layout or dtype round trips
        around every norm (under bf16 autocast the convs still run in bf16: autocast casts their
        float32 inputs, at the point where the module path cast the norm's output), and for one
        host-side t (the DDIM chain) each FiLM folds into its norm's affine, γ(1+s) and β(1+s)+b.
        """
        x = x.float()
        layout = _fused_layout(x)
        x = x.contiguous(memory_format=layout)
        h = x + self._rows(self.time_embed, t, x)
        film = self._rows(self.time_film, t, x).chunk(6, dim=1) if self.time_cond == "film" else None
        for i, block in enumerate(self.blocks):
            conv1, norm1, _, conv2, norm2, _, conv3, norm3 = block.block
            u = _group_norm(norm1, _conv(conv1, h, layout)).relu_()
            u = _group_norm(norm2, _conv(conv2, u, layout)).relu_()
            h = h + _film_norm(norm3, _conv(conv3, u, layout), film[2 * i: 2 * i + 2] if film else None)
        conv, norm = self.out
        return _film_norm(norm, _conv(conv, h, layout), film[4:6] if film else None)


def _fused_layout(x: torch.Tensor) -> torch.memory_format:
    """Channels-last, except for calls without autograd or autocast on CPU (the float32 no-grad chain).

    `x` is already float32 here (`_forward_fused` casts it), so autocast decides the convs' dtype.

    Why (CPU, torch 2.13, 128×64×8×8 maps, timed while writing this): float32 GroupNorm's NCHW
    kernel beats its channels-last one, which decides a no-grad call; with autograd the channels-last
    convolution backward wins, and bf16 convolutions are slower in NCHW (issue 15). The layout
    changes the speed, not the result.
    """
    if not torch.is_grad_enabled() and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        return torch.contiguous_format
    return torch.channels_last


def _conv(conv: nn.Conv2d, u: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """`conv(u)`, with an NCHW copy of the weight when the maps are NCHW, so the output stays NCHW.

    Why: the trainer converts the whole distiller to channels-last (`TrainConfig.channels_last`), and
    a channels-last weight makes a channels-last output whatever the input's layout. So the no-grad
    chain meant to run NCHW ran channels-last in training after all, paying a layout copy and the
    slow channels-last GroupNorm around every conv (issue 15; CPU, the bench's resnet20 → resnet8
    DSKD after trainer-style channels-last conversion, one chain of 5 calls timed alone while writing
    this: ~80 ms with the weights as stored, ~38 ms with NCHW copies). The copies are a few KB each;
    the result is the same to float32 rounding. With autograd the maps are channels-last like the
    weights (`_fused_layout`), and the weight is used as stored.
    """
    weight = conv.weight
    # strides, not is_contiguous(): a channels-last 1×1 weight passes that test in either layout
    if layout == torch.contiguous_format and weight.stride() != _nchw_strides(weight):
        return conv._conv_forward(u, weight.clone(memory_format=torch.contiguous_format), conv.bias)
    return conv(u)  # the module call: forward hooks (the MAC counter of cost reports) see it


def _nchw_strides(t: torch.Tensor) -> tuple[int, ...]:
    """The strides of a dense NCHW tensor of t's (4-d) shape."""
    _, c, h, w = t.shape
    return (c * h * w, h * w, w, 1)


def _group_norm(norm: nn.Module, u: torch.Tensor, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """`norm` (a GroupNorm) on `u` in float32, in u's layout, optionally with another affine."""
    with torch.autocast(device_type=u.device.type, enabled=False):
        return F.group_norm(u.float(), norm.num_groups, norm.weight if weight is None else weight,
                            norm.bias if bias is None else bias, norm.eps)


def _film_norm(norm: nn.Module, u: torch.Tensor, film: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
    """FiLM(norm(u)) = shift + norm(u)·(1 + scale); folded into the norm's affine for one shared t."""
    if film is None:
        return _group_norm(norm, u)
    scale, shift = film
    if scale.shape[0] == 1:  # one t for the batch: (γ, β) → (γ(1+s), β(1+s)+b), one op on the map
        gain = 1.0 + scale.reshape(-1)
        return _group_norm(norm, u, norm.weight * gain, torch.addcmul(shift.reshape(-1), norm.bias, gain))
    return torch.addcmul(shift, _group_norm(norm, u), 1.0 + scale)
