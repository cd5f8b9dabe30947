"""Issue 15: the fast DSKD step computes what the general (autograd) step computes, without syncs.

The oracle is `guidance_impl = "autograd"`, the original guidance path (kept as the general
one). Both distillers start from the same weights and RNG state, so losses and every
parameter gradient must agree to float32 rounding.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from dskd.methods import create_distiller
from dskd.methods.bookkeeping import LossBook
from dskd.methods.dskd import V1_OPTIONS
from dskd.methods.guidance import (
    GuideWeights,
    HeadWeights,
    guidance_gradient_closed_form,
    has_pooled_linear_head,
    head_gradient_closed_form,
)
from dskd.models import create_model

# v1 (before issue 14) with the benchmark's tuned values, the v1 spec's starting values, and v2 (the defaults).
V1_SHIPPED = {**V1_OPTIONS, "lsh_on": "pooled", "t0": 100, "guidance_scale": 100.0, "detach_adapter_input": False}
V1_SPEC = {**V1_OPTIONS, "lsh_on": "spatial", "t0": 400, "guidance_scale": 1.0, "detach_adapter_input": True}
SHIPPED: dict = {}
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::lift_fresh")


def pair(options: dict, teacher_name: str = "resnet8x4") -> tuple[torch.nn.Module, torch.nn.Module]:
    """(fast, oracle) DSKD distillers with identical weights; teacher width 256 ≠ student 64."""
    torch.manual_seed(0)
    teacher = create_model(teacher_name, num_classes=10, in_chans=3)
    fast = create_distiller("dskd", create_model("resnet8", num_classes=10, in_chans=3), teacher, options)
    with torch.no_grad():  # a non-trivial adapter BN, so both BN modes are really exercised
        fast.adapter.bn.weight.uniform_(0.5, 1.5)
        fast.adapter.bn.bias.normal_(0.0, 0.3)
        fast.adapter.bn.running_mean.normal_(0.0, 0.3)
        fast.adapter.bn.running_var.uniform_(0.5, 2.0)
        # Hash bias already set (as after lsh_bias_batches): a fresh median bias puts one projection
        # per bit exactly on the threshold, where float rounding alone may flip the bit.
        fast.lsh.bias.normal_(0.0, 0.5)
        fast.lsh.batches_seen.fill_(fast.lsh.bias_batches)
    oracle = copy.deepcopy(fast)
    oracle.options = {**oracle.options, "guidance_impl": "autograd"}
    oracle.closed_form_guidance = False
    assert fast.closed_form_guidance and not oracle.closed_form_guidance
    return fast, oracle


def data(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def step(d: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 5) -> tuple[dict, dict]:
    """One forward + backward from a fixed RNG state: (losses, {param name: grad})."""
    torch.manual_seed(seed)
    _, losses = d(x, y, 0.5)
    sum(v.float() for v in losses.values()).backward()
    grads = {n: p.grad.detach().clone() for n, p in d.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize(
    ("options", "mode"),
    [
        (V1_SHIPPED, "train"),
        (V1_SPEC, "train"),  # per-position hash, t0 = 400, s = 1
        ({**V1_SHIPPED, "guidance_target": "mix", "feature_mse": 0.5}, "train"),
        (V1_SHIPPED, "eval"),  # adapter BN with running statistics: the constant-per-position form
        (SHIPPED, "train"),  # v2: teacher-space diffusion, the head's closed form with the feature scale
        (SHIPPED, "eval"),
        ({"target_mode": "cancel", "loss_guidance": 0.5, "guidance_target": "mix", "feature_mse": 0.5}, "train"),
        ({"target_mode": "invert", "lsh_soft": 0.5}, "train"),
        # v2 choices in the student's space: the adapter's closed form with the feature scale's chain rule
        ({"diffusion_space": "student", "lsh_head_planes": False}, "train"),
        ({"diffusion_space": "student", "x0_source": "self", "lsh_head_planes": False}, "eval"),
    ],
)
def test_fast_step_matches_autograd_oracle(options: dict, mode: str) -> None:
    fast, oracle = pair(options)
    x, y = data()
    for d in (fast, oracle):
        d.train(mode == "train")
    lf, gf = step(fast, x, y)
    lo, go = step(oracle, x, y)
    assert lf.keys() == lo.keys()
    for k in lf:
        assert torch.allclose(lf[k], lo[k], rtol=1e-4, atol=1e-6), (k, lf[k], lo[k])
    assert gf.keys() == go.keys() and len(gf) > 0
    for n in gf:
        assert torch.allclose(gf[n], go[n], rtol=1e-3, atol=1e-6), n


@pytest.mark.parametrize("options", [V1_SHIPPED, SHIPPED], ids=["v1", "v2"])
def test_denoised_features_match_under_bf16_autocast(options: dict) -> None:
    """Fast and autograd guidance denoise alike under CPU bf16 autocast: v1 in the student's feature
    space, v2 (teacher_space) on the adapter's output once the feature scale has seen the teacher."""
    fast, oracle = pair(options)
    x, y = data()
    with torch.no_grad():
        z_t, f_t = fast.teacher_outputs(x)
        feats = fast.student.forward_features(x)
        if fast.teacher_space:
            feats = fast.adapter(feats)
            for d in (fast, oracle):
                d.feature_stats.observe(f_t)
    target = fast.guidance_target(y, z_t)
    noise = torch.randn_like(feats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = fast.denoise(feats, target, noise=noise)
        want, _ = oracle.denoise(feats, target, noise=noise)
    unguided, _ = fast.denoise(feats, target, noise=noise, scale=0.0)
    assert (want - unguided).abs().max() > 1e-3  # guidance really moved f̂ ...
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-4)  # ... and both paths moved it alike


