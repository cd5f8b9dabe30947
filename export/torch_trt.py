"""torch-tensorrt as a second TensorRT engine builder, without needing torch-tensorrt here.

Path: the student's model.pt → `torch.export.export` → Torch-TensorRT's dynamo frontend →
(a) a serialized TensorRT engine (`torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine`)
that the runner and `trtexec --loadEngine` load like an ONNX-built one, and optionally (b) a
Torch-TensorRT ExportedProgram (`torch_tensorrt.save(..., output_format="exported_program")`,
loaded with `torch_tensorrt.load`). INT8 is explicit Q/DQ (ModelOpt `mtq.quantize` inserts the
Q/DQ nodes, calibrated on training images), as TensorRT 10+ wants it.

An engine only runs on the GPU and TensorRT that built it, so the build runs ON THE DEVICE:
this module writes `build_torch_trt.py` into the build kit (a script that needs torch,
torch-tensorrt and, for INT8, nvidia-modelopt there). Here we test what can be tested without
them: the version rules, the script's text, the command line that runs it, and the parsing of
what it prints. Neither torch-tensorrt nor TensorRT has run on this project's machines.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dskd.atomic import atomic_path, write_text
from dskd.errors import UserError

BUILDERS = ("onnx", "torch-tensorrt")
BUILD_SCRIPT = "build_torch_trt.py"
RESULT_PREFIX = "@@dskd-torch-trt "  # the one line of JSON the script prints on success
DEFAULT_DEVICE = "cuda"  # where the kit's script builds; tests with the FAKE torch-tensorrt use cpu
PRECISIONS = ("fp16", "int8")

# torch-tensorrt X.Y is built against torch X.Y and one TensorRT minor. Every row is taken from
# that release's notes (sources: docs/export.md, "torch-tensorrt versions"); a release not listed
# is checked for its torch minor only and reported as untested (WARN), never guessed.
_PAIRS: dict[tuple[int, int], dict[str, tuple[int, int]]] = {
    (2, 6): {"torch": (2, 6), "tensorrt": (10, 7)},
    (2, 8): {"torch": (2, 8), "tensorrt": (10, 12)},
    (2, 9): {"torch": (2, 9), "tensorrt": (10, 13)},
    (2, 10): {"torch": (2, 10), "tensorrt": (10, 14)},
    (2, 11): {"torch": (2, 11), "tensorrt": (10, 15)},
    (2, 12): {"torch": (2, 12), "tensorrt": (10, 16)},
    (2, 13): {"torch": (2, 13), "tensorrt": (11, 0)},
    (2, 14): {"torch": (2, 14), "tensorrt": (11, 1)},
}
# Jetson Orin ('tegra', JetPack 6.x): the 2.8 wheels pair torch 2.8 with JetPack's TensorRT 10.3;
# 2.9-2.12 have no Orin wheels (the notes say: keep using 2.8); from 2.13 the aarch64 wheels,
# Orin included, use the same TensorRT as x86-64.
_TEGRA_PAIRS: dict[tuple[int, int], dict[str, tuple[int, int]]] = {
    (2, 8): {"torch": (2, 8), "tensorrt": (10, 3)},
}


def check_builder(name: str, where: str = "export.trt_builder") -> str:
    """The builder name, or a one-line UserError naming the key and the choices."""
    value = str(name).strip().lower()
    if value not in BUILDERS:
        raise UserError(f"{where} {name!r}: choose {' or '.join(repr(b) for b in BUILDERS)}")
    return value


def _minor(text: str | None) -> tuple[int, int] | None:
    m = re.match(r"\s*v?(\d+)\.(\d+)", str(text or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class VersionVerdict:
    """Whether torch, torch-tensorrt and TensorRT on one machine belong together."""

    ok: bool  # False: the build cannot work (fail before anything is copied)
    warning: str  # "" or why the combination is untested
    detail: str  # what was found, for the doctor's line

    @property
    def status(self) -> str:
        return "FAIL" if not self.ok else "WARN" if self.warning else "PASS"


def check_versions(torch_version: str | None, torch_trt_version: str | None,
                   tensorrt_version: str | None, tegra: bool = False) -> VersionVerdict:
    """torch ↔ torch-tensorrt ↔ TensorRT: a torch minor other than the one torch-tensorrt was
    built for cannot load its C++ ops (FAIL); a TensorRT minor other than its pin is untested (WARN)."""
    found = (f"torch {torch_version or 'absent'}, torch-tensorrt {torch_trt_version or 'absent'}, "
             f"TensorRT {tensorrt_version or 'absent'}")
    tt, th, trt = _minor(torch_trt_version), _minor(torch_version), _minor(tensorrt_version)
    missing = [n for n, v in (("torch", th), ("torch-tensorrt", tt), ("tensorrt", trt)) if v is None]
    if missing:
        return VersionVerdict(False, "", f"{found}: {', '.join(missing)} missing or unreadable")
    pairs = (_TEGRA_PAIRS.get(tt) if tegra else None) or _PAIRS.get(tt)
    want_torch = pairs["torch"] if pairs else tt  # from 2.x on, torch-tensorrt tracks torch's minor
    if th != want_torch:
        return VersionVerdict(False, "", f"{found}: torch-tensorrt {tt[0]}.{tt[1]} needs torch "
                              f"{want_torch[0]}.{want_torch[1]}")
    if pairs is None:
        return VersionVerdict(True, f"torch-tensorrt {tt[0]}.{tt[1]} is not in this pipeline's table "
                              "(docs/export.md): untested, check its release notes for the TensorRT "
                              "it needs", found)
    want_trt = pairs["tensorrt"]
    if trt != want_trt:
        return VersionVerdict(True, f"torch-tensorrt {tt[0]}.{tt[1]} was built for TensorRT "
                              f"{want_trt[0]}.{want_trt[1]}, found {trt[0]}.{trt[1]}: untested", found)
    return VersionVerdict(True, "", found)


# --------------------------------------------------------------------------- the build kit
KIT_CHECKPOINT = "model.pt"
KIT_MODELS_ZIP = "dskd_models.zip"  # the model zoo's source: the device rebuilds the nn.Module
KIT_CALIB = "calib.npz"  # INT8: uint8 training images + mean/std, for ModelOpt's calibration


def ep_file(precision: str) -> str:
    """Name of the optional Torch-TensorRT ExportedProgram of `precision`."""
    return f"model.{precision}.ep"


def write_kit(model_pt: str | Path, out_dir: str | Path, precisions: Sequence[str],
              calib_x: Any = None, mean: Sequence[float] = (), std: Sequence[float] = (),
              batches: tuple[int, int, int] = (1, 16, 64), workspace_mib: int = 1024,
              save_ep: bool = False, device: str | None = None) -> list[Path]:
    """Files the device needs to build the engines with torch-tensorrt (build on the device).

    `calib_x` (uint8 N×C×H×W training images) is needed for int8. `device` is the torch device the
    build runs on: cuda there; tests with the FAKE torch-tensorrt build on cpu.
    """
    import zipfile

    import numpy as np

    import dskd

    wanted = [check_precision(p) for p in precisions]
    lo, opt, hi = batches
    if not 1 <= lo <= opt <= hi:
        raise UserError(f"TensorRT batch profile {batches}: need 1 <= min <= opt <= max")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / KIT_CHECKPOINT, out / KIT_MODELS_ZIP, out / BUILD_SCRIPT]
    with atomic_path(files[0]) as tmp:
        shutil.copyfile(model_pt, tmp)
    pkg = Path(dskd.__file__).parent
    with atomic_path(files[1]) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for src in [pkg / "__init__.py", pkg / "errors.py", *sorted((pkg / "models").glob("*.py"))]:
            zf.write(src, str(src.relative_to(pkg.parent)))
    if "int8" in wanted:
        if calib_x is None or len(calib_x) == 0:
            raise UserError("torch-tensorrt int8 needs calibration images (--calib-data / the recipe's data)")
        with atomic_path(out / KIT_CALIB) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, x=np.asarray(calib_x, dtype=np.uint8), mean=np.asarray(mean, np.float32),
                     std=np.asarray(std, np.float32))
        files.append(out / KIT_CALIB)
    write_text(files[2], device_script(batches, workspace_mib, save_ep, device or DEFAULT_DEVICE))
    return files


def write_stage_kit(model_pt: str | Path, out_dir: str | Path, precisions: Sequence[str], data: Any,
                    calib_size: int) -> list[Path]:
    """The kit for the pipeline's deploy stage: INT8 calibrates on the same stratified training
    images as the ONNX Q/DQ path (export.imagesets.calibration_set), with the checkpoint's mean/std."""
    from dskd.checkpoint import load_model_file
    from export.imagesets import calibration_set

    _, meta = load_model_file(model_pt)
    calib = calibration_set(data, meta, calib_size).x if "int8" in precisions else None
    return write_kit(model_pt, out_dir, precisions, calib_x=calib, mean=meta["mean"], std=meta["std"])


