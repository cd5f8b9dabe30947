"""What DSKD's feature loss compares, measured on one batch (issue 14, item 3).

A DSKD variant is only worth keeping when its target f̂ carries teacher knowledge that the
student's own features do not. These probes say whether it does, in numbers:

- bits: share of hash bits of f̂ that differ from the student's view (what the feature loss
  asks the student to change) and from f̂ at guidance scale 0 on the same noise (what guidance
  changed); split into the random planes and the teacher-head planes when there are any;
- teacher direction: cosine between pool(f̂ − v) and pool(f_t − v), v = the student's features in
  the teacher's space (A(f_s)); the same against ANOTHER image's teacher features (the control:
  a cosine that is as high there is the teacher manifold's mean, not per-image knowledge);
- distance to the teacher: ‖pool(f̂) − pool(f_t)‖ / ‖pool(v) − pool(f_t)‖ (< 1: f̂ is nearer);
- teacher-head accuracy (and agreement with the teacher's own prediction) on v, on f̂ at s = 0,
  on f̂;
- ε-MSE of the denoiser per t, called as the DDIM chain calls it (one t for the whole batch,
  the distiller's current mode).

Nothing here trains: no optimizer step, no hash-bias or feature-scale update, fixed noise from
a private generator (the training RNG stream is left alone).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dskd.methods.adapter import match_spatial

DEFAULT_TS = (0, 25, 50, 100, 200, 400, 700, 999)


def _pool(f: torch.Tensor) -> torch.Tensor:
    return f.float().mean(dim=(2, 3))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=1, eps=1e-12).mean())


def _r(v: float, nd: int = 4) -> float:
    return round(float(v), nd)


def dskd_probes(d: Any, x: torch.Tensor, y: torch.Tensor, seed: int = 0,
                ts: tuple[int, ...] = DEFAULT_TS) -> dict[str, Any]:
    """The probe figures for DSKD distiller `d` on batch (x, y); a flat dict of rounded floats."""
    saved = {name: b.detach().clone() for name, b in d.named_buffers()}  # BN running stats etc.
    try:
        return _probes(d, x, y, seed, ts)
    finally:  # the forward passes above ran in the distiller's mode: put every buffer back
        with torch.no_grad():
            for name, b in d.named_buffers():
                b.copy_(saved[name])


def _probes(d: Any, x: torch.Tensor, y: torch.Tensor, seed: int, ts: tuple[int, ...]) -> dict[str, Any]:
    o = d.options
    gen = torch.Generator(device=x.device).manual_seed(seed)
    with torch.no_grad():
        z_t, f_t = d.teacher_outputs(x)
        f_s = d.student.forward_features(x).float()
        a_s = d.adapter.frozen_forward(f_s)  # A(f_s) as the step sees it, without a running-stat update
        view = a_s if d.teacher_space else f_s
        target = d.guidance_target(y, z_t)
        noise = torch.randn(view.shape, generator=gen, device=x.device)
    f_hat, _ = d.denoise(view, target, noise=noise)
    f_hat0, _ = d.denoise(view, target, noise=noise, scale=0.0)
    out: dict[str, Any] = {}
    with torch.no_grad():
        to_teacher = (lambda f: f) if d.teacher_space else d.adapter.frozen_forward
        t_map = match_spatial(f_t.float(), tuple(f_s.shape[-2:]))
        pv, ph, ph0, pt = _pool(to_teacher(view)), _pool(to_teacher(f_hat)), _pool(to_teacher(f_hat0)), _pool(t_map)
        towards = pt - pv
        other = pt.roll(1, dims=0) - pv  # another image's teacher features: the control direction
        out["cos_to_teacher"] = _cos(ph - pv, towards)
        out["cos_to_other_teacher"] = _cos(ph - pv, other)
        out["cos_guidance_to_teacher"] = _cos(ph - ph0, towards)
        out["cos_guidance_to_other_teacher"] = _cos(ph - ph0, other)
        gap = towards.norm(dim=1).clamp(min=1e-12)
        out["dist_to_teacher_ratio"] = _r(((ph - pt).norm(dim=1) / gap).mean())
        out["dist_to_teacher_ratio_s0"] = _r(((ph0 - pt).norm(dim=1) / gap).mean())
        out["rel_shift_pooled"] = _r(((ph - pv).norm(dim=1) / pv.norm(dim=1).clamp(min=1e-12)).mean())
        out["rel_guidance_shift_pooled"] = _r(((ph - ph0).norm(dim=1) / pv.norm(dim=1).clamp(min=1e-12)).mean())
        for k in ("cos_to_teacher", "cos_to_other_teacher", "cos_guidance_to_teacher", "cos_guidance_to_other_teacher"):
            out[k] = _r(out[k])

        def head(f: torch.Tensor) -> torch.Tensor:
            return d.space_logits(f).float().argmax(dim=1)

        t_pred = z_t.argmax(dim=1)
        for name, f in (("student", view), ("f_hat_s0", f_hat0), ("f_hat", f_hat)):
            pred = head(f)
            out[f"teacher_head_acc_{name}"] = _r((pred == y).float().mean())
            out[f"teacher_agree_{name}"] = _r((pred == t_pred).float().mean())
        out["teacher_acc"] = _r((t_pred == y).float().mean())

        if d.lsh is not None:
            pooled = o["lsh_on"] == "pooled"

            def bits(f: torch.Tensor) -> torch.Tensor:
                b = d.lsh.hash(_pool(f) if pooled else f)
                return b if b.dim() == 2 else b.transpose(0, 1).reshape(b.shape[1], -1).transpose(0, 1)

            bv, bh, bh0 = bits(view), bits(f_hat), bits(f_hat0)
            n_rand = d.lsh.bits
            for label, sl in (("", slice(None)), ("_random", slice(0, n_rand)), ("_head", slice(n_rand, None))):
                if bh[:, sl].shape[1] == 0:
                    continue
                out[f"bits_differ_from_student{label}"] = _r((bh[:, sl] != bv[:, sl]).float().mean())
                out[f"bits_differ_from_s0{label}"] = _r((bh[:, sl] != bh0[:, sl]).float().mean())
            out["bit_balance"] = _r(bh.mean())

        x0 = d.feature_stats.normalise(d.diffusion_x0(f_s, f_t, a_s))
        mse = {}
        for t in ts:
            if t >= d.schedule.num_train_timesteps:
                continue
            eps = torch.randn(x0.shape, generator=gen, device=x.device)
            pred = d.denoiser(d.schedule.add_noise(x0, eps, t), t).float()
            mse[str(t)] = _r(F.mse_loss(pred, eps), 5)
        out["eps_mse_per_t"] = mse
    return out
