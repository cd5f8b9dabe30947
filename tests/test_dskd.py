"""DSKD behaviour: schedule, guided denoising, LSH loss, gradient routing, and a small learning run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dskd.methods import create_distiller
from dskd.methods.dskd import V1_OPTIONS
from dskd.methods.lsh import LSHHash
from dskd.methods.schedule import DiffusionSchedule
from tests.helpers.nets import TinyNet, fresh_teacher, grads_by_term, synthetic, train_history

# The v1 reconstruction with the spec's starting values (the defaults before issue 14): these tests
# pin its behaviour; tests/test_dskd_v2.py covers the v2 defaults.
V1 = {**V1_OPTIONS, "t0": 400, "guidance_scale": 1.0, "lsh_on": "spatial", "detach_adapter_input": True}


# -- schedule ---------------------------------------------------------------------------


def test_add_noise_matches_closed_form() -> None:
    sched = DiffusionSchedule(1000, 1e-4, 0.02)
    x0 = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    noise = torch.randn_like(x0)
    for t in (0, 399, 999):
        alpha_bar = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(t + 1))
        expected = math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * noise
        assert torch.allclose(sched.add_noise(x0, noise, t), expected, atol=1e-12)
    ts = torch.tensor([0, 399, 999])
    per_sample = sched.add_noise(x0, noise, ts)
    for i, t in enumerate(ts.tolist()):
        assert torch.allclose(per_sample[i], sched.add_noise(x0[i : i + 1], noise[i : i + 1], t)[0])
    assert 0.1 < float(sched.alphas_cumprod[400]) < 0.3  # the SDEdit start keeps some signal


def test_sampling_timesteps_follow_diffkd() -> None:
    sched = DiffusionSchedule()
    assert sched.sampling_timesteps(400, 5) == [(400, 300), (300, 200), (200, 100), (100, 0), (0, -1)]
    assert sched.sampling_timesteps(250, 1) == [(250, -1)]


@pytest.mark.parametrize(("t0", "steps"), [(400, 5), (999, 10), (50, 1)])
def test_ddim_with_oracle_noise_predictor_recovers_x0(t0: int, steps: int) -> None:
    sched = DiffusionSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 8, 3, 3, generator=g, dtype=torch.float64)
    x = sched.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t0)
    assert (x - x0).abs().max() > 0.1
    for t, t_prev in sched.sampling_timesteps(t0, steps):
        a = sched.alpha_bar(t, x)
        oracle_eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = sched.step(oracle_eps, t, t_prev, x)
    assert torch.allclose(x, x0, atol=1e-9)


# -- a small trained teacher on synthetic data -------------------------------------------


# `teacher` (a TinyNet(32) trained on `synthetic`) is a fixture of tests/conftest.py.


# -- guidance ---------------------------------------------------------------------------


@pytest.mark.parametrize("target_kind", ["label", "soft", "mix"])
def test_guidance_raises_teacher_log_probability_of_target(teacher: TinyNet, target_kind: str) -> None:
    torch.manual_seed(0)
    d = create_distiller("dskd", TinyNet(16), fresh_teacher(teacher), {**V1, "guidance_target": target_kind})
    x, y = synthetic(32, seed=4)
    with torch.no_grad():
        z_t, _ = d.teacher_outputs(x)
        f_s = d.student.forward_features(x)
    target = d.guidance_target(y, z_t)
    noise = torch.randn_like(f_s)

    def objective(scale: float) -> float:
        f_hat, extra = d.denoise(f_s, target, noise=noise, scale=scale)
        assert extra is None
        with torch.no_grad():
            log_p = F.log_softmax(d.teacher_classifier(f_hat), dim=1)
        return float((target * log_p).sum(1).mean())

    unguided, default, strong = objective(0.0), objective(1.0), objective(10.0)
    assert unguided < default < strong
    assert strong - unguided > 0.1


def test_guidance_does_not_touch_parameter_grads(teacher: TinyNet) -> None:
    torch.manual_seed(0)
    d = create_distiller("dskd", TinyNet(16), fresh_teacher(teacher), {**V1, "guidance_scale": 5.0})
    x, y = synthetic(16, seed=5)
    d(x, y, progress=1.0)  # forward only: guidance gradients are taken inside
    assert all(p.grad is None for p in d.parameters())


# -- LSH --------------------------------------------------------------------------------


def test_lsh_bits_are_balanced_after_bias_initialisation() -> None:
    torch.manual_seed(0)
    lsh = LSHHash(16, 64, std=1.0, bias_batches=5)
    offset = torch.linspace(0.5, 3.0, 16)  # non-centred, like post-ReLU features

    def sample(n: int) -> torch.Tensor:
        return torch.randn(n, 16) + offset

    before = lsh.hash(sample(2000)).mean(0)
    assert (before - 0.5).abs().max() > 0.3  # hyperplanes through 0 split these badly
    for _ in range(5):
        lsh.observe(sample(256))
    bias = lsh.bias.clone()
    lsh.observe(sample(256))  # past bias_batches: frozen
    assert torch.equal(bias, lsh.bias)
    after = lsh.hash(sample(4000)).mean(0)
    assert (after - 0.5).abs().max() < 0.12
    assert abs(float(after.mean()) - 0.5) < 0.02


def test_lsh_bias_momentum_keeps_bits_balanced_when_features_drift() -> None:
    """A frozen bias goes stale when the hashed features move (DSKD hashes the student's own,
    still-training features); with `bias_momentum` it follows them and the bits stay balanced."""
    torch.manual_seed(0)
    frozen = LSHHash(16, 64, bias_batches=5)
    tracking = LSHHash(16, 64, bias_batches=5, bias_momentum=0.2)
    tracking.weight.copy_(frozen.weight)
    for _ in range(5):
        batch = torch.randn(256, 16)
        frozen.observe(batch)
        tracking.observe(batch)
    assert torch.equal(frozen.bias, tracking.bias)  # identical until the initial batches are over
    shifted = lambda n: torch.randn(n, 16) + 2.0  # noqa: E731  (the features drifted)
    for _ in range(40):
        batch = shifted(256)
        frozen.observe(batch)
        tracking.observe(batch)
    imbalance = lambda lsh: float((lsh.hash(shifted(4000)).mean(0) - 0.5).abs().max())  # noqa: E731
    assert imbalance(frozen) > 0.3
    assert imbalance(tracking) < 0.12


def test_lsh_bias_is_per_bit_on_spatial_maps() -> None:
    torch.manual_seed(0)
    lsh = LSHHash(8, 32, bias_batches=3)
    maps = lambda: torch.relu(torch.randn(16, 8, 4, 4) + 1.0)  # noqa: E731
    for _ in range(3):
        lsh.observe(maps())
    bits = lsh.hash(maps())
    assert bits.shape == (16, 32, 4, 4)
    assert (bits.mean(dim=(0, 2, 3)) - 0.5).abs().max() < 0.15


def test_lsh_loss_near_zero_when_equal_and_grows_with_angle() -> None:
    torch.manual_seed(0)
    dim = 64
    lsh = LSHHash(dim, 4 * dim, bias_batches=1)
    target = torch.randn(256, dim)
    lsh.observe(target)
    other = torch.randn(256, dim)
    other = other - (other * target).sum(1, keepdim=True) / target.pow(2).sum(1, keepdim=True) * target
    other = other / other.norm(dim=1, keepdim=True) * target.norm(dim=1, keepdim=True)  # ⟂ target, same norm
    losses = []
    for angle in (0.0, math.pi / 16, math.pi / 8, math.pi / 4, math.pi / 2, math.pi):
        f = math.cos(angle) * target + math.sin(angle) * other
        losses.append(float(lsh.loss(f, target)))
    assert all(a < b for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[0] < 0.1 * losses[4]
    assert losses[0] < 0.15


def test_lsh_correct_only_mask_excludes_samples() -> None:
    torch.manual_seed(0)
    lsh = LSHHash(8, 16)
    target = torch.randn(4, 8)
    f = target.clone()
    f[2:] = -f[2:]  # samples 2, 3 disagree on every bit
    mask = torch.tensor([True, True, False, False])
    assert float(lsh.loss(f, target, mask)) == pytest.approx(float(lsh.loss(f[:2], target[:2])))
    assert float(lsh.loss(f, target, torch.zeros(4, dtype=torch.bool))) == 0.0


# -- gradient routing -------------------------------------------------------------------


@pytest.mark.parametrize("form", ["gradient", "loss"])
def test_each_module_learns_only_from_its_own_terms(teacher: TinyNet, form: str) -> None:
    torch.manual_seed(0)
    d = create_distiller(
        "dskd", TinyNet(16), fresh_teacher(teacher),
        {**V1, "guidance_form": form, "lsh_warmup": 0.0, "feature_mse": 0.5},
    )
    x, y = synthetic(16, seed=6)
    _, losses = d(x, y, progress=0.5)
    expected_terms = {"ce", "kd", "adapt", "diff", "lsh", "mse"} | ({"guide"} if form == "loss" else set())
    assert set(losses) == expected_terms

    student = grads_by_term(d, losses, list(d.student.parameters()))
    denoiser = grads_by_term(d, losses, list(d.denoiser.parameters()))
    adapter = grads_by_term(d, losses, list(d.adapter.parameters()))

    assert {k for k, v in student.items() if v > 0} == {"ce", "kd", "lsh", "mse"}
    denoiser_terms = {"diff", "guide"} if form == "loss" else {"diff"}
    assert {k for k, v in denoiser.items() if v > 0} == denoiser_terms
    assert {k for k, v in adapter.items() if v > 0} == {"adapt"}

    sum(losses.values()).backward()
    assert all(p.grad is None for p in d.teacher.parameters())


def test_adapter_loss_reaches_student_when_not_detached(teacher: TinyNet) -> None:
    torch.manual_seed(0)
    d = create_distiller("dskd", TinyNet(16), fresh_teacher(teacher), {**V1, "detach_adapter_input": False})
    x, y = synthetic(16, seed=6)
    _, losses = d(x, y, progress=0.5)
    assert grads_by_term(d, {"adapt": losses["adapt"]}, list(d.student.parameters()))["adapt"] > 0


def test_lsh_weight_warms_up_linearly(teacher: TinyNet) -> None:
    torch.manual_seed(0)
    d = create_distiller("dskd", TinyNet(16), fresh_teacher(teacher), {**V1, "lsh_warmup": 0.5, "lsh_bias_batches": 1})
    d.eval()  # fixed BN statistics: the same batch gives the same features twice
    x, y = synthetic(16, seed=7)
    torch.manual_seed(1)
    _, early = d(x, y, progress=0.1)
    torch.manual_seed(1)
    _, late = d(x, y, progress=0.8)
    early_lsh, late_lsh = float(early["lsh"].detach()), float(late["lsh"].detach())
    assert late_lsh > 0
    assert early_lsh == pytest.approx(0.2 * late_lsh, rel=1e-5)


@pytest.mark.parametrize(
    "options",
    [{"feature_loss": "mse"}, {"lsh_on": "pooled"}, {"x0_source": "teacher"}, {"lsh_correct_only": True},
     {"guidance_scale": 0.0}, {"guidance_target": "mix", "guidance_form": "loss"}],
)
def test_ablation_variants_run(teacher: TinyNet, options: dict) -> None:
    torch.manual_seed(0)
    d = create_distiller("dskd", TinyNet(16), fresh_teacher(teacher), {**V1, **options, "lsh_warmup": 0.0})
    x, y = synthetic(16, seed=8)
    _, losses = d(x, y, progress=0.5)
    assert ("feat_mse" in losses) == (options.get("feature_loss") == "mse")
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None for p in d.trainable_parameters())


def test_teacher_x0_source_inverts_the_adapter(teacher: TinyNet) -> None:
    torch.manual_seed(0)
    d = create_distiller("dskd", TinyNet(32), fresh_teacher(teacher), {**V1, "x0_source": "teacher"})
    d.eval()
    f = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        assert torch.allclose(d.adapter.pseudo_inverse(d.adapter(f)), f, atol=1e-4)


# -- learning ---------------------------------------------------------------------------


@pytest.mark.slow
def test_dskd_steps_reduce_the_loss_of_a_fresh_student(teacher: TinyNet) -> None:
    torch.manual_seed(0)
    d = create_distiller("dskd", TinyNet(16), fresh_teacher(teacher), {**V1, "lsh_warmup": 0.0, "lsh_bias_batches": 5})
    x, y = synthetic(256, seed=9)
    d.train()
    history = train_history(d, x, y)

    def mean(key: str, part: slice) -> float:
        rows = history[part]
        return sum(r[key] for r in rows) / len(rows)

    first, last = slice(0, 5), slice(-5, None)
    for key in ("ce", "kd", "diff", "lsh"):
        assert mean(key, last) < mean(key, first), key
    total_first = sum(mean(k, first) for k in history[0])
    total_last = sum(mean(k, last) for k in history[0])
    assert total_last < 0.7 * total_first
    d.eval()
    xt, yt = synthetic(256, seed=11)
    with torch.no_grad():
        assert (d.student(xt).argmax(1) == yt).float().mean() > 0.6
