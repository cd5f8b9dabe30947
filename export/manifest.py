"""`manifest.json`: one entry per artifact, so a consumer can check what it runs before it runs it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dskd.atomic import write_json
from dskd.checkpoint import file_sha256
from dskd.errors import UserError

MANIFEST_FORMAT = "dskd-export-manifest/1"
MANIFEST_NAME = "manifest.json"


@dataclass
class FileRecord:
    path: str  # relative to the export folder, '/'-separated
    sha256: str
    size_bytes: int


@dataclass
class ArtifactEntry:
    """One exported artifact. `path` is its main file; `files` lists every file it consists of."""

    format: str
    precision: str
    runtime: str
    path: str
    sha256: str
    size_bytes: int
    source_sha256: str
    tool_versions: dict[str, str]
    files: list[FileRecord] = field(default_factory=list)
    parity: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class SkippedFormat:
    """A format that was asked for but not built here, why, and what was prepared for it."""

    format: str
    reason: str
    prepared: list[FileRecord] = field(default_factory=list)
    parity: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    source: dict[str, Any]
    tool_versions: dict[str, str]
    artifacts: list[ArtifactEntry] = field(default_factory=list)
    skipped: list[SkippedFormat] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    created_utc: str = ""
    format: str = MANIFEST_FORMAT

    def artifact(self, fmt: str) -> ArtifactEntry:
        for entry in self.artifacts:
            if entry.format == fmt:
                return entry
        raise KeyError(fmt)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"format": data.pop("format"), "created_utc": data.pop("created_utc"), **data}


def file_record(root: str | os.PathLike, path: str | os.PathLike) -> FileRecord:
    root, path = Path(root), Path(path)
    return FileRecord(path.relative_to(root).as_posix(), file_sha256(path), path.stat().st_size)


def write_manifest(out_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Write `manifest.json` atomically (readers see the old one or the whole new one)."""
    path = Path(out_dir) / MANIFEST_NAME
    write_json(path, manifest.to_dict())
    return path


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Load a manifest (file or its folder) back into dataclasses."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; run `python -m pipeline export` first") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable manifest ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}: not a {MANIFEST_FORMAT} file; re-run the export")

    def files(items: list[dict[str, Any]]) -> list[FileRecord]:
        return [FileRecord(**f) for f in items]

    artifacts = [
        ArtifactEntry(**{**a, "files": files(a.get("files", []))}) for a in raw.get("artifacts", [])
    ]
    skipped = [
        SkippedFormat(**{**s, "prepared": files(s.get("prepared", []))})
        for s in raw.get("skipped", [])
    ]
    return Manifest(
        source=raw.get("source", {}),
        tool_versions=raw.get("tool_versions", {}),
        artifacts=artifacts,
        skipped=skipped,
        settings=raw.get("settings", {}),
        created_utc=raw.get("created_utc", ""),
    )


def verify_files(out_dir: str | os.PathLike, manifest: Manifest) -> list[str]:
    """Paths whose bytes no longer match the manifest (empty when everything is intact)."""
    bad = []
    for entry in manifest.artifacts:
        for rec in entry.files:
            p = Path(out_dir) / rec.path
            if not p.exists() or p.stat().st_size != rec.size_bytes or file_sha256(p) != rec.sha256:
                bad.append(rec.path)
    return bad
