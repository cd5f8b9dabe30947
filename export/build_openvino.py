"""Builders of the OpenVINO formats (`openvino`, `openvino-fp16`, `openvino-int8`), registered in
export/formats.py. Each IR is model.xml + model.bin in its own folder; parity is checked with
INFERENCE_PRECISION_HINT=f32 (CPUs with bf16 would otherwise run bf16)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from export import imagesets
from export.build_onnx import onnx_fp32
from export.formats import FORMATS, FormatSpec
from export.job import BuildJob

COMPILE_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "note": "without it CPUs with bf16 run bf16"}


def openvino_fp32_ir(job: BuildJob) -> Path:
    """The FP32 IR (built once: the `openvino` format and the start of `openvino-int8`)."""
    from export.openvino_ir import convert_onnx_to_ir

    if "openvino" not in job.built:
        xml = job.main_path(FORMATS["openvino"])
        job.built_details["openvino"] = convert_onnx_to_ir(onnx_fp32(job), xml, False, job.props("fp32"))
        job.built["openvino"] = xml
    return job.built["openvino"]


def _finish(job: BuildJob, spec: FormatSpec, xml: Path, details: dict[str, Any]) -> None:
    from export.runners import openvino_predictor

    threads = job.opts.threads
    details["compile_config"] = dict(COMPILE_CONFIG)
    parity = job.check(spec, openvino_predictor(xml, "f32", threads),
                       f"openvino CPU, INFERENCE_PRECISION_HINT=f32, {threads} threads")
    job.record(spec, parity, details, main=xml)


def build_openvino_fp32(job: BuildJob, spec: FormatSpec) -> None:
    xml = openvino_fp32_ir(job)
    _finish(job, spec, xml, dict(job.built_details["openvino"]))


def build_openvino_fp16(job: BuildJob, spec: FormatSpec) -> None:
    from export.openvino_ir import convert_onnx_to_ir

    xml = job.main_path(spec)
    details = convert_onnx_to_ir(onnx_fp32(job), xml, True, job.props(spec.precision))
    _finish(job, spec, xml, details)


def build_openvino_int8(job: BuildJob, spec: FormatSpec) -> None:
    """nncf.quantize of the FP32 IR; with ov_max_drop, nncf's accuracy control on held-out training images."""
    from export.openvino_ir import quantize_ir_int8

    assert job.calib_x is not None and job.calib is not None
    xml = job.main_path(spec)
    validation, held = None, None
    if job.opts.ov_max_drop is not None:
        held = imagesets.held_out_train_set(job.bundle, job.meta, job.opts.accuracy_control_size, job.calib)
        validation = (held.normalized(job.meta["mean"], job.meta["std"]), held.y)
    details = quantize_ir_int8(openvino_fp32_ir(job), xml, job.calib_x, job.props(spec.precision),
                               job.opts.ov_max_drop, validation, job.opts.ov_int8_head == "float")
    details["calibration"] = job.calib.describe()
    if held is not None:
        details["validation"] = held.describe()
    _finish(job, spec, xml, details)
