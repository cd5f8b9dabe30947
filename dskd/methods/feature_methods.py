"""Feature-matching baselines: FitNet, LSHFM and a DiffKD-style method."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dskd.methods.adapter import ConvAdapter, match_spatial
from dskd.methods.base import Distiller
from dskd.methods.denoiser import Denoiser
from dskd.methods.dskd import (
    DIFFUSION_OPTIONS,
    check_diffusion_options,
    diffusion_cost_report,
    gaussian_like,
)
from dskd.methods.losses import ce_loss, kd_loss
from dskd.methods.lsh import LSHHash
from dskd.methods.options import Opt
from dskd.methods.schedule import DiffusionSchedule

_W = {"low": 0.0}


class FitNet(Distiller):
    """CE + w_hint·MSE(regressor(f_s), f_t) on the last feature maps (regressor: 1×1 conv + BN).

    w_hint = 100 is mdistiller's/RepDistiller's FitNet weight. Maps of different sizes are
    compared at the smaller size.
    """

    name = "fitnet"
    OPTIONS: ClassVar[dict[str, Opt]] = {
        "w_ce": Opt(1.0, float, "cross-entropy weight", **_W),
        "w_hint": Opt(100.0, float, "hint MSE weight", **_W),
    }

    def __init__(self, student, teacher, options) -> None:  # type: ignore[no-untyped-def]
        super().__init__(student, teacher, options)
        self.regressor = ConvAdapter(int(student.num_features), int(teacher.num_features))

    def forward(self, x: torch.Tensor, y: torch.Tensor, progress: float = 1.0):  # type: ignore[override]
        o = self.options
        _, f_t = self.teacher_outputs(x)
        z_s, f_s = self.student_outputs(x)
        hint = self.regressor(f_s)
        size = (min(hint.shape[-2], f_t.shape[-2]), min(hint.shape[-1], f_t.shape[-1]))
        mse = F.mse_loss(match_spatial(hint, size).float(), match_spatial(f_t, size).float())
        return z_s, {"ce": o["w_ce"] * ce_loss(z_s, y), "hint": o["w_hint"] * mse}


class LSHFM(Distiller):
    """CE + w_lsh·LSH(proj(pool(f_s)) vs hash of pool(f_t)) (Wang et al., TPAMI 2022).

    Penultimate (pooled) features; a learnable linear projection when widths differ;
    hash bits = 4 × teacher width unless set; bias balanced like DSKD's.
    """

    name = "lshfm"
    OPTIONS: ClassVar[dict[str, Opt]] = {
        "w_ce": Opt(1.0, float, "cross-entropy weight", **_W),
        "w_lsh": Opt(6.0, float, "LSH loss weight", **_W),
        "lsh_bits": Opt(None, int, "hash bits (None = 4 × teacher width)", nullable=True, low=1),
        "lsh_std": Opt(1.0, float, "std of the random projection", low=1e-8),
        "lsh_bias_batches": Opt(20, int, "batches whose medians set the hash bias", low=1),
        "lsh_correct_only": Opt(False, bool, "LSH loss only on samples the teacher gets right"),
        "feature_mse": Opt(0.0, float, "extra MSE between projected student and teacher features", **_W),
        "alpha_kd": Opt(0.0, float, "optional logit KD weight", **_W),
        "tau": Opt(4.0, float, "KD temperature", low=1e-3),
    }

    def __init__(self, student, teacher, options) -> None:  # type: ignore[no-untyped-def]
        super().__init__(student, teacher, options)
        c_s, c_t = int(student.num_features), int(teacher.num_features)
        self.projection: nn.Module = nn.Linear(c_s, c_t) if c_s != c_t else nn.Identity()
        bits = self.options["lsh_bits"] or 4 * c_t
        self.lsh = LSHHash(c_t, bits, self.options["lsh_std"], self.options["lsh_bias_batches"])

    def forward(self, x: torch.Tensor, y: torch.Tensor, progress: float = 1.0):  # type: ignore[override]
        o = self.options
        z_t, f_t = self.teacher_outputs(x)
        z_s, f_s = self.student_outputs(x)
        g_t = f_t.float().mean(dim=(2, 3))
        g_s = self.projection(f_s.mean(dim=(2, 3)))
        mask = (z_t.argmax(dim=1) == y) if o["lsh_correct_only"] else None
        self.lsh.observe(g_t)
        losses = {"ce": o["w_ce"] * ce_loss(z_s, y), "lsh": o["w_lsh"] * self.lsh.loss(g_s, g_t, mask)}
        if o["feature_mse"] > 0:
            losses["mse"] = o["feature_mse"] * F.mse_loss(g_s.float(), g_t)
        if o["alpha_kd"] > 0:
            losses["kd"] = o["alpha_kd"] * kd_loss(z_s, z_t, o["tau"])
        return z_s, losses


class DiffKDStyle(Distiller):
    """DiffKD-style baseline (Huang et al., NeurIPS 2023), simplified.

    A denoiser learns the teacher's feature distribution (L_diff); the student's map,
    projected to the teacher width (1×1 conv + BN), is partially noised to t0 and
    denoised by DDIM with gradients flowing back to the student; the result is matched to
    the teacher's map by MSE; plus CE and KD on logits. No autoencoder or adaptive noise
    matching: this is the "align with the teacher directly" approach DSKD argues against.
    """

    name = "diffkd"
    OPTIONS: ClassVar[dict[str, Opt]] = {
        "w_ce": Opt(1.0, float, "cross-entropy weight", **_W),
        "w_kd": Opt(1.0, float, "logit KD weight (τ² applied inside)", **_W),
        "tau": Opt(4.0, float, "KD temperature", low=1e-3),
        "w_diff": Opt(1.0, float, "diffusion loss weight", **_W),
        "w_feat": Opt(1.0, float, "denoised-feature MSE weight", **_W),
        **DIFFUSION_OPTIONS,
    }

    def __init__(self, student, teacher, options) -> None:  # type: ignore[no-untyped-def]
        super().__init__(student, teacher, options)
        o = self.options
        check_diffusion_options(self.name, o)
        c_s, c_t = int(student.num_features), int(teacher.num_features)
        self.schedule = DiffusionSchedule(o["num_train_timesteps"], o["beta_start"], o["beta_end"])
        self.projection = ConvAdapter(c_s, c_t)
        self.denoiser = Denoiser(c_t, o["num_train_timesteps"])

    def forward(self, x: torch.Tensor, y: torch.Tensor, progress: float = 1.0):  # type: ignore[override]
        o = self.options
        z_t, f_t = self.teacher_outputs(x)
        z_s, f_s = self.student_outputs(x)
        target = f_t.float()

        t = torch.randint(0, self.schedule.num_train_timesteps, (x.shape[0],), device=x.device)
        noise = gaussian_like(target)
        eps = self.denoiser(self.schedule.add_noise(target, noise, t), t)
        l_diff = F.mse_loss(eps.float(), noise)

        student_map = match_spatial(self.projection(f_s), tuple(target.shape[-2:])).float()
        x_t = self.schedule.add_noise(student_map, gaussian_like(student_map), o["t0"])
        for step_t, t_prev in self.schedule.sampling_timesteps(o["t0"], o["steps"]):
            x_t = self.schedule.step(self.denoiser(x_t, step_t).float(), step_t, t_prev, x_t)
        return z_s, {
            "ce": o["w_ce"] * ce_loss(z_s, y),
            "kd": o["w_kd"] * kd_loss(z_s, z_t, o["tau"]),
            "diff": o["w_diff"] * l_diff,
            "feat": o["w_feat"] * F.mse_loss(x_t, target),
        }

    def cost_report(self, input_size: int = 32, in_chans: int = 3) -> dict[str, int]:
        return diffusion_cost_report(
            self, self.denoiser, self.student, input_size, in_chans, calls=1 + self.options["steps"]
        )
