"""DSKD: teacher-guided student self-knowledge distillation with a feature diffusion model.

A RECONSTRUCTION of Wang et al., arXiv 2602.02107 from its abstract (the full paper and
code were unavailable); every "(choice)" of the method spec (docs/dskd.md) is an option.

Per step (v2, the defaults; issue 14): a light denoiser learns the distribution of the frozen
teacher's last feature map in the teacher's feature space (L_diff); the student's features,
mapped there by a learned adapter (A(f_s)), are partially noised (SDEdit, t0) and denoised by
DDIM onto that manifold while the teacher's classifier guides the sampling towards the label;
the denoised map f̂ = sg(x_0) is the "virtual teacher" for an LSH-guided feature loss on
A(f_s). `V1_OPTIONS` gives back the first reconstruction (the denoiser learned the student's
own features in the student's space). Training only: the student never owns the adapter,
denoiser, feature scale or hash.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F

from dskd.errors import UserError
from dskd.methods import costs
from dskd.methods.adapter import ConvAdapter, match_spatial
from dskd.methods.base import Distiller, ramp
from dskd.methods.denoiser import Denoiser
from dskd.methods.diffusion_branch import FeatureStats, ddim_invert
from dskd.methods.guidance import (
    GuideWeights,
    HeadWeights,
    guidance_gradient_closed_form,
    has_pooled_linear_head,
    head_gradient_closed_form,
)
from dskd.methods.losses import ce_loss, kd_loss, soft_target_log_likelihood
from dskd.methods.lsh import LSHHash
from dskd.methods.options import Opt
from dskd.methods.registry import register_method
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


# Options that give back the v1 reconstruction (before issue 14): student-space diffusion of sg(f_s),
# the original timestep conditioning and BatchNorm denoiser, no feature scaling, random hash planes,
# the feature loss from the first step. Combine with the benchmark's tuned v1 values
# (lsh_on, t0, guidance_scale, detach_adapter_input) to reproduce the old table's rows.
V1_OPTIONS: dict[str, object] = {
    "diffusion_space": "student", "x0_source": "self", "denoiser_time": "add", "denoiser_norm": "batch",
    "feature_norm": False, "lsh_head_planes": False, "feature_start": 0.0,
}


@register_method
class DSKD(Distiller):
    """CE + α·KD + λ_diff·L_diff + λ_adapt·L_adapt + ramp(λ_lsh)·L_lsh (+ μ·MSE, + loss guidance).

    v2 (issue 14), the defaults: the denoiser learns the frozen TEACHER's feature distribution in
    the teacher's feature space (scaled to unit variance per channel); the student's features,
    mapped there by the adapter, are partially noised and denoised onto that manifold while the
    teacher's own classifier guides the sampling; the feature loss ties A(f_s) to the denoised
    f̂, with hash planes that include the teacher head's class directions. `V1_OPTIONS` restores
    the first reconstruction (student-space diffusion of sg(f_s)).
    """

    name = "dskd"
    OPTIONS: ClassVar[dict[str, Opt]] = {
        # 1000: in the teacher's scaled space guidance at s = 100 moves f̂ ~5× less than v1's did at s = 100;
        # the probes (bench/results/dskd_probes.json) find teacher signal in f̂ at 1000, hardly at 100
        "guidance_scale": Opt(1000.0, float, "classifier-guidance scale s (0 = unguided)", **_W),
        "guidance_target": Opt("label", str, "what guidance pulls towards", choices=("label", "soft", "mix")),
        "guidance_mix": Opt(0.5, float, "label share of the 'mix' target", low=0.0, high=1.0),
        "guidance_form": Opt("gradient", str, "classifier-gradient or loss guidance (v1's loss form, "
                             "weight = guidance_scale)", choices=("gradient", "loss")),
        "guidance_impl": Opt("auto", str, "gradient guidance: closed form when the teacher head is pool+linear "
                             "(auto) or autograd (the general path; same result)", choices=("auto", "autograd")),
        "capture": Opt("off", str, "torch.compile the sampling chain (reduce-overhead = CUDA graphs on CUDA; "
                       "default mode elsewhere); falls back to eager if compiling fails",
                       choices=("off", "compile")),
        **DIFFUSION_OPTIONS,
        "t0": Opt(100, int, "SDEdit start step of the denoising chain", low=0),
        "diffusion_space": Opt("teacher", str, "where the denoiser works: the teacher's feature space (the "
                               "student's features reach it through the adapter) or the student's",
                               choices=("teacher", "student")),
        "x0_source": Opt("teacher", str, "whose features the denoiser learns: the teacher's (in student space: "
                         "their adapter-inverse) or the student's own (self)", choices=("self", "teacher")),
        "feature_norm": Opt(True, bool, "diffuse (f − μ)/σ with running per-channel statistics of the "
                            "denoiser's training features (unit scale next to the unit noise)"),
        "denoiser_time": Opt("film", str, "timestep conditioning: add before the first norm (v1; a BatchNorm "
                             "removes it for a one-t batch) or film (scale/shift after each norm)",
                             choices=("add", "film")),
        "denoiser_norm": Opt("group", str, "denoiser norms: group (per-sample statistics, the same in train "
                             "and eval mode) or batch (v1)", choices=("group", "batch")),
        "target_mode": Opt("sample", str, "the feature-loss target: sample = f̂ itself; cancel = start + "
                           "f̂ − f̂(s=0) on shared noise (only what guidance changed); invert = DDIM "
                           "inversion to t0 instead of random noise, then guided DDIM",
                           choices=("sample", "cancel", "invert")),
        "loss_guidance": Opt(0.0, float, "weight of CE(teacher head on f̂, target) back-propagated through "
                             "the chain into the denoiser (small-scale loss guidance; 0 = off)", **_W),
        "feature_start": Opt(0.1, float, "fraction of training with the feature loss off (the denoiser "
                             "pre-trains on L_diff alone; the hash bias is set after it)", low=0.0, high=1.0),
        "lsh_bits": Opt(None, int, "random hash bits (None = 4 × the width of the diffusion space)",
                        nullable=True, low=1),
        "lsh_head_planes": Opt(True, bool, "add the teacher head's class directions as hash planes "
                               "(teacher space only), so the hash sees what guidance changed"),
        "lsh_soft": Opt(0.0, float, "soft hash targets sigmoid(projection/lsh_soft) (0 = hard bits)", **_W),
        "lsh_on": Opt("pooled", str, "feature loss per position or on the pooled vector",
                      choices=("spatial", "pooled")),
        "lsh_std": Opt(1.0, float, "std of the random projection", low=1e-8),
        "lsh_bias_batches": Opt(20, int, "batches whose medians set the hash bias", low=1),
        "lsh_bias_momentum": Opt(None, float, "then keep tracking the median by EMA (None = freeze)",
                                 nullable=True, low=0.0, high=1.0),
        "lsh_correct_only": Opt(False, bool, "feature loss only on samples the teacher gets right"),
        "feature_loss": Opt("lsh", str, "feature loss (mse = ablation)", choices=("lsh", "mse")),
        "feature_mse": Opt(0.0, float, "μ: extra MSE between the student's view and f̂ (LSHFM's L2 term)", **_W),
        "detach_adapter_input": Opt(False, bool, "L_adapt trains the adapter only (on sg(f_s))"),
        "alpha_kd": Opt(1.0, float, "logit KD weight α", **_W),
        "tau": Opt(4.0, float, "temperature of KD and L_adapt", low=1e-3),
        "w_ce": Opt(1.0, float, "cross-entropy weight", **_W),
        "w_diff": Opt(1.0, float, "diffusion loss weight", **_W),
        "w_adapt": Opt(1.0, float, "adapter loss weight", **_W),
        "w_lsh": Opt(6.0, float, "feature loss weight λ_lsh", **_W),
        "lsh_warmup": Opt(0.1, float, "fraction of training to ramp λ_lsh in (after feature_start)",
                          low=0.0, high=1.0),
    }

    def __init__(self, student, teacher, options) -> None:  # type: ignore[no-untyped-def]
        super().__init__(student, teacher, options)
        o = self.options
        check_diffusion_options(self.name, o)
        if o["lsh_head_planes"] and o["diffusion_space"] != "teacher" and o["feature_loss"] == "lsh":
            raise UserError(
                f"option {self.name}.lsh_head_planes=true needs {self.name}.diffusion_space=\"teacher\" "
                "(the head's class directions live in the teacher's feature space); set lsh_head_planes=false"
            )
        c_s, c_t = int(student.num_features), int(teacher.num_features)
        self.teacher_space = o["diffusion_space"] == "teacher"
        width = c_t if self.teacher_space else c_s
        self.schedule = DiffusionSchedule(o["num_train_timesteps"], o["beta_start"], o["beta_end"])
        self.adapter = ConvAdapter(c_s, c_t)
        self.denoiser = Denoiser(width, o["num_train_timesteps"], o["denoiser_time"], o["denoiser_norm"])
        self.feature_stats = FeatureStats(width, enabled=o["feature_norm"])
        self.lsh: LSHHash | None = None
        if o["feature_loss"] == "lsh":
            planes = None
            if o["lsh_head_planes"]:
                fc = getattr(teacher, "fc", None)
                if not isinstance(fc, torch.nn.Linear) or fc.in_features != c_t:
                    raise UserError(f"option {self.name}.lsh_head_planes=true needs a teacher whose head is a "
                                    "linear layer `fc` on its features; set lsh_head_planes=false")
                planes = fc.weight
            bits = o["lsh_bits"] or 4 * width
            self.lsh = LSHHash(width, bits, o["lsh_std"], o["lsh_bias_batches"], o["lsh_bias_momentum"], planes)
        self.closed_form_guidance = o["guidance_impl"] == "auto" and has_pooled_linear_head(teacher)
        self._compiled_chain = None  # built on first use when capture = "compile"
        self._capture_failed = False

    # -- guidance -----------------------------------------------------------------------
    def teacher_classifier(self, features: torch.Tensor) -> torch.Tensor:
        """head_T(A(·)) on student-space features, the adapter's weights fixed: a guide, not a trainee."""
        assert self.teacher is not None
        return self.teacher.forward_head(self.adapter.frozen_forward(features))

    def guide_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher classifier on diffusion coordinates x (scaled, in the diffusion space)."""
        assert self.teacher is not None
        f = self.feature_stats.denormalise(x)
        return self.teacher.forward_head(f) if self.teacher_space else self.teacher_classifier(f)

    def space_logits(self, f: torch.Tensor) -> torch.Tensor:
        """The teacher classifier on (unscaled) diffusion-space features: f̂, A(f_s) or f_s."""
        assert self.teacher is not None
        return self.teacher.forward_head(f) if self.teacher_space else self.teacher_classifier(f)

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
        """g = ∇_{x_t} Σ_b Σ_k π_bk log p_T(k | x̂0_b), ε_θ held fixed, in float32 (autograd).

        The graph holds only x_t, so no parameter (teacher, adapter, denoiser) can collect
        a gradient from guidance.
        """
        a = self.schedule.alpha_bar(t, x_t)
        with torch.enable_grad(), torch.autocast(device_type=x_t.device.type, enabled=False):
            xg = x_t.detach().float().requires_grad_(True)
            x0_hat = (xg - (1.0 - a).sqrt() * eps.detach().float()) / a.sqrt()
            objective = soft_target_log_likelihood(self.guide_logits(x0_hat), target).sum()
            (grad,) = torch.autograd.grad(objective, inputs=[xg])
        return grad

    def _closed_form_guide(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """∇_{x̂0} of the guide's objective in diffusion coordinates, no autograd (pool+linear head)."""
        assert self.teacher is not None
        stats = self.feature_stats
        scale = stats.scale()
        if self.teacher_space:
            hw = HeadWeights.read(self.teacher.fc, scale, stats.mean if scale is not None else None)
            return lambda x0, target, tsum: head_gradient_closed_form(x0, target, hw, tsum)
        gw = GuideWeights.read(self.adapter, self.teacher.fc)
        if scale is None:
            return lambda x0, target, tsum: guidance_gradient_closed_form(x0, target, gw, tsum)
        sv = scale.detach().float().view(1, -1, 1, 1)
        return lambda x0, target, tsum: guidance_gradient_closed_form(
            stats.denormalise(x0), target, gw, tsum).mul(sv)

    def _guided_eps(self, x: torch.Tensor, eps: torch.Tensor, t: int, target: torch.Tensor, scale: float,
                    closed: Callable | None, target_sum: torch.Tensor | None) -> torch.Tensor:
        """ε̂ = ε − s·√(1−ᾱ_t)·∇_{x_t} log p_T(π | x̂0), with ε held fixed; no gradient to anything."""
        if closed is None:
            a_t = self.schedule.alpha_bar(t, x)
            return eps - scale * (1.0 - a_t).sqrt() * self.guidance_gradient(x, eps, t, target)
        a = self.schedule.alpha_bar_value(t)
        sa, s1a = math.sqrt(a), math.sqrt(1.0 - a)
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            x0_hat = torch.add(x.detach(), eps.detach(), alpha=-s1a).mul_(1.0 / sa)
            grad = closed(x0_hat, target, target_sum)
        # ε̂ = ε − s·√(1−ᾱ)·∇_{x_t}, and ∇_{x_t} = ∇_{x̂0} / √ᾱ
        return torch.add(eps, grad, alpha=-scale * s1a / sa)

    def descend(self, x: torch.Tensor, target: torch.Tensor, scale: float, with_grad: bool = False) -> torch.Tensor:
        """Guided DDIM from x_{t0} to the clean end, in diffusion coordinates.

        Without `with_grad` nothing is recorded (no autograd at all on the closed-form path: static
        shapes, no host reads, so `capture = "compile"` can capture it). With it, the denoiser's
        calls stay in the graph (loss guidance trains the denoiser through the chain); the guidance
        gradient itself is always a constant.
        """
        o = self.options
        closed = self._closed_form_guide() if scale > 0 and self.closed_form_guidance else None
        target_sum = target.sum(dim=1, keepdim=True) if scale > 0 else None
        for t, t_prev in self.schedule.sampling_timesteps(o["t0"], o["steps"]):
            with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
                eps = self.denoiser(x, t).float()
            if scale > 0:
                eps = self._guided_eps(x, eps, t, target, scale, closed, target_sum)
            with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
                x = self.schedule.step(eps, t, t_prev, x)
        return x

    def sample_chain(self, start: torch.Tensor, noise: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
        """SDEdit from diffusion coordinates `start` + guided DDIM: no autograd, no sync."""
        with torch.no_grad():
            x = self.schedule.add_noise(start, noise, self.options["t0"])
        return self.descend(x, target, scale)

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

    def _chain(self, start: torch.Tensor, noise: torch.Tensor, target: torch.Tensor, scale: float,
               with_grad: bool = False, invert: bool = False) -> torch.Tensor:
        """One chain from diffusion coordinates `start`: SDEdit noise, or DDIM inversion (`invert`)."""
        o = self.options
        if invert:
            x = ddim_invert(self.denoiser, self.schedule, start, o["t0"], o["steps"])
            return self.descend(x, target, scale, with_grad)
        if with_grad:
            return self.descend(self.schedule.add_noise(start, noise, o["t0"]), target, scale, with_grad)
        return self._run_chain(start, noise, target, scale)

    def denoise(
        self,
        start: torch.Tensor,
        target: torch.Tensor,
        noise: torch.Tensor | None = None,
        scale: float | None = None,
        mode: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The feature-loss target f̂ from diffusion-space features `start` (A(f_s) or f_s).

        Returns (sg(f̂) in `start`'s units, loss-guidance term or None). `mode` overrides
        `target_mode`: "sample" = the guided chain's output; "cancel" = start + chain(s) −
        chain(0) on the same noise; "invert" = DDIM inversion, then the guided chain.
        """
        o = self.options
        s = o["guidance_scale"] if scale is None else scale
        grad_scale = s if o["guidance_form"] == "gradient" else 0.0
        guide_weight = o["loss_guidance"] + (s if o["guidance_form"] == "loss" else 0.0)
        if torch.is_inference_mode_enabled():
            grad_scale, guide_weight = 0.0, 0.0  # no autograd at all in inference mode
        mode = o["target_mode"] if mode is None else mode
        stats = self.feature_stats
        start_n = stats.normalise(start.detach())
        noise = gaussian_like(start_n) if noise is None else noise.float()
        with_grad = guide_weight > 0 and torch.is_grad_enabled()
        invert = mode == "invert"
        x = self._chain(start_n, noise, target, float(grad_scale), with_grad, invert)
        guide = None
        if with_grad:
            with torch.autocast(device_type=x.device.type, enabled=False):
                log_lik = soft_target_log_likelihood(self.guide_logits(x.float()), target)
            guide = -guide_weight * log_lik.mean()
        x = x.detach()
        if mode == "cancel":
            x = start_n + x - self._chain(start_n, noise, target, 0.0)
        return stats.denormalise(x).detach(), guide

    # -- losses -------------------------------------------------------------------------
    def diffusion_x0(self, f_s: torch.Tensor, f_t: torch.Tensor, a_s: torch.Tensor | None = None) -> torch.Tensor:
        """What the denoiser learns to generate, in the diffusion space (unscaled, no graph).

        Teacher space: f_t at the student map's size (x0_source = "teacher") or sg(A(f_s)) ("self").
        Student space: sg(f_s) ("self") or the adapter-inverse of f_t ("teacher").
        """
        source = self.options["x0_source"]
        if self.teacher_space:
            if source == "teacher":
                return match_spatial(f_t.float(), tuple(f_s.shape[-2:])).detach()
            assert a_s is not None
            return a_s.detach().float()
        if source == "self":
            return f_s.detach().float()
        resized = match_spatial(f_t.float(), tuple(f_s.shape[-2:]))
        return self.adapter.pseudo_inverse(resized).detach()

    def diffusion_loss(self, x0: torch.Tensor) -> torch.Tensor:
        """‖ε − ε_θ(x_t, t)‖² with t ~ U{0..T−1}, on scaled diffusion coordinates."""
        x0 = self.feature_stats.normalise(x0)
        t = torch.randint(0, self.schedule.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noise = gaussian_like(x0)
        pred = self.denoiser(self.schedule.add_noise(x0, noise, t), t)
        return F.mse_loss(pred.float(), noise)

    def feature_weight(self, progress: float) -> float:
        """0 before `feature_start`, then a linear ramp over `lsh_warmup` of training, then 1."""
        o = self.options
        if progress < o["feature_start"]:
            return 0.0
        return ramp(progress - o["feature_start"], o["lsh_warmup"])

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, y: torch.Tensor, progress: float = 1.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.options
        z_t, f_t = self.teacher_outputs(x)
        z_s, f_s = self.student_outputs(x)
        losses: dict[str, torch.Tensor] = {"ce": o["w_ce"] * ce_loss(z_s, y)}
        if o["alpha_kd"] > 0:
            losses["kd"] = o["alpha_kd"] * kd_loss(z_s, z_t, o["tau"])

        # L_adapt = τ²·KL(p_T(·|x)/τ ‖ head_T(A(f_s))/τ): τ² keeps its gradient scale, as in KD.
        assert self.teacher is not None
        # A(f_s) in the graph serves L_adapt (not detached) and the teacher-space feature loss; the
        # adapter runs twice only when both a detached and a live A(f_s) are needed.
        a_s = self.adapter(f_s) if self.teacher_space or not o["detach_adapter_input"] else None
        a_for_adapt = self.adapter(f_s.detach()) if o["detach_adapter_input"] else a_s
        assert a_for_adapt is not None
        losses["adapt"] = o["w_adapt"] * kd_loss(self.teacher.forward_head(a_for_adapt), z_t, o["tau"])
        view = a_s if self.teacher_space and a_s is not None else f_s  # the student's features in that space
        pooled = o["lsh_on"] == "pooled"
        feat_key = "lsh" if o["feature_loss"] == "lsh" else "feat_mse"
        guide_weight = o["loss_guidance"] + (o["guidance_scale"] if o["guidance_form"] == "loss" else 0.0)
        warm = self.feature_weight(progress)
        # Nothing reads f̂ when its terms weigh 0 (dskd_nofeat, or before feature_start): then no chain.
        started = progress >= o["feature_start"]
        needs_chain = (o["w_lsh"] != 0 or o["feature_mse"] != 0) and started or guide_weight > 0

        x0 = self.diffusion_x0(f_s, f_t, a_s)
        self.feature_stats.observe(x0)
        # The chain runs before L_diff: a compiled chain (capture) writes BN running statistics back
        # with an in-place copy autograd sees, which would void L_diff's saved graph.
        if needs_chain:
            f_hat, guide = self.denoise(view, self.guidance_target(y, z_t))
        losses["diff"] = o["w_diff"] * self.diffusion_loss(x0)
        zero = torch.zeros((), device=z_s.device)
        if not needs_chain:
            losses[feat_key] = zero  # the term stays, an exact 0
            if o["feature_mse"] > 0:
                losses["mse"] = zero
            return z_s, losses
        if guide is not None:
            losses["guide"] = guide

        mask = (z_t.argmax(dim=1) == y) if o["lsh_correct_only"] else None
        # The feature loss compares the student's view and f̂ per position, or their pooled vectors
        # (lsh_on); the MSE ablation and the μ term compare the same view.
        f_in = global_pool(view.float()) if pooled else view
        hat_in = global_pool(f_hat) if pooled else f_hat
        if o["feature_loss"] == "lsh":
            assert self.lsh is not None
            self.lsh.observe(hat_in)
            losses["lsh"] = warm * o["w_lsh"] * self.lsh.loss(f_in, hat_in, mask, o["lsh_soft"])
        else:
            losses["feat_mse"] = warm * o["w_lsh"] * masked_mse(f_in, hat_in, mask)
        if o["feature_mse"] > 0:
            losses["mse"] = warm * o["feature_mse"] * masked_mse(f_in, hat_in, mask)
        return z_s, losses

    def cost_report(self, input_size: int = 32, in_chans: int = 3) -> dict[str, int]:
        """Parameters and batch-1 MACs of the diffusion branch next to the teacher's forward."""
        o = self.options
        chains = 2 if o["target_mode"] in ("cancel", "invert") else 1
        return diffusion_cost_report(
            self, self.denoiser, self.student, input_size, in_chans, calls=1 + chains * o["steps"],
            at_student_size=True,
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
