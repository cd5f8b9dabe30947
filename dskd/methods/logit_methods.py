"""Logit-only methods: CE (no teacher), KD (Hinton 2015) and DKD (Zhao et al. 2022)."""

from __future__ import annotations

from typing import ClassVar

import torch

from dskd.methods.base import Distiller, ramp
from dskd.methods.losses import ce_loss, dkd_loss, kd_loss
from dskd.methods.options import Opt
from dskd.methods.registry import register_method

_POS = {"low": 0.0}


@register_method
class CEOnly(Distiller):
    """The student alone with cross-entropy: the no-distillation baseline."""

    name = "ce"
    needs_teacher = False
    OPTIONS: ClassVar[dict[str, Opt]] = {
        "w_ce": Opt(1.0, float, "cross-entropy weight", **_POS),
    }

    def forward(self, x: torch.Tensor, y: torch.Tensor, progress: float = 1.0):  # type: ignore[override]
        logits, _ = self.student_outputs(x)
        return logits, {"ce": self.options["w_ce"] * ce_loss(logits, y)}


@register_method
class KD(Distiller):
    """w_ce·CE + w_kd·τ²·KL; defaults 0.1 / 0.9 / τ=4 are mdistiller's CIFAR setting."""

    name = "kd"
    OPTIONS: ClassVar[dict[str, Opt]] = {
        "w_ce": Opt(0.1, float, "cross-entropy weight", **_POS),
        "w_kd": Opt(0.9, float, "KL weight (τ² applied inside)", **_POS),
        "tau": Opt(4.0, float, "softmax temperature", low=1e-3),
    }

    def forward(self, x: torch.Tensor, y: torch.Tensor, progress: float = 1.0):  # type: ignore[override]
        o = self.options
        z_t, _ = self.teacher_outputs(x)
        z_s, _ = self.student_outputs(x)
        return z_s, {
            "ce": o["w_ce"] * ce_loss(z_s, y),
            "kd": o["w_kd"] * kd_loss(z_s, z_t, o["tau"]),
        }


@register_method
class DKD(Distiller):
    """CE + warm-up·DKD(α, β, T). β = 8 suits ResNet32x4→8x4, 2 suits ResNet56→20.

    The paper warms DKD up over 20 of 240 epochs; `warmup` is that fraction of training,
    so short schedules keep the same shape.
    """

    name = "dkd"
    OPTIONS: ClassVar[dict[str, Opt]] = {
        "w_ce": Opt(1.0, float, "cross-entropy weight", **_POS),
        "alpha": Opt(1.0, float, "target-class KD weight (TCKD)", **_POS),
        "beta": Opt(8.0, float, "non-target-class KD weight (NCKD)", **_POS),
        "tau": Opt(4.0, float, "softmax temperature", low=1e-3),
        "warmup": Opt(20 / 240, float, "fraction of training to ramp DKD in", low=0.0, high=1.0),
    }

    def forward(self, x: torch.Tensor, y: torch.Tensor, progress: float = 1.0):  # type: ignore[override]
        o = self.options
        z_t, _ = self.teacher_outputs(x)
        z_s, _ = self.student_outputs(x)
        weight = ramp(progress, o["warmup"])
        return z_s, {
            "ce": o["w_ce"] * ce_loss(z_s, y),
            "dkd": weight * dkd_loss(z_s, z_t, y, o["alpha"], o["beta"], o["tau"]),
        }
