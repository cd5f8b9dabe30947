"""Feature-matching baselines: FitNet, LSHFM and a DiffKD-style method."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist
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
from dskd.methods.registry import register_method
from dskd.methods.schedule import DiffusionSchedule

_W = {"low": 0.0}


class HintRegressor(nn.Module):
    """FitNet's regressor in mdistiller's form (`ConvReg`): conv (with bias) + BN (+ ReLU).

    The conv follows the two maps' sizes as the reference does: 1×1 when they match, a 3×3
    stride-2 conv when the student's map is twice the teacher's, a 4×4 stride-2 transposed conv
    when it is half, a (1+Δ)-kernel conv when larger by Δ. Other shrink factors (e.g. a 2×2 map
    against an 8×8 one, where the reference raises) use a 1×1 conv and compare at the smaller size.
    The ReLU matters: the teacher's last map is post-ReLU, so without it the regressor wastes
    capacity on matching negative values that never occur.
    """

    def __init__(self, c_s: int, c_t: int, s_hw: tuple[int, int], t_hw: tuple[int, int], relu: bool) -> None:
        super().__init__()
        (sh, sw), (th, tw) = s_hw, t_hw
        self.conv: nn.Module
        if sh == 2 * th and sw == 2 * tw:
            self.conv = nn.Conv2d(c_s, c_t, 3, stride=2, padding=1)
        elif 2 * sh == th and 2 * sw == tw:
            self.conv = nn.ConvTranspose2d(c_s, c_t, 4, stride=2, padding=1)
        elif sh >= th and sw >= tw:
            self.conv = nn.Conv2d(c_s, c_t, (1 + sh - th, 1 + sw - tw))
        else:
            self.conv = nn.Conv2d(c_s, c_t, 1)
        self.bn = nn.BatchNorm2d(c_t)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return F.relu(y) if self.relu else y


def _last_map_size(model: nn.Module, input_size: int = 32) -> tuple[int, int]:
    """Spatial size of `model`'s last feature map at the CIFAR input size (one tiny eval forward)."""
    in_chans = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            f = model.forward_features(torch.zeros(1, in_chans, input_size, input_size))
    finally:
        model.train(was_training)
    return int(f.shape[-2]), int(f.shape[-1])


@register_method
class FitNet(Distiller):
    """CE + w_hint·MSE(regressor(f_s), f_t) on the last feature maps (Romero et al. 2015).

    Defaults are mdistiller's FitNet: w_hint 100, CE weight 1, `ConvReg` regressor (conv + BN +
    ReLU, see HintRegressor). One deviation, kept on purpose: mdistiller's CIFAR config hints at
    the middle stage; here the hint is the last stage, the map every zoo model exposes
    (`forward_features`). `regressor_relu=False` is the earlier 1×1-conv+BN form of this repo.
    Sizes are probed at 32 px; maps of other sizes are compared at the smaller size.
    """

    name = "fitnet"
    OPTIONS: ClassVar[dict[str, Opt]] = {
        "w_ce": Opt(1.0, float, "cross-entropy weight", **_W),
        "w_hint": Opt(100.0, float, "hint MSE weight", **_W),
        "regressor_relu": Opt(True, bool, "ReLU after the regressor's BN (mdistiller's ConvReg)"),
    }

    def __init__(self, student, teacher, options) -> None:  # type: ignore[no-untyped-def]
        super().__init__(student, teacher, options)
        self.regressor = HintRegressor(int(student.num_features), int(teacher.num_features),
                                       _last_map_size(student), _last_map_size(teacher),
                                       self.options["regressor_relu"])

    def forward(self, x: torch.Tensor, y: torch.Tensor, progress: float = 1.0):  # type: ignore[override]
        o = self.options
        _, f_t = self.teacher_outputs(x)
        z_s, f_s = self.student_outputs(x)
        hint = self.regressor(f_s)
        size = (min(hint.shape[-2], f_t.shape[-2]), min(hint.shape[-1], f_t.shape[-1]))
        mse = F.mse_loss(match_spatial(hint, size).float(), match_spatial(f_t, size).float())
        return z_s, {"ce": o["w_ce"] * ce_loss(z_s, y), "hint": o["w_hint"] * mse}


