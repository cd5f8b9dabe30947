"""Locality-sensitive hashing for feature distillation (LSHFM-style, balanced bits).

A frozen random projection P (N(0, σ²)) turns a feature vector into N hyperplane bits;
sign agreement between two vectors' bits falls with the angle between them (SimHash).
The bias is minus the running median of the projections over the first batches, so
each bit splits the target features in half and carries information. When the targets
drift during training (DSKD hashes the student's own, still-changing features), an
optional EMA keeps tracking the median afterwards so the bits stay balanced.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class LSHHash(nn.Module):
    """Frozen projection `in_dim → bits`, applied to B×C vectors or per position of B×C×H×W maps.

    Everything is a buffer (not a parameter): it never trains, yet is saved for resume and
    broadcast by DDP, so all ranks hash alike.
    """

    def __init__(self, in_dim: int, bits: int, std: float = 1.0, bias_batches: int = 20,
                 bias_momentum: float | None = None, extra_planes: torch.Tensor | None = None) -> None:
        super().__init__()
        weight = torch.randn(bits, in_dim) * std
        if extra_planes is not None:  # given hyperplanes (e.g. a classifier's class directions),
            # rescaled to a random row's expected norm so their BCE logits weigh like the others'
            rows = extra_planes.detach().float()
            rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12) * (std * in_dim**0.5)
            weight = torch.cat([weight, rows.to(weight.dtype)])
        self.in_dim = in_dim
        self.bits = bits  # random planes; `weight` may hold extra given ones after them
        self.bias_batches = bias_batches
        self.bias_momentum = bias_momentum
        self.register_buffer("weight", weight)
        self.register_buffer("bias", torch.zeros(weight.shape[0]))
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        self._bias_done = False  # host-side mirror of batches_seen >= bias_batches (no device sync)
        self._seen_host: int | None = None  # host mirror of batches_seen: read once, then counted here

    def project(self, f: torch.Tensor) -> torch.Tensor:
        """P·f + b in float32 (autocast off): B×C → B×N, B×C×H×W → B×N×H×W."""
        with torch.autocast(device_type=f.device.type, enabled=False):
            f = f.float()
            if f.dim() == 4:
                return F.conv2d(f, self.weight[:, :, None, None], self.bias)
            return F.linear(f, self.weight, self.bias)

    def observe(self, target: torch.Tensor) -> None:
        """Set b = −(mean of batch medians of P·f) over the first `bias_batches` training batches;
        afterwards, with `bias_momentum`, keep tracking them as an EMA (else b stays frozen)."""
        if not self.training or self._bias_done:
            return
        if self._seen_host is None:  # the one device read, after construction or a state load
            self._seen_host = int(self.batches_seen)
        n = self._seen_host
        if n >= self.bias_batches and self.bias_momentum is None:
            self._bias_done = True
            return
        with torch.no_grad():
            raw = self.project(target.detach()) - (
                self.bias[:, None, None] if target.dim() == 4 else self.bias
            )
            flat = raw.transpose(0, 1).reshape(self.weight.shape[0], -1)  # N × (B·H·W)
            median = flat.median(dim=1).values
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(median)
                median /= dist.get_world_size()
            keep = n / (n + 1) if n < self.bias_batches else 1.0 - float(self.bias_momentum or 0.0)
            self.bias.mul_(keep).sub_(median * (1.0 - keep))
            self.batches_seen += 1
            self._seen_host = n + 1

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._bias_done = False  # re-read batches_seen from the loaded state
        self._seen_host = None

    def hash(self, f: torch.Tensor) -> torch.Tensor:
        """Bits 1[P·f + b > 0] as float32 {0, 1}, shaped like `project`."""
        return (self.project(f.detach()) > 0).float()

    def loss(
        self, f: torch.Tensor, target: torch.Tensor, sample_mask: torch.Tensor | None = None,
        soft: float = 0.0,
    ) -> torch.Tensor:
        """BCE-with-logits of P·f + b against the bits of `target`, averaged per sample.

        `sample_mask` (B, bool) keeps only some samples (e.g. those the teacher gets right);
        an empty mask gives an exact zero that still belongs to the graph. `soft` > 0 uses
        sigmoid((P·target + b)/soft) instead of hard bits, so a target that moved towards a
        hyperplane without crossing it still changes the loss.
        """
        logits = self.project(f)
        if soft > 0:
            with torch.no_grad():
                bits = torch.sigmoid(self.project(target.detach()) / soft)
        else:
            bits = self.hash(target)
        per_element = F.binary_cross_entropy_with_logits(logits, bits, reduction="none")
        per_sample = per_element.flatten(1).mean(dim=1)
        if sample_mask is None:
            return per_sample.mean()
        weights = sample_mask.to(per_sample.dtype)
        return (per_sample * weights).sum() / weights.sum().clamp(min=1.0)
