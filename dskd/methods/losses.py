"""Logit losses shared by the methods, computed in float32 so bf16 autocast cannot overflow them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with hard labels."""
    return F.cross_entropy(logits.float(), target)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Hinton KD: τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)), mean over the batch."""
    log_s = F.log_softmax(student_logits.float() / tau, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / tau, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * tau**2


def _binary_log_probs(logits: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """log [p(target), p(non-target)] by log-sum-exp, exact even for saturated softmaxes."""
    total = torch.logsumexp(logits, dim=1)
    target = (logits * gt_mask).sum(dim=1)
    others = torch.logsumexp(logits.masked_fill(gt_mask.bool(), float("-inf")), dim=1)
    return torch.stack([target - total, others - total], dim=1)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    tau: float,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): α·TCKD + β·NCKD, both scaled by τ².

    TCKD matches the binary target/non-target split; NCKD matches the distribution among
    non-target classes (the target class is removed, not pushed to a large negative logit).
    """
    zs = student_logits.float() / tau
    zt = teacher_logits.float() / tau
    gt_mask = F.one_hot(target, zs.shape[1]).to(zs.dtype)
    tckd = F.kl_div(
        _binary_log_probs(zs, gt_mask),
        _binary_log_probs(zt, gt_mask),
        reduction="batchmean",
        log_target=True,
    )
    keep = ~gt_mask.bool()
    num_classes = zs.shape[1]
    log_s = F.log_softmax(zs[keep].reshape(-1, num_classes - 1), dim=1)
    log_t = F.log_softmax(zt[keep].reshape(-1, num_classes - 1), dim=1)
    nckd = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    return (alpha * tckd + beta * nckd) * tau**2


def soft_target_log_likelihood(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Σ_k π_k log softmax(z)_k per sample: log p(y) for one-hot π, −CE for soft π."""
    return (target_probs * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
