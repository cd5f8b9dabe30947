"""Closed-form classifier guidance through adapter + (global average pool → linear) head.

DSKD's guide is head_T(A(x̂0)) with A = 1×1 conv + BN and head_T = mean over positions then
a linear layer. For that composition ∇_{x̂0} Σ_b Σ_k π_bk log softmax(z_b)_k has a closed
form, so the DDIM chain needs no autograd graph, no `autograd.grad` call, and about a
fifth of the tensor ops (issue 15). With g_z = π − p·Σπ (p = softmax z) and
G = g_z·W_T (B×C_t, the gradient at the pooled, normalised features):

- BN with running statistics (eval): ∇ = (1/HW)·W_Aᵀ·(γ/σ ⊙ G_b), the same at every position;
- BN with batch statistics (train, as the adapter is while DSKD trains): the batch mean and
  variance depend on every sample, and BN's backward adds two per-channel corrections,
  ∇_u = (γ/σ)/HW ⊙ [(G_b − mean_b G) − û_bhw ⊙ mean_b(G_b ⊙ mean_hw û_b)], then ∇ = W_Aᵀ·∇_u.

`DSKD.guidance_gradient` (autograd) stays the general path and the test oracle
(tests/test_step_equivalence.py compares the two).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dskd.methods.adapter import ConvAdapter


def has_pooled_linear_head(model: nn.Module) -> bool:
    """True when `model.forward_head(f)` is exactly `fc(mean_hw(f))` with an nn.Linear `fc`.

    Zoo models inherit FeatureClassifier.forward_head; any other model may declare
    `pooled_linear_head = True`. Anything else keeps the autograd path.
    """
    if not isinstance(getattr(model, "fc", None), nn.Linear):
        return False
    declared = getattr(model, "pooled_linear_head", None)
    if declared is not None:
        return bool(declared)
    from dskd.models.base import FeatureClassifier

    return getattr(type(model), "forward_head", None) is FeatureClassifier.forward_head


@dataclass(frozen=True)
class GuideWeights:
    """The guide's weights in float32, read once per chain (they are fixed during sampling)."""

    conv_w: torch.Tensor  # C_t × C_s × 1 × 1 (A's conv)
    conv_wt: torch.Tensor  # C_s × C_t × 1 × 1 (its transpose, for the backward)
    gamma: torch.Tensor  # C_t
    beta: torch.Tensor  # C_t
    running_mean: torch.Tensor | None  # None: batch statistics (adapter in train mode)
    running_var: torch.Tensor | None
    bn_eps: float
    fc_w: torch.Tensor  # K × C_t
    fc_b: torch.Tensor | None  # K

    @staticmethod
    def read(adapter: ConvAdapter, fc: nn.Linear) -> GuideWeights:
        w = adapter.conv.weight.detach().float()
        bn = adapter.bn
        use_running = not adapter.training
        return GuideWeights(
            conv_w=w,
            conv_wt=w.transpose(0, 1).contiguous(),
            gamma=bn.weight.detach().float(),
            beta=bn.bias.detach().float(),
            running_mean=bn.running_mean.detach().float() if use_running else None,
            running_var=bn.running_var.detach().float() if use_running else None,
            bn_eps=float(bn.eps),
            fc_w=fc.weight.detach().float(),
            fc_b=None if fc.bias is None else fc.bias.detach().float(),
        )


