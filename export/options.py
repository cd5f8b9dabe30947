"""The knobs of an export (`ExportOptions`) and their validation, shared by the API and the builders."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dskd.errors import UserError
from export.onnx_build import DEFAULT_OPSET
from export.parity import DEFAULT_TOLERANCES, Tolerance

INT8_HEADS = ("float", "int8")  # how openvino-int8 treats the classifier (see quantize_ir_int8)
PARITY_FAILURE_MODES = ("raise", "reject")


def check_int8_head(value: str) -> None:
    if value not in INT8_HEADS:
        raise UserError(f"--int8-head {value!r}: use {' or '.join(INT8_HEADS)}")


@dataclass
class ExportOptions:
    """Knobs of an export (defaults are the documented ones)."""

    opset: int = DEFAULT_OPSET
    simplify: bool | None = None  # None: onnxslim when installed
    calib_size: int = 300
    calib_seed: int = 0
    calib_method: str = "minmax"
    int8_activations: str = "auto"  # ORT: auto | uint8 | int8
    parity_size: int = 1000
    threads: int = 2
    ov_max_drop: float | None = None  # top-1 points; enables nncf accuracy control
    ov_int8_head: str = "float"  # openvino-int8 classifier: "float" (kept float) or "int8"
    accuracy_control_size: int = 1000
    trt_batches: tuple[int, int, int] = (1, 16, 64)
    trt_workspace_mib: int = 1024
    trt_int8_mode: str = "qdq"  # qdq | calibrator (TensorRT ≤ 10)
    trt_strongly_typed: bool = False
    require_tensorrt: bool = False  # True: no TensorRT here is an error, not a skip
    trt_build_here: bool = True  # False: only the device kit, never an engine here (torch-tensorrt builds them)
    merge: bool = True  # keep still-valid entries of an earlier manifest for other formats
    on_parity_failure: str = "raise"  # raise (ExportError) | reject (record it, build the other formats)
    tolerances: dict[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))


def resolve_options(options: ExportOptions | None, overrides: dict[str, Any]) -> ExportOptions:
    """`options` with keyword overrides applied, checked (UserError names the flag)."""
    unknown = sorted(set(overrides) - set(ExportOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"export_all got unknown options {unknown}")
    opts = dataclasses.replace(options or ExportOptions(), **overrides)
    opts.tolerances = {**DEFAULT_TOLERANCES, **(opts.tolerances or {})}
    if opts.threads < 1:
        raise UserError(f"--threads must be at least 1, got {opts.threads}")
    if opts.calib_size < 1:
        raise UserError(f"--calib-size must be at least 1, got {opts.calib_size}")
    check_int8_head(opts.ov_int8_head)
    if opts.on_parity_failure not in PARITY_FAILURE_MODES:
        raise ValueError(f"on_parity_failure must be one of {PARITY_FAILURE_MODES}, got {opts.on_parity_failure!r}")
    if opts.parity_size < 1:
        raise UserError(f"--parity-size must be at least 1, got {opts.parity_size}")
    return opts