@pytest.mark.parametrize("train_mode", [True, False])
def test_closed_form_gradient_equals_autograd_through_the_guide(train_mode: bool) -> None:
    fast, _ = pair(V1_SHIPPED)
    fast.train(train_mode)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(8, 64, 8, 8, generator=g).abs()
    target = torch.softmax(torch.randn(8, 10, generator=g), dim=1)
    xg = x0.clone().requires_grad_(True)
    logits = fast.teacher_classifier(xg)
    (want,) = torch.autograd.grad((target * torch.log_softmax(logits, 1)).sum(), [xg])
    got = guidance_gradient_closed_form(x0, target, GuideWeights.read(fast.adapter, fast.teacher.fc))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-9)


def scaled_head_case(seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(teacher resnet8x4, x̂0 8×256×8×8, soft target π, feature scale σ, shift μ): a teacher-space guide case."""
    torch.manual_seed(0)
    teacher = create_model("resnet8x4", num_classes=10, in_chans=3)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(8, 256, 8, 8, generator=g)
    target = torch.softmax(torch.randn(8, 10, generator=g), dim=1)
    scale, shift = torch.rand(256, generator=g) + 0.5, torch.randn(256, generator=g)
    return teacher, x0, target, scale, shift


def test_teacher_space_closed_form_equals_autograd_through_the_scaled_head() -> None:
    """v2's guide: the teacher head read on σ ⊙ x + μ (the diffusion's feature scale)."""
    teacher, x0, target, scale, shift = scaled_head_case(3)
    xg = x0.clone().requires_grad_(True)
    logits = teacher.forward_head(xg * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    (want,) = torch.autograd.grad((target * torch.log_softmax(logits, 1)).sum(), [xg])
    got = head_gradient_closed_form(x0, target, HeadWeights.read(teacher.fc, scale, shift))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-9)


def test_head_detection() -> None:
    assert has_pooled_linear_head(create_model("resnet8", num_classes=10, in_chans=3))
    assert has_pooled_linear_head(create_model("mobilenetv2", num_classes=10, in_chans=3))

    class OwnHead(torch.nn.Module):
        fc = torch.nn.Linear(4, 2)

        def forward_head(self, f: torch.Tensor) -> torch.Tensor:
            return self.fc(f.amax(dim=(2, 3)))

    assert not has_pooled_linear_head(OwnHead())  # undeclared custom head: autograd path


@pytest.mark.parametrize("options", [V1_SHIPPED, SHIPPED])
def test_nofeat_skips_the_chain_and_keeps_every_gradient(options: dict) -> None:
    """w_lsh = 0: no DDIM chain (one denoiser call, the L_diff one), same gradients as DSKD minus L_lsh.

    The skipped chain draws no noise, so L_diff sees other random draws than in the full run:
    the denoiser (trained only by L_diff) is compared on L_diff's value range, the rest exactly.
    """
    fast, _ = pair(options)
    nofeat = copy.deepcopy(fast)
    nofeat.options = {**nofeat.options, "w_lsh": 0.0}
    calls = []
    nofeat.denoiser.register_forward_hook(lambda *_: calls.append(1))
    x, y = data()
    ln, gn = step(nofeat, x, y)
    assert len(calls) == 1 and float(ln["lsh"]) == 0.0 and set(ln) == {"ce", "kd", "adapt", "diff", "lsh"}
    torch.manual_seed(5)
    _, lf = fast(x, y, 0.5)
    named = [(n, p) for n, p in fast.named_parameters() if p.requires_grad and not n.startswith("denoiser.")]
    kept = sum(v for k, v in lf.items() if k not in ("lsh", "diff"))
    grads = torch.autograd.grad(kept, [p for _, p in named], allow_unused=True)
    for (n, _), g in zip(named, grads, strict=True):
        if g is None:
            assert n not in gn
        else:
            assert torch.allclose(gn[n], g, rtol=1e-5, atol=1e-7), n
    assert all(n.startswith("denoiser.") or n in dict(named) for n in gn)
    for k in ("ce", "kd", "adapt"):
        assert torch.allclose(ln[k], lf[k].detach())
    assert 0.1 < float(ln["diff"]) < 10.0


def count_sync_ops(fn) -> int:  # noqa: ANN001
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name in SYNC_OPS)


@pytest.mark.parametrize("options", [V1_SHIPPED, SHIPPED])
def test_training_step_reads_the_device_once(options: dict) -> None:
    """Forward: no call that would block on a GPU; bookkeeping: one finite check per step."""
    fast, _ = pair(options)
    x, y = data()
    book = LossBook()
    opt = torch.optim.SGD(list(fast.trainable_parameters()), lr=0.01)

    def train_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, losses = fast(x, y, 0.5)
        loss = book.add(losses)
        assert not book.bad_terms()
        opt.zero_grad()
        loss.backward()
        opt.step()

    train_step()  # first step reads the hash's (and the feature scale's) batch counter once
    assert count_sync_ops(train_step) == 1
    totals = book.totals()
    assert set(totals) == {"ce", "kd", "adapt", "diff", "lsh"} and all(v == v for v in totals.values())


def test_loss_book_names_non_finite_terms() -> None:
    book = LossBook()
    book.add({"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
    assert book.bad_terms() == []
    book.add({"a": torch.tensor(float("nan")), "b": torch.tensor(3.0)})
    assert book.bad_terms() == ["a"]
    assert book.totals()["b"] == 5.0


@pytest.mark.parametrize("options", [V1_SHIPPED, SHIPPED])
def test_capture_falls_back_to_eager_when_compiling_fails(monkeypatch: pytest.MonkeyPatch, options: dict) -> None:
    fast, _ = pair(options)
    captured = copy.deepcopy(fast)
    captured.options = {**captured.options, "capture": "compile"}

    def broken_compile(*_a, **_k):  # noqa: ANN002, ANN003
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    x, y = data()
    lf, gf = step(fast, x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lc, gc = step(captured, x, y)
    assert any("capture=compile failed" in str(w.message) for w in caught)
    for k in lf:
        assert torch.equal(lf[k], lc[k]), k
    for n in gf:
        assert torch.equal(gf[n], gc[n]), n


@pytest.mark.slow
def test_capture_compile_on_cpu_matches_eager() -> None:
    """Real torch.compile (default mode on CPU; reduce-overhead = CUDA graphs on a GPU)."""
    fast, _ = pair(V1_SHIPPED)
    captured = copy.deepcopy(fast)
    captured.options = {**captured.options, "capture": "compile"}
    x, y = data()
    lf, gf = step(fast, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would hide a compile failure
        lc, gc = step(captured, x, y)
    assert not captured._capture_failed
    for k in lf:
        assert torch.allclose(lf[k], lc[k], rtol=1e-3, atol=1e-5), k
    for n in gf:
        assert torch.allclose(gf[n], gc[n], rtol=1e-2, atol=1e-5), n


def test_pooled_head_gradient_is_hw_times_the_per_position_gradient() -> None:
    """The chain's teacher-space guide reads only mean_hw x̂0 (issue 15): same gradient as the map form."""
    from dskd.methods.guidance import head_gradient_pooled

    teacher, x0, target, scale, shift = scaled_head_case(5)
    hw = HeadWeights.read(teacher.fc, scale, shift)
    want = head_gradient_closed_form(x0, target, hw)
    got = head_gradient_pooled(x0.mean(dim=(2, 3)), target, hw) / 64
    assert torch.allclose(got, want[:, :, 0, 0], rtol=1e-5, atol=1e-9)
    assert torch.equal(want, want[:, :, :1, :1].expand_as(want))  # the same at every position