def check_precision(precision: str) -> str:
    value = str(precision).lower()
    if value not in PRECISIONS:
        raise UserError(f"torch-tensorrt precision {precision!r}: choose {', '.join(PRECISIONS)}")
    return value


def build_command(python: str, precision: str, *, out: str | None = None, ep: bool = False) -> list[str]:
    """argv (after `cd` into the kit) that builds one engine on the device."""
    argv = [*shlex.split(python), BUILD_SCRIPT, "--precision", check_precision(precision),
            "--out", out or f"model.{precision}.engine"]
    return [*argv, "--ep", ep_file(precision)] if ep else argv


def parse_result(stdout: str) -> dict[str, Any]:
    """The build script's one result line (JSON after RESULT_PREFIX); UserError when absent."""
    for ln in reversed(stdout.splitlines()):
        if ln.startswith(RESULT_PREFIX):
            try:
                data = json.loads(ln[len(RESULT_PREFIX):])
            except ValueError:
                break
            if isinstance(data, dict) and data.get("engine_sha256"):
                return data
            break
    raise UserError("the torch-tensorrt build printed no result line: see its log")


def device_script(batches: tuple[int, int, int], workspace_mib: int, save_ep: bool, device: str) -> str:
    """The build script, with the profile, the version table and the device baked in."""
    table = {f"{k[0]}.{k[1]}": {n: f"{v[0]}.{v[1]}" for n, v in p.items()} for k, p in _PAIRS.items()}
    tegra = {f"{k[0]}.{k[1]}": {n: f"{v[0]}.{v[1]}" for n, v in p.items()} for k, p in _TEGRA_PAIRS.items()}
    return (_SCRIPT.replace("@BATCHES@", repr(tuple(batches))).replace("@WORKSPACE@", str(int(workspace_mib)))
            .replace("@SAVE_EP@", repr(bool(save_ep))).replace("@DEVICE@", repr(device))
            .replace("@PAIRS@", json.dumps(table)).replace("@TEGRA@", json.dumps(tegra))
            .replace("@PREFIX@", RESULT_PREFIX))


