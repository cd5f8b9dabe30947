"""Builder of the TensorRT formats (`tensorrt-fp16`, `tensorrt-int8`), registered in export/formats.py.

The device build kit (FP32 ONNX, symmetric Q/DQ ONNX for INT8, build_trtexec.sh with their
checksums) is always prepared; the engine itself is built here only when TensorRT and a GPU
are (engines are device-specific), otherwise the format is recorded as skipped with the reason
and the prepared files.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from dskd.checkpoint import file_sha256
from export.build_onnx import onnx_fp32
from export.formats import FORMATS, FormatSpec
from export.job import BuildJob, Rejected
from export.manifest import SkippedFormat, file_record
from export.runners import ort_predictor

TRT_DIR = "tensorrt"
TRT_QDQ_ONNX = "model.int8.qdq.onnx"
TRT_SCRIPT = "build_trtexec.sh"


def tensorrt_preflight(opts: Any) -> str:
    """With require_tensorrt, no TensorRT here is a reason not to build (else the kit is prepared anyway)."""
    if not opts.require_tensorrt:
        return ""
    from export.tensorrt_build import tensorrt_status

    version, reason = tensorrt_status()
    return "" if version is not None else reason


def _trt_kit(job: BuildJob) -> dict[str, Path]:
    """The device build kit, once for all TensorRT formats: FP32 ONNX, symmetric Q/DQ ONNX
    (when int8 is asked for) and build_trtexec.sh with their checksums."""
    from export.ort_quant import quantize_onnx_int8
    from export.tensorrt_cmd import build_script

    if "trt-kit" in job.built:
        return {"onnx": job.built["trt-onnx"], "script": job.built["trt-kit"],
                **({"qdq": job.built["trt-qdq"]} if "trt-qdq" in job.built else {})}
    kit = job.stage / TRT_DIR
    kit.mkdir(exist_ok=True)
    precisions = [p for p in ("fp16", "int8")
                  if any(FORMATS[n].runtime == "tensorrt" and FORMATS[n].precision == p for n in job.requested)]
    onnx_copy = kit / "model.onnx"
    shutil.copyfile(onnx_fp32(job), onnx_copy)
    job.built["trt-onnx"] = onnx_copy
    qdq = None
    if "int8" in precisions:
        assert job.calib_x is not None
        qdq = kit / TRT_QDQ_ONNX
        job.built_details["trt-qdq"] = quantize_onnx_int8(
            onnx_copy, qdq, job.calib_x, calibrate_method=job.opts.calib_method,
            for_tensorrt=True, metadata=job.props("int8"))
        job.built["trt-qdq"] = qdq
        if job.opts.trt_int8_mode == "qdq" and not _qdq_passes_parity(job, qdq):
            # rejected before the script is written: a script whose checksums list a file the kit
            # does not ship fails `sha256sum -c` on the device for fp16 too (and the bundle cannot copy it)
            precisions.remove("int8")
            del job.built["trt-qdq"]
            qdq.unlink()
            qdq = None
    sums = {p.name: file_sha256(p) for p in (onnx_copy, qdq) if p is not None}
    script = build_script(precisions, job.chw, onnx_copy.name, qdq.name if qdq else None, sums,
                          job.opts.trt_batches, job.opts.trt_workspace_mib,
                          title=f"{job.meta['model']} (model.pt {job.source_sha256[:12]})")
    script_path = kit / TRT_SCRIPT
    script_path.write_text(script, encoding="utf-8")
    script_path.chmod(0o755)
    job.built["trt-kit"] = script_path
    return _trt_kit(job)


INT8_PARITY_NOTE = "onnxruntime CPU on the TensorRT Q/DQ ONNX (estimate for the engine)"


def _qdq_passes_parity(job: BuildJob, qdq: Path) -> bool:
    """The INT8 engine's parity, estimated on ONNX Runtime running the same Q/DQ graph, checked once
    when the kit is made; a rejection is kept for `build_tensorrt` to raise for the int8 format."""
    spec = next(FORMATS[n] for n in job.requested if FORMATS[n].runtime == "tensorrt" and FORMATS[n].precision == "int8")
    try:
        job.built_details["trt-qdq-parity"] = job.check(spec, ort_predictor(qdq, job.opts.threads), INT8_PARITY_NOTE)
    except Rejected as rej:
        job.built_details["trt-qdq-rejected"] = {"reason": rej.reason, "parity": rej.parity}
        return False
    return True


def _calib_data_sha(job: BuildJob) -> str:
    if job.calib is None:
        return ""
    return hashlib.sha256(f"{job.calib.source}:{job.calib.indices_sha256}".encode()).hexdigest()


def build_tensorrt(job: BuildJob, spec: FormatSpec) -> None:
    """Prepare the device kit; build the engine when TensorRT and a GPU are here, else
    record the format as skipped with the reason and the prepared files."""
    from export.tensorrt_build import build_engine, engine_predictor, tensorrt_status

    kit = _trt_kit(job)
    parity = None
    uses_qdq = spec.precision == "int8" and job.opts.trt_int8_mode == "qdq"
    if uses_qdq and "trt-qdq-rejected" in job.built_details:
        rej = job.built_details["trt-qdq-rejected"]
        raise Rejected(rej["reason"], rej["parity"])
    source = kit["qdq"] if uses_qdq else kit["onnx"]
    if uses_qdq:
        # ONNX Runtime runs the same Q/DQ graph: the accuracy is known before the device (checked with the kit)
        parity = job.built_details["trt-qdq-parity"]
    prepared = [file_record(job.stage, p) for p in (source, kit["script"])]
    version, why = tensorrt_status() if job.opts.trt_build_here else (
        None, "engines are built on the target by the torch-tensorrt builder (export.trt_builder)")
    if version is None:
        job.skipped.append(SkippedFormat(spec.name, why, prepared, parity,
                                         {"build_script": f"{TRT_DIR}/{TRT_SCRIPT}",
                                          "quantization": job.built_details.get("trt-qdq")
                                          if uses_qdq else None}))
        return
    engine = job.main_path(spec)
    info = build_engine(source, engine, spec.precision, job.chw, job.opts.trt_batches,
                        workspace_mib=job.opts.trt_workspace_mib,
                        timing_cache=job.stage / TRT_DIR / "timing.cache",
                        int8_mode=job.opts.trt_int8_mode, calib_x=job.calib_x,
                        calib_data_sha256=_calib_data_sha(job),
                        strongly_typed=job.opts.trt_strongly_typed)
    engine_parity = job.check(spec, engine_predictor(engine), f"TensorRT {version}")
    info.update(build_script=f"{TRT_DIR}/{TRT_SCRIPT}",
                inputs=[{"path": r.path, "sha256": r.sha256, "size_bytes": r.size_bytes}
                        for r in prepared])
    entry = job.record(spec, engine_parity, info, main=engine)
    entry.files += [r for r in prepared if r.path not in {f.path for f in entry.files}]
