"""Deploy bundles: what ships to one target, with a manifest a device (or `pipeline verify`) can check.

A bundle is a flat folder `<target>/` (and `<target>.tar.gz` of it) holding every file of every
shipped artifact under a distinct name (OpenVINO: `model.<precision>.xml` + `.bin`; ONNX:
`model.onnx`, `model.int8.onnx`; TensorRT: the device build kit of the recipe's builder (ONNX +
`build_trtexec.sh`, or checkpoint + model zoo source + `build_torch_trt.py` for torch-tensorrt)
and, once built on a device, `model.<precision>.engine` + its `.json`), `infer.py` (pipeline/bundle_infer.py, one script
for every runtime), `README.txt` and `manifest.json` (sha256 and size of every other file,
labels, preprocessing, the artifacts with their measured accuracy, gates, tool versions).
Which files make up each artifact, and their names here, come from the format's entry in the
registry (export/formats.py): exactly its declared files are copied, and a missing one stops the bundle.
Verification lives in pipeline.bundle_verify and is re-exported here.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dskd import atomic
from dskd.checkpoint import file_sha256
from dskd.errors import UserError
from pipeline.bundle_verify import BUNDLE_FORMAT, MANIFEST, verify_bundle

if TYPE_CHECKING:
    from export.formats import FormatSpec

__all__ = ["BUNDLE_FORMAT", "MANIFEST", "README", "INFER", "write_bundle", "verify_bundle"]

README = "README.txt"
INFER = "infer.py"
TORCH_TRT_SCRIPT = "build_torch_trt.py"  # export.torch_trt.BUILD_SCRIPT (not imported: torch-free here)
_INFER_SOURCE = Path(__file__).with_name("bundle_infer.py")


@dataclass
class _Layout:
    """Bundle file name -> source file, refusing two different files under one name."""

    files: dict[str, Path] = field(default_factory=dict)

    def add(self, name: str, src: Path) -> str:
        have = self.files.get(name)
        if have is not None and have != src and file_sha256(have) != file_sha256(src):
            raise RuntimeError(f"bundle: two different files would both be named {name} ({have}, {src})")
        self.files[name] = src
        return name


def _spec(fmt: str) -> FormatSpec:
    """The format's registry entry (export/formats.py): its declared files and bundle naming."""
    from export.formats import FORMATS

    spec = FORMATS.get(fmt)
    if spec is None or spec.bundle is None:
        raise RuntimeError(f"bundle: format {fmt!r} is not a bundled format of export/formats.py")
    return spec


def bundle_name(fmt: str, precision: str, main: Path | None) -> str:
    """Distinct flat names, from the format's bundle entry: every OpenVINO IR is `model.xml` in
    its own export folder, so the registry names it model.<precision>.xml here."""
    return _spec(fmt).bundle.file_name(precision, None if main is None else main.name)


def _artifact_files(layout: _Layout, fmt: str, precision: str, main: Path) -> list[str]:
    """Exactly the declared files of the artifact (main file + companions), under bundle names.
    A declared file missing beside the main file stops the bundle: an IR without its .bin
    would ship and fail only on the device."""
    spec = _spec(fmt)
    name = bundle_name(fmt, precision, main)
    names = [layout.add(name, main)]
    for c in spec.companions:
        src = main.with_name(c.name_for(main.name))
        if not src.is_file():
            raise UserError(f"bundle: {fmt} artifact {main} has no {src.name} beside it "
                            f"({c.what}, declared in export/formats.py): re-run with `--force export`")
        names.append(layout.add(c.name_for(name), src))
    return names


def _script_inputs(script: Path) -> list[str]:
    """File names build_trtexec.sh checks with `sha256sum -c` (its inputs), from its SUMS block."""
    names, inside = [], False
    for line in script.read_text(encoding="utf-8").splitlines():
        if line.startswith("sha256sum -c"):
            inside = True
        elif inside and line == "SUMS":
            break
        elif inside:
            names.append(line.split("  ", 1)[1])
    return names


def _script_shapes(script: Path) -> dict[str, str]:
    """min/opt/max input shapes of the engine profile, as build_trtexec.sh passes them to trtexec."""
    text = script.read_text(encoding="utf-8")
    return {k: m.group(1) for k in ("min", "opt", "max")
            if (m := re.search(rf"--{k}Shapes=\S+?:(\d+x\d+x\d+x\d+)", text))}


