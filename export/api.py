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
import datetime as dt
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from dskd.checkpoint import build_model, file_sha256
from dskd.errors import UserError
from export import imagesets
from export.formats import FormatSpec, list_formats, resolve_formats
from export.job import BuildJob, Rejected
from export.manifest import (
    MANIFEST_NAME,
    ArtifactEntry,
    Manifest,
    SkippedFormat,
    read_manifest,
    verify_files,
    write_manifest,
)
from export.onnx_build import check_opset
from export.options import (
    INT8_HEADS,
    PARITY_FAILURE_MODES,
    ExportOptions,
    check_int8_head,
    resolve_options,
)
from export.runners import run_batched, torch_predictor
from export.versions import have, tool_versions

__all__ = ["INT8_HEADS", "PARITY_FAILURE_MODES", "ExportOptions", "check_int8_head", "export_all",
           "export_format", "list_formats"]


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
    Each format is built by its registry entry's builder (export/formats.py).
    """
    opts = resolve_options(options, overrides)
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
        job = BuildJob(model, meta, source_sha, stage, opts, tool_versions(), parity, parity_x,
                       reference, calib_set,
                       None if calib_set is None else calib_set.normalized(meta["mean"], meta["std"]),
                       calib, requested=[s.name for s in specs], skipped=skipped)
        for spec in specs:
            try:
                spec.build(job)
            except Rejected as rej:
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
    """Refuse (explicit request) or skip (default set) formats that cannot be built here:
    no calibration data, a module missing, or the entry's own preflight (TensorRT with
    require_tensorrt) says no."""
    keep, skipped = [], []
    for spec in specs:
        why = ""
        if spec.needs_calibration and calib is None:
            why = f"{spec.name} needs calibration data: pass --calib-data (the training data)"
        missing = [m for m in spec.modules if not have(m)]
        if missing:
            why = f"{spec.name} needs {missing[0]}, which is not installed: pip install {missing[0]}"
        reason = spec.why_not_here(opts)
        if reason:
            why = f"{spec.name}: {reason}"
        if why and explicit:
            raise UserError(why)
        if why:
            skipped.append(SkippedFormat(spec.name, why))
        else:
            keep.append(spec)
    return keep, skipped


# --------------------------------------------------------------------------- finishing


def _manifest(job: BuildJob, model_pt: Path, specs: list[FormatSpec], notes: list[str]) -> Manifest:
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


def _promote(stage: Path, out_dir: Path, job: BuildJob) -> None:
    """Move finished files from staging into out_dir: companions first, main files last."""
    records = [f for a in job.artifacts for f in a.files] + \
              [f for s in job.skipped for f in s.prepared]
    mains = {a.path for a in job.artifacts}
    paths = sorted({r.path for r in records}, key=lambda p: (p in mains, p))
    for rel in paths:
        dst = out_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / rel, dst)
