"""OpenVINO IR from the exported ONNX: FP32, FP16-compressed weights, and INT8 via NNCF.

The IR keeps the dynamic batch axis of the ONNX. Measuring FP32 needs
INFERENCE_PRECISION_HINT=f32 at compile time (see export.runners.openvino_compile):
on CPUs with native bf16 the plugin otherwise runs bf16. FP16-compressed weights are
decompressed to the inference precision at load time, so they halve the file, not the
compute; the INT8 IR runs int8 convolutions and leaves the rest to the inference precision.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dskd.errors import UserError
from export.errors import ExportError


def _ov() -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise UserError("openvino is not installed: pip install openvino "
                        "(or leave the openvino formats out of --formats)") from None
    return ov


def _nncf() -> Any:
    try:
        import nncf
    except ImportError:
        raise UserError("nncf is not installed: pip install nncf "
                        "(or leave openvino-int8 out of --formats)") from None
    nncf.set_log_level(logging.ERROR)
    return nncf


def _tag(model: Any, metadata: dict[str, str]) -> None:
    for key, value in metadata.items():
        model.set_rt_info(value, ["dskd", key])


def save_ir(model: Any, xml_path: str | os.PathLike, compress_to_fp16: bool) -> None:
    """Write xml+bin into a temp folder beside the target, then move bin first, xml last:
    a reader that finds the .xml finds its .bin."""
    ov = _ov()
    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ir-", dir=xml_path.parent) as work:
        tmp_xml = Path(work) / xml_path.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=compress_to_fp16)
        os.replace(tmp_xml.with_suffix(".bin"), xml_path.with_suffix(".bin"))
        os.replace(tmp_xml, xml_path)


def convert_onnx_to_ir(onnx_path: str | os.PathLike, xml_path: str | os.PathLike,
                       compress_to_fp16: bool, metadata: dict[str, str]) -> dict[str, Any]:
    ov = _ov()
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"{Path(xml_path).name}: OpenVINO could not convert the ONNX "
                          f"({first[:200]})") from None
    _tag(model, metadata)
    save_ir(model, xml_path, compress_to_fp16)
    return {"weights": "fp16" if compress_to_fp16 else "fp32", "compress_to_fp16": compress_to_fp16}


def classifier_head(model: Any) -> str | None:
    """Friendly name of the last MatMul/Convolution: the classifier that turns features into logits."""
    for op in reversed(model.get_ordered_ops()):
        if op.get_type_name() in ("MatMul", "Convolution"):
            return str(op.get_friendly_name())
    return None


def quantize_ir_int8(fp32_xml: str | os.PathLike, xml_path: str | os.PathLike,
                     calib_x: np.ndarray, metadata: dict[str, str],
                     max_drop: float | None = None,
                     validation: tuple[np.ndarray, np.ndarray] | None = None,
                     keep_head_float: bool = True) -> dict[str, Any]:
    """nncf.quantize (PERFORMANCE preset: symmetric int8, what the CPU plugin runs fastest);
    with `max_drop` (top-1 points) nncf.quantize_with_accuracy_control reverts layers to
    float until the drop on `validation` (normalized x, y) is within it.

    `keep_head_float` leaves the classifier in float. Its input, the pooled features, gets one
    per-tensor scale; when a few channels are far larger than the rest (seen on a DSKD-trained
    resnet8: channel maxima 9.2 vs a median of 1.3) the rest get a handful of levels, and small
    logit margins flip: top-1 agreement 0.84 with the head in int8, 0.96 with it in float. The
    head is a few hundred MACs, so keeping it float costs nothing measurable."""
    ov, nncf = _ov(), _nncf()
    model = ov.Core().read_model(str(fp32_xml))
    calib = nncf.Dataset([calib_x[i:i + 1] for i in range(len(calib_x))])
    head = classifier_head(model) if keep_head_float else None
    common = dict(preset=nncf.QuantizationPreset.PERFORMANCE,
                  target_device=nncf.TargetDevice.CPU, subset_size=len(calib_x))
    if head is not None:
        common["ignored_scope"] = nncf.IgnoredScope(names=[head])
    details: dict[str, Any] = {"tool": "nncf.quantize", "preset": "performance",
                               "calibration_images": int(len(calib_x)),
                               "float_layers": [head] if head else []}
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink):
            if max_drop is None:
                quantized = nncf.quantize(model, calib, **common)
            else:
                if validation is None:
                    raise UserError("--max-drop needs validation images (pass --calib-data)")
                vx, vy = validation
                val = nncf.Dataset([(vx[i:i + 64], vy[i:i + 64]) for i in range(0, len(vx), 64)],
                                   lambda item: item[0])
                quantized = nncf.quantize_with_accuracy_control(
                    model, calib, val, _accuracy_fn(), max_drop=max_drop / 100.0,
                    drop_type=nncf.DropType.ABSOLUTE, **common)
                details.update(tool="nncf.quantize_with_accuracy_control",
                               max_drop_points=max_drop, validation_images=int(len(vx)))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"{Path(xml_path).name}: nncf quantization failed ({first[:200]})"
                          ) from None
    _tag(quantized, metadata)
    save_ir(quantized, xml_path, compress_to_fp16=False)
    return details


def _accuracy_fn() -> Callable[[Any, Any], tuple[float, None]]:
    def validate(compiled: Any, items: Any) -> tuple[float, None]:
        correct = total = 0
        out = compiled.outputs[0]
        for x, y in items:
            logits = compiled(x)[out]
            correct += int(np.sum(np.argmax(logits, axis=1) == y))
            total += len(y)
        return correct / max(total, 1), None

    return validate
