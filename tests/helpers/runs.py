"""Tiny real runs of the pipeline and checks on the folders they leave."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

# Overrides of the shipped digits-smoke recipe: a real run of every stage in ~20 s. Gates are
# set where even this barely-trained student passes, so a failure means a fault, not accuracy.
TINY: dict[str, object] = {
    "data.input_size": 16, "data.in_chans": 1,
    "teacher.model": "resnet8", "teacher.epochs": 4,
    "student.model": "resnet8", "student.epochs": 2, "student.method": "kd", "student.options": {},
    "export.calib_size": 100,
    "target.min_iters": 20, "target.min_seconds": 0.1, "target.warmup_seconds": 0.02,
    "gates.min_top1": 0.0, "gates.max_top1_drop": 100.0, "gates.max_size_mb": 5.0,
    "gates.max_latency_ms": 1000.0,
}
# Smaller still: one epoch each, for runs that are meant to fail early (bad data, bad config).
SMALL: dict[str, object] = {
    "data.input_size": 16, "data.in_chans": 1, "teacher.model": "resnet8", "teacher.epochs": 1,
    "student.model": "resnet8", "student.epochs": 1, "student.method": "kd", "student.options": {},
}
RUN_OUTPUTS = ("report.json", "report.md", "report.html", "gates.junit.xml", "last_run.json", "plots", "bundle")


def stage_dir(run_dir: Path, stage: str) -> Path | None:
    """The cached folder of `stage` in a run folder, or None before it ran."""
    found = sorted((run_dir / "stages").glob(f"{stage}-*"))
    return found[0] if found else None


def copy_run(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    """A copy of a finished run folder without the stages in `drop` and the run's outputs,
    so the next `run` there starts at the first dropped stage (like a fresh run reaching it)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    for stage in drop:
        for folder in (dst / "stages").glob(f"{stage}-*"):
            shutil.rmtree(folder)
    if drop:
        for name in RUN_OUTPUTS:
            p = dst / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    return dst


def assert_no_torn_files(root: Path) -> int:
    """Every finished file (not hidden temp files) under `root` reads back whole; returns the count.

    Torn files are what a non-atomic write leaves when killed: each type is parsed to the end,
    and every manifest's sha256 list is checked against the files it names.
    """
    import onnx
    from PIL import Image

    from dskd.checkpoint import torch_load
    from export.manifest import read_manifest, verify_files
    from pipeline.bundle import verify_bundle

    checked = 0
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        name = p.name
        if name == "manifest.json" and p.parent.name == "artifacts":
            assert verify_files(p.parent, read_manifest(p.parent)) == [], p
        elif name == "manifest.json" and p.parent.parent.name == "bundle":
            assert verify_bundle(p.parent)["ok"], p
        if name.endswith(".json"):
            json.loads(p.read_text())
        elif name.endswith(".jsonl"):
            for line in p.read_text().splitlines():
                json.loads(line)
        elif name.endswith(".onnx"):
            onnx.checker.check_model(onnx.load(str(p)))
        elif name.endswith(".pt"):
            torch_load(p)
        elif name.endswith(".png"):
            with Image.open(p) as im:
                im.load()
        elif name.endswith(".tar.gz"):
            with tarfile.open(p, "r:gz") as tar:
                for member in tar:
                    if member.isfile():
                        tar.extractfile(member).read()  # type: ignore[union-attr]
        elif name.endswith(".xml"):
            import xml.etree.ElementTree as ET

            ET.parse(p)
        elif name.endswith(".html"):
            assert p.read_text().rstrip().endswith("</html>"), p
        elif name.endswith(".npz"):
            import numpy as np

            with np.load(p, allow_pickle=False) as data:
                for key in data.files:
                    data[key]
        checked += 1
    return checked


def assert_same_weights(a: Path, b: Path) -> None:
    """Two model files hold bit-identical tensors under the same names."""
    import torch

    from dskd.checkpoint import load_model_file

    sa, _ = load_model_file(a)
    sb, _ = load_model_file(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs between {a} and {b}"
