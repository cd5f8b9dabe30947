"""DSKD v2 (issue 14): teacher-space diffusion, the (a)–(e) options, and the probes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dskd.errors import UserError
from dskd.methods import create_distiller
from dskd.methods.diffusion_branch import ddim_invert
from dskd.methods.lsh import LSHHash
from dskd.methods.probes import dskd_probes
from dskd.methods.schedule import DiffusionSchedule
from tests.helpers.nets import TinyNet, fresh_teacher, grads_by_term, synthetic, train_history

# `teacher` (a TinyNet(32) trained on `synthetic`) is a fixture of tests/conftest.py.


def v2(teacher_model: TinyNet, **options: object):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return create_distiller("dskd", TinyNet(16), fresh_teacher(teacher_model), options)


def start_of_chain(d, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    """What the chain starts from: A(f_s), the guidance target and fixed noise (feature stats observed)."""
    with torch.no_grad():
        z_t, f_t = d.teacher_outputs(x)
        d.feature_stats.observe(f_t)
        a_s = d.adapter(d.student.forward_features(x))
    return a_s, d.guidance_target(y, z_t), torch.randn_like(a_s)


def test_defaults_build_the_branch_in_the_teacher_space(teacher: TinyNet) -> None:
    d = v2(teacher)
    assert d.teacher_space and d.denoiser.channels == 32 and d.lsh is not None and d.lsh.in_dim == 32
    assert d.denoiser.norm == "group" and d.denoiser.time_cond == "film"
    head = d.teacher.fc.weight
    assert d.lsh.weight.shape == (4 * 32 + head.shape[0], 32)
    extra = d.lsh.weight[4 * 32:]
    assert torch.allclose(F.cosine_similarity(extra, head, dim=1), torch.ones(head.shape[0]), atol=1e-5)
    # rescaled like a random row: comparable BCE logits
    assert torch.allclose(extra.norm(dim=1), torch.full((head.shape[0],), 32**0.5), rtol=1e-5)


def test_feature_scale_tracks_the_teacher_features(teacher: TinyNet) -> None:
    d = v2(teacher).train()
    x, y = synthetic(64, seed=20)
    for i in range(4):
        d(x[16 * i: 16 * (i + 1)], y[16 * i: 16 * (i + 1)], progress=0.05)
    with torch.no_grad():
        f_t = d.teacher.forward_features(x)
    assert torch.allclose(d.feature_stats.mean, f_t.mean(dim=(0, 2, 3)), atol=1e-4)
    normalised = d.feature_stats.normalise(f_t)
    assert abs(float(normalised.mean())) < 0.05 and 0.7 < float(normalised.std()) < 1.3


@pytest.mark.parametrize("loss_guidance", [0.0, 0.5])
def test_each_module_learns_only_from_its_own_terms(teacher: TinyNet, loss_guidance: float) -> None:
    d = v2(teacher, loss_guidance=loss_guidance, feature_mse=0.5, lsh_warmup=0.0)
    x, y = synthetic(16, seed=6)
    _, losses = d(x, y, progress=0.5)
    assert set(losses) == {"ce", "kd", "adapt", "diff", "lsh", "mse"} | ({"guide"} if loss_guidance else set())
    student = grads_by_term(d, losses, list(d.student.parameters()))
    adapter = grads_by_term(d, losses, list(d.adapter.parameters()))
    denoiser = grads_by_term(d, losses, list(d.denoiser.parameters()))
    # the feature loss ties A(f_s) to f̂: it reaches the student and the adapter, never the denoiser
    assert {k for k, v in student.items() if v > 0} == {"ce", "kd", "adapt", "lsh", "mse"}
    assert {k for k, v in adapter.items() if v > 0} == {"adapt", "lsh", "mse"}
    assert {k for k, v in denoiser.items() if v > 0} == ({"diff", "guide"} if loss_guidance else {"diff"})
    sum(losses.values()).backward()
    assert all(p.grad is None for p in d.teacher.parameters())


def test_guidance_in_the_teacher_space_raises_the_target_log_probability(teacher: TinyNet) -> None:
    d = v2(teacher).train()
    x, y = synthetic(32, seed=4)
    a_s, target, noise = start_of_chain(d, x, y)

    def log_p(scale: float) -> float:
        f_hat, _ = d.denoise(a_s, target, noise=noise, scale=scale)
        with torch.no_grad():
            return float((target * F.log_softmax(d.space_logits(f_hat), dim=1)).sum(1).mean())

    values = [log_p(s) for s in (0.0, 100.0, 1000.0)]
    assert values[0] < values[1] < values[2] and values[2] - values[0] > 0.1


def test_feature_start_keeps_the_chain_and_the_hash_off_until_it(teacher: TinyNet) -> None:
    d = v2(teacher, feature_start=0.3, lsh_warmup=0.2, lsh_bias_batches=1).train()
    calls = []
    d.denoiser.register_forward_hook(lambda *_: calls.append(1))
    x, y = synthetic(16, seed=7)
    _, early = d(x, y, progress=0.2)
    assert len(calls) == 1 and float(early["lsh"]) == 0.0 and int(d.lsh.batches_seen) == 0
    _, late = d(x, y, progress=0.4)  # half-way through the ramp that starts at feature_start
    assert len(calls) == 1 + 1 + d.options["steps"] and int(d.lsh.batches_seen) == 1
    assert d.feature_weight(0.4) == pytest.approx(0.5) and float(late["lsh"].detach()) > 0


def test_cancel_target_is_the_start_without_guidance(teacher: TinyNet) -> None:
    d = v2(teacher, target_mode="cancel").train()
    x, y = synthetic(8, seed=8)
    a_s, target, noise = start_of_chain(d, x, y)
    same, _ = d.denoise(a_s, target, noise=noise, scale=0.0)
    assert torch.allclose(same, a_s, atol=1e-5)  # the noise and the denoiser's error cancel exactly
    guided, _ = d.denoise(a_s, target, noise=noise)
    sample, _ = d.denoise(a_s, target, noise=noise, mode="sample")
    unguided, _ = d.denoise(a_s, target, noise=noise, scale=0.0, mode="sample")
    assert torch.allclose(guided - a_s, sample - unguided, atol=1e-4)  # only what guidance changed


def test_ddim_inversion_then_sampling_reconstructs_for_a_consistent_denoiser() -> None:
    sched = DiffusionSchedule()
    fixed = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    class ConstantEps(torch.nn.Module):  # ε_θ independent of x and t: inversion is then exact
        def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
            return fixed

    x0 = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    x = ddim_invert(ConstantEps(), sched, x0, 100, 5)
    assert (x - x0).abs().max() > 0.1  # it went somewhere: x_t0 ≠ x0
    for t, t_prev in sched.sampling_timesteps(100, 5):
        x = sched.step(fixed, t, t_prev, x)
    assert torch.allclose(x, x0, atol=1e-9)


def test_invert_mode_has_no_random_noise(teacher: TinyNet) -> None:
    d = v2(teacher, target_mode="invert").train()
    x, y = synthetic(8, seed=9)
    with torch.no_grad():
        z_t, _ = d.teacher_outputs(x)
        a_s = d.adapter(d.student.forward_features(x))
    target = d.guidance_target(y, z_t)
    first, _ = d.denoise(a_s, target)
    second, _ = d.denoise(a_s, target)
    assert torch.equal(first, second)


def test_soft_hash_targets_see_a_move_that_flips_no_bit() -> None:
    torch.manual_seed(0)
    lsh = LSHHash(16, 64, bias_batches=1)
    lsh.observe(torch.randn(32, 16))
    target = torch.randn(32, 16)
    f = target + 0.3 * torch.randn(32, 16)
    nudged = target + 1e-3 * torch.randn(32, 16)
    assert torch.equal(lsh.hash(nudged), lsh.hash(target))
    assert float(lsh.loss(f, nudged)) == float(lsh.loss(f, target))  # hard bits: blind to it
    assert float(lsh.loss(f, nudged, soft=0.5)) != float(lsh.loss(f, target, soft=0.5))


@pytest.mark.parametrize(
    ("options", "field"),
    [({"diffusion_space": "student"}, "dskd.lsh_head_planes"), ({"target_mode": "noise"}, "dskd.target_mode"),
     ({"loss_guidance": -1.0}, "dskd.loss_guidance"), ({"feature_start": 1.5}, "dskd.feature_start"),
     ({"denoiser_norm": "layer"}, "dskd.denoiser_norm")],
)
def test_bad_v2_options_are_user_errors(teacher: TinyNet, options: dict, field: str) -> None:
    with pytest.raises(UserError, match=field):
        create_distiller("dskd", TinyNet(16), fresh_teacher(teacher), options)


@pytest.mark.parametrize(
    "options",
    [{}, {"target_mode": "cancel"}, {"target_mode": "invert", "lsh_soft": 1.0}, {"loss_guidance": 0.3},
     {"x0_source": "self"}, {"diffusion_space": "student", "lsh_head_planes": False, "x0_source": "teacher"},
     {"feature_loss": "mse", "lsh_head_planes": False}, {"lsh_on": "spatial"}],
)
def test_v2_variants_train_and_keep_every_parameter_in_use(teacher: TinyNet, options: dict) -> None:
    d = v2(teacher, **options, lsh_warmup=0.0).train()
    x, y = synthetic(16, seed=10)
    _, losses = d(x, y, progress=0.5)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None for p in d.trainable_parameters())
    assert set(d.student.state_dict()) == set(TinyNet(16).state_dict())  # nothing joins the student


def test_v2_steps_reduce_the_loss_of_a_fresh_student(teacher: TinyNet) -> None:
    d = v2(teacher, lsh_warmup=0.0, lsh_bias_batches=5, feature_start=0.1).train()
    x, y = synthetic(256, seed=9)
    history = train_history(d, x, y)
    first, last = history[:5], history[-5:]
    for key in ("ce", "kd", "diff", "adapt"):
        assert sum(r[key] for r in last) < sum(r[key] for r in first), key
    d.eval()
    xt, yt = synthetic(256, seed=11)
    with torch.no_grad():
        assert (d.student(xt).argmax(1) == yt).float().mean() > 0.6


def test_probes_measure_what_guidance_moves_without_training_anything(teacher: TinyNet) -> None:
    d = v2(teacher, guidance_scale=1000.0).train()
    x, y = synthetic(64, seed=12)
    d(x, y, progress=0.5)  # sets the feature scale and the hash bias
    before = {k: v.clone() for k, v in d.state_dict().items()}
    rng = torch.get_rng_state()
    p = dskd_probes(d, x, y, ts=(0, 100, 999))
    assert torch.equal(rng, torch.get_rng_state())  # the training RNG stream is untouched
    assert all(torch.equal(v, d.state_dict()[k]) for k, v in before.items())
    assert p["teacher_head_acc_f_hat"] >= p["teacher_head_acc_f_hat_s0"]
    assert p["bits_differ_from_s0_head"] > 0  # the head planes see what guidance changed
    assert 0 <= p["bits_differ_from_student"] <= 1 and -1 <= p["cos_to_teacher"] <= 1
    assert set(p["eps_mse_per_t"]) == {"0", "100", "999"}
    assert p == dskd_probes(d, x, y, ts=(0, 100, 999))  # fixed noise: the same numbers again


@pytest.mark.parametrize("shape", [(16, 32, 4, 4), (16, 32)])
def test_feature_statistics_match_var_mean_on_channels_last_maps(shape: tuple[int, ...]) -> None:
    """FeatureStats' per-channel statistics (two pooled passes, issue 15) are torch.var_mean's."""
    from dskd.methods.diffusion_branch import channel_var_mean

    g = torch.Generator().manual_seed(0)
    f = torch.randn(*shape, generator=g) * torch.linspace(0.5, 3.0, 32).view(1, -1, *[1] * (len(shape) - 2)) + 2.0
    if f.dim() == 4:
        f = f.contiguous(memory_format=torch.channels_last)
    var, mean = channel_var_mean(f)
    want_var, want_mean = torch.var_mean(f, dim=(0, 2, 3) if f.dim() == 4 else (0,))
    assert torch.allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(var, want_var, rtol=1e-5, atol=1e-6)
