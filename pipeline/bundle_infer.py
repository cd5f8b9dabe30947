"""Classify images with this deploy bundle: python infer.py [--artifact FILE] IMAGE [IMAGE ...]

Copied verbatim into every bundle as `infer.py` (from pipeline/bundle_infer.py), so it needs
nothing from this project: numpy, Pillow and the bundle's runtime (onnxruntime, openvino, or
tensorrt + pycuda on the device), on Python >= 3.8 (JetPack 5). It reads manifest.json beside it
for the labels, the preprocessing and the artifact files, decodes images exactly as the pipeline's
dskd/data/decode.py `decode_image` does (EXIF orientation applied, transparency composited on
black, 16-bit images scaled to 8 bits, then a bilinear resize) and normalizes as the deploy stage
measured (x/255, then (x - mean) / std, NCHW float32, batches of 64 by default), so its
predictions are the ones the report's accuracy was measured with. CPU threads default to those
the report's latency was measured with (the artifact's `runtime_config` in manifest.json).

Trust: the folder it runs from is a copy that travelled; so this script (1) removes its own folder
from sys.path before importing anything that is not already loaded (a `numpy.py` planted beside it
is never imported), (2) refuses to run when a Python file (.py/.pyc/.pth/.so) that manifest.json
does not list lies beside it, and (3) checks the size and sha256 of every file it loads (and, for
TensorRT, of the build kit before running it) against manifest.json. No annotations are evaluated
at run time (they are strings): `from __future__ import ...` is itself an import a planted
`__future__.py` would answer, so it is not used.

TensorRT: the engine is device-specific and built on the device; when the artifact's engine
file is absent, this script runs the bundle's own build script first (`bash build_trtexec.sh
fp16`, or `python build_torch_trt.py --precision fp16` when the recipe chose torch-tensorrt),
then runs the engine through the TensorRT Python API either way. Exit codes: 0 done, 2 bad input,
a damaged or inconsistent bundle, or a missing package (one line `error: ...`).
"""

# ruff: noqa: E402 - the imports below must follow the sys.path clean-up, which must come first.
import sys

# `import os` must not read the script's folder (sys.path[0]) either: before Python 3.11 with -S
# os is not loaded yet; otherwise (site imported it, or it is frozen) this is a sys.modules lookup.
_FIRST = sys.path.pop(0) if sys.path else None
import os

if _FIRST is not None:
    sys.path.insert(0, _FIRST)
_OWN_FOLDER = os.path.dirname(os.path.realpath(__file__))
# The script's folder ('' = the working directory when that is it) leaves sys.path for good.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _OWN_FOLDER]

import argparse
import hashlib
import io
import json
import re
import stat
import subprocess
import warnings
from pathlib import Path
from typing import Any

HERE = Path(_OWN_FOLDER)
# The pipeline's default pixel cap (dskd/data/limits.py DataLimits.max_image_mp): an image's header
# is checked against it before any pixel is decoded, as the pipeline does for its datasets.
DEFAULT_MAX_IMAGE_MP = 40.0
_EXIF_ORIENTATION = 0x0112
# Files Python would import or load from a folder on sys.path: none may lie here unlisted.
_CODE_SUFFIXES = (".py", ".pyc", ".pyd", ".pyw", ".pth", ".so", ".dylib", ".dll")
_RECHECK = ("re-fetch or rebuild the bundle, or run `python -m pipeline verify THIS_FOLDER` "
            "to list every problem")
_INCONSISTENT = ("the bundle is inconsistent: run `python -m pipeline verify THIS_FOLDER` "
                 "or rebuild the bundle")


class BundleError(Exception):
    """A one-line problem the user can fix (printed as `error: ...`, exit 2)."""


