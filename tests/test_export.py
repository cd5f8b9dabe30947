"""export/: real exports of a briefly trained zoo model through real ONNX Runtime and OpenVINO.

The checkpoint is a resnet8 trained for a few epochs on scikit-learn's digits (16×16,
~95% test top-1), so INT8 accuracy and top-1 agreement mean something.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dskd.checkpoint import file_sha256, save_model
from dskd.data import normalize
from dskd.errors import UserError
from dskd.models import create_model
from export import (
    ExportError,
    export_all,
    export_format,
    list_formats,
    onnx_io,
    onnx_metadata,
    onnx_op_histogram,
    onnx_param_count,
    read_manifest,
    resolve_formats,
    verify_files,
)
from export.imagesets import calibration_set, parity_set, stratified_indices
from export.onnx_inspect import onnx_quantized_weight_count
from export.ort_quant import choose_activation_type, cpu_flags
from export.runners import compiled_precision, openvino_predictor, ort_predictor, run_batched
from tests.helpers.data import DIGITS_SIZE, digits, meta_for

SIZE = DIGITS_SIZE


@pytest.fixture(scope="module")
def work(tmp_path_factory, digits_rgb, digits_checkpoint):
    """A folder of this module's own, the digits data and the session's trained checkpoint."""
    return tmp_path_factory.mktemp("export"), digits_rgb, digits_checkpoint


@pytest.fixture(scope="module")
def full(work):
    """Every format, default settings: the export the CLI makes."""
    root, bundle, ckpt = work
    out = root / "full"
    manifest = export_all(ckpt, out, calib=bundle)
    return out, manifest


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


# --------------------------------------------------------------------------- whole export


def trt_here() -> bool:
    from export.tensorrt_build import tensorrt_status

    return tensorrt_status()[0] is not None


@pytest.mark.slow
def test_every_format_built_verified_and_listed(work, full):
    root, bundle, ckpt = work
    out, manifest = full
    built = [a.format for a in manifest.artifacts]
    expected = ["onnx", "onnx-int8", "openvino", "openvino-fp16", "openvino-int8"]
    assert built == expected + (["tensorrt-fp16", "tensorrt-int8"] if trt_here() else [])
    for entry in manifest.artifacts:
        assert entry.source_sha256 == file_sha256(ckpt)
        assert entry.parity["passed"] and entry.parity["images"] == len(bundle.test_x)
        assert entry.size_bytes == sum((out / f.path).stat().st_size for f in entry.files)
        assert entry.sha256 == file_sha256(out / entry.path)
        assert {"torch", "onnx", "onnxruntime", "openvino", "nncf"} <= set(entry.tool_versions)
    assert verify_files(out, read_manifest(out)) == []
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format"] == "dskd-export-manifest/1" and raw["source"]["model"] == "resnet8"
    # nothing half-written or temporary left behind
    leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []
    assert not list(out.rglob("*.data"))


@pytest.mark.slow
def test_fp32_artifacts_match_pytorch(full):
    _, manifest = full
    for fmt in ("onnx", "openvino"):
        parity = manifest.artifact(fmt).parity
        assert parity["max_abs_diff"] < 1e-3
        assert parity["top1_agreement"] == 1.0
        assert parity["batch1_rel_diff"] < 1e-5
    fp16 = manifest.artifact("openvino-fp16").parity
    assert 0 < fp16["max_abs_diff"] < 0.1  # fp16 weights do change the numbers a little


@pytest.mark.slow
def test_int8_keeps_accuracy_and_is_really_int8(work, full):
    _, bundle, _ = work
    out, manifest = full
    ort8 = manifest.artifact("onnx-int8")
    assert ort8.parity["top1_drop"] <= 2.0 and ort8.parity["top1_agreement"] >= 0.95
    assert ort8.details["per_channel"] and ort8.details["format"] == "QDQ"
    assert ort8.details["calibration"]["images"] == 300
    assert "train split" in ort8.details["calibration"]["source"]
    hist = onnx_op_histogram(out / ort8.path)
    assert hist.get("QuantizeLinear", 0) > 0 and hist.get("DequantizeLinear", 0) > 0
    assert onnx_quantized_weight_count(out / ort8.path) > 0.9 * onnx_param_count(out / "model.onnx")
    assert (out / ort8.path).stat().st_size < 0.5 * (out / "model.onnx").stat().st_size
    ov8 = manifest.artifact("openvino-int8")
    assert ov8.parity["top1_drop"] <= 2.0
    assert "FakeQuantize" in (out / ov8.path).read_text()
    # the symmetric Q/DQ model prepared for TensorRT is measured too (through ORT)
    if not trt_here():
        trt8 = next(s for s in manifest.skipped if s.format == "tensorrt-int8")
        assert trt8.parity["top1_drop"] <= 2.0
        assert trt8.details["quantization"]["symmetric_activations"] is True


@pytest.mark.slow
def test_onnx_contract_names_batch_metadata(work, full):
    root, bundle, ckpt = work
    out, _ = full
    path = out / "model.onnx"
    io = onnx_io(path)
    assert io["opset"] == 18
    assert [i["name"] for i in io["inputs"]] == ["input"]
    assert [o["name"] for o in io["outputs"]] == ["logits"]
    assert isinstance(io["inputs"][0]["shape"][0], str)
    assert io["inputs"][0]["shape"][1:] == [3, SIZE, SIZE]
    meta = onnx_metadata(path)
    assert meta["class_names"] == list(bundle.class_names)
    assert meta["mean"] == pytest.approx(list(bundle.mean))
    assert meta["std"] == pytest.approx(list(bundle.std))
    assert (meta["input_size"], meta["in_chans"]) == (SIZE, 3)
    assert meta["source_sha256"] == file_sha256(ckpt)
    assert (meta["method"], meta["model"]) == ("ce", "resnet8")
    # a fresh ORT session takes any batch size
    x = normalize(bundle.test_x[:7], bundle.mean, bundle.std).numpy()
    predict = ort_predictor(path, threads=1)
    assert predict(x).shape == (7, 10) and predict(x[:1]).shape == (1, 10)


@pytest.mark.slow
def test_tensorrt_formats_prepared_and_skipped_with_reason(full):
    out, manifest = full
    if trt_here():
        for fmt in ("tensorrt-fp16", "tensorrt-int8"):
            entry = manifest.artifact(fmt)
            assert entry.parity["passed"] and entry.details["gpu_name"]
            assert entry.tool_versions["tensorrt"].startswith(entry.details["tensorrt_version"])
        return
    skipped = {s.format: s for s in manifest.skipped}
    assert set(skipped) == {"tensorrt-fp16", "tensorrt-int8"}
    for s in skipped.values():
        assert "TensorRT" in s.reason
        for rec in s.prepared:
            assert file_sha256(out / rec.path) == rec.sha256
    script = (out / "tensorrt" / "build_trtexec.sh").read_text()
    assert "model.int8.qdq.onnx" in script and "--minShapes=input:1x3x16x16" in script
    assert os.access(out / "tensorrt" / "build_trtexec.sh", os.X_OK)


# --------------------------------------------------------------------------- the student only


@pytest.mark.slow
def test_dskd_student_exports_like_a_ce_student(work, tmp_path):
    """The diffusion branch, adapter and LSH projection live in the Distiller, never in the
    student: the DSKD student's graph has the same operators and parameter count."""
    from dskd.methods import create_distiller

    _, bundle, ce_ckpt = work
    torch.manual_seed(1)
    student = create_model("resnet8", 10)
    teacher = create_model("resnet14", 10).eval()
    distiller = create_distiller("dskd", student, teacher, {})
    assert distiller.count_training_only_params() > 0  # there is something to leave behind
    opt = torch.optim.SGD(list(distiller.trainable_parameters()), lr=0.01)
    distiller.train()
    for i in range(2):
        idx = torch.arange(i * 32, (i + 1) * 32)
        _, losses = distiller(normalize(bundle.train_x[idx], bundle.mean, bundle.std),
                              bundle.train_y[idx], 0.5)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    dskd_ckpt = tmp_path / "dskd.pt"
    save_model(dskd_ckpt, distiller.student.state_dict(), meta_for(bundle, "resnet8", "dskd"))
    a = export_format(ce_ckpt, tmp_path / "ce", "onnx", calib=bundle, parity_size=64).path
    b = export_format(dskd_ckpt, tmp_path / "dskd", "onnx", calib=bundle, parity_size=64).path
    ce_onnx, dskd_onnx = tmp_path / "ce" / a, tmp_path / "dskd" / b
    assert onnx_op_histogram(dskd_onnx) == onnx_op_histogram(ce_onnx)
    assert onnx_param_count(dskd_onnx) == onnx_param_count(ce_onnx)
    assert onnx_metadata(dskd_onnx)["method"] == "dskd"


