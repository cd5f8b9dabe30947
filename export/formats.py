"""The export formats by name: what each one produces, for which runtime, and what it needs."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

from dskd.errors import UserError


@dataclass(frozen=True)
class FormatSpec:
    name: str
    precision: str  # fp32 | fp16 | int8
    runtime: str  # onnxruntime | openvino | tensorrt
    path: str  # main file, relative to the export folder
    needs_calibration: bool
    modules: tuple[str, ...]  # Python modules the build needs
    description: str


FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec("onnx", "fp32", "onnxruntime", "model.onnx", False, ("onnx", "onnxruntime"),
                   "self-contained ONNX, dynamic batch, opset 18 by default"),
        FormatSpec("onnx-int8", "int8", "onnxruntime", "model.int8.onnx", True,
                   ("onnx", "onnxruntime"),
                   "static QDQ INT8 for ONNX Runtime, per-channel weights"),
        FormatSpec("openvino", "fp32", "openvino", "openvino/model.xml", False, ("openvino",),
                   "OpenVINO IR, FP32 weights (compile with INFERENCE_PRECISION_HINT=f32)"),
        FormatSpec("openvino-fp16", "fp16", "openvino", "openvino-fp16/model.xml", False,
                   ("openvino",), "OpenVINO IR with FP16-compressed weights"),
        FormatSpec("openvino-int8", "int8", "openvino", "openvino-int8/model.xml", True,
                   ("openvino", "nncf"), "OpenVINO IR quantized with nncf.quantize"),
        FormatSpec("tensorrt-fp16", "fp16", "tensorrt", "tensorrt/model.fp16.engine", False,
                   ("tensorrt",), "TensorRT engine, FP16 (device-specific)"),
        FormatSpec("tensorrt-int8", "int8", "tensorrt", "tensorrt/model.int8.engine", True,
                   ("tensorrt",), "TensorRT engine, INT8 from the QDQ ONNX (device-specific)"),
    )
}

DEFAULT_FORMATS: tuple[str, ...] = tuple(FORMATS)


def list_formats() -> list[str]:
    """Every format name, in build order."""
    return list(FORMATS)


def resolve_formats(names: Iterable[str] | str | None) -> list[FormatSpec]:
    """Validate names (comma-separated strings allowed); unknown ones get the closest match."""
    if names is None:
        return [FORMATS[n] for n in DEFAULT_FORMATS]
    if isinstance(names, str):
        names = [names]
    wanted: list[str] = []
    for item in names:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name == "all":
                wanted.extend(FORMATS)
                continue
            if name not in FORMATS:
                close = difflib.get_close_matches(name, list(FORMATS), n=1, cutoff=0.4)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise UserError(
                    f"--formats: unknown format '{name}': {hint}choose from {', '.join(FORMATS)}"
                )
            wanted.append(name)
    if not wanted:
        raise UserError(f"--formats: no format given; choose from {', '.join(FORMATS)}")
    order = list(FORMATS)
    return [FORMATS[n] for n in sorted(set(wanted), key=order.index)]
