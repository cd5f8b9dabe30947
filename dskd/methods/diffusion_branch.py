"""Pieces of DSKD's feature diffusion that are not the denoiser: feature scaling, DDIM inversion,
noise and pooling helpers, and the cost report (shared with the DiffKD baseline).

Why a feature scale: a last feature map has per-element RMS ≈ 0.4 (student) or any other scale
(teacher), while the diffusion noise has unit variance; at t0 = 100 the noise std √(1−ᾱ) ≈ 0.3
is then most of the signal. `FeatureStats` keeps per-channel running mean/variance of what the
denoiser learns and the chain works on (f − μ)/σ. When the denoiser learns the frozen teacher's
features those statistics are stationary, so after the first batches the map is fixed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dskd.methods import costs
from dskd.methods.base import Distiller
from dskd.methods.denoiser import Denoiser
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
            var, mean = channel_var_mean(f.detach().float())
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


def channel_var_mean(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (unbiased variance, mean) of B×C×H×W or B×C, as torch.var_mean over all but dim 1.

    For maps, two passes of pooling: torch.var_mean over (0, 2, 3) of a channels-last map (the
    trainer's layout) took ~5× as long on CPU (issue 15); the result agrees to float32 rounding
    (a single value per channel gives variance 0, where torch.var_mean gives NaN).
    """
    if f.dim() != 4:
        return torch.var_mean(f, dim=0)
    n = f.shape[0] * f.shape[2] * f.shape[3]
    mean = F.adaptive_avg_pool2d(f, 1).mean(dim=0).view(-1)
    centred = f - mean.view(1, -1, 1, 1)
    hw = f.shape[2] * f.shape[3]
    var = F.adaptive_avg_pool2d(centred * centred, 1).sum(dim=0).view(-1) * (hw / max(n - 1, 1))
    return var, mean


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


def gaussian_like(x: torch.Tensor) -> torch.Tensor:
    """N(0, 1) noise shaped like `x`, drawn in the default (contiguous) layout.

    torch.randn_like keeps a channels-last layout and then fills element by element, ~10×
    slower on CPU than a contiguous draw; the distribution is the same.
    """
    return torch.randn(x.shape, dtype=x.dtype, device=x.device)


def global_pool(f: torch.Tensor) -> torch.Tensor:
    """Mean over positions, B×C×H×W → B×C (adaptive pooling: fast on channels-last maps)."""
    return F.adaptive_avg_pool2d(f, 1).flatten(1)


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error per sample, averaged over the samples `mask` keeps (all if None)."""
    per_sample = (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)
    if mask is None:
        return per_sample.mean()
    w = mask.to(per_sample.dtype)
    return (per_sample * w).sum() / w.sum().clamp(min=1.0)


def diffusion_cost_report(
    distiller: Distiller,
    denoiser: Denoiser,
    feature_model: torch.nn.Module,
    input_size: int,
    in_chans: int,
    calls: int,
    at_student_size: bool = False,
) -> dict[str, int]:
    """Counts for the benchmark's cost table (MACs per sample, batch 1).

    The denoiser runs at the student map's size when `at_student_size` (DSKD, in either space),
    else at the size of the model whose width it has (DiffKD: the teacher's).
    """
    from dskd.models import count_macs

    assert distiller.teacher is not None
    c, h, w = costs.feature_shape(feature_model, input_size, in_chans)
    first = next(denoiser.parameters())
    probe = torch.zeros(1, denoiser.channels, h, w, device=first.device, dtype=first.dtype)
    if c != denoiser.channels and not at_student_size:  # DiffKD's denoiser lives at the teacher's size
        _, h, w = costs.feature_shape(distiller.teacher, input_size, in_chans)
        probe = torch.zeros(1, denoiser.channels, h, w, device=first.device, dtype=first.dtype)
    denoiser_macs = costs.module_macs(denoiser, probe, 0)
    return {
        "training_only_params": distiller.count_training_only_params(),
        "denoiser_params": costs.params(denoiser),
        "denoiser_macs_per_call": denoiser_macs,
        "denoiser_calls_per_step": calls,
        "denoiser_macs_per_step": denoiser_macs * calls,
        "teacher_params": costs.params(distiller.teacher),
        "teacher_macs": count_macs(distiller.teacher, input_size, in_chans),
        "student_macs": count_macs(distiller.student, input_size, in_chans),
    }