@pytest.mark.slow
def test_op_histogram_and_param_count_see_an_extra_branch(work, tmp_path):
    """Negative control: the helpers do notice a module that should not be there."""
    from export.onnx_build import export_onnx

    _, bundle, _ = work
    meta = meta_for(bundle, "resnet8")
    plain = create_model("resnet8", 10).eval()

    class WithExtra(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = plain
            self.extra = torch.nn.Conv2d(64, 64, 1)

        def forward(self, x):
            f = self.net.forward_features(x)
            return self.net.forward_head(f + torch.relu(self.extra(f)))

    export_onnx(plain, meta, tmp_path / "a.onnx", "0" * 64)
    export_onnx(WithExtra().eval(), meta, tmp_path / "b.onnx", "0" * 64)
    assert onnx_op_histogram(tmp_path / "a.onnx") != onnx_op_histogram(tmp_path / "b.onnx")
    assert onnx_param_count(tmp_path / "b.onnx") - onnx_param_count(tmp_path / "a.onnx") == 64 * 64 + 64


# --------------------------------------------------------------------------- runtimes


@pytest.mark.slow
def test_openvino_fp32_needs_the_precision_hint(full):
    """Without INFERENCE_PRECISION_HINT=f32, CPUs with native bf16 run bf16."""
    out, _ = full
    xml = out / "openvino" / "model.xml"
    assert compiled_precision(xml, "f32", 1) == "f32"
    native_bf16 = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    assert compiled_precision(xml, None, 1) == ("bf16" if native_bf16 else "f32")
    x = np.random.default_rng(0).normal(size=(8, 3, SIZE, SIZE)).astype(np.float32)
    ref = run_batched(ort_predictor(out / "model.onnx", 1), x)
    f32 = run_batched(openvino_predictor(xml, "f32", 1), x)
    assert np.abs(f32 - ref).max() < 1e-4


def _head_inputs_quantized(xml: Path) -> bool:
    import openvino as ov

    from export.openvino_ir import classifier_head

    model = ov.Core().read_model(str(xml))
    name = classifier_head(model)
    head = next(op for op in model.get_ordered_ops() if op.get_friendly_name() == name)
    node = head.input(0).get_source_output().get_node()  # the activations, through shape-only ops
    while node.get_type_name() in ("Reshape", "Squeeze", "Unsqueeze", "Transpose"):
        node = node.input(0).get_source_output().get_node()
    return node.get_type_name() == "FakeQuantize"


@pytest.mark.slow
def test_openvino_int8_keeps_the_classifier_float_unless_asked(work, full, tmp_path):
    """The head's input (pooled features) gets one per-tensor scale in int8; a few large
    channels then leave the rest with a handful of levels (see quantize_ir_int8)."""
    _, bundle, ckpt = work
    out, manifest = full
    ov8 = manifest.artifact("openvino-int8")
    assert ov8.details["float_layers"] and not _head_inputs_quantized(out / ov8.path)
    entry = export_format(ckpt, tmp_path, "openvino-int8", calib=bundle, parity_size=200,
                          ov_int8_head="int8")
    assert entry.details["float_layers"] == []
    assert _head_inputs_quantized(tmp_path / entry.path)


def test_unknown_int8_head_is_one_line_before_any_work(work, tmp_path):
    _, _, ckpt = work
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"^--int8-head 'fp16': use float or int8$"):
        export_all(ckpt, out, formats=["openvino-int8"], ov_int8_head="fp16")
    assert not out.exists()