def load_manifest() -> "dict[str, Any]":
    try:
        return json.loads((HERE / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{HERE / 'manifest.json'}: unreadable ({exc}); run `pipeline verify` on the bundle") from None


def pick_artifact(manifest: "dict[str, Any]", wanted: "str | None") -> "dict[str, Any]":
    """The artifact named by file, format or precision; default: the first of the bundle's runtime."""
    own = [a for a in manifest["artifacts"] if a["runtime"] == manifest["runtime"]]
    if wanted is None:
        if not own:
            raise BundleError(f"the bundle holds no {manifest['runtime']} artifact")
        return own[0]
    for a in own:
        if wanted in (a["path"], a["format"], a["precision"]):
            return a
    names = ", ".join(a["path"] for a in own)
    raise BundleError(f"--artifact {wanted}: not in this bundle; choose from {names}")


def measured_threads(artifact: "dict[str, Any]") -> int:
    """The CPU threads the report's latency was measured with (manifest `runtime_config`), so a
    device runs as it was measured; 0 (the runtime's default, all cores) for "all physical cores"
    (the count of the machine that measured is not this one's), on a GPU or when not recorded."""
    cfg = artifact.get("runtime_config") or {}
    threads = cfg.get("threads")
    if cfg.get("threads_policy") == "all physical cores" or not isinstance(threads, int) or isinstance(threads, bool):
        return 0
    return max(threads, 0)


# ---------------------------------------------------------------- the bundle's own files
def _bundle_name(name: Any, what: str) -> str:
    """A plain file name of this flat folder; anything else means the manifest was edited."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise BundleError(f"manifest.json: {what} {name!r} is not a file name in this bundle; "
                          "check the bundle with `python -m pipeline verify THIS_FOLDER`")
    return name


def _recorded(manifest: "dict[str, Any]", name: str) -> "tuple[str, int]":
    """(sha256, size) manifest.json `files` records for `name`; a file without them cannot be trusted."""
    files = manifest.get("files")
    rec = files.get(name) if isinstance(files, dict) else None
    sha = rec.get("sha256") if isinstance(rec, dict) else None
    size = rec.get("size_bytes") if isinstance(rec, dict) else None
    if not isinstance(sha, str) or not isinstance(size, int) or isinstance(size, bool):
        raise BundleError(f"{name}: manifest.json `files` records no sha256 and size for it, so it cannot be "
                          f"checked; {_RECHECK}")
    return sha, size


def check_file(name: str, sha: str, size: int) -> None:
    """The file's size and sha256 are the manifest's (hashlib, read in 1 MiB pieces). Like
    `pipeline verify`, a symlink, FIFO or folder is refused unopened (never followed, never blocks)."""
    path = HERE / name
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{name}: not a regular file (a link, folder or special file); {_RECHECK}")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise BundleError(f"{name}: missing from the bundle (manifest.json lists it); {_RECHECK}") from None
    except OSError as exc:
        raise BundleError(f"{name}: cannot be read ({exc.strerror}); {_RECHECK}") from None
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as fh:
        found = os.fstat(fh.fileno())
        if not stat.S_ISREG(found.st_mode):  # swapped for something else since the lstat
            raise BundleError(f"{name}: not a regular file (a link, folder or special file); {_RECHECK}")
        if found.st_size != size:
            raise BundleError(f"{name}: {found.st_size} bytes where manifest.json records {size}: the file was "
                              f"changed or damaged; {_RECHECK}")
        for piece in iter(lambda: fh.read(1 << 20), b""):
            digest.update(piece)
    if digest.hexdigest() != sha:
        raise BundleError(f"{name}: sha256 differs from the one manifest.json records: the file was changed or "
                          f"damaged; {_RECHECK}")


def refuse_unlisted_code(manifest: "dict[str, Any]") -> None:
    """No Python module, .pth or shared library that manifest.json does not list lies beside this
    script: a bundle never has one, and one there was put there by someone else."""
    files = manifest.get("files")
    listed = set(files) if isinstance(files, dict) else set()
    me = os.path.basename(__file__)
    for entry in sorted(os.listdir(HERE)):
        if entry in listed or entry == me:
            continue
        low = entry.lower()
        package = os.path.isfile(os.path.join(HERE, entry, "__init__.py"))
        if package or low.endswith(_CODE_SUFFIXES) or ".so." in low:
            what = "a Python package" if package else "a Python/native module file"
            raise BundleError(f"{entry}: {what} that manifest.json does not list lies beside infer.py (planted "
                              f"code?); delete it and {_RECHECK}")


def check_artifact_files(manifest: "dict[str, Any]", artifact: "dict[str, Any]", name: str) -> None:
    """Every file the runtime will read for this artifact (its `files` and its main file) matches
    manifest.json, and the artifact's own sha256 is the one `files` records for its main file.
    An engine built on this device (not in the manifest) cannot be checked: it was made here."""
    listed = artifact.get("files") or []
    if not isinstance(listed, list):
        raise BundleError(f"manifest.json: artifact {name}: `files` is not a list; {_INCONSISTENT}")
    names = [_bundle_name(n, f"artifact {name} file") for n in listed]
    built_here = bool(artifact.get("build")) and name not in names
    if not built_here and name not in names:
        names.insert(0, name)
    want = artifact.get("sha256")
    if want is not None and not built_here and want != _recorded(manifest, name)[0]:
        raise BundleError(f"manifest.json: artifact {name}: its sha256 is not the one `files` records for "
                          f"{name}; {_INCONSISTENT}")
    for n in names:
        check_file(n, *_recorded(manifest, n))


def check_build_kit(manifest: "dict[str, Any]", artifact: "dict[str, Any]") -> None:
    """The build script and its inputs match manifest.json before the script is run."""
    build = artifact["build"]
    names = [build["script"], *(build.get("inputs") or [])]
    for n in names:
        n = _bundle_name(n, f"artifact {artifact['path']} build file")
        check_file(n, *_recorded(manifest, n))


# ---------------------------------------------------------------- images, as the pipeline decodes them
def _need(module: str, hint: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise BundleError(f"{module} is not installed here: {hint}") from None


def read_image_file(path: str) -> bytes:
    """The bytes of a regular file; a FIFO or device is refused unopened (decode.read_capped)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError("not a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):  # swapped for something else since the stat
            raise OSError("not a regular file")
        return fh.read()


def _to_8bit(im: Any, Image: Any, np: Any) -> Any:
    """decode._to_8bit: 16-bit modes scaled by 1/257 and rounded, float clipped, to L."""
    if im.mode.startswith("I"):
        arr = np.asarray(im, dtype=np.float64) / 257.0
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
    else:
        return im
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def _to_target_mode(im: Any, in_chans: int, Image: Any, np: Any) -> Any:
    """decode._to_target_mode: transparency composited on black, then L or RGB."""
    im = _to_8bit(im, Image, np)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    target = "L" if in_chans == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def _upright(im: Any, ImageOps: Any) -> Any:
    """decode._upright: the EXIF orientation applied; broken EXIF is ignored."""
    try:
        if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            return ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF blocks raise all sorts of errors
        pass
    return im


def decode_image(data: bytes, size: int, in_chans: int, max_pixels: int) -> Any:
    """uint8 in_chans x size x size: dskd/data/decode.py `decode_image`, step for step (pixel cap
    from the header, JPEG draft for big JPEGs, load, EXIF orientation, mode, bilinear resize)."""
    np = _need("numpy", "pip install numpy")
    Image = _need("PIL.Image", "pip install Pillow")
    ImageOps = _need("PIL.ImageOps", "pip install Pillow")
    im = Image.open(io.BytesIO(data))
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise Image.DecompressionBombError(f"{w}x{h} = {w * h / 1e6:.1f} megapixels")
        if im.format == "JPEG" and min(im.size) >= 2 * size:
            im.draft(None, (size, size))
        im.load()
        im = _upright(im, ImageOps)
        im = _to_target_mode(im, in_chans, Image, np)
        if im.size != (size, size):
            im = im.resize((size, size), getattr(Image, "Resampling", Image).BILINEAR)  # Pillow < 9.1 too
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_images(paths: "list[str]", pre: "dict[str, Any]", max_image_mp: float = DEFAULT_MAX_IMAGE_MP) -> Any:
    """uint8 N x C x H x W, decoded as the pipeline decoded the images the report measured."""
    np = _need("numpy", "pip install numpy")
    Image = _need("PIL.Image", "pip install Pillow")
    size, chans = int(pre["input_size"]), int(pre["in_chans"])
    cap = int(max_image_mp * 1_000_000)
    out = np.empty((len(paths), chans, size, size), dtype=np.uint8)
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = cap  # Pillow's own bomb check at the same cap (decode.pil_pixel_cap)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd EXIF/palettes; errors are what matter (as the pipeline)
            for i, path in enumerate(paths):
                try:
                    out[i] = decode_image(read_image_file(path), size, chans, cap)
                except MemoryError:
                    raise
                except BundleError:
                    raise
                except Image.DecompressionBombError as exc:
                    pil = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow's own check, or ours
                    found = f"{int(pil.group(1)) / 1e6:.1f} megapixels" if pil else str(exc)
                    raise BundleError(f"{path}: image of {found}, over the cap of {max_image_mp:g} megapixels "
                                      "(--max-image-mp); raise --max-image-mp if the image is trusted, "
                                      "or downscale it") from None
                except Exception as exc:  # any failure means "this file is not a usable image"
                    why = str(exc).replace("\n", " ").strip() or type(exc).__name__
                    raise BundleError(f"{path}: not a readable image ({why})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old
    return out


def normalize(x_uint8: Any, pre: "dict[str, Any]") -> Any:
    """(x/255 - mean)/std per channel in float32: the arithmetic the deploy stage measured with."""
    import numpy as np

    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x_uint8.astype(np.float32) / np.float32(255.0) - mean) / std)


# ---------------------------------------------------------------- runtimes
def onnxruntime_predictor(path: Path, threads: int, precision: str) -> Any:
    ort = _need("onnxruntime", "pip install onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def openvino_predictor(path: Path, threads: int, precision: str) -> Any:
    ov = _need("openvino", "pip install openvino")
    # f32 unless the IR is fp16: CPUs with bf16 would otherwise run an FP32 IR in bf16.
    cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f16" if precision == "fp16" else "f32",
                           "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}  # a local: never evaluated
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = threads
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", cfg)
    request = compiled.create_infer_request()

    def predict(x: Any) -> Any:
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()

    return predict


def build_command(artifact: "dict[str, Any]") -> "list[str]":
    """argv of the bundle's own build script for this precision: `bash build_trtexec.sh P` (ONNX kit)
    or `python build_torch_trt.py --precision P` with this python (torch-tensorrt kit)."""
    script = HERE / artifact["build"]["script"]
    if script.suffix == ".py":
        return [sys.executable, str(script), "--precision", artifact["precision"]]
    return ["bash", str(script), artifact["precision"]]


def build_engine(artifact: "dict[str, Any]") -> Path:
    """Run the bundle's build script for this precision (engines are built where they run)."""
    engine = HERE / artifact["path"]
    script = HERE / artifact["build"]["script"]
    print(f"building {engine.name} with {script.name} (once; the engine is kept beside it)", file=sys.stderr)
    # its output goes to stderr: stdout carries only the predictions (--json must stay parseable)
    proc = subprocess.run(build_command(artifact), cwd=HERE, check=False, stdout=sys.stderr.fileno())
    if proc.returncode != 0 or not engine.is_file():
        hint = ("install torch, the matching torch-tensorrt and TensorRT for this python"
                if script.suffix == ".py" else "or set TRTEXEC=/path/to/trtexec")
        raise BundleError(f"{script.name} {artifact['precision']} failed (exit {proc.returncode}); "
                          f"see its output above; {hint}")
    return engine


def tensorrt_predictor(path: Path, threads: int, precision: str) -> Any:
    """TensorRT >= 8.5 name-based I/O with pycuda buffers (the deploy stage's runner does the same)."""
    trt = _need("tensorrt", "run this bundle on the device (JetPack ships TensorRT) or pip install tensorrt")
    cuda = _need("pycuda.driver", "pip install pycuda")
    _need("pycuda.autoinit", "pip install pycuda (and a CUDA driver)")
    import numpy as np

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise BundleError(f"{path.name}: TensorRT cannot load it (built by another TensorRT version or GPU?); "
                          f"delete it and run again to rebuild it here")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    out = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    in_dtype, out_dtype = (trt.nptype(engine.get_tensor_dtype(n)) for n in (inp, out))
    max_batch = int(engine.get_tensor_profile_shape(inp, 0)[2][0])  # the build profile's max N
    stream = cuda.Stream()

    def predict(x: Any) -> Any:
        if len(x) > max_batch:  # --batch above the engine's profile: run it in pieces it accepts
            return np.concatenate([predict(x[i:i + max_batch]) for i in range(0, len(x), max_batch)])
        if not context.set_input_shape(inp, tuple(x.shape)):
            raise BundleError(f"{path.name}: TensorRT refused input shape {tuple(x.shape)}")
        h_in = np.ascontiguousarray(x.astype(in_dtype))
        h_out = np.empty(tuple(context.get_tensor_shape(out)), dtype=out_dtype)
        d_in, d_out = cuda.mem_alloc(h_in.nbytes), cuda.mem_alloc(h_out.nbytes)
        try:
            context.set_tensor_address(inp, int(d_in))
            context.set_tensor_address(out, int(d_out))
            cuda.memcpy_htod_async(d_in, h_in, stream)
            if not context.execute_async_v3(stream.handle):
                raise BundleError(f"{path.name}: TensorRT inference failed")
            cuda.memcpy_dtoh_async(h_out, d_out, stream)
            stream.synchronize()
        finally:
            d_in.free()
            d_out.free()
        return h_out.astype(np.float32)

    return predict


PREDICTORS = {"onnxruntime": onnxruntime_predictor, "openvino": openvino_predictor,
              "tensorrt": tensorrt_predictor}


def _load_predictor(file: Path, artifact: "dict[str, Any]", threads: int) -> Any:
    try:
        return PREDICTORS[artifact["runtime"]](file, threads, artifact["precision"])
    except BundleError:
        raise
    except Exception as exc:  # a damaged or incomplete artifact (e.g. an IR without its .bin): say which
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        raise BundleError(f"{artifact['path']}: {artifact['runtime']} cannot load it ({why}); check the bundle "
                          "with `python -m pipeline verify THIS_FOLDER` or rebuild it") from None


def _run(predict: Any, x: Any, artifact: "dict[str, Any]", n_labels: int) -> Any:
    """One batch's logits; a model that does not take the manifest's input or does not give one
    score per label is an inconsistent bundle (one line), not a runtime traceback or IndexError."""
    import numpy as np

    try:
        logits = np.asarray(predict(x))
    except BundleError:
        raise
    except Exception as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        shape = " x ".join(map(str, x.shape))
        raise BundleError(f"{artifact['path']}: {artifact['runtime']} refused the input manifest.json's "
                          f"preprocessing gives ({shape} float32): {why}; {_INCONSISTENT}") from None
    if logits.ndim != 2 or logits.shape != (len(x), n_labels):
        raise BundleError(f"{artifact['path']}: the model gives outputs of shape {tuple(logits.shape)} for "
                          f"{len(x)} images, where manifest.json lists {n_labels} labels; {_INCONSISTENT}")
    return logits


def classify(paths: "list[str]", wanted: "str | None", batch: int, threads: "int | None",
             max_image_mp: float = DEFAULT_MAX_IMAGE_MP) -> "list[dict[str, Any]]":
    manifest = load_manifest()
    refuse_unlisted_code(manifest)
    np = _need("numpy", "pip install numpy")
    _need("PIL.Image", "pip install Pillow")
    artifact = pick_artifact(manifest, wanted)
    if threads is None:
        threads = measured_threads(artifact)
    pre = manifest["preprocessing"]
    # bundles are flat: a manifest pointing elsewhere was edited (`pipeline verify` names it)
    name = _bundle_name(artifact["path"], "artifact path")
    if artifact["runtime"] not in PREDICTORS:
        raise BundleError(f"{artifact['path']}: runtime {artifact['runtime']!r} is not one this infer.py runs "
                          f"({', '.join(PREDICTORS)}); rebuild the bundle")
    labels = list(manifest["labels"])
    check_artifact_files(manifest, artifact, name)
    x = load_images(paths, pre, max_image_mp)
    file = HERE / name
    if artifact["runtime"] == "tensorrt":
        _need("tensorrt", "run this bundle on the device (JetPack ships TensorRT) or pip install tensorrt")
        if not file.is_file():
            check_build_kit(manifest, artifact)
            file = build_engine(artifact)
    predict = _load_predictor(file, artifact, threads)
    rows = []
    for i in range(0, len(paths), batch):
        logits = _run(predict, normalize(x[i:i + batch], pre), artifact, len(labels))
        for j, k in enumerate(np.argmax(logits, axis=1)):
            rows.append({"image": paths[i + j], "index": int(k), "label": labels[int(k)]})
    return rows


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description="Classify images with this bundle's model.")
    ap.add_argument("images", nargs="+", help="image files (any size; resized to the model's input)")
    ap.add_argument("--artifact", help="file, format or precision of the artifact (default: the first)")
    ap.add_argument("--batch", type=int, default=64, help="images per inference call (default 64)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: those the report's latency was measured with; 0: the runtime's default)")
    ap.add_argument("--max-image-mp", type=float, default=DEFAULT_MAX_IMAGE_MP,
                    help=f"refuse images over this many megapixels, from their header, before decoding "
                         f"(default {DEFAULT_MAX_IMAGE_MP:g}, the pipeline's data.max_image_mp default)")
    ap.add_argument("--json", action="store_true", help="print one JSON list instead of 'IMAGE LABEL' lines")
    args = ap.parse_args(argv)
    if args.batch < 1 or (args.threads is not None and args.threads < 0):
        ap.error("--batch must be >= 1 and --threads >= 0")
    if not args.max_image_mp > 0:
        ap.error("--max-image-mp must be > 0")
    try:
        rows = classify(args.images, args.artifact, args.batch, args.threads, args.max_image_mp)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, ValueError) as exc:  # a manifest missing a field or of the wrong shape: one line
        print(f"error: {HERE / 'manifest.json'}: not a manifest this infer.py can read ({type(exc).__name__}: "
              f"{exc}); check the bundle with `python -m pipeline verify THIS_FOLDER`", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(r["image"], r["label"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
