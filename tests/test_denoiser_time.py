"""Issue 14 item 1: a denoiser whose noise estimate depends on t in the mode sampling uses.

Sampling (DSKD.sample_chain) calls the denoiser in train mode with one host-side t for the
whole batch. With `time_cond = "add"` the embedding is a per-channel constant before a BN,
which the BN removes; `"film"` scales/shifts after the norms, so t survives.
"""

from __future__ import annotations

import pytest
import torch

from dskd.methods import create_distiller
from dskd.methods.denoiser import Denoiser
from tests.helpers.nets import TinyNet, batch


def trained_like(time_cond: str) -> Denoiser:
    """A denoiser whose time tables are non-zero, as after training (both tables random)."""
    torch.manual_seed(0)
    d = Denoiser(16, 1000, time_cond).train()
    with torch.no_grad():
        d.time_embed.weight.normal_(0.0, 1.0)
        if time_cond == "film":
            d.time_film.weight.normal_(0.0, 0.3)
    return d


def sampling_gap(d: Denoiser) -> float:
    """max |ε(x, 0) − ε(x, 100)| relative to |ε|, called exactly as the DDIM chain calls it."""
    x = torch.randn(32, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        e0, e100 = d(x, 0), d(x, 100)
    return float((e0 - e100).abs().max() / e0.abs().max())


def test_added_embedding_is_removed_by_batch_norm_in_sampling_mode() -> None:
    assert sampling_gap(trained_like("add")) < 1e-4  # the defect issue 14 found, pinned


def test_film_conditioning_survives_normalisation_in_sampling_mode() -> None:
    assert sampling_gap(trained_like("film")) > 0.05


def test_film_starts_as_the_add_denoiser_and_learns_from_the_diffusion_loss() -> None:
    torch.manual_seed(0)
    add = Denoiser(16, 1000, "add").train()
    torch.manual_seed(0)
    film = Denoiser(16, 1000, "film").train()
    x = torch.randn(8, 16, 4, 4)
    t = torch.randint(0, 1000, (8,))
    assert torch.allclose(add(x, t), film(x, t))  # zero-initialised FiLM: identical at the start
    film(x, t).pow(2).mean().backward()
    assert film.time_film.weight.grad is not None and film.time_film.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("time_cond", ["add", "film"])
def test_dskd_option_builds_the_denoiser_and_trains(time_cond: str) -> None:
    torch.manual_seed(0)
    d = create_distiller("dskd", TinyNet(16), TinyNet(32), {"denoiser_time": time_cond, "guidance_scale": 10.0})
    assert d.denoiser.time_cond == time_cond
    x, y = batch(8)
    _, losses = d(x, y, 0.5)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


# -- the v2 default: GroupNorm + FiLM, tested in the mode the DSKD chain really calls it ------------


def test_group_norm_denoiser_knows_t_and_does_not_depend_on_its_batch() -> None:
    d = Denoiser(16, 1000, "film", "group").train()
    with torch.no_grad():
        d.time_embed.weight.normal_(0.0, 1.0)
        d.time_film.weight.normal_(0.0, 0.3)
    assert sampling_gap(d) > 0.05
    x = torch.randn(8, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = d(x, 100)
        assert torch.allclose(whole[:3], d(x[:3], 100), atol=1e-5)  # no other sample changes a sample's ε
        mixed = d(x, torch.tensor([0, 100, 999, 5, 100, 3, 100, 7]))
        assert torch.allclose(mixed[1], whole[1], atol=1e-5)  # nor the other samples' t
        d.eval()
        assert torch.allclose(d(x, 100), whole, atol=1e-6)  # train and eval mode: the same function


def test_dskd_chain_calls_a_t_aware_denoiser_in_its_own_mode() -> None:
    """Hook the denoiser inside the real DDIM chain of a default (v2) DSKD: every call gets one
    host-side t for the whole batch, in the distiller's training mode, and on exactly those inputs
    ε_θ(x, t) differs from ε_θ(x, t') — the denoiser knows the noise level where sampling uses it."""
    torch.manual_seed(0)
    d = create_distiller("dskd", TinyNet(16), TinyNet(32), {}).train()
    assert d.denoiser.norm == "group" and d.denoiser.time_cond == "film"
    with torch.no_grad():  # time tables as after training (non-zero)
        d.denoiser.time_embed.weight.normal_(0.0, 1.0)
        d.denoiser.time_film.weight.normal_(0.0, 0.3)
    calls: list[tuple[torch.Tensor, object, bool]] = []
    hook = d.denoiser.register_forward_pre_hook(
        lambda m, args: calls.append((args[0].detach().clone(), args[1], m.training)))
    x, y = batch(8)
    with torch.no_grad():
        z_t, _ = d.teacher_outputs(x)
        a_s = d.adapter(d.student.forward_features(x))
    d.denoise(a_s, d.guidance_target(y, z_t))
    hook.remove()
    assert len(calls) == d.options["steps"]
    for x_t, t, training in calls:
        assert isinstance(t, int) and training  # one t for the batch, train mode: as sampling runs
        with torch.no_grad():
            e, e_other = d.denoiser(x_t, t), d.denoiser(x_t, (t + 300) % 1000)
        assert float((e - e_other).abs().max() / e.abs().max()) > 0.05


# -- issue 15: the fused GroupNorm forward is the module-by-module forward ---------------------------


@pytest.mark.parametrize("time_cond", ["film", "add"])
def test_fused_group_norm_forward_computes_the_module_path(time_cond: str) -> None:
    """One layout, float32 between the convs, FiLM folded into the norm's affine for a host-side t:
    the same outputs and parameter gradients as `forward_modules` (the oracle) in float32, for one t
    and for a t per sample, and the same outputs to bf16 rounding under CPU bf16 autocast."""
    torch.manual_seed(0)
    d = Denoiser(16, 1000, time_cond, "group").train()
    with torch.no_grad():  # time tables and norm affines as after training (non-trivial)
        d.time_embed.weight.normal_(0.0, 1.0)
        if time_cond == "film":
            d.time_film.weight.normal_(0.0, 0.3)
        for m in d.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 16, 4, 4, generator=g).contiguous(memory_format=torch.channels_last)  # trainer's layout
    w = torch.randn(8, 16, 4, 4, generator=g)
    params = [p for p in d.parameters() if p.requires_grad]
    for t in (75, torch.tensor([0, 100, 999, 5, 100, 3, 100, 7])):
        fused, ref = d(x, t), d.forward_modules(x, t)
        assert (fused - d(x, 500 if isinstance(t, int) else 999 - t)).abs().max() > 1e-2  # t matters here
        assert torch.allclose(fused, ref, rtol=1e-5, atol=1e-5)
        got = torch.autograd.grad((fused * w).sum(), params, allow_unused=True)
        want = torch.autograd.grad((ref * w).sum(), params, allow_unused=True)
        for p, a, b in zip(params, got, want, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-6, p.shape  # float32 summation order
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            fused, ref = d(x, t).float(), d.forward_modules(x, t).float()
        assert (fused - ref).abs().max() <= 2e-2 * ref.abs().max()  # a few bf16 ulps of the largest value


# -- issue 15: the float32 denoiser (DSKD's "auto" on CPU) ----------------------------------------


@pytest.mark.parametrize("precision", ["float32", "auto"])
def test_float32_denoiser_leaves_the_callers_autocast_and_computes_the_float32_oracle(precision: str) -> None:
    """Under the trainer's bf16 autocast a float32 denoiser returns float32 and the float32 module path's
    values, with autograd (channels-last) and without (the chain's NCHW layout): only speed differs."""
    torch.manual_seed(0)
    d = Denoiser(16, 1000, "film", "group", precision).train()
    with torch.no_grad():
        d.time_embed.weight.normal_(0.0, 1.0)
        d.time_film.weight.normal_(0.0, 0.3)
    x = torch.randn(8, 16, 4, 4, generator=torch.Generator().manual_seed(5)).contiguous(
        memory_format=torch.channels_last)
    for t in (75, torch.tensor([0, 100, 999, 5, 100, 3, 100, 7])):
        ref = d.forward_modules(x, t).detach()  # float32, no autocast: the oracle
        with torch.autocast("cpu", dtype=torch.bfloat16):
            live = d(x, t)
            with torch.no_grad():
                chain = d(x, t)
        assert live.dtype == chain.dtype == torch.float32
        assert torch.allclose(live, ref, rtol=1e-5, atol=1e-5)
        assert torch.allclose(chain, ref, rtol=1e-5, atol=1e-5)
        assert live.requires_grad and not chain.requires_grad
    assert d.runs_float32(torch.device("cpu"))
    assert d.runs_float32(torch.device("cuda")) == (precision == "float32")  # auto keeps autocast on a GPU


def test_dskd_ships_the_auto_precision_and_rejects_other_precisions() -> None:
    d = create_distiller("dskd", TinyNet(16), TinyNet(32), {})
    assert d.denoiser.precision == "auto" and d.options["steps"] == 5
    with pytest.raises(Exception, match="denoiser_precision"):
        create_distiller("dskd", TinyNet(16), TinyNet(32), {"denoiser_precision": "fp16"})
    with pytest.raises(ValueError, match="precision"):
        Denoiser(16, 1000, "film", "group", "half")


def test_no_grad_chain_call_runs_nchw_even_when_the_trainer_made_the_weights_channels_last() -> None:
    """The trainer converts the distiller to channels-last; a channels-last conv weight would make every
    output channels-last again (and the chain's GroupNorms several times slower on CPU). The no-grad
    float32 call must come out in NCHW strides, equal to the oracle, and leave the stored weights alone."""
    torch.manual_seed(0)
    d = Denoiser(16, 1000, "film", "group", "auto").train()
    with torch.no_grad():
        d.time_film.weight.normal_(0.0, 0.3)
    d = d.to(memory_format=torch.channels_last)
    weight_strides = {n: p.stride() for n, p in d.named_parameters()}
    assert any(p.dim() == 4 and not p.is_contiguous() for p in d.parameters())  # really converted
    x = torch.randn(8, 16, 4, 4, generator=torch.Generator().manual_seed(6)).contiguous(
        memory_format=torch.channels_last)
    nchw = torch.empty(8, 16, 4, 4).stride()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        chain = d(x, 75)
    assert chain.stride() == nchw
    assert torch.allclose(chain, d.forward_modules(x, 75).detach(), rtol=1e-5, atol=1e-5)
    assert {n: p.stride() for n, p in d.named_parameters()} == weight_strides
    with torch.autocast("cpu", dtype=torch.bfloat16):  # with autograd the trainer's channels-last stays
        assert d(x, 75).is_contiguous(memory_format=torch.channels_last)