@pytest.mark.slow
def test_openvino_accuracy_control(work, tmp_path):
    """nncf.quantize_with_accuracy_control, validated on training images outside the
    calibration subset (the test split stays for the parity report)."""
    from dskd.checkpoint import load_model_file
    from export.imagesets import held_out_train_set

    _, bundle, ckpt = work
    entry = export_format(ckpt, tmp_path, "openvino-int8", calib=bundle, ov_max_drop=1.0,
                          accuracy_control_size=200, parity_size=200)
    assert entry.details["tool"] == "nncf.quantize_with_accuracy_control"
    assert entry.details["validation"]["images"] == 200
    assert "outside calibration" in entry.details["validation"]["source"]
    assert entry.parity["top1_drop"] <= 2.0
    meta = load_model_file(ckpt)[1]
    calib = calibration_set(bundle, meta, 300)
    held = held_out_train_set(bundle, meta, 200, calib)
    assert not set(held.indices.tolist()) & set(calib.indices.tolist())


def test_activation_type_choice():
    assert choose_activation_type("auto", "x86_64", {"avx512_vnni"})[:2] == ("uint8", False)
    assert choose_activation_type("auto", "x86_64", {"avx2"})[:2] == ("uint8", True)
    assert choose_activation_type("auto", "aarch64", set())[:2] == ("int8", False)
    assert choose_activation_type("int8", "x86_64", {"avx512_vnni"})[0] == "int8"
    with pytest.raises(UserError):
        choose_activation_type("fp8")