def _torch_trt_shapes(script: Path, chw: tuple[int, int, int] | None) -> dict[str, str]:
    """min/opt/max input shapes of build_torch_trt.py's profile (its BATCHES x the model's C x H x W)."""
    m = re.search(r"^BATCHES = \((\d+), (\d+), (\d+)\)$", script.read_text(encoding="utf-8"), re.MULTILINE)
    if not m or chw is None:
        return {}
    return {k: "x".join(map(str, (int(b), *chw))) for k, b in zip(("min", "opt", "max"), m.groups(), strict=True)}


def _build_entry(layout: _Layout, script: Path, kit: list[Path], precision: str,
                 chw: tuple[int, int, int] | None) -> dict[str, Any]:
    """The manifest's `build` of an engine the bundle builds on first use: its script, the files
    the script reads, the command infer.py runs (from the bundle folder) and the profile shapes."""
    if script.suffix == ".sh":  # the ONNX kit: the script lists its inputs with their sha256
        inputs = [layout.add(n, script.parent / n) for n in _script_inputs(script)]
        return {"script": layout.add(script.name, script), "builder": "onnx", "inputs": inputs,
                "command": f"bash {script.name} {precision}", "profile_shapes": _script_shapes(script)}
    # torch-tensorrt: the checkpoint, the model zoo's source and (int8) the calibration images
    inputs = [layout.add(p.name, p) for p in kit if p != script and (p.name != "calib.npz" or precision == "int8")]
    return {"script": layout.add(script.name, script), "builder": "torch-tensorrt", "inputs": sorted(inputs),
            "command": f"python3 {script.name} --precision {precision}",
            "profile_shapes": _torch_trt_shapes(script, chw)}


def _plan(artifacts: list[dict[str, Any]], run_dir: Path,
          chw: tuple[int, int, int] | None = None) -> tuple[_Layout, list[dict[str, Any]]]:
    """Which files go into the bundle under which names, and the manifest's artifact entries.
    `chw`: the model's input channels x height x width (for the torch-tensorrt profile shapes)."""
    layout, entries = _Layout(), []
    for a in artifacts:
        if not a.get("shipped") or a.get("rejected"):  # rejected: failed its parity check
            continue
        entry = {k: a.get(k) for k in ("format", "precision", "runtime")}
        entry.update(measured=bool(a.get("measured")), top1=a.get("top1"), agreement=a.get("agreement"))
        if a.get("runtime_config"):  # threads/streams/hint the latency was measured with: infer.py uses the threads
            entry["runtime_config"] = a["runtime_config"]
        kit = [run_dir / p for p in (a.get("prepared") or [])]
        script = next((p for p in kit if p.suffix == ".sh" or p.name == TORCH_TRT_SCRIPT), None)
        if script is not None:  # TensorRT: the kit builds the engine on the device
            entry["build"] = _build_entry(layout, script, kit, a["precision"], chw)
        if a.get("path"):
            main = run_dir / a["path"]
            files = _artifact_files(layout, a["format"], a["precision"], main)
            sha = file_sha256(main)
            if a.get("sha256") and sha != a["sha256"]:  # the bundle ships what was measured, or nothing
                raise UserError(f"bundle: {a['path']} changed since it was measured (sha256 {sha[:12]}, measured "
                                f"{a['sha256'][:12]}); re-run with `--force export` to rebuild and re-measure it")
            entry.update(path=files[0], files=sorted(set(files)), sha256=sha)
        elif script is not None and _spec(a["format"]).bundle.built_on_device:
            entry.update(path=bundle_name(a["format"], a["precision"], None), files=[])
        else:
            continue  # neither built nor buildable: nothing of it can ship
        entries.append(entry)
    return layout, entries


def _input_line(meta: dict[str, Any], entries: list[dict[str, Any]]) -> str:
    pre = meta["preprocessing"]
    chw = f"{pre['in_chans']} x {pre['input_size']} x {pre['input_size']}"
    line = f"input '{pre['input']}': float32, N x {chw} (NCHW)"
    shapes = next((e["build"]["profile_shapes"] for e in entries if e.get("build")), None)
    if shapes and "min" in shapes and "max" in shapes:
        lo, hi = shapes["min"].split("x")[0], shapes["max"].split("x")[0]
        return line + f", N from {lo} to {hi} (the TensorRT engine's build profile)"
    return line + ", any N (dynamic batch)"


