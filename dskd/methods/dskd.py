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
from dskd.methods.adapter import ConvAdapter, match_spatial
from dskd.methods.base import Distiller, ramp
from dskd.methods.cpu_memory import keep_freed_memory
from dskd.methods.denoiser import Denoiser
from dskd.methods.diffusion_branch import (
    FeatureStats,
    ddim_invert,
    diffusion_cost_report,
    gaussian_like,
    global_pool,
    masked_mse,
)
from dskd.methods.dskd_options import (
    DIFFUSION_OPTIONS,
    DSKD_OPTIONS,
    V1_OPTIONS,
    check_diffusion_options,
    check_dskd_options,
)
from dskd.methods.guidance import (
    GuideWeights,
    HeadWeights,
    guidance_gradient_closed_form,
    has_pooled_linear_head,
    head_gradient_closed_form,
    head_gradient_pooled,
)
from dskd.methods.losses import ce_loss, kd_loss, soft_target_log_likelihood
from dskd.methods.lsh import LSHHash
from dskd.methods.options import Opt
from dskd.methods.registry import register_method
from dskd.methods.schedule import DiffusionSchedule

# Public names other modules (the DiffKD baseline, benches, tests) import from here.
__all__ = ["DIFFUSION_OPTIONS", "DSKD", "V1_OPTIONS", "check_diffusion_options", "diffusion_cost_report",
           "gaussian_like", "global_pool", "masked_mse"]


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
    OPTIONS: ClassVar[dict[str, Opt]] = DSKD_OPTIONS

    def __init__(self, student, teacher, options) -> None:  # type: ignore[no-untyped-def]
        super().__init__(student, teacher, options)
        o = self.options
        check_dskd_options(self.name, o)
        c_s, c_t = int(student.num_features), int(teacher.num_features)
        self.teacher_space = o["diffusion_space"] == "teacher"
        width = c_t if self.teacher_space else c_s
        self.schedule = DiffusionSchedule(o["num_train_timesteps"], o["beta_start"], o["beta_end"])
        self.adapter = ConvAdapter(c_s, c_t)
        self.denoiser = Denoiser(width, o["num_train_timesteps"], o["denoiser_time"], o["denoiser_norm"],
                                 o["denoiser_precision"])
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

    def _closed_form_guide(self) -> tuple[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                                          HeadWeights | None]:
        """∇_{x̂0} of the guide's objective in diffusion coordinates, no autograd (pool+linear head).

        Also the head's weights when the guide reads the teacher head directly (teacher space):
        then only mean_hw x̂0 matters and the chain need not build x̂0 (`_descend_head_guided`).
        """
        assert self.teacher is not None
        stats = self.feature_stats
        scale = stats.scale()
        if self.teacher_space:
            hw = HeadWeights.read(self.teacher.fc, scale, stats.mean if scale is not None else None)
            return (lambda x0, target, tsum: head_gradient_closed_form(x0, target, hw, tsum)), hw
        gw = GuideWeights.read(self.adapter, self.teacher.fc)
        if scale is None:
            return (lambda x0, target, tsum: guidance_gradient_closed_form(x0, target, gw, tsum)), None
        sv = scale.detach().float().view(1, -1, 1, 1)
        return (lambda x0, target, tsum: guidance_gradient_closed_form(
            stats.denormalise(x0), target, gw, tsum).mul(sv)), None

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

    def _guide_in_place(self, x: torch.Tensor, eps: torch.Tensor, t: int, target: torch.Tensor, scale: float,
                        closed: Callable, target_sum: torch.Tensor) -> torch.Tensor:
        """`_guided_eps` (closed form) written into `eps` (no graph). The teacher-space head guide,
        which needs only pooled maps, has its own chain (`_descend_head_guided`)."""
        a = self.schedule.alpha_bar_value(t)
        sa, s1a = math.sqrt(a), math.sqrt(1.0 - a)
        with torch.autocast(device_type=x.device.type, enabled=False):
            grad = closed(torch.add(x, eps, alpha=-s1a).mul_(1.0 / sa), target, target_sum)
            return eps.add_(grad, alpha=-scale * s1a / sa)

    def descend(self, x: torch.Tensor, target: torch.Tensor, scale: float, with_grad: bool = False) -> torch.Tensor:
        """Guided DDIM from x_{t0} to the clean end, in diffusion coordinates.

        Without `with_grad` nothing is recorded (no autograd at all on the closed-form path: static
        shapes, no host reads, so `capture = "compile"` can capture it), and each step updates
        its own tensors in place. With it, the denoiser's calls stay in the graph (loss guidance
        trains the denoiser through the chain); the guidance gradient itself is always a constant.
        """
        o = self.options
        closed, head = self._closed_form_guide() if scale > 0 and self.closed_form_guidance else (None, None)
        target_sum = target.sum(dim=1, keepdim=True) if scale > 0 else None
        steps = self.schedule.sampling_timesteps(o["t0"], o["steps"])
        if with_grad and torch.is_grad_enabled():
            for t, t_prev in steps:
                eps = self.denoiser(x, t).float()
                if scale > 0:
                    eps = self._guided_eps(x, eps, t, target, scale, closed, target_sum)
                x = self.schedule.step(eps, t, t_prev, x)
            return x
        with torch.no_grad():
            x = x.float()
            if scale > 0 and head is not None:
                return self._descend_head_guided(x, steps, target, scale, head)
            for t, t_prev in steps:
                eps = self.denoiser(x, t).float()  # a fresh tensor: the step may write into it
                if scale > 0 and closed is not None:
                    assert target_sum is not None
                    eps = self._guide_in_place(x, eps, t, target, scale, closed, target_sum)
                elif scale > 0:
                    eps = self._guided_eps(x, eps, t, target, scale, None, None)
                c_x, c_eps = self.schedule.ddim_coefficients(t, t_prev)
                x = eps.mul_(c_eps).add_(x, alpha=c_x)  # DDIM: c_x·x_t + c_ε·ε̂, in ε̂'s buffer
        return x

    def _descend_head_guided(self, x: torch.Tensor, steps: list[tuple[int, int]], target: torch.Tensor,
                             scale: float, head: HeadWeights) -> torch.Tensor:
        """The no-grad chain when the guide reads the teacher head on pooled maps (teacher space).

        The update of `descend`'s loop (ε̂ = ε − g, then DDIM) with fewer passes over the B×C×H×W
        maps (issue 15). The head sees only mean_hw x̂0 = (mean_hw x_t − √(1−ᾱ)·mean_hw ε)/√ᾱ, so
        the guidance shift g is the same at every position and
        x_{t_prev} = c_x·x_t + c_ε·(ε − g) is one broadcast add of −c_ε·g fused into the c_ε·ε
        product, then one add of c_x·x_t (3 passes before); and pooling is linear, so
        mean_hw x_{t_prev} = c_x·mean_hw x_t + c_ε·(mean_hw ε − g) needs no pooling of x after the
        first step (2 poolings per step before). Equal to the per-step form to float32 rounding.
        """
        target_sum = target.sum(dim=1, keepdim=True)
        inv_hw = 1.0 / (x.shape[-2] * x.shape[-1])
        pooled_x = global_pool(x)
        for t, t_prev in steps:
            eps = self.denoiser(x, t).float()  # in the denoiser's precision (denoiser_precision), as every call
            a = self.schedule.alpha_bar_value(t)
            sa, s1a = math.sqrt(a), math.sqrt(1.0 - a)
            c_x, c_eps = self.schedule.ddim_coefficients(t, t_prev)
            with torch.autocast(device_type=x.device.type, enabled=False):  # the guidance in float32
                pooled_eps = global_pool(eps)
                pooled_x0 = torch.sub(pooled_x, pooled_eps, alpha=s1a).mul_(1.0 / sa)
                g = head_gradient_pooled(pooled_x0, target, head, target_sum).mul_(scale * s1a / sa * inv_hw)
                shift = g.mul(-c_eps)  # B×C: −c_ε·g, broadcast over positions
                x = torch.add(shift.view(*shift.shape, 1, 1), eps, alpha=c_eps).add_(x, alpha=c_x)
                pooled_x = pooled_x.mul_(c_x).add_(pooled_eps.sub_(g), alpha=c_eps)
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
        if self.training and x.device.type == "cpu":
            keep_freed_memory()  # the chain's temporaries would fault in fresh pages every step (cpu_memory)
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