def test_opset_17_uses_the_torchscript_exporter(work, tmp_path):
    _, _, ckpt = work
    entry = export_format(ckpt, tmp_path, "onnx", opset=17, calib=work[1], parity_size=32)
    assert entry.details["exporter"] == "torch.onnx torchscript"
    assert onnx_io(tmp_path / "model.onnx")["opset"] == 17
    assert entry.parity["max_abs_diff"] < 1e-3


@pytest.mark.slow
def test_model_pt_alone_exports_with_synthetic_parity(work, tmp_path):
    """No data: FP formats still export (parity on noise, said so); INT8 is skipped."""
    _, _, ckpt = work
    with pytest.warns(UserWarning, match="synthetic"):
        manifest = export_all(ckpt, tmp_path, parity_size=16)
    assert manifest.settings["parity_data"]["source"].startswith("synthetic")
    skipped = {s.format: s.reason for s in manifest.skipped}
    assert "calibration data" in skipped["onnx-int8"]
    assert "calibration data" in skipped["openvino-int8"]
    assert {a.format for a in manifest.artifacts} == {"onnx", "openvino", "openvino-fp16"}


@pytest.mark.slow
def test_manifest_merges_formats_of_the_same_checkpoint(work, tmp_path):
    _, bundle, ckpt = work
    export_format(ckpt, tmp_path, "onnx", calib=bundle, parity_size=16)
    manifest = export_format(ckpt, tmp_path, "openvino", calib=bundle, parity_size=16)
    assert manifest.format == "openvino"
    assert {a.format for a in read_manifest(tmp_path).artifacts} == {"onnx", "openvino"}


# --------------------------------------------------------------------------- data


def test_calibration_subset_is_deterministic_stratified_train(work):
    _, bundle, ckpt = work
    from dskd.checkpoint import load_model_file

    meta = load_model_file(ckpt)[1]
    a = calibration_set(bundle, meta, 100)
    b = calibration_set(bundle, meta, 100)
    assert np.array_equal(a.indices, b.indices) and len(a) == 100
    assert np.bincount(a.y, minlength=10).min() >= 9  # every class present
    assert "train split" in a.source
    assert not np.array_equal(calibration_set(bundle, meta, 100, seed=1).indices, a.indices)
    with pytest.warns(UserWarning, match="only 50 images"):
        calibration_set(bundle, meta, 50)
    p = parity_set(bundle, meta, 10_000)
    assert len(p) == len(bundle.test_x) and "test split" in p.source


def test_stratified_indices_round_robin():
    y = np.array([0] * 90 + [1] * 10)
    idx = stratified_indices(y, 20, seed=3)
    assert len(set(idx.tolist())) == 20 and (y[idx] == 1).sum() == 10


# --------------------------------------------------------------------------- bad input


def test_missing_and_non_checkpoint_files(tmp_path):
    with pytest.raises(UserError) as exc:
        export_all(tmp_path / "nope.pt", tmp_path / "out")
    assert "no such file" in one_line(exc)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(UserError) as exc:
        export_all(junk, tmp_path / "out")
    assert "junk.pt" in one_line(exc)
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_an_unknown_model(work, tmp_path):
    _, bundle, _ = work
    model = create_model("resnet8", 10)
    bad = tmp_path / "model.pt"
    save_model(bad, model.state_dict(), meta_for(bundle, "resnet9000"))
    with pytest.raises(UserError) as exc:
        export_all(bad, tmp_path / "out")
    assert "resnet9000" in one_line(exc) and "zoo" in one_line(exc)