def _readme(meta: dict[str, Any], entries: list[dict[str, Any]], names: list[str]) -> str:
    pre = meta["preprocessing"]
    lines = [
        f"Deploy bundle for target '{meta['target']}' (runtime {meta['runtime']}), written by `pipeline run`.",
        "",
        _input_line(meta, entries),
        f"output '{pre['output']}': float32, N x {len(meta['labels'])} logits; labels in manifest.json",
        f"preprocessing: EXIF orientation applied, transparency composited on black, 16-bit scaled to 8 bits, "
        f"RGB/L image resized to {pre['input_size']}x{pre['input_size']} (bilinear), "
        f"{pre['scale']}, mean {pre['mean']}, std {pre['std']}",
        "",
        "Run:   python infer.py IMAGE [IMAGE ...]            (first artifact below)",
        "       python infer.py --artifact FILE IMAGE ...    (any artifact below; --json for JSON)",
        "Check: python -m pipeline verify THIS_FOLDER        (sha256 of every file; nothing extra)",
        "",
        "Artifacts:",
    ]
    for e in entries:
        acc = f"top-1 {e['top1']:.2f} %" if e.get("top1") is not None else "not measured"
        parts = ", ".join(e.get("files") or [])
        if e.get("build"):
            b = e["build"]
            state = "built on the device, included" if e.get("files") else "not built yet"
            needs = ("torch, a matching torch-tensorrt, TensorRT and pycuda"
                     + (", nvidia-modelopt" if e["precision"] == "int8" else "")
                     if b.get("builder") == "torch-tensorrt" else "trtexec, TensorRT and pycuda")
            lines.append(f"  {e['path']}  {e['runtime']} {e['precision']}, {acc}; {state}")
            lines.append(f"      infer.py builds it on first use with: {b.get('command') or b['script']}"
                         f"  (from {', '.join(b['inputs'])}; needs {needs})")
        else:
            lines.append(f"  {e['path']}  {e['runtime']} {e['precision']}, {acc}; files: {parts}")
    lines += ["", "Files: " + ", ".join(sorted(names + [MANIFEST])), ""]
    return "\n".join(lines)


def write_bundle(bundle_dir: Path, artifacts: list[dict[str, Any]], run_dir: Path,
                 meta: dict[str, Any]) -> Path:
    """Write `bundle_dir` (replaced whole, never half-written) and `<bundle_dir>.tar.gz`.

    `artifacts` are the report's rows: those with `shipped` go in, with their companion
    files and, for TensorRT, the device build kit (`prepared`). Paths are relative to run_dir.
    """
    pre = meta.get("preprocessing") or {}
    chw = ((int(pre["in_chans"]), int(pre["input_size"]), int(pre["input_size"]))
           if "in_chans" in pre and "input_size" in pre else None)
    layout, entries = _plan(artifacts, run_dir, chw)
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}.", dir=bundle_dir.parent))
    try:
        for name, src in layout.files.items():
            shutil.copyfile(src, tmp / name)
            # Modes from the staging files vary (atomic writes are 0600); a bundle is read by whoever runs it.
            (tmp / name).chmod(0o755 if name.endswith(".sh") else 0o644)
        shutil.copyfile(_INFER_SOURCE, tmp / INFER)
        names = sorted([*layout.files, INFER, README])
        (tmp / README).write_text(_readme(meta, entries, names), encoding="utf-8")
        files = {n: {"sha256": file_sha256(tmp / n), "size_bytes": (tmp / n).stat().st_size} for n in names}
        atomic.write_json(tmp / MANIFEST, {"format": BUNDLE_FORMAT, **meta, "artifacts": entries, "files": files})
        (tmp / MANIFEST).chmod(0o644)  # readable like the other files (the atomic write makes it 0600)
        tmp.chmod(0o755)  # mkdtemp makes the folder 0700: whoever runs infer.py on the device must enter it
        old = None
        if bundle_dir.exists():  # rename, not rmtree, first: a kill never leaves a half-deleted bundle
            old = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}.old-", dir=bundle_dir.parent))
            os.replace(bundle_dir, old / bundle_dir.name)
        os.replace(tmp, bundle_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tar_path = bundle_dir.with_name(bundle_dir.name + ".tar.gz")
    with atomic.atomic_path(tar_path) as t:
        with tarfile.open(t, "w:gz") as tar:
            tar.add(bundle_dir, arcname=bundle_dir.name)
        os.chmod(t, 0o644)  # readable by an artifact server or the device's user, like the folder's files
    return tar_path
