"""Normalization and batched GPU/CPU augmentation of uint8 images.

Augmentation works on a whole batch with one flat gather (airbench/hlb-CIFAR10 style): no
per-image Python loop, runs on whatever device the batch is on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _stats(values: Sequence[float], channels: int, what: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32, device=device).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{what} has {t.numel()} values for {channels} channels")
    return t.view(channels, 1, 1)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (…×C×H×W) -> float32 `(x/255 - mean)/std`, the same formula the runtimes use."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {x.dtype}")
    c = x.shape[-3]
    m = _stats(mean, c, "mean", x.device)
    s = _stats(std, c, "std", x.device)
    return (x.to(torch.float32) / 255.0 - m) / s


def _randint(high: int, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, (n,), generator=generator, device=gen_device).to(device)


def augment(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], pad: int = 4,
            flip: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (zero padding of `pad` pixels) + random horizontal flip, then normalize.

    x: uint8 N×C×H×W on any device -> float32 N×C×H×W on that device. With a seeded
    `generator` the result is reproducible (draws: row shifts, column shifts, flips).
    """
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise TypeError(f"augment expects a uint8 N×C×H×W batch, got {x.dtype} with shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    dev = x.device
    if n == 0:
        return normalize(x, mean, std)
    rows = torch.arange(h, device=dev).expand(n, h)
    cols = torch.arange(w, device=dev).expand(n, w)
    if pad > 0:
        x = F.pad(x, (pad, pad, pad, pad))
        rows = rows + _randint(2 * pad + 1, n, generator, dev)[:, None]
        cols = cols + _randint(2 * pad + 1, n, generator, dev)[:, None]
    if flip:
        flipped = _randint(2, n, generator, dev).bool()
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    # One gather over the flattened padded plane picks each image's rows and columns.
    width = x.shape[-1]
    index = (rows[:, :, None] * width + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    out = x.reshape(n, c, -1).gather(2, index).view(n, c, h, w)
    return normalize(out, mean, std)