@pytest.mark.parametrize("options", [V1_SHIPPED, SHIPPED], ids=["v1", "v2"])
def test_in_place_chain_leaves_its_start_alone(options: dict) -> None:
    """The no-grad DDIM chain writes into its own buffers (issue 15), never into the caller's x_t0."""
    fast, _ = pair(options)
    start, target = chain_inputs(fast)
    before = start.clone()
    out = fast.descend(start, target, 100.0)
    assert torch.equal(start, before) and out.data_ptr() != start.data_ptr()


def chain_inputs(d: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(the student's features in the diffusion space, guidance target π) for the fixed batch."""
    x, y = data()
    with torch.no_grad():
        z_t, _ = d.teacher_outputs(x)
        start = d.student.forward_features(x)
        if d.teacher_space:
            start = d.adapter(start)
    return start, d.guidance_target(y, z_t)


def per_step_head_chain(d: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    """The teacher-space guided chain as written before its pooled recurrence (issue 15): every step
    pools x_t and ε, subtracts the broadcast guidance from ε, then the DDIM update c_x·x_t + c_ε·ε̂."""
    from dskd.methods.guidance import head_gradient_pooled

    _, head = d._closed_form_guide()
    target_sum = target.sum(dim=1, keepdim=True)
    hw = x.shape[-2] * x.shape[-1]
    with torch.no_grad():
        x = x.float()
        for t, t_prev in d.schedule.sampling_timesteps(d.options["t0"], d.options["steps"]):
            eps = d.denoiser(x, t).float()
            a = d.schedule.alpha_bar_value(t)
            sa, s1a = a**0.5, (1.0 - a) ** 0.5
            with torch.autocast("cpu", enabled=False):
                pooled = (x.mean(dim=(2, 3)) - s1a * eps.mean(dim=(2, 3))) / sa
                g = head_gradient_pooled(pooled, target, head, target_sum) * (scale * s1a / sa / hw)
                c_x, c_eps = d.schedule.ddim_coefficients(t, t_prev)
                x = c_x * x + c_eps * (eps - g[:, :, None, None])
    return x


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_head_guided_chain_matches_the_per_step_form(autocast: bool) -> None:
    """The pooled-recurrence chain (`_descend_head_guided`) computes the per-step chain: to float32
    rounding in float32; under bf16 autocast those roundings may move a bf16 conv input by one ulp."""
    fast, _ = pair(SHIPPED)
    start, target = chain_inputs(fast)
    with torch.no_grad():  # a feature scale that has seen data, so the head's σ and μ matter
        fast.feature_stats.observe(start)
    x = fast.schedule.add_noise(fast.feature_stats.normalise(start), torch.randn(start.shape), fast.options["t0"])
    s = float(fast.options["guidance_scale"])  # the default, 1000
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = fast.descend(x, target, s)
        want = per_step_head_chain(fast, x, target, s)
        unguided = fast.descend(x, target, 0.0)
    assert (want - unguided).abs().max() > 1e-2  # guidance really moved the chain
    if autocast:
        assert float((got - want).norm() / want.norm()) < 1e-3
    else:
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
