"""DSKD: teacher-guided student self-knowledge distillation with a feature diffusion model.

A RECONSTRUCTION of Wang et al., arXiv 2602.02107 from its abstract (the full paper and
code were unavailable); every "(choice)" of the method spec (docs/dskd.md) is an option.

Per step: a light denoiser learns the distribution of the student's own last feature
map (L_diff); the student's features are partially noised (SDEdit, t0) and denoised by
DDIM while the frozen teacher classifier, reached through a learned adapter, guides
the sampling towards the label; the denoised map f̂_s = sg(x_0) acts as the "virtual
teacher" for an LSH-guided feature loss on the student. Training only: the student
never owns the adapter, denoiser or hash.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F

from dskd.errors import UserError
from dskd.methods import costs
from dskd.methods.adapter import ConvAdapter, match_spatial
from dskd.methods.base import Distiller, ramp
from dskd.methods.denoiser import Denoiser
from dskd.methods.guidance import (
    GuideWeights,
    guidance_gradient_closed_form,
    has_pooled_linear_head,
)
from dskd.methods.losses import ce_loss, kd_loss, soft_target_log_likelihood
from dskd.methods.lsh import LSHHash
from dskd.methods.options import Opt
from dskd.methods.schedule import DiffusionSchedule

_W = {"low": 0.0}

DIFFUSION_OPTIONS: dict[str, Opt] = {
    "t0": Opt(400, int, "SDEdit start step of the denoising chain", low=0),
    "steps": Opt(5, int, "DDIM steps from t0 to 0", low=1, high=1000),
    "num_train_timesteps": Opt(1000, int, "DDPM steps", low=2),
    "beta_start": Opt(1e-4, float, "first DDPM beta", low=1e-8, high=0.5),
    "beta_end": Opt(0.02, float, "last DDPM beta", low=1e-8, high=0.999),
}


def check_diffusion_options(method: str, options: dict) -> None:
    """Cross-option checks the per-option ranges cannot express."""
    if options["t0"] >= options["num_train_timesteps"]:
        raise UserError(
            f"option {method}.t0={options['t0']} must be below {method}.num_train_timesteps="
            f"{options['num_train_timesteps']}"
        )
    if options["beta_start"] > options["beta_end"]:
        raise UserError(f"option {method}.beta_start must not exceed {method}.beta_end")


class DSKD(Distiller):
    """CE + α·KD + λ_diff·L_diff + λ_adapt·L_adapt + ramp(λ_lsh)·L_lsh (+ μ·MSE, + loss guidance)."""

    name = "dskd"
    OPTIONS: ClassVar[dict[str, Opt]] = {
        "guidance_scale": Opt(1.0, float, "classifier-guidance scale s (0 = unguided)", **_W),
        "guidance_target": Opt("label", str, "what guidance pulls towards", choices=("label", "soft", "mix")),
        "guidance_mix": Opt(0.5, float, "label share of the 'mix' target", low=0.0, high=1.0),
        "guidance_form": Opt("gradient", str, "classifier-gradient or loss guidance", choices=("gradient", "loss")),
        "guidance_impl": Opt("auto", str, "gradient guidance: closed form when the teacher head is pool+linear "
                             "(auto) or autograd (the general path; same result)", choices=("auto", "autograd")),
        "capture": Opt("off", str, "torch.compile the sampling chain (reduce-overhead = CUDA graphs on CUDA; "
                       "default mode elsewhere); falls back to eager if compiling fails",
                       choices=("off", "compile")),
        **DIFFUSION_OPTIONS,
        "denoiser_time": Opt("add", str, "timestep conditioning: add before the first BN (original; BN removes it "
                             "for a one-t batch) or film (scale/shift after each norm)", choices=("add", "film")),
        "lsh_bits": Opt(None, int, "hash bits (None = 4 × student width)", nullable=True, low=1),
        "lsh_on": Opt("spatial", str, "feature loss per position or on the pooled vector",
                      choices=("spatial", "pooled")),
        "lsh_std": Opt(1.0, float, "std of the random projection", low=1e-8),
        "lsh_bias_batches": Opt(20, int, "batches whose medians set the hash bias", low=1),
        "lsh_bias_momentum": Opt(None, float, "then keep tracking the median by EMA (None = freeze)",
                                 nullable=True, low=0.0, high=1.0),
        "lsh_correct_only": Opt(False, bool, "feature loss only on samples the teacher gets right"),
        "feature_loss": Opt("lsh", str, "feature loss (mse = ablation)", choices=("lsh", "mse")),
        "feature_mse": Opt(0.0, float, "μ: extra MSE between f_s and f̂_s", **_W),
        "x0_source": Opt("self", str, "what the denoiser learns", choices=("self", "teacher")),
        "detach_adapter_input": Opt(True, bool, "adapter trains on sg(f_s)"),
        "alpha_kd": Opt(1.0, float, "logit KD weight α", **_W),
        "tau": Opt(4.0, float, "temperature of KD and L_adapt", low=1e-3),
        "w_ce": Opt(1.0, float, "cross-entropy weight", **_W),
        "w_diff": Opt(1.0, float, "diffusion loss weight", **_W),
        "w_adapt": Opt(1.0, float, "adapter loss weight", **_W),
        "w_lsh": Opt(6.0, float, "feature loss weight λ_lsh", **_W),
        "lsh_warmup": Opt(0.1, float, "fraction of training to ramp λ_lsh in", low=0.0, high=1.0),
    }

    def __init__(self, student, teacher, options) -> None:  # type: ignore[no-untyped-def]
        super().__init__(student, teacher, options)
        o = self.options
        check_diffusion_options(self.name, o)
        c_s, c_t = int(student.num_features), int(teacher.num_features)
        self.schedule = DiffusionSchedule(o["num_train_timesteps"], o["beta_start"], o["beta_end"])
        self.adapter = ConvAdapter(c_s, c_t)
        self.denoiser = Denoiser(c_s, o["num_train_timesteps"], o["denoiser_time"])
        self.lsh: LSHHash | None = None
        if o["feature_loss"] == "lsh":
            bits = o["lsh_bits"] or 4 * c_s
            self.lsh = LSHHash(c_s, bits, o["lsh_std"], o["lsh_bias_batches"], o["lsh_bias_momentum"])
        self.closed_form_guidance = o["guidance_impl"] == "auto" and has_pooled_linear_head(teacher)
        self._compiled_chain = None  # built on first use when capture = "compile"
        self._capture_failed = False

    # -- guidance -----------------------------------------------------------------------
    def teacher_classifier(self, features: torch.Tensor) -> torch.Tensor:
        """head_T(A(·)) with the adapter's weights fixed: a guide, not a trainee."""
        assert self.teacher is not None
        return self.teacher.forward_head(self.adapter.frozen_forward(features))

    def guidance_target(self, y: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Class distribution π the guidance maximises Σ π log p_T(·|x̂0) for."""
        # scatter, not F.one_hot: one_hot reads y's min/max back to the host (a sync on CUDA)
        onehot = torch.zeros_like(teacher_logits, dtype=torch.float32).scatter_(1, y[:, None], 1.0)
        kind = self.options["guidance_target"]
        if kind == "label":
            return onehot
        soft = F.softmax(teacher_logits.float(), dim=1)
        if kind == "soft":
            return soft
        m = self.options["guidance_mix"]
        return m * onehot + (1.0 - m) * soft

    def guidance_gradient(
        self, x_t: torch.Tensor, eps: torch.Tensor, t: int, target: torch.Tensor
    ) -> torch.Tensor:
        """g = ∇_{x_t} Σ_b Σ_k π_bk log p_T(k | x̂0_b), ε_θ held fixed, in float32.

        The graph holds only x_t, so no parameter (teacher, adapter, denoiser) can collect
        a gradient from guidance.
        """
        a = self.schedule.alpha_bar(t, x_t)
        with torch.enable_grad(), torch.autocast(device_type=x_t.device.type, enabled=False):
            xg = x_t.detach().float().requires_grad_(True)
            x0_hat = (xg - (1.0 - a).sqrt() * eps.detach().float()) / a.sqrt()
            objective = soft_target_log_likelihood(self.teacher_classifier(x0_hat), target).sum()
            (grad,) = torch.autograd.grad(objective, inputs=[xg])
        return grad

    def denoise(
        self,
        start: torch.Tensor,
        target: torch.Tensor,
        noise: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SDEdit from t0 + guided DDIM; returns (sg(x_0), loss-guidance term or None)."""
        o = self.options
        s = o["guidance_scale"] if scale is None else scale
        if torch.is_inference_mode_enabled():
            s = 0.0  # no autograd at all in inference mode
        start = start.detach().float()
        noise = gaussian_like(start) if noise is None else noise.float()
        x = self.schedule.add_noise(start, noise, o["t0"])
        pairs = self.schedule.sampling_timesteps(o["t0"], o["steps"])

        if o["guidance_form"] == "loss" and s > 0 and torch.is_grad_enabled():
            for t, t_prev in pairs:
                x = self.schedule.step(self.denoiser(x, t).float(), t, t_prev, x)
            with torch.autocast(device_type=x.device.type, enabled=False):
                log_lik = soft_target_log_likelihood(self.teacher_classifier(x.float()), target)
            return x.detach(), -s * log_lik.mean()

        if s <= 0 or (o["guidance_form"] == "gradient" and self.closed_form_guidance):
            return self._run_chain(start, noise, target, float(s)), None

        for t, t_prev in pairs:  # autograd guidance: the general path, and the oracle of the fast one
            with torch.no_grad():
                eps = self.denoiser(x, t).float()
            if s > 0 and o["guidance_form"] == "gradient":
                a = self.schedule.alpha_bar(t, x)
                eps = eps - s * (1.0 - a).sqrt() * self.guidance_gradient(x, eps, t, target)
            with torch.no_grad():
                x = self.schedule.step(eps, t, t_prev, x)
        return x.detach(), None

    def sample_chain(self, start: torch.Tensor, noise: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
        """SDEdit + DDIM with closed-form guidance (or none at scale 0): no autograd, no sync.

        Static shapes and no host reads, so `capture = "compile"` can capture it whole.
        Needs a pooled-linear teacher head when scale > 0 (see dskd.methods.guidance).
        """
        o = self.options
        with torch.no_grad():
            x = self.schedule.add_noise(start, noise, o["t0"])
            weights, target_sum = None, None
            if scale > 0:
                assert self.teacher is not None
                weights = GuideWeights.read(self.adapter, self.teacher.fc)
                target_sum = target.sum(dim=1, keepdim=True)
            for t, t_prev in self.schedule.sampling_timesteps(o["t0"], o["steps"]):
                eps = self.denoiser(x, t).float()
                if weights is not None:
                    a = self.schedule.alpha_bar_value(t)
                    sa, s1a = math.sqrt(a), math.sqrt(1.0 - a)
                    with torch.autocast(device_type=x.device.type, enabled=False):
                        x0_hat = torch.add(x, eps, alpha=-s1a).mul_(1.0 / sa)
                        grad = guidance_gradient_closed_form(x0_hat, target, weights, target_sum)
                        # ε̂ = ε − s·√(1−ᾱ)·∇_{x_t}, and ∇_{x_t} = ∇_{x̂0} / √ᾱ
                        eps = torch.add(eps, grad, alpha=-scale * s1a / sa)
                x = self.schedule.step(eps, t, t_prev, x)
        return x

    def _run_chain(self, start: torch.Tensor, noise: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
        """`sample_chain`, compiled when `capture = "compile"`; eager again if compiling fails."""
        if self.options["capture"] == "compile" and not self._capture_failed:
            try:
                if self._compiled_chain is None:
                    mode = "reduce-overhead" if start.device.type == "cuda" else "default"
                    self._compiled_chain = torch.compile(self.sample_chain, mode=mode, dynamic=False)
                out = self._compiled_chain(start, noise, target, scale)
                return out.clone() if start.device.type == "cuda" else out  # CUDA-graph outputs are reused
            except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, say so once
                self._capture_failed = True
                warnings.warn(f"dskd capture=compile failed ({type(exc).__name__}: {exc}); running eagerly",
                              RuntimeWarning, stacklevel=2)
        return self.sample_chain(start, noise, target, scale)

    # -- losses -------------------------------------------------------------------------
    def diffusion_x0(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """What the denoiser learns to generate: sg(f_s), or the adapter-inverse of f_t."""
        if self.options["x0_source"] == "self":
            return f_s.detach().float()
        resized = match_spatial(f_t.float(), tuple(f_s.shape[-2:]))
        return self.adapter.pseudo_inverse(resized).detach()

    def diffusion_loss(self, x0: torch.Tensor) -> torch.Tensor:
        """‖ε − ε_θ(x_t, t)‖² with t ~ U{0..T−1}."""
        t = torch.randint(0, self.schedule.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noise = gaussian_like(x0)
        pred = self.denoiser(self.schedule.add_noise(x0, noise, t), t)
        return F.mse_loss(pred.float(), noise)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, y: torch.Tensor, progress: float = 1.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.options
        z_t, f_t = self.teacher_outputs(x)
        z_s, f_s = self.student_outputs(x)
        losses: dict[str, torch.Tensor] = {"ce": o["w_ce"] * ce_loss(z_s, y)}
        if o["alpha_kd"] > 0:
            losses["kd"] = o["alpha_kd"] * kd_loss(z_s, z_t, o["tau"])

        # L_adapt = τ²·KL(p_T(·|x)/τ ‖ head_T(A(sg f_s))/τ): τ² keeps its gradient scale, as in KD.
        adapter_in = f_s.detach() if o["detach_adapter_input"] else f_s
        assert self.teacher is not None
        z_a = self.teacher.forward_head(self.adapter(adapter_in))
        losses["adapt"] = o["w_adapt"] * kd_loss(z_a, z_t, o["tau"])
        pooled = o["lsh_on"] == "pooled"
        feat_key = "lsh" if o["feature_loss"] == "lsh" else "feat_mse"
        loss_guided = o["guidance_form"] == "loss" and o["guidance_scale"] > 0
        # Nothing reads f̂ when its terms weigh 0 (e.g. dskd_nofeat): then no chain at all.
        needs_chain = o["w_lsh"] != 0 or o["feature_mse"] != 0 or loss_guided
        # The chain runs before L_diff: a compiled chain (capture) writes the denoiser's BN running
        # statistics back with an in-place copy autograd sees, which would void L_diff's saved graph.
        # Train-mode BN normalises with batch statistics, so the order changes no loss or gradient.
        if needs_chain:
            f_hat, guide = self.denoise(f_s, self.guidance_target(y, z_t))
        losses["diff"] = o["w_diff"] * self.diffusion_loss(self.diffusion_x0(f_s, f_t))
        if not needs_chain:
            losses[feat_key] = torch.zeros((), device=z_s.device)  # the term stays, an exact 0
            return z_s, losses
        if guide is not None:
            losses["guide"] = guide

        mask = (z_t.argmax(dim=1) == y) if o["lsh_correct_only"] else None
        warm = ramp(progress, o["lsh_warmup"])
        # The feature loss compares f_s and f̂ per position, or their pooled vectors (lsh_on);
        # the MSE ablation and the μ term compare the same view, so swapping the loss is the only change.
        f_in = global_pool(f_s.float()) if pooled else f_s
        hat_in = global_pool(f_hat) if pooled else f_hat
        if o["feature_loss"] == "lsh":
            assert self.lsh is not None
            self.lsh.observe(hat_in)
            losses["lsh"] = warm * o["w_lsh"] * self.lsh.loss(f_in, hat_in, mask)
        else:
            losses["feat_mse"] = warm * o["w_lsh"] * masked_mse(f_in, hat_in, mask)
        if o["feature_mse"] > 0:
            losses["mse"] = warm * o["feature_mse"] * masked_mse(f_in, hat_in, mask)
        return z_s, losses

    def cost_report(self, input_size: int = 32, in_chans: int = 3) -> dict[str, int]:
        """Parameters and batch-1 MACs of the diffusion branch next to the teacher's forward."""
        return diffusion_cost_report(
            self, self.denoiser, self.student, input_size, in_chans, calls=1 + self.options["steps"]
        )


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
) -> dict[str, int]:
    """Counts for the benchmark's cost table (MACs per sample, batch 1)."""
    from dskd.models import count_macs

    assert distiller.teacher is not None
    c, h, w = costs.feature_shape(feature_model, input_size, in_chans)
    first = next(denoiser.parameters())
    probe = torch.zeros(1, denoiser.channels, h, w, device=first.device, dtype=first.dtype)
    if c != denoiser.channels:  # DiffKD's denoiser lives at the teacher's width
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
