"""Builders of the ONNX Runtime formats (`onnx`, `onnx-int8`), registered in export/formats.py.

The FP32 ONNX is also where every other format starts from, so `onnx_fp32` builds it once per
export and the other builders reuse it.
"""

from __future__ import annotations

from pathlib import Path

from export.formats import FORMATS, FormatSpec
from export.job import BuildJob
from export.onnx_build import export_onnx
from export.runners import ort_predictor


def onnx_fp32(job: BuildJob) -> Path:
    """The FP32 ONNX every other format starts from (built once)."""
    if "onnx" not in job.built:
        path = job.main_path(FORMATS["onnx"])
        details = export_onnx(job.model, job.meta, path, job.source_sha256, job.opts.opset,
                              job.opts.simplify)
        job.built["onnx"] = path
        job.built_details["onnx"] = details
    return job.built["onnx"]


def ort_note(job: BuildJob) -> str:
    return f"onnxruntime CPU, {job.opts.threads} threads"


def build_onnx_fp32(job: BuildJob, spec: FormatSpec) -> None:
    fp32 = onnx_fp32(job)
    parity = job.check(spec, ort_predictor(fp32, job.opts.threads), ort_note(job))
    job.record(spec, parity, dict(job.built_details["onnx"]), main=fp32)


def build_onnx_int8(job: BuildJob, spec: FormatSpec) -> None:
    """Static QDQ INT8 from the FP32 ONNX, calibrated on the training images."""
    from export.ort_quant import quantize_onnx_int8

    assert job.calib_x is not None and job.calib is not None
    path = job.main_path(spec)
    details = quantize_onnx_int8(onnx_fp32(job), path, job.calib_x, job.opts.int8_activations,
                                 job.opts.calib_method, metadata=job.props(spec.precision))
    details["calibration"] = job.calib.describe()
    parity = job.check(spec, ort_predictor(path, job.opts.threads), ort_note(job))
    job.record(spec, parity, details)
