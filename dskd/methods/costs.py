"""Compute cost of training-only modules, to set next to the teacher's forward pass."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def module_macs(module: nn.Module, *inputs: Any) -> int:
    """Conv2d + Linear multiply-accumulates of one forward on `inputs` (batch 1 expected).

    Runs in eval mode without grad and restores the mode, so BN statistics are untouched.
    """
    total = 0

    def hook(mod: nn.Module, _inp: tuple[Any, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total += out[0].numel() * (mod.in_channels // mod.groups) * kh * kw
        else:
            total += out[0].numel() * mod.in_features  # type: ignore[union-attr]

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(*inputs)
    finally:
        module.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def feature_shape(model: nn.Module, input_size: int, in_chans: int) -> tuple[int, int, int]:
    """(C, H, W) of `model.forward_features` for one input of the given size."""
    first = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            x = torch.zeros(1, in_chans, input_size, input_size, device=first.device, dtype=first.dtype)
            out = model.forward_features(x)  # type: ignore[operator]
    finally:
        model.train(was_training)
    return tuple(out.shape[1:])  # type: ignore[return-value]


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