@register_method
class LSHFM(Distiller):
    """CE + w_lsh·(BCE of the student's hash logits vs the teacher's bits + L2) on pooled features
    (Wang et al., "In Defense of Feature Mimicking for Knowledge Distillation", TPAMI 2022).

    Defaults are the reference's CIFAR setting (`lshl2_s`): the L2 term beside the hash, the loss
    only on samples the teacher classifies correctly, 32 × teacher-width bits, projection std =
    the std of the teacher classifier's weights, hash bias = minus the median of the projected
    teacher features over the training data (here: the exact median over the first
    `lsh_bias_batches` batches, ≥ one epoch of the benchmark subsets; until then a running
    estimate). A learnable linear projection maps the student's pooled features to the teacher
    width when they differ (the reference puts that layer inside the student, before its fc).
    """

    name = "lshfm"
    OPTIONS: ClassVar[dict[str, Opt]] = {
        "w_ce": Opt(1.0, float, "cross-entropy weight", **_W),
        "w_lsh": Opt(6.0, float, "weight of the feature loss (hash BCE + L2), the reference's beta", **_W),
        "lsh_bits": Opt(None, int, "hash bits (None = 32 × teacher width, the reference's)", nullable=True, low=1),
        "lsh_std": Opt(None, float, "std of the random projection (None = std of the teacher "
                       "classifier's weights, the reference's)", nullable=True, low=1e-8),
        "lsh_bias_batches": Opt(40, int, "training batches whose projected teacher features give the "
                                "hash bias (exact median)", low=1),
        "lsh_correct_only": Opt(True, bool, "feature loss only on samples the teacher gets right (LSH_S)"),
        "lsh_l2": Opt(True, bool, "add the L2 (MSE) between pooled student and teacher features (lshl2)"),
        "alpha_kd": Opt(0.0, float, "optional logit KD weight", **_W),
        "tau": Opt(4.0, float, "KD temperature", low=1e-3),
    }

    def __init__(self, student, teacher, options) -> None:  # type: ignore[no-untyped-def]
        super().__init__(student, teacher, options)
        o = self.options
        c_s, c_t = int(student.num_features), int(teacher.num_features)
        self.projection: nn.Module = nn.Linear(c_s, c_t) if c_s != c_t else nn.Identity()
        std = o["lsh_std"]
        if std is None:
            std = float(teacher.fc.weight.detach().float().std())
        self.lsh = LSHHash(c_t, o["lsh_bits"] or 32 * c_t, std, o["lsh_bias_batches"])
        self._bias_rows: list[torch.Tensor] = []  # raw projections of the bias window (not saved)
        self._bias_done = False  # host mirror of batches_seen >= lsh_bias_batches (no per-step read)

    def _observe(self, g_t: torch.Tensor) -> None:
        """Running bias while the window fills, then b = −median over every feature in it.

        After a resume inside the window, the median covers the batches seen since; under DDP
        the ranks' medians are averaged so every rank hashes alike.
        """
        lsh = self.lsh
        if not self.training or self._bias_done:
            return
        if int(lsh.batches_seen) >= lsh.bias_batches:
            self._bias_done = True
            return
        with torch.no_grad():
            self._bias_rows.append(F.linear(g_t.detach().float(), lsh.weight))
        lsh.observe(g_t)
        if int(lsh.batches_seen) >= lsh.bias_batches:
            with torch.no_grad():
                median = torch.cat(self._bias_rows).median(dim=0).values
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(median)
                    median /= dist.get_world_size()
                lsh.bias.copy_(-median)
            self._bias_rows, self._bias_done = [], True

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._bias_done, self._bias_rows = False, []  # re-read batches_seen from the loaded state

    def forward(self, x: torch.Tensor, y: torch.Tensor, progress: float = 1.0):  # type: ignore[override]
        o = self.options
        z_t, f_t = self.teacher_outputs(x)
        z_s, f_s = self.student_outputs(x)
        # The models' own pooling (timm's pre_logits), so the hash sees what each head sees.
        assert self.teacher is not None
        g_t = self.teacher.forward_head(f_t.float(), pre_logits=True)
        g_s = self.projection(self.student.forward_head(f_s, pre_logits=True))
        mask = (z_t.argmax(dim=1) == y) if o["lsh_correct_only"] else None
        self._observe(g_t)
        losses = {"ce": o["w_ce"] * ce_loss(z_s, y), "lsh": o["w_lsh"] * self.lsh.loss(g_s, g_t, mask)}
        if o["lsh_l2"]:  # same per-sample mask and weight as the hash term: the reference sums them
            per_sample = (g_s.float() - g_t).pow(2).mean(dim=1)
            w = torch.ones_like(per_sample) if mask is None else mask.to(per_sample.dtype)
            losses["l2"] = o["w_lsh"] * (per_sample * w).sum() / w.sum().clamp(min=1.0)
        if o["alpha_kd"] > 0:
            losses["kd"] = o["alpha_kd"] * kd_loss(z_s, z_t, o["tau"])
        return z_s, losses


@register_method
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
        "denoiser_time": Opt("add", str, "timestep conditioning of the denoiser: add before the first norm "
                             "(v1; a BatchNorm removes it for a one-t batch) or film (after each norm)",
                             choices=("add", "film")),
        "denoiser_norm": Opt("batch", str, "denoiser norms: batch (v1) or group (per-sample statistics)",
                             choices=("batch", "group")),
        **DIFFUSION_OPTIONS,
    }

    def __init__(self, student, teacher, options) -> None:  # type: ignore[no-untyped-def]
        super().__init__(student, teacher, options)
        o = self.options
        check_diffusion_options(self.name, o)
        c_s, c_t = int(student.num_features), int(teacher.num_features)
        self.schedule = DiffusionSchedule(o["num_train_timesteps"], o["beta_start"], o["beta_end"])
        self.projection = ConvAdapter(c_s, c_t)
        self.denoiser = Denoiser(c_t, o["num_train_timesteps"], o["denoiser_time"], o["denoiser_norm"])

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
