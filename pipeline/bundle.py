"""Deploy bundles: what ships to one target, with a manifest a device (or `pipeline verify`) can check."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from dskd import atomic
from dskd.checkpoint import file_sha256
from dskd.errors import UserError

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "dskd-bundle/1"

_EXAMPLES = {
    "onnxruntime": '''"""Minimal ONNX Runtime inference for this bundle: python infer.py IMAGE [IMAGE ...]"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

here = Path(__file__).parent
m = json.loads((here / "manifest.json").read_text())
pre = m["preprocessing"]
art = next(a for a in m["artifacts"] if a["runtime"] == "onnxruntime")
sess = ort.InferenceSession(str(here / art["path"]), providers=["CPUExecutionProvider"])
for path in sys.argv[1:]:
    img = Image.open(path).convert("L" if pre["in_chans"] == 1 else "RGB").resize((pre["input_size"],) * 2)
    x = np.asarray(img, dtype=np.float32).reshape(pre["input_size"], pre["input_size"], -1).transpose(2, 0, 1) / 255.0
    x = (x - np.array(pre["mean"], np.float32)[:, None, None]) / np.array(pre["std"], np.float32)[:, None, None]
    logits = sess.run(["logits"], {"input": x[None].astype(np.float32)})[0][0]
    print(path, m["labels"][int(logits.argmax())])
''',
    "openvino": '''"""Minimal OpenVINO inference for this bundle: python infer.py IMAGE [IMAGE ...]"""
import json
import sys
from pathlib import Path

import numpy as np
import openvino as ov
from PIL import Image

here = Path(__file__).parent
m = json.loads((here / "manifest.json").read_text())
pre = m["preprocessing"]
art = next(a for a in m["artifacts"] if a["runtime"] == "openvino")
core = ov.Core()
# FP32 artifacts: ask for f32 explicitly, or CPUs with bf16 support run them in bf16.
cfg = {"INFERENCE_PRECISION_HINT": "f32"} if art["precision"] == "fp32" else {}
model = core.compile_model(str(here / art["path"]), "CPU", cfg)
for path in sys.argv[1:]:
    img = Image.open(path).convert("L" if pre["in_chans"] == 1 else "RGB").resize((pre["input_size"],) * 2)
    x = np.asarray(img, dtype=np.float32).reshape(pre["input_size"], pre["input_size"], -1).transpose(2, 0, 1) / 255.0
    x = (x - np.array(pre["mean"], np.float32)[:, None, None]) / np.array(pre["std"], np.float32)[:, None, None]
    logits = model(x[None].astype(np.float32))[0][0]
    print(path, m["labels"][int(np.argmax(logits))])
''',
    "tensorrt": '''"""TensorRT engines are built on the device: run build_engine.sh there, then e.g.
    trtexec --loadEngine=student_fp16.engine --shapes=input:1x3x32x32
The engine file is specific to the GPU and TensorRT version that built it."""
''',
}


def write_bundle(bundle_dir: Path, artifacts: list[dict[str, Any]], source_root: Path, meta: dict[str, Any],
                 extra_files: list[Path] = ()) -> Path:
    """Copy the target's artifacts into `bundle_dir`, write manifest + example, pack `<bundle_dir>.tar.gz`."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}.", dir=bundle_dir.parent if bundle_dir.parent.exists() else None))
    try:
        entries = []
        for a in artifacts:
            src = source_root / a["path"]
            if not src.exists():
                continue
            dst = tmp / Path(a["path"]).name
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
            entries.append({**{k: a[k] for k in ("format", "precision", "runtime") if k in a}, "path": dst.name})
        for f in extra_files:
            if f.exists():
                shutil.copy2(f, tmp / f.name)
        runtimes = {e["runtime"] for e in entries} | {meta.get("runtime")}
        for rt in runtimes:
            if rt in _EXAMPLES:
                (tmp / ("infer.py" if rt != "tensorrt" else "README_tensorrt.txt")).write_text(_EXAMPLES[rt])
        files = {p.relative_to(tmp).as_posix(): {"sha256": file_sha256(p), "size_bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"format": BUNDLE_FORMAT, **meta, "artifacts": entries, "files": files}
        atomic.write_json(tmp / MANIFEST, manifest)
        bundle_dir.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if bundle_dir.exists():  # rename, not rmtree, first: a kill never leaves a half-deleted bundle
            old = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}.old-", dir=bundle_dir.parent))
            os.replace(bundle_dir, old)
        os.replace(tmp, bundle_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tar_path = bundle_dir.with_name(bundle_dir.name + ".tar.gz")
    with atomic.atomic_path(tar_path) as t, tarfile.open(t, "w:gz") as tar:
        tar.add(bundle_dir, arcname=bundle_dir.name)
    return tar_path


def verify_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """Check every file's sha256 against the manifest; accepts the folder or its .tar.gz."""
    from dskd.data.archive import safe_extract

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such bundle; pass RUN/bundle/<target> or its .tar.gz")
    if p.is_file():
        with tempfile.TemporaryDirectory() as td:
            safe_extract(p, Path(td))
            inner = [d for d in Path(td).iterdir() if (d / MANIFEST).exists()]
            if not inner:
                raise UserError(f"{p}: archive holds no {MANIFEST}; is it a bundle written by `pipeline run`?")
            return verify_bundle(inner[0])
    mpath = p / MANIFEST
    if not mpath.exists():
        raise UserError(f"{p}: no {MANIFEST}; pass a bundle folder written by `pipeline run`")
    manifest = atomic.read_json(mpath)
    problems = []
    for rel, info in manifest.get("files", {}).items():
        f = p / rel
        if not f.exists():
            problems.append(f"{rel}: missing")
        elif file_sha256(f) != info["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    listed = set(manifest.get("files", {})) | {MANIFEST}
    extra = [q.relative_to(p).as_posix() for q in p.rglob("*") if q.is_file() and q.relative_to(p).as_posix() not in listed]
    return {"bundle": str(p), "files": len(manifest.get("files", {})), "problems": problems, "unlisted": extra,
            "ok": not problems}
