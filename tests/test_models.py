"""Model zoo: interface contract, published sizes, profiling, registry errors, ONNX export."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from dskd.errors import UserError
from dskd.models import count_macs, count_params, create_model, list_models, register_model

ALL_MODELS = list_models()

# Parameter counts at 100 classes from the RepDistiller (CRD) table; ours must be within 1%.
PUBLISHED_PARAMS_100 = {
    "resnet8x4": 1.23e6,
    "resnet32x4": 7.43e6,
    "resnet56": 0.86e6,
    "resnet20": 0.28e6,
    "resnet110": 1.74e6,
    "wrn_40_2": 2.26e6,
    "wrn_16_2": 0.70e6,
    "vgg13": 9.46e6,
    "vgg8": 3.96e6,
    "mobilenetv2": 0.81e6,
    "shufflenetv2": 1.36e6,
}


def test_zoo_has_the_benchmark_models() -> None:
    expected = {
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg13",
        "mobilenetv2", "shufflenetv2",
    }  # fmt: skip
    assert set(ALL_MODELS) == expected
    assert ALL_MODELS == sorted(ALL_MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_contract(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        via_head = model.forward_head(feats)
    assert logits.shape == (2, 7)
    assert feats.dim() == 4 and feats.shape[:2] == (2, model.num_features)
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == model.num_features
    torch.testing.assert_close(logits, via_head)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_head_pre_logits_is_the_pooled_features(name: str) -> None:
    """forward_head(f, pre_logits=True) is global-average-pooled f (B x num_features), and fc of it is
    the logits: methods that need pooled features (LSHFM, DSKD) get them from the model."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(3, 3, 32, 32))
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats, pre_logits=False)
    assert pooled.shape == (3, model.num_features)
    torch.testing.assert_close(pooled, feats.mean(dim=(2, 3)))
    torch.testing.assert_close(model.fc(pooled), logits)
    assert not torch.equal(pooled[:, :7], logits)  # the flag changes what comes back


@pytest.mark.parametrize("name", ALL_MODELS)
def test_single_channel_input(name: str) -> None:
    model = create_model(name, num_classes=10, in_chans=1).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 3, 32, 32))


def test_backward_reaches_every_parameter() -> None:
    model = create_model("shufflenetv2", num_classes=5)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("name,published", sorted(PUBLISHED_PARAMS_100.items()))
def test_param_counts_match_published(name: str, published: float) -> None:
    params = count_params(create_model(name, num_classes=100))
    assert abs(params - published) / published < 0.01, params


def test_count_params_counts_head_and_every_tensor() -> None:
    m10 = count_params(create_model("resnet20", num_classes=10))
    m100 = count_params(create_model("resnet20", num_classes=100))
    assert m100 - m10 == 90 * (64 + 1)
    assert count_params(nn.Linear(3, 4)) == 16


def test_count_macs_matches_hand_computation() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # 8x16x16 outputs, 27 MACs each
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 9 MACs each
        nn.Flatten(),
        nn.Linear(8 * 16 * 16, 10),
    )
    expected = 8 * 16 * 16 * 27 + 8 * 16 * 16 * 9 + 8 * 16 * 16 * 10
    assert count_macs(net, input_size=32) == expected


def test_count_macs_known_models_and_leaves_model_untouched() -> None:
    model = create_model("resnet20", num_classes=10)
    model.train()
    macs = count_macs(model)
    assert abs(macs - 40.8e6) / 40.8e6 < 0.01  # the commonly quoted ~41M
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    assert count_macs(model) == macs
    # Convolution cost grows with the pixel count (4x), the classifier does not.
    assert 3.9 * macs < count_macs(model, input_size=64) < 4.0 * macs
    gray = create_model("resnet20", num_classes=10, in_chans=1)
    assert count_macs(gray, in_chans=1) == macs - 16 * 32 * 32 * 9 * 2
    assert count_macs(create_model("resnet32x4", 100)) > 25 * count_macs(create_model("resnet8", 100))


def test_unknown_model_names_close_matches() -> None:
    with pytest.raises(UserError) as info:
        create_model("resnet21", num_classes=10)
    message = str(info.value)
    assert "resnet21" in message and "resnet20" in message and "did you mean" in message
    assert "\n" not in message
    with pytest.raises(UserError, match="choose one of"):
        create_model("efficientnet_b7", num_classes=10)


@pytest.mark.parametrize("field,kwargs", [
    ("num_classes", {"num_classes": 0}),
    ("num_classes", {"num_classes": "10"}),
    ("in_chans", {"num_classes": 10, "in_chans": 0}),
])  # fmt: skip
def test_bad_sizes_are_user_errors(field: str, kwargs: dict) -> None:
    with pytest.raises(UserError, match=field):
        create_model("resnet8", **kwargs)


def test_register_model_rejects_duplicates() -> None:
    def resnet20(num_classes: int, in_chans: int = 3) -> nn.Module:
        return nn.Linear(in_chans, num_classes)

    with pytest.raises(ValueError, match="resnet20"):
        register_model(resnet20)


# ONNX export takes seconds per model: the fast run exports two (plain and depthwise convs), the full run all.
@pytest.mark.parametrize("name", [n if n in ("resnet8", "mobilenetv2") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in ALL_MODELS])
def test_onnx_export_has_dynamic_batch(name: str, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = create_model(name, num_classes=10).eval()
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(2, 3, 32, 32),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32)  # a batch size the exporter never saw
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    assert got.shape == (5, 10)
    scale = max(1.0, float(abs(expected).max()))
    assert abs(got - expected).max() / scale < 1e-4
