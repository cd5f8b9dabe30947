"""`export_all`: model.pt -> verified artifacts + manifest.json, all or nothing.

Everything is built in a staging folder inside `out_dir`, verified there (onnx.checker,
parity against PyTorch on real images, INT8 accuracy), and only then moved into place;
`manifest.json` is written last. A failure removes the staging folder and leaves
`out_dir` as it was.

A failed parity check is an error by default (`pipeline export`: the user asked for that
artifact). With `on_parity_failure="reject"` (what `pipeline run` uses) it is a finding
about the model instead: the artifact is left out, listed under `skipped` with
`details.rejected = true`, the reason and its measured parity numbers, and the other
formats are still built and checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dskd.checkpoint import build_model, file_sha256
from dskd.errors import UserError
from export import imagesets
from export.errors import ExportError
from export.formats import FORMATS, FormatSpec, resolve_formats
from export.manifest import (
    MANIFEST_NAME,
    ArtifactEntry,
    Manifest,
    SkippedFormat,
    artifact_files,
    file_record,
    read_manifest,
    verify_files,
    write_manifest,
)
from export.onnx_build import DEFAULT_OPSET, check_opset, export_onnx, onnx_metadata_props
from export.parity import DEFAULT_TOLERANCES, Tolerance, enforce, measure
from export.runners import ort_predictor, run_batched, torch_predictor
from export.versions import have, tool_versions

TRT_DIR = "tensorrt"
TRT_QDQ_ONNX = "model.int8.qdq.onnx"
TRT_SCRIPT = "build_trtexec.sh"


INT8_HEADS = ("float", "int8")  # how openvino-int8 treats the classifier (see quantize_ir_int8)
PARITY_FAILURE_MODES = ("raise", "reject")


class _Rejected(Exception):
    """An artifact failed its parity check in "reject" mode: carries the numbers to record."""

    def __init__(self, reason: str, parity: dict[str, Any]):
        super().__init__(reason)
        self.reason, self.parity = reason, parity


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


@dataclass
class _Job:
    model: torch.nn.Module
    meta: dict[str, Any]
    source_sha256: str
    stage: Path
    opts: ExportOptions
    versions: dict[str, str]
    parity: imagesets.ImageSet
    parity_x: np.ndarray
    reference: np.ndarray
    calib: imagesets.ImageSet | None
    calib_x: np.ndarray | None
    bundle: Any
    artifacts: list[ArtifactEntry] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)
    skipped: list[SkippedFormat] = field(default_factory=list)
    built: dict[str, Path] = field(default_factory=dict)  # intermediates by name
    built_details: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def chw(self) -> tuple[int, int, int]:
        s = int(self.meta["input_size"])
        return int(self.meta["in_chans"]), s, s

    def props(self, precision: str) -> dict[str, str]:
        return onnx_metadata_props(self.meta, self.source_sha256, precision)

    def entry(self, spec: FormatSpec, main: Path, parity: dict[str, Any] | None,
              details: dict[str, Any]) -> ArtifactEntry:
        files = artifact_files(self.stage, main)
        head = next(f for f in files if f.path == main.relative_to(self.stage).as_posix())
        return ArtifactEntry(
            format=spec.name, precision=spec.precision, runtime=spec.runtime, path=head.path,
            sha256=head.sha256, size_bytes=sum(f.size_bytes for f in files),
            source_sha256=self.source_sha256, tool_versions=self.versions, files=files,
            parity=parity, details=details)

    def check(self, spec: FormatSpec, predict: Any, runtime_note: str,
              precision: str | None = None) -> dict[str, Any]:
        reject = self.opts.on_parity_failure == "reject"
        try:
            report = measure(predict, self.parity_x, self.reference, self.parity.y)
        except ExportError as exc:  # NaN logits or a wrong output shape: nothing to compare
            if not reject:
                raise
            raise _Rejected(str(exc), {"passed": False, "failure": str(exc)}) from None
        report.update(runtime=runtime_note, data=self.parity.source)
        tol = self.opts.tolerances[precision or spec.precision]
        try:
            return enforce(spec.name, report, tol)
        except ExportError as exc:
            if not reject:
                raise
            reason = str(exc).replace(" (nothing was written)", "")
            report.setdefault("tolerance", dataclasses.asdict(tol))
            raise _Rejected(reason, {**report, "passed": False, "failure": reason}) from None


def list_formats() -> list[str]:
    """Names accepted by `export_all(formats=...)`, in build order."""
    return list(FORMATS)


def export_all(model_pt: str | os.PathLike, out_dir: str | os.PathLike,
               formats: Iterable[str] | str | None = None, calib: Any = None,
               parity_eval: tuple[Any, Any] | None = None,
               options: ExportOptions | None = None, **overrides: Any) -> Manifest:
    """Export `model_pt` to every format in `formats` (None: all) under `out_dir`.

    calib: a DataBundle (dskd.data.load_data) of the data the model was trained on; its
    training split calibrates INT8, its test split checks parity unless `parity_eval`
    (uint8 images, labels) is given. Without it, INT8 formats are skipped (an error when
    named explicitly) and parity runs on noise images.
    Keyword overrides set ExportOptions fields (e.g. opset=20, calib_size=500).
    """
    opts = _options(options, overrides)
    explicit = formats is not None
    specs = resolve_formats(formats)
    check_opset(opts.opset)
    model_pt, out_dir = Path(model_pt), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a folder; pick a folder path")
    model, meta = build_model(model_pt)
    _check_meta(model_pt, meta)
    source_sha = file_sha256(model_pt if model_pt.is_file() else model_pt / "model.pt")
    specs, skipped = _plan(specs, explicit, calib, opts)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        calib_set = None
        if calib is not None and any(s.needs_calibration for s in specs):
            calib_set = imagesets.calibration_set(calib, meta, opts.calib_size, opts.calib_seed)
        elif calib is not None:
            imagesets.check_bundle(calib, meta)
        parity = imagesets.parity_set(parity_eval if parity_eval is not None else calib, meta,
                                      opts.parity_size)
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)

    threads_before = torch.get_num_threads()
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export-staging-", dir=out_dir))
    ok = False
    try:
        parity_x = parity.normalized(meta["mean"], meta["std"])
        reference = run_batched(torch_predictor(model, opts.threads), parity_x)
        job = _Job(model, meta, source_sha, stage, opts, tool_versions(), parity, parity_x,
                   reference, calib_set,
                   None if calib_set is None else calib_set.normalized(meta["mean"], meta["std"]),
                   calib, requested=[s.name for s in specs], skipped=skipped)
        for spec in specs:
            try:
                _BUILDERS[spec.runtime](job, spec)
            except _Rejected as rej:
                job.skipped.append(SkippedFormat(spec.name, rej.reason, [], rej.parity, {"rejected": True}))
        manifest = _manifest(job, model_pt, specs, notes)
        if opts.merge:
            _merge_previous(manifest, out_dir)
        _promote(stage, out_dir, job)
        write_manifest(out_dir, manifest)
        ok = True
        return manifest
    finally:
        torch.set_num_threads(threads_before)
        shutil.rmtree(stage, ignore_errors=True)
        if created and not ok:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if still empty


def export_format(model_pt: str | os.PathLike, out_dir: str | os.PathLike, fmt: str,
                  **kwargs: Any) -> ArtifactEntry | SkippedFormat:
    """One format (same checks and manifest as export_all); returns its entry."""
    manifest = export_all(model_pt, out_dir, formats=[fmt], **kwargs)
    name = resolve_formats([fmt])[0].name
    for item in [*manifest.artifacts, *manifest.skipped]:
        if item.format == name:
            return item
    raise AssertionError(f"{name} missing from its own manifest")


def _options(options: ExportOptions | None, overrides: dict[str, Any]) -> ExportOptions:
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


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """build_model checked the zoo name and the weights; the rest of meta must agree too."""
    n, chans = int(meta["num_classes"]), int(meta["in_chans"])
    if len(meta["class_names"]) != n:
        raise UserError(f"{path}: meta class_names has {len(meta['class_names'])} names but "
                        f"num_classes is {n}; re-save the checkpoint")
    for key in ("mean", "std"):
        if len(meta[key]) != chans:
            raise UserError(f"{path}: meta {key} has {len(meta[key])} values for {chans} "
                            "channels; re-save the checkpoint")
    if any(float(s) <= 0 for s in meta["std"]):
        raise UserError(f"{path}: meta std must be positive, got {meta['std']}")


def _plan(specs: list[FormatSpec], explicit: bool, calib: Any, opts: ExportOptions
          ) -> tuple[list[FormatSpec], list[SkippedFormat]]:
    """Refuse (explicit request) or skip (default set) formats that cannot be built here.
    TensorRT is special: its device build kit is always prepared (see _build_tensorrt)."""
    keep, skipped = [], []
    for spec in specs:
        why = ""
        if spec.needs_calibration and calib is None:
            why = f"{spec.name} needs calibration data: pass --calib-data (the training data)"
        missing = [m for m in spec.modules if m != "tensorrt" and not have(m)]
        if missing:
            why = f"{spec.name} needs {missing[0]}, which is not installed: pip install {missing[0]}"
        if spec.runtime == "tensorrt" and opts.require_tensorrt:
            from export.tensorrt_build import tensorrt_status

            version, reason = tensorrt_status()
            if version is None:
                why = f"{spec.name}: {reason}"
        if why and explicit:
            raise UserError(why)
        if why:
            skipped.append(SkippedFormat(spec.name, why))
        else:
            keep.append(spec)
    return keep, skipped


# --------------------------------------------------------------------------- builders


def _onnx_fp32(job: _Job) -> Path:
    """The FP32 ONNX every other format starts from (built once)."""
    if "onnx" not in job.built:
        path = job.stage / FORMATS["onnx"].path
        details = export_onnx(job.model, job.meta, path, job.source_sha256, job.opts.opset,
                              job.opts.simplify)
        job.built["onnx"] = path
        job.built_details["onnx"] = details
    return job.built["onnx"]


def _build_onnxruntime(job: _Job, spec: FormatSpec) -> None:
    from export.ort_quant import quantize_onnx_int8

    fp32 = _onnx_fp32(job)
    if spec.precision == "fp32":
        parity = job.check(spec, ort_predictor(fp32, job.opts.threads),
                           f"onnxruntime CPU, {job.opts.threads} threads")
        job.artifacts.append(job.entry(spec, fp32, parity, dict(job.built_details["onnx"])))
        return
    assert job.calib_x is not None and job.calib is not None
    path = job.stage / spec.path
    props = job.props("int8")
    details = quantize_onnx_int8(fp32, path, job.calib_x, job.opts.int8_activations,
                                 job.opts.calib_method, metadata=props)
    details["calibration"] = job.calib.describe()
    parity = job.check(spec, ort_predictor(path, job.opts.threads),
                       f"onnxruntime CPU, {job.opts.threads} threads")
    job.artifacts.append(job.entry(spec, path, parity, details))


def _openvino_fp32_ir(job: _Job) -> Path:
    from export.openvino_ir import convert_onnx_to_ir

    if "openvino" not in job.built:
        xml = job.stage / FORMATS["openvino"].path
        job.built_details["openvino"] = convert_onnx_to_ir(_onnx_fp32(job), xml, False,
                                                           job.props("fp32"))
        job.built["openvino"] = xml
    return job.built["openvino"]


def _build_openvino(job: _Job, spec: FormatSpec) -> None:
    from export.openvino_ir import convert_onnx_to_ir, quantize_ir_int8
    from export.runners import openvino_predictor

    threads = job.opts.threads
    note = f"openvino CPU, INFERENCE_PRECISION_HINT=f32, {threads} threads"
    if spec.name == "openvino":
        xml = _openvino_fp32_ir(job)
        details = dict(job.built_details["openvino"])
    elif spec.name == "openvino-fp16":
        xml = job.stage / spec.path
        details = convert_onnx_to_ir(_onnx_fp32(job), xml, True, job.props("fp16"))
    else:
        assert job.calib_x is not None and job.calib is not None
        xml = job.stage / spec.path
        validation, held = None, None
        if job.opts.ov_max_drop is not None:
            held = imagesets.held_out_train_set(job.bundle, job.meta,
                                                job.opts.accuracy_control_size, job.calib)
            validation = (held.normalized(job.meta["mean"], job.meta["std"]), held.y)
        details = quantize_ir_int8(_openvino_fp32_ir(job), xml, job.calib_x, job.props("int8"),
                                   job.opts.ov_max_drop, validation, job.opts.ov_int8_head == "float")
        details["calibration"] = job.calib.describe()
        if held is not None:
            details["validation"] = held.describe()
    details["compile_config"] = {"INFERENCE_PRECISION_HINT": "f32",
                                 "note": "without it CPUs with bf16 run bf16"}
    parity = job.check(spec, openvino_predictor(xml, "f32", threads), note)
    job.artifacts.append(job.entry(spec, xml, parity, details))


def _trt_kit(job: _Job) -> dict[str, Path]:
    """The device build kit, once for all TensorRT formats: FP32 ONNX, symmetric Q/DQ ONNX
    (when int8 is asked for) and build_trtexec.sh with their checksums."""
    from export.ort_quant import quantize_onnx_int8
    from export.tensorrt_cmd import build_script

    if "trt-kit" in job.built:
        return {"onnx": job.built["trt-onnx"], "script": job.built["trt-kit"],
                **({"qdq": job.built["trt-qdq"]} if "trt-qdq" in job.built else {})}
    kit = job.stage / TRT_DIR
    kit.mkdir(exist_ok=True)
    precisions = [p for p in ("fp16", "int8") if f"tensorrt-{p}" in job.requested]
    onnx_copy = kit / "model.onnx"
    shutil.copyfile(_onnx_fp32(job), onnx_copy)
    job.built["trt-onnx"] = onnx_copy
    qdq = None
    if "int8" in precisions:
        assert job.calib_x is not None
        qdq = kit / TRT_QDQ_ONNX
        job.built_details["trt-qdq"] = quantize_onnx_int8(
            onnx_copy, qdq, job.calib_x, calibrate_method=job.opts.calib_method,
            for_tensorrt=True, metadata=job.props("int8"))
        job.built["trt-qdq"] = qdq
    sums = {p.name: file_sha256(p) for p in (onnx_copy, qdq) if p is not None}
    script = build_script(precisions, job.chw, onnx_copy.name, qdq.name if qdq else None, sums,
                          job.opts.trt_batches, job.opts.trt_workspace_mib,
                          title=f"{job.meta['model']} (model.pt {job.source_sha256[:12]})")
    script_path = kit / TRT_SCRIPT
    script_path.write_text(script, encoding="utf-8")
    script_path.chmod(0o755)
    job.built["trt-kit"] = script_path
    return _trt_kit(job)


def _calib_data_sha(job: _Job) -> str:
    if job.calib is None:
        return ""
    return hashlib.sha256(f"{job.calib.source}:{job.calib.indices_sha256}".encode()).hexdigest()


def _build_tensorrt(job: _Job, spec: FormatSpec) -> None:
    """Prepare the device kit; build the engine when TensorRT and a GPU are here, else
    record the format as skipped with the reason and the prepared files."""
    from export.tensorrt_build import build_engine, engine_predictor, tensorrt_status

    kit = _trt_kit(job)
    parity = None
    uses_qdq = spec.precision == "int8" and job.opts.trt_int8_mode == "qdq"
    source = kit["qdq"] if uses_qdq else kit["onnx"]
    if uses_qdq:
        # ONNX Runtime runs the same Q/DQ graph: the accuracy is known before the device.
        parity = job.check(spec, ort_predictor(source, job.opts.threads),
                           "onnxruntime CPU on the TensorRT Q/DQ ONNX (estimate for the engine)")
    prepared = [file_record(job.stage, p) for p in (source, kit["script"])]
    version, why = tensorrt_status() if job.opts.trt_build_here else (
        None, "engines are built on the target by the torch-tensorrt builder (export.trt_builder)")
    if version is None:
        job.skipped.append(SkippedFormat(spec.name, why, prepared, parity,
                                         {"build_script": f"{TRT_DIR}/{TRT_SCRIPT}",
                                          "quantization": job.built_details.get("trt-qdq")
                                          if uses_qdq else None}))
        return
    engine = job.stage / spec.path
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
    entry = job.entry(spec, engine, engine_parity, info)
    entry.files += [r for r in prepared if r.path not in {f.path for f in entry.files}]
    job.artifacts.append(entry)


_BUILDERS = {"onnxruntime": _build_onnxruntime, "openvino": _build_openvino,
             "tensorrt": _build_tensorrt}


# --------------------------------------------------------------------------- finishing


def _manifest(job: _Job, model_pt: Path, specs: list[FormatSpec], notes: list[str]) -> Manifest:
    meta = job.meta
    source = {"path": model_pt.name, "sha256": job.source_sha256, "model": meta["model"],
              "method": meta.get("method"), "num_classes": int(meta["num_classes"]),
              "class_names": list(meta["class_names"]), "input_size": int(meta["input_size"]),
              "in_chans": int(meta["in_chans"]), "mean": list(meta["mean"]),
              "std": list(meta["std"]), "top1": meta.get("top1")}
    settings = {"opset": job.opts.opset, "formats": [s.name for s in specs],
                "parity_data": job.parity.describe(),
                "calibration": job.calib.describe() if job.calib else None,
                "threads": job.opts.threads, "warnings": notes,
                "tensorrt_profile": list(job.opts.trt_batches)}
    created = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Manifest(source=source, tool_versions=job.versions, artifacts=job.artifacts,
                    skipped=job.skipped, settings=settings, created_utc=created)


def _merge_previous(manifest: Manifest, out_dir: Path) -> None:
    """Keep an earlier manifest's entries for formats not rebuilt now, when they come from
    the same checkpoint and their files are intact."""
    if not (out_dir / MANIFEST_NAME).exists():
        return
    try:
        old = read_manifest(out_dir)
    except UserError:
        return
    done = {a.format for a in manifest.artifacts} | {s.format for s in manifest.skipped}
    for entry in old.artifacts:
        if entry.format in done or entry.source_sha256 != manifest.source["sha256"]:
            continue
        probe = Manifest(source={}, tool_versions={}, artifacts=[entry])
        if not verify_files(out_dir, probe):
            manifest.artifacts.append(entry)


def _promote(stage: Path, out_dir: Path, job: _Job) -> None:
    """Move finished files from staging into out_dir: companions first, main files last."""
    records = [f for a in job.artifacts for f in a.files] + \
              [f for s in job.skipped for f in s.prepared]
    paths = sorted({r.path for r in records},
                   key=lambda p: (p.endswith((".xml", ".engine", ".onnx")), p))
    for rel in paths:
        dst = out_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / rel, dst)