def guidance_gradient_closed_form(
    x0_hat: torch.Tensor, target: torch.Tensor, w: GuideWeights, target_sum: torch.Tensor | None = None
) -> torch.Tensor:
    """∇_{x̂0} Σ_b Σ_k π_bk log p_T(k | x̂0_b) for the adapter + pooled-linear guide, float32.

    `x0_hat` is B×C_s×H×W float32; `target` is π (B×K); `target_sum` = π.sum(1, keepdim) if
    already known. Matches autograd through `ConvAdapter.frozen_forward` + pool + linear.
    """
    hw = x0_hat.shape[-2] * x0_hat.shape[-1]
    u = F.conv2d(x0_hat, w.conv_w)  # B×C_t×H×W: the adapter's conv, before BN
    if w.running_mean is None:
        # BN's own kernel gives û, the batch mean and 1/σ (a generic var_mean over (0, 2, 3)
        # is ~7× slower on channels-last maps)
        u_hat, _, inv_std = torch.native_batch_norm(u, None, None, None, None, True, 0.0, w.bn_eps)
        u_hat_pool = F.adaptive_avg_pool2d(u_hat, 1).flatten(1)  # pooled normalised features
    else:
        inv_std = torch.rsqrt(w.running_var + w.bn_eps)
        u_hat_pool = (F.adaptive_avg_pool2d(u, 1).flatten(1) - w.running_mean) * inv_std
    logits = F.linear(torch.addcmul(w.beta, u_hat_pool, w.gamma), w.fc_w, w.fc_b)
    p = torch.softmax(logits, dim=1)
    s = target.sum(dim=1, keepdim=True) if target_sum is None else target_sum
    g_pool = (target - p * s) @ w.fc_w  # B×C_t: ∂/∂(pooled BN output)
    k = w.gamma * inv_std * (1.0 / hw)  # ∂ BN-out / ∂ u per channel, with the pool's 1/HW
    if w.running_mean is None:
        m2 = (g_pool * u_hat_pool).mean(dim=0)  # mean_bhw(g_v · û) · HW
        per_sample = k * (g_pool - g_pool.mean(dim=0))  # B×C_t
        g_u = torch.addcmul(per_sample.view(*per_sample.shape, 1, 1), u_hat, (k * m2).view(1, -1, 1, 1), value=-1.0)
        return F.conv2d(g_u, w.conv_wt)
    per_sample = (k * g_pool) @ w.conv_w.flatten(1)  # B×C_s, the same at every position
    return per_sample.view(*per_sample.shape, 1, 1).expand_as(x0_hat)


@dataclass(frozen=True)
class HeadWeights:
    """A pooled-linear head seen from scaled coordinates: logits = W·(σ ⊙ mean_hw(x) + μ) + b."""

    fc_w: torch.Tensor  # K × C
    fc_b: torch.Tensor | None
    scale: torch.Tensor | None  # σ (C) of the feature normalisation, None = identity
    shift: torch.Tensor | None  # μ (C)

    @staticmethod
    def read(fc: nn.Linear, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> HeadWeights:
        return HeadWeights(
            fc_w=fc.weight.detach().float(),
            fc_b=None if fc.bias is None else fc.bias.detach().float(),
            scale=None if scale is None else scale.detach().float(),
            shift=None if shift is None else shift.detach().float(),
        )


def head_gradient_closed_form(
    x0_hat: torch.Tensor, target: torch.Tensor, w: HeadWeights, target_sum: torch.Tensor | None = None
) -> torch.Tensor:
    """∇_{x̂0} Σ_b Σ_k π_bk log softmax(W·(σ ⊙ mean_hw x̂0 + μ) + b)_k, float32 (teacher-space guide).

    The gradient is σ ⊙ (π − p·Σπ)·W / HW, the same at every position: the guide when the
    diffusion runs in the teacher's feature space and the teacher head reads it directly.
    """
    hw = x0_hat.shape[-2] * x0_hat.shape[-1]
    g = head_gradient_pooled(F.adaptive_avg_pool2d(x0_hat, 1).flatten(1), target, w, target_sum) * (1.0 / hw)
    return g.view(*g.shape, 1, 1).expand_as(x0_hat)


def head_gradient_pooled(
    pooled: torch.Tensor, target: torch.Tensor, w: HeadWeights, target_sum: torch.Tensor | None = None
) -> torch.Tensor:
    """σ ⊙ (π − p·Σπ)·W (B×C) from the pooled x̂0 alone: HW × the gradient at any one position.

    All the head sees of x̂0 is its mean over positions, so the DDIM chain can pool x_t and ε
    (mean_hw x̂0 = (mean x_t − √(1−ᾱ)·mean ε)/√ᾱ) and never build x̂0 itself (issue 15).
    """
    if w.scale is not None:
        pooled = torch.addcmul(w.shift, pooled, w.scale) if w.shift is not None else pooled * w.scale
    p = torch.softmax(F.linear(pooled, w.fc_w, w.fc_b), dim=1)
    s = target.sum(dim=1, keepdim=True) if target_sum is None else target_sum
    g = (target - p * s) @ w.fc_w  # B×C
    return g * w.scale if w.scale is not None else g