def test_checkpoint_meta_inconsistent(work, tmp_path):
    _, bundle, _ = work
    meta = meta_for(bundle, "resnet8")
    meta["mean"] = [0.5]
    save_model(tmp_path / "m.pt", create_model("resnet8", 10).state_dict(), meta)
    with pytest.raises(UserError) as exc:
        export_all(tmp_path / "m.pt", tmp_path / "out")
    assert "mean" in one_line(exc)


def test_unknown_format_suggests_the_closest():
    with pytest.raises(UserError) as exc:
        resolve_formats(["onnx", "onnx-in8"])
    assert "did you mean 'onnx-int8'" in one_line(exc)
    assert [s.name for s in resolve_formats("openvino-int8,onnx")] == ["onnx", "openvino-int8"]
    assert [s.name for s in resolve_formats(["all"])] == list_formats()


def test_calibration_data_with_other_classes_or_channels(work, tmp_path):
    root, bundle, ckpt = work
    renamed = dataclasses.replace(bundle, class_names=[f"c{i}" for i in range(10)])
    with pytest.raises(UserError) as exc:
        export_all(ckpt, tmp_path / "a", formats=["onnx-int8"], calib=renamed)
    assert "classes" in one_line(exc)
    gray = digits(root, in_chans=1)
    with pytest.raises(UserError) as exc:
        export_all(ckpt, tmp_path / "b", formats=["onnx-int8"], calib=gray)
    assert "1 channels" in one_line(exc) and "in_chans=3" in one_line(exc)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_int8_named_without_calibration_data(work, tmp_path):
    _, _, ckpt = work
    with pytest.raises(UserError) as exc:
        export_all(ckpt, tmp_path, formats=["openvino-int8"])
    assert "--calib-data" in one_line(exc)


def test_opset_out_of_range(work, tmp_path):
    _, _, ckpt = work
    with pytest.raises(UserError) as exc:
        export_all(ckpt, tmp_path, formats=["onnx"], opset=21)
    assert "--opset" in one_line(exc)


@pytest.mark.slow
def test_runtime_not_installed(work, tmp_path, monkeypatch):
    """Availability is probed with export.api.have; pretend OpenVINO is absent."""
    import export.api

    _, _, ckpt = work
    real = export.api.have
    monkeypatch.setattr(export.api, "have", lambda m: m != "openvino" and real(m))
    with pytest.raises(UserError) as exc:
        export_all(ckpt, tmp_path / "a", formats=["openvino"])
    assert "openvino" in one_line(exc) and "pip install" in one_line(exc)
    manifest = export_all(ckpt, tmp_path / "b", calib=work[1], parity_size=16)  # skip, say why
    assert all("not installed" in s.reason for s in manifest.skipped
               if s.format.startswith("openvino"))


def test_require_tensorrt_without_it(work, tmp_path):
    from export.versions import have

    if have("tensorrt"):
        pytest.skip("TensorRT is installed here")
    _, bundle, ckpt = work
    with pytest.raises(UserError) as exc:
        export_all(ckpt, tmp_path, formats=["tensorrt-fp16"], require_tensorrt=True)
    assert "TensorRT is not installed" in one_line(exc)


@pytest.mark.slow
def test_failed_parity_leaves_nothing_behind(work, full, tmp_path):
    """An impossible FP32 tolerance fails the export; the folder keeps its old contents."""
    from export import DEFAULT_TOLERANCES, Tolerance

    _, bundle, ckpt = work
    out = tmp_path / "out"
    export_format(ckpt, out, "onnx", calib=bundle, parity_size=16)
    before = {p.relative_to(out): file_sha256(p) for p in out.rglob("*") if p.is_file()}
    strict = dict(DEFAULT_TOLERANCES, fp32=Tolerance(max_rel_diff=-1.0, min_top1_agreement=1.0))
    with pytest.raises(ExportError) as exc:
        export_all(ckpt, out, formats=["onnx", "openvino"], calib=bundle, tolerances=strict,
                   parity_size=64)
    assert "parity check failed" in one_line(exc)
    after = {p.relative_to(out): file_sha256(p) for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not (tmp_path / "new").exists()
    with pytest.raises(ExportError):
        export_all(ckpt, tmp_path / "new", formats=["onnx"], calib=bundle, tolerances=strict,
                   parity_size=16)
    assert not (tmp_path / "new").exists()