_SCRIPT = r'''#!/usr/bin/env python3
"""Build a TensorRT engine of the student with torch-tensorrt ON THIS DEVICE (written by the pipeline).

model.pt -> torch.export -> torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine
-> model.<precision>.engine (loads in TensorRT's runtime and trtexec like an ONNX-built engine);
optionally model.<precision>.ep (torch_tensorrt.save, load with torch_tensorrt.load).
INT8 is explicit Q/DQ from NVIDIA ModelOpt (mtq.quantize, calibrated on calib.npz).
Usage: python3 build_torch_trt.py --precision fp16|int8 [--out FILE] [--ep FILE]
Exit: 0 built, 2 bad versions / usage, 3 a module is missing, 5 the build failed.
"""
import argparse
import contextlib
import hashlib
import inspect
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BATCHES = @BATCHES@
WORKSPACE_MIB = @WORKSPACE@
SAVE_EP = @SAVE_EP@
DEVICE = @DEVICE@
PAIRS = json.loads('@PAIRS@')
TEGRA_PAIRS = json.loads('@TEGRA@')
PREFIX = "@PREFIX@"


def fail(code, message):
    sys.stderr.write("torch-trt-build: " + message + "\n")
    sys.exit(code)


def minor(text):
    m = re.match(r"\s*v?(\d+)\.(\d+)", str(text))
    return "%s.%s" % m.groups() if m else None


def check_versions(torch_v, tt_v, trt_v):
    tegra = os.path.exists("/etc/nv_tegra_release")
    pair = (TEGRA_PAIRS.get(minor(tt_v)) if tegra else None) or PAIRS.get(minor(tt_v))
    want_torch = pair["torch"] if pair else minor(tt_v)
    if minor(torch_v) != want_torch:
        fail(2, "torch-tensorrt %s needs torch %s, found torch %s: install the matching pair"
             % (tt_v, want_torch, torch_v))
    if pair and minor(trt_v) != pair["tensorrt"]:
        sys.stderr.write("torch-trt-build: warning: torch-tensorrt %s was built for TensorRT %s, found %s\n"
                         % (tt_v, pair["tensorrt"], trt_v))


def calibration_batches(torch, path, dev, batch=32):
    import numpy as np

    with np.load(path) as data:
        x, mean, std = data["x"], data["mean"], data["std"]
    x = (x.astype(np.float32) / 255.0 - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
    return [torch.from_numpy(x[i:i + batch]).to(dev) for i in range(0, len(x), batch)]


def settings(fn, torch, torch_tensorrt, precision, shapes):
    """Keyword arguments for this torch-tensorrt version (enabled_precisions is deprecated in
    newer releases in favour of explicit typing + autocast)."""
    lo, opt, hi = shapes
    params = inspect.signature(fn).parameters
    kw = {"arg_inputs": [torch_tensorrt.Input(min_shape=lo, opt_shape=opt, max_shape=hi, dtype=torch.float32)],
          "workspace_size": WORKSPACE_MIB << 20, "min_block_size": 1}
    wanted = {torch.float16} if precision == "fp16" else {torch.float16, torch.int8}
    has_var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    if "enable_autocast" in params:  # newer releases: explicit typing, FP16 by autocast
        kw.update(use_explicit_typing=True, enable_autocast=True, autocast_low_precision_type=torch.float16)
    elif "enabled_precisions" in params or has_var_kw:
        kw["enabled_precisions"] = wanted
    return kw


def main():
    ap = argparse.ArgumentParser(description="build a TensorRT engine with torch-tensorrt")
    ap.add_argument("--precision", required=True, choices=("fp16", "int8"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--ep", default=None, help="also save a Torch-TensorRT ExportedProgram here")
    args = ap.parse_args()
    out = os.path.join(HERE, args.out or "model.%s.engine" % args.precision)
    ep_out = args.ep or ("model.%s.ep" % args.precision if SAVE_EP else None)
    try:
        import tensorrt
        import torch
        import torch_tensorrt
    except ImportError as exc:
        fail(3, "%s: install torch, torch-tensorrt and TensorRT (JetPack) for this python" % exc)
    check_versions(torch.__version__, torch_tensorrt.__version__, tensorrt.__version__)
    sys.path.insert(0, os.path.join(HERE, "dskd_models.zip"))
    from dskd.models import create_model

    t0 = time.time()
    ckpt = torch.load(os.path.join(HERE, "model.pt"), map_location="cpu", weights_only=True)
    meta = ckpt["meta"]
    model = create_model(meta["model"], num_classes=int(meta["num_classes"]), in_chans=int(meta["in_chans"]))
    model.load_state_dict(ckpt["state_dict"], strict=True)
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        fail(5, "no CUDA GPU visible to torch: torch-tensorrt builds need the device's GPU")
    model = model.eval().to(DEVICE)
    chw = (int(meta["in_chans"]), int(meta["input_size"]), int(meta["input_size"]))
    lo, opt, hi = BATCHES
    shapes = [(b,) + chw for b in (lo, opt, hi)]
    example = torch.randn(*shapes[1], device=DEVICE)
    export_ctx = contextlib.nullcontext()
    if args.precision == "int8":
        try:
            import modelopt.torch.quantization as mtq
            from modelopt.torch.quantization.utils import export_torch_mode
        except ImportError:
            fail(3, "int8 needs NVIDIA ModelOpt for explicit Q/DQ: pip install nvidia-modelopt")
        batches = calibration_batches(torch, os.path.join(HERE, "calib.npz"), DEVICE)

        def forward_loop(m):
            with torch.no_grad():
                for b in batches:
                    m(b)

        model = mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop=forward_loop)
        export_ctx = export_torch_mode()
    batch = torch.export.Dim("batch", min=lo, max=hi) if hi > lo else None
    with torch.no_grad(), export_ctx:
        ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},) if batch else None)
    convert = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine
    kw = settings(convert, torch, torch_tensorrt, args.precision, shapes)
    try:
        engine = bytes(convert(ep, **kw))
    except Exception as exc:
        fail(5, "torch-tensorrt could not convert the model (%s: %s)" % (type(exc).__name__,
                                                                         " ".join(str(exc).split())[:300]))
    tmp = out + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(engine)
    os.replace(tmp, out)
    if ep_out:
        compile_kw = settings(torch_tensorrt.dynamo.compile, torch, torch_tensorrt, args.precision, shapes)
        trt_gm = torch_tensorrt.dynamo.compile(ep, **compile_kw)
        torch_tensorrt.save(trt_gm, os.path.join(HERE, ep_out), output_format="exported_program",
                            arg_inputs=[example])
    gpu = torch.cuda.get_device_name() if DEVICE.startswith("cuda") else DEVICE
    info = {"builder": "torch-tensorrt", "precision": args.precision, "engine": os.path.basename(out),
            "engine_sha256": hashlib.sha256(engine).hexdigest(), "ep": ep_out, "gpu_name": gpu,
            "torch": torch.__version__, "torch_tensorrt": torch_tensorrt.__version__,
            "tensorrt_version": tensorrt.__version__, "profile": {"min": lo, "opt": opt, "max": hi},
            "input_chw": list(chw), "seconds": round(time.time() - t0, 3)}
    with open(out + ".json", "w") as fh:  # beside the engine, as build_trtexec.sh does
        json.dump(info, fh)
    print(PREFIX + json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
'''
