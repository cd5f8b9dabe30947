"""`BuildJob`: one export in progress, as every format's builder sees it.

A builder (named by its format's entry in export/formats.py) reads the model, the options, the
calibration and parity images from the job, writes its files into `job.stage` under the
format's declared paths, checks parity with `job.check` and records the artifact with
`job.record`, which refuses an artifact missing one of its declared files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export import imagesets
from export.errors import ExportError
from export.formats import FormatSpec
from export.manifest import ArtifactEntry, FileRecord, SkippedFormat, file_record
from export.onnx_build import onnx_metadata_props
from export.options import ExportOptions
from export.parity import enforce, measure


class Rejected(Exception):
    """An artifact failed its parity check in "reject" mode: carries the numbers to record."""

    def __init__(self, reason: str, parity: dict[str, Any]):
        super().__init__(reason)
        self.reason, self.parity = reason, parity


@dataclass
class BuildJob:
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
    built: dict[str, Path] = field(default_factory=dict)  # intermediates shared by builders, by name
    built_details: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def chw(self) -> tuple[int, int, int]:
        s = int(self.meta["input_size"])
        return int(self.meta["in_chans"]), s, s

    def props(self, precision: str) -> dict[str, str]:
        return onnx_metadata_props(self.meta, self.source_sha256, precision)

    def main_path(self, spec: FormatSpec) -> Path:
        """Where the format's main file goes in the staging folder."""
        return self.stage / spec.path

    def declared_files(self, spec: FormatSpec, main: Path | None = None) -> list[FileRecord]:
        """Records of every declared file of the artifact; ExportError names one the build did not write."""
        main = main or self.main_path(spec)
        records = []
        for path in (main, *spec.companion_paths(main)):
            if not path.is_file():
                raise ExportError(f"{spec.name}: the build wrote no {path.relative_to(self.stage).as_posix()}, "
                                  "which export/formats.py declares part of the artifact (nothing was written)")
            records.append(file_record(self.stage, path))
        return records

    def entry(self, spec: FormatSpec, parity: dict[str, Any] | None, details: dict[str, Any],
              main: Path | None = None) -> ArtifactEntry:
        files = self.declared_files(spec, main)
        head = files[0]
        return ArtifactEntry(
            format=spec.name, precision=spec.precision, runtime=spec.runtime, path=head.path,
            sha256=head.sha256, size_bytes=sum(f.size_bytes for f in files),
            source_sha256=self.source_sha256, tool_versions=self.versions, files=files,
            parity=parity, details=details)

    def record(self, spec: FormatSpec, parity: dict[str, Any] | None, details: dict[str, Any],
               main: Path | None = None) -> ArtifactEntry:
        """Add the finished artifact (all its declared files present) to the manifest-to-be."""
        entry = self.entry(spec, parity, details, main)
        self.artifacts.append(entry)
        return entry

    def check(self, spec: FormatSpec, predict: Any, runtime_note: str,
              precision: str | None = None) -> dict[str, Any]:
        """Parity of `predict` against PyTorch on the parity images, within the precision's tolerance."""
        reject = self.opts.on_parity_failure == "reject"
        try:
            report = measure(predict, self.parity_x, self.reference, self.parity.y)
        except ExportError as exc:  # NaN logits or a wrong output shape: nothing to compare
            if not reject:
                raise
            raise Rejected(str(exc), {"passed": False, "failure": str(exc)}) from None
        report.update(runtime=runtime_note, data=self.parity.source)
        tol = self.opts.tolerances[precision or spec.precision]
        try:
            return enforce(spec.name, report, tol)
        except ExportError as exc:
            if not reject:
                raise
            reason = str(exc).replace(" (nothing was written)", "")
            report.setdefault("tolerance", dataclasses.asdict(tol))
            raise Rejected(reason, {**report, "passed": False, "failure": reason}) from None
