"""Pieces of DSKD's feature diffusion that are not the denoiser: feature scaling and DDIM inversion.

Why a feature scale: a last feature map has per-element RMS ≈ 0.4 (student) or any other scale
(teacher), while the diffusion noise has unit variance; at t0 = 100 the noise std √(1−ᾱ) ≈ 0.3
is then most of the signal. `FeatureStats` keeps per-channel running mean/variance of what the
denoiser learns and the chain works on (f − μ)/σ. When the denoiser learns the frozen teacher's
features those statistics are stationary, so after the first batches the map is fixed.
"""

from __future__ import annotations

import torch
from torch import nn

from dskd.methods.schedule import DiffusionSchedule


class FeatureStats(nn.Module):
    """Per-channel running mean/variance: exact average over the first `warm` batches, then an EMA.

    Buffers (saved for resume, never trained). Normalising uses the running values, never the
    batch's own, so a sample's normalised features do not depend on its batch.
    """

    def __init__(self, channels: int, enabled: bool = True, momentum: float = 0.01, warm: int = 50) -> None:
        super().__init__()
        self.enabled = enabled
        self.momentum = momentum
        self.warm = warm
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self._seen_host: int | None = None  # host mirror of `seen` (no device read per step)

    def observe(self, f: torch.Tensor) -> None:
        """Fold a batch's per-channel statistics (B×C×H×W or B×C) into the running ones (train mode)."""
        if not (self.enabled and self.training):
            return
        if self._seen_host is None:
            self._seen_host = int(self.seen)
        n = self._seen_host
        with torch.no_grad():
            dims = (0, 2, 3) if f.dim() == 4 else (0,)
            var, mean = torch.var_mean(f.detach().float(), dim=dims)
            keep = n / (n + 1) if n < self.warm else 1.0 - self.momentum
            self.mean.mul_(keep).add_(mean, alpha=1.0 - keep)
            self.var.mul_(keep).add_(var, alpha=1.0 - keep)
            self.seen += 1
        self._seen_host = n + 1

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._seen_host = None

    def scale(self) -> torch.Tensor | None:
        """σ per channel (None when disabled: the identity map)."""
        return (self.var + 1e-5).sqrt() if self.enabled else None

    def _view(self, v: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, 1, 1) if f.dim() == 4 else v.view(1, -1)

    def normalise(self, f: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return f.float()
        s = self.scale()
        assert s is not None
        return (f.float() - self._view(self.mean, f)) / self._view(s, f)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        s = self.scale()
        assert s is not None
        return torch.addcmul(self._view(self.mean, x), x, self._view(s, x))


def ddim_invert(denoiser: nn.Module, schedule: DiffusionSchedule, x0: torch.Tensor, t0: int,
                steps: int) -> torch.Tensor:
    """Deterministic DDIM inversion of clean `x0` up to t0 along the sampling grid (no guidance).

    Each step uses ε_θ at the less noisy end (the usual approximation), so unguided DDIM from the
    result reconstructs x0 up to the denoiser's inconsistency, with no random-noise error: the
    issue's (c) target. Runs without autograd.
    """
    pairs = schedule.sampling_timesteps(t0, steps)
    x = x0
    with torch.no_grad():
        for t, t_prev in reversed(pairs):  # clean → t0: from t_prev up to t
            eps = denoiser(x, max(t_prev, 0)).float()
            c_x, c_eps = schedule.ddim_coefficients(t_prev, t)
            x = torch.add(x * c_x, eps, alpha=c_eps)
    return x
