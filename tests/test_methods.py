"""Distillation methods: option handling, logit losses, and the Distiller contract for every method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dskd.errors import UserError
from dskd.methods import (
    create_distiller,
    list_methods,
    method_defaults,
    parse_method_option,
    resolve_method_options,
)
from dskd.methods.losses import dkd_loss, kd_loss
from tests.helpers.nets import TinyNet, batch

ALL_METHODS = ["ce", "kd", "dkd", "fitnet", "lshfm", "diffkd", "dskd"]


# -- registry and options ---------------------------------------------------------------


def test_list_methods_has_all_baselines_and_dskd() -> None:
    assert list_methods() == ALL_METHODS


def test_dskd_defaults_follow_the_spec() -> None:
    # DSKD v2 (issue 14, docs/dskd.md): the defaults are the shipped formulation; the v1 spec's
    # starting values are dskd.methods.dskd.V1_OPTIONS + t0 400, s 1, spatial, adapter detached.
    # the float32 denoiser on CPU: issue 15; steps stays 5 (bench/results/dskd_steps_probe_v3.json).
    d = method_defaults("dskd")
    expected = {
        "guidance_scale": 1000.0, "guidance_target": "label", "guidance_form": "gradient",
        "t0": 100, "steps": 5, "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
        "lsh_bits": None, "lsh_on": "pooled", "lsh_correct_only": False, "feature_mse": 0.0,
        "x0_source": "teacher", "detach_adapter_input": False, "alpha_kd": 1.0, "tau": 4.0,
        "w_ce": 1.0, "w_diff": 1.0, "w_adapt": 1.0, "w_lsh": 6.0, "feature_loss": "lsh",
        "diffusion_space": "teacher", "denoiser_time": "film", "denoiser_norm": "group",
        "denoiser_precision": "auto",
    }
    for name, value in expected.items():
        assert d[name] == value, name
    assert 0 < d["lsh_warmup"] <= 1
    assert method_defaults("kd") == {"w_ce": 0.1, "w_kd": 0.9, "tau": 4.0}
    assert method_defaults("dkd")["beta"] == 8.0
    assert math.isclose(method_defaults("dkd")["warmup"], 20 / 240)


def test_unknown_option_names_the_closest_valid_one() -> None:
    with pytest.raises(UserError, match=r"guidance_scal\b.*guidance_scale"):
        resolve_method_options("dskd", {"guidance_scal": 2.0})
    with pytest.raises(UserError, match="unknown option kd.temperature"):
        create_distiller("kd", TinyNet(), TinyNet(), {"temperature": 2.0})


@pytest.mark.parametrize(
    ("name", "value"),
    [("t0", "400"), ("t0", 400.5), ("steps", True), ("guidance_scale", "1.0"), ("lsh_correct_only", 1),
     ("guidance_target", "labels"), ("guidance_scale", -1.0), ("t0", 1000), ("w_lsh", float("nan"))],
)
def test_bad_option_values_raise_user_error(name: str, value: object) -> None:
    with pytest.raises(UserError, match=f"dskd.{name}"):
        create_distiller("dskd", TinyNet(), TinyNet(), {name: value})


def test_valid_overrides_are_applied_and_ints_accepted_for_floats() -> None:
    d = create_distiller("dskd", TinyNet(), TinyNet(), {"guidance_scale": 2, "lsh_bits": 32, "t0": 200})
    assert d.options["guidance_scale"] == 2.0 and isinstance(d.options["guidance_scale"], float)
    assert d.options["t0"] == 200 and d.lsh is not None and d.lsh.bits == 32


def test_parse_method_option_converts_cli_text() -> None:
    assert parse_method_option("dskd", "t0", "300") == 300
    assert parse_method_option("dskd", "lsh_bits", "none") is None
    assert parse_method_option("dskd", "lsh_correct_only", "true") is True
    with pytest.raises(UserError, match="dskd.t0"):
        parse_method_option("dskd", "t0", "abc")
    with pytest.raises(UserError, match="did you mean dskd.steps"):
        parse_method_option("dskd", "step", "3")


def test_unknown_method_and_missing_teacher_are_user_errors() -> None:
    with pytest.raises(UserError, match="'dskd'"):
        create_distiller("dsdk", TinyNet(), TinyNet(), None)
    with pytest.raises(UserError, match="needs a teacher"):
        create_distiller("kd", TinyNet(), None, None)
    with pytest.raises(UserError, match="classes"):
        create_distiller("kd", TinyNet(num_classes=4), TinyNet(num_classes=5), None)
    assert create_distiller("ce", TinyNet(), None, None) is not None


# -- logit losses against independent formulas ------------------------------------------


def test_kd_loss_matches_hinton_formula() -> None:
    zs, zt = torch.randn(5, 7), torch.randn(5, 7)
    tau = 4.0
    pt = F.softmax(zt / tau, 1)
    expected = (pt * (pt.log() - F.log_softmax(zs / tau, 1))).sum(1).mean() * tau**2
    assert torch.allclose(kd_loss(zs, zt, tau), expected, atol=1e-6)
    assert kd_loss(zt, zt, tau).abs() < 1e-6


def test_dkd_loss_matches_decoupled_definition() -> None:
    torch.manual_seed(0)
    zs, zt, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    alpha, beta, tau = 1.0, 8.0, 4.0
    ps, pt = F.softmax(zs / tau, 1), F.softmax(zt / tau, 1)
    tckd = nckd = 0.0
    for i in range(6):
        k = int(y[i])
        bs = torch.stack([ps[i, k], 1 - ps[i, k]])
        bt = torch.stack([pt[i, k], 1 - pt[i, k]])
        tckd += (bt * (bt.log() - bs.log())).sum()
        others = [j for j in range(5) if j != k]
        qs, qt = ps[i, others] / ps[i, others].sum(), pt[i, others] / pt[i, others].sum()
        nckd += (qt * (qt.log() - qs.log())).sum()
    expected = (alpha * tckd + beta * nckd) / 6 * tau**2
    assert torch.allclose(dkd_loss(zs, zt, y, alpha, beta, tau), expected, atol=1e-5)


def test_dkd_loss_is_finite_for_saturated_logits() -> None:
    zs = torch.tensor([[200.0, -200.0, 0.0]], requires_grad=True)
    zt = torch.tensor([[-300.0, 300.0, 0.0]])
    loss = dkd_loss(zs, zt, torch.tensor([0]), 1.0, 8.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()


def test_dkd_warmup_scales_with_progress() -> None:
    torch.manual_seed(0)
    d = create_distiller("dkd", TinyNet(), TinyNet(), {"warmup": 0.5})
    d.eval()
    x, y = batch()
    _, early = d(x, y, progress=0.1)
    _, late = d(x, y, progress=0.9)
    assert torch.allclose(early["dkd"] * 5, late["dkd"], rtol=1e-5)


# -- the Distiller contract, every method -----------------------------------------------


def make(method: str, options: dict | None = None, student_width: int = 8, teacher_width: int = 16):
    torch.manual_seed(0)
    student, teacher = TinyNet(student_width), TinyNet(teacher_width)
    return create_distiller(method, student, None if method == "ce" else teacher, options)


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_backward_finite_for_every_method(method: str, dtype: torch.dtype) -> None:
    d = make(method, {"lsh_warmup": 0.0} if method == "dskd" else None)
    d.train()
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        logits, losses = d(x, y, progress=0.5)
    assert logits.shape == (8, 4)
    assert losses and all(isinstance(k, str) for k in losses)
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), f"{method}:{name}={value}"
    sum(losses.values()).backward()
    student_grads = [p.grad for p in d.student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in student_grads)
    assert any(g.abs().sum() > 0 for g in student_grads)
    if d.teacher is not None:
        assert all(p.grad is None for p in d.teacher.parameters())
    for p in d.trainable_parameters():
        assert p.grad is not None, f"{method}: a trainable parameter got no gradient (DDP would fail)"


@pytest.mark.parametrize("method", ALL_METHODS)
def test_student_keeps_plain_keys_and_teacher_stays_frozen(method: str) -> None:
    d = make(method, {"lsh_warmup": 0.0} if method == "dskd" else None)
    plain_keys = {k: v.shape for k, v in TinyNet(8).state_dict().items()}
    teacher_before = {} if d.teacher is None else {k: v.clone() for k, v in d.teacher.state_dict().items()}
    params = list(d.trainable_parameters())
    opt = torch.optim.SGD(params, lr=0.01)
    d.train()
    for step in range(2):
        x, y = batch(seed=step)
        _, losses = d(x, y, progress=step / 2)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert {k: v.shape for k, v in d.student.state_dict().items()} == plain_keys
    if d.teacher is not None:
        assert not d.teacher.training
        teacher_ids = {id(p) for p in d.teacher.parameters()}
        assert not teacher_ids & {id(p) for p in params}
        assert all(not p.requires_grad for p in d.teacher.parameters())
        for k, v in d.teacher.state_dict().items():
            assert torch.equal(v, teacher_before[k]), f"teacher {k} changed"
        assert not any(k.startswith("teacher.") for k in d.resume_state_dict())
    extra = sum(p.numel() for p in params) - sum(p.numel() for p in d.student.parameters())
    assert d.count_training_only_params() == extra


def test_train_call_keeps_teacher_in_eval_mode() -> None:
    d = make("kd")
    d.teacher.train()
    d.train()
    assert d.student.training and not d.teacher.training
    d.eval()
    assert not d.student.training and not d.teacher.training


def test_zoo_models_work_with_every_method() -> None:
    from dskd.models import create_model

    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for method in ALL_METHODS:
        torch.manual_seed(0)
        student, teacher = create_model("resnet8", 10), create_model("resnet14", 10)
        d = create_distiller(method, student, None if method == "ce" else teacher, None)
        logits, losses = d(x, y, progress=1.0)
        sum(losses.values()).backward()
        assert logits.shape == (4, 10) and all(torch.isfinite(v) for v in losses.values()), method
        assert set(student.state_dict()) == set(create_model("resnet8", 10).state_dict())


def test_feature_methods_handle_different_spatial_sizes() -> None:
    torch.manual_seed(0)
    student, teacher = TinyNet(8, stride=1), TinyNet(16, stride=2)  # 8×8 vs 4×4 maps
    for method in ("fitnet", "lshfm", "diffkd", "dskd"):
        d = create_distiller(method, student, teacher, {"x0_source": "teacher"} if method == "dskd" else None)
        _, losses = d(*batch(), progress=1.0)
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values()), method


def test_cost_report_counts_denoiser_next_to_teacher() -> None:
    from dskd.models import count_macs, create_model

    student, teacher = create_model("resnet8", 10), create_model("resnet20", 10)
    d = create_distiller("dskd", student, teacher, None)
    report = d.cost_report(input_size=32)
    c = student.num_features
    mid = c // 4
    per_position = 2 * (c * mid + 9 * mid * mid + mid * c) + c * c
    assert report["denoiser_macs_per_call"] == per_position * 8 * 8  # 8×8 last map at 32 px
    assert report["denoiser_calls_per_step"] == 1 + d.options["steps"] == 6  # L_diff + 5 DDIM steps
    assert report["teacher_macs"] == count_macs(teacher, 32)
    assert report["denoiser_macs_per_step"] < report["teacher_macs"]
    assert report["training_only_params"] == d.count_training_only_params()


def test_distiller_under_ddp_single_process(tmp_path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for options in ({"lsh_warmup": 0.0}, {"guidance_form": "loss", "lsh_warmup": 0.0}):
            d = make("dskd", options)
            model = DDP(d)
            opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01)
            for step in range(3):
                x, y = batch(seed=step)
                _, losses = model(x, y, progress=0.5)
                opt.zero_grad()
                sum(losses.values()).backward()
                opt.step()
                assert all(torch.isfinite(v) for v in losses.values())
            assert int(d.lsh.batches_seen) == 3
    finally:
        dist.destroy_process_group()


def test_resume_state_restores_training_only_modules() -> None:
    d = make("dskd", {"lsh_bias_batches": 2})
    d.train()
    for step in range(3):
        d(*batch(seed=step), progress=0.5)
    state = d.resume_state_dict()
    assert "lsh.bias" in state and "denoiser.out.0.weight" in state
    fresh = make("dskd", {"lsh_bias_batches": 2})
    fresh.train()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("teacher.") for k in missing)
    assert torch.equal(fresh.lsh.bias, d.lsh.bias) and int(fresh.lsh.batches_seen) == 2
    bias = fresh.lsh.bias.clone()
    fresh(*batch(seed=5), progress=0.5)
    assert torch.equal(fresh.lsh.bias, bias)  # already initialised: not re-estimated


# -- LSHFM and FitNet in their reference forms (issue 14) -------------------------------------


def test_lshfm_defaults_are_the_reference_lshl2_s() -> None:
    d = make("lshfm", {"lsh_bias_batches": 3})
    teacher_std = float(d.teacher.fc.weight.float().std())
    assert d.lsh.bits == 32 * 16  # 32 × teacher width
    assert math.isclose(float(d.lsh.weight.std()), teacher_std, rel_tol=0.1)
    assert d.options["lsh_correct_only"] and d.options["lsh_l2"] and d.options["alpha_kd"] == 0.0
    d.train()
    x, y = batch()
    _, losses = d(x, y, progress=0.5)
    assert set(losses) == {"ce", "lsh", "l2"}
    # The L2 term is the MSE between pooled, projected student and pooled teacher features on
    # the samples the teacher gets right, weighted like the hash term.
    with torch.no_grad():
        z_t, f_t = d.teacher_outputs(x)
        g_s = d.projection(d.student.forward_features(x).mean(dim=(2, 3)))
        ok = z_t.argmax(1) == y
        expected = (g_s - f_t.mean(dim=(2, 3))).pow(2).mean(1)[ok].mean() * 6.0 if ok.any() else torch.tensor(0.0)
    assert torch.allclose(losses["l2"], expected, atol=1e-5)
    # No sample right: both feature terms are exact zeros that still belong to the graph.
    _, losses = d(x, (z_t.argmax(1) + 1) % 4, progress=0.5)
    assert float(losses["lsh"].detach()) == 0.0 and float(losses["l2"].detach()) == 0.0 and losses["l2"].requires_grad


class _MaxPoolHead(TinyNet):
    """A model whose head pools by max, not mean: LSHFM must use the model's own pre-logits vector."""

    pooled_linear_head = False  # not mean + fc: DSKD would take its autograd guidance path

    def forward_head(self, f: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = f.amax(dim=(2, 3))
        return pooled if pre_logits else self.fc(pooled)


def test_lshfm_pools_with_the_models_forward_head() -> None:
    # Zoo models (average pooling): the same L2 as pooling by hand, so the numbers do not move.
    from dskd.models import create_model

    torch.manual_seed(0)
    student, teacher = create_model("mobilenetv2", 4), create_model("resnet8", 4)  # widths 1280 → 64
    d = create_distiller("lshfm", student, teacher, {"lsh_correct_only": False}).train()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
    _, losses = d(x, y, progress=0.5)
    with torch.no_grad():
        g_s = d.projection(d.student.forward_features(x).mean(dim=(2, 3)))
        g_t = d.teacher_outputs(x)[1].float().mean(dim=(2, 3))
    assert torch.allclose(losses["l2"], (g_s - g_t).pow(2).mean() * 6.0, rtol=1e-5)
    # A model with its own pooling: LSHFM follows forward_head(pre_logits=True), not a hand-written mean.
    torch.manual_seed(0)
    d = create_distiller("lshfm", _MaxPoolHead(8), _MaxPoolHead(16), {"lsh_correct_only": False}).train()
    x, y = batch()
    _, losses = d(x, y, progress=0.5)
    with torch.no_grad():
        g_s = d.projection(d.student.forward_features(x).amax(dim=(2, 3)))
        g_t = d.teacher_outputs(x)[1].float().amax(dim=(2, 3))
        by_mean = d.projection(d.student.forward_features(x).mean(dim=(2, 3)))
    assert torch.allclose(losses["l2"], (g_s - g_t).pow(2).mean() * 6.0, rtol=1e-5)
    assert not torch.allclose(losses["l2"], (by_mean - g_t).pow(2).mean() * 6.0, rtol=1e-3)


def test_lshfm_bias_is_the_exact_median_over_the_window() -> None:
    d = make("lshfm", {"lsh_bias_batches": 3, "lsh_correct_only": False})
    d.train()
    seen = []
    for step in range(5):
        x, y = batch(seed=step)
        with torch.no_grad():
            seen.append(torch.nn.functional.linear(d.teacher_outputs(x)[1].float().mean(dim=(2, 3)), d.lsh.weight))
        d(x, y, progress=0.5)
        if step == 2:
            expected = -torch.cat(seen).median(dim=0).values
            assert torch.allclose(d.lsh.bias, expected)
    assert torch.allclose(d.lsh.bias, expected)  # frozen after the window
    assert int(d.lsh.batches_seen) == 3
    state = d.resume_state_dict()
    fresh = make("lshfm", {"lsh_bias_batches": 3, "lsh_correct_only": False})
    fresh.load_state_dict(state, strict=False)
    fresh.train()
    fresh(*batch(seed=9), progress=0.5)
    assert torch.equal(fresh.lsh.bias, d.lsh.bias)  # resumed after the window: not re-estimated


def test_fitnet_regressor_is_mdistillers_convreg() -> None:
    from dskd.methods.feature_methods import HintRegressor

    d = make("fitnet")  # 4×4 maps on both sides: 1×1 conv with bias, BN, ReLU
    conv = d.regressor.conv
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is not None
    d.train()
    hint = d.regressor(d.student.forward_features(batch()[0]))
    assert float(hint.min().detach()) >= 0.0  # the teacher's last map is post-ReLU; so is the hint
    assert not make("fitnet", {"regressor_relu": False}).regressor.relu
    # The reference's size rules: twice the size → 3×3 stride 2; half → 4×4 transposed conv.
    assert HintRegressor(8, 16, (8, 8), (4, 4), True).conv.stride == (2, 2)
    assert isinstance(HintRegressor(8, 16, (4, 4), (8, 8), True).conv, nn.ConvTranspose2d)
    assert HintRegressor(8, 16, (6, 6), (4, 4), True).conv.kernel_size == (3, 3)
    x = torch.randn(2, 8, 2, 2)  # 2×2 vs 8×8 (MobileNetV2 vs ResNet): 1×1, compared at the smaller size
    assert HintRegressor(8, 16, (2, 2), (8, 8), True)(x).shape == (2, 16, 2, 2)


def test_diffkd_can_use_the_fixed_denoiser() -> None:
    # Defaults keep the original denoiser (the baseline as it was); the tuning grid also tries the
    # FiLM + GroupNorm one DSKD v2 uses, so the baseline is not judged with a known bug only.
    assert (make("diffkd").denoiser.time_cond, make("diffkd").denoiser.norm) == ("add", "batch")
    d = make("diffkd", {"denoiser_time": "film", "denoiser_norm": "group"})
    assert (d.denoiser.time_cond, d.denoiser.norm) == ("film", "group")
    _, losses = d(*batch(), progress=1.0)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(UserError, match="diffkd.denoiser_time"):
        make("diffkd", {"denoiser_time": "concat"})
