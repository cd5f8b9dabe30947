"""Classify images with this deploy bundle: python infer.py [--artifact FILE] IMAGE [IMAGE ...]

Copied verbatim into every bundle as `infer.py` (from pipeline/bundle_infer.py), so it needs
nothing from this project: numpy, Pillow and the bundle's runtime (onnxruntime, openvino, or
tensorrt + pycuda on the device). It reads manifest.json beside it for the labels, the
preprocessing and the artifact files, and preprocesses exactly as the pipeline's deploy stage
measured (x/255, then (x - mean) / std, NCHW float32, batches of 64 by default), so its
predictions are the ones the report's accuracy was measured with. CPU threads default to those
the report's latency was measured with (the artifact's `runtime_config` in manifest.json).

TensorRT: the engine is device-specific and built on the device; when the artifact's engine
file is absent, this script runs the bundle's own build script first (`bash build_trtexec.sh
fp16`, or `python build_torch_trt.py --precision fp16` when the recipe chose torch-tensorrt),
then runs the engine through the TensorRT Python API either way. Exit codes: 0 done, 2 bad input or a missing runtime (one line `error: ...`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


class BundleError(Exception):
    """A one-line problem the user can fix (printed as `error: ...`, exit 2)."""


def load_manifest() -> dict[str, Any]:
    try:
        return json.loads((HERE / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{HERE / 'manifest.json'}: unreadable ({exc}); run `pipeline verify` on the bundle") from None


def pick_artifact(manifest: dict[str, Any], wanted: str | None) -> dict[str, Any]:
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


def measured_threads(artifact: dict[str, Any]) -> int:
    """The CPU threads the report's latency was measured with (manifest `runtime_config`), so a
    device runs as it was measured; 0 (the runtime's default, all cores) for "all physical cores"
    (the count of the machine that measured is not this one's), on a GPU or when not recorded."""
    cfg = artifact.get("runtime_config") or {}
    threads = cfg.get("threads")
    if cfg.get("threads_policy") == "all physical cores" or not isinstance(threads, int) or isinstance(threads, bool):
        return 0
    return max(threads, 0)


def load_images(paths: list[str], pre: dict[str, Any]) -> Any:
    """uint8 N x C x H x W, resized to the model's input size like the training data."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    size, chans = int(pre["input_size"]), int(pre["in_chans"])
    out = np.empty((len(paths), chans, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                img = img.convert("L" if chans == 1 else "RGB")
                if img.size != (size, size):
                    img = img.resize((size, size), Image.BILINEAR)
                out[i] = np.asarray(img, dtype=np.uint8).reshape(size, size, chans).transpose(2, 0, 1)
        except (OSError, UnidentifiedImageError) as exc:
            raise BundleError(f"{path}: not a readable image ({exc})") from None
    return out


def normalize(x_uint8: Any, pre: dict[str, Any]) -> Any:
    """(x/255 - mean)/std per channel in float32: the arithmetic the deploy stage measured with."""
    import numpy as np

    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x_uint8.astype(np.float32) / np.float32(255.0) - mean) / std)


def _need(module: str, hint: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise BundleError(f"{module} is not installed here: {hint}") from None


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
                           "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = threads
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", cfg)
    request = compiled.create_infer_request()

    def predict(x: Any) -> Any:
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()

    return predict


def build_command(artifact: dict[str, Any]) -> list[str]:
    """argv of the bundle's own build script for this precision: `bash build_trtexec.sh P` (ONNX kit)
    or `python build_torch_trt.py --precision P` with this python (torch-tensorrt kit)."""
    script = HERE / artifact["build"]["script"]
    if script.suffix == ".py":
        return [sys.executable, str(script), "--precision", artifact["precision"]]
    return ["bash", str(script), artifact["precision"]]


def build_engine(artifact: dict[str, Any]) -> Path:
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


def classify(paths: list[str], wanted: str | None, batch: int, threads: int | None) -> list[dict[str, Any]]:
    import numpy as np

    manifest = load_manifest()
    artifact = pick_artifact(manifest, wanted)
    if threads is None:
        threads = measured_threads(artifact)
    pre = manifest["preprocessing"]
    x = load_images(paths, pre)
    name = artifact["path"]
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
        # bundles are flat: a manifest pointing elsewhere was edited (`pipeline verify` names it)
        raise BundleError(f"manifest.json: artifact path {name!r} is not a file name in this bundle; "
                          "check the bundle with `python -m pipeline verify THIS_FOLDER`")
    file = HERE / name
    if artifact["runtime"] == "tensorrt":
        _need("tensorrt", "run this bundle on the device (JetPack ships TensorRT) or pip install tensorrt")
        if not file.is_file():
            file = build_engine(artifact)
    if artifact["runtime"] not in PREDICTORS:
        raise BundleError(f"{artifact['path']}: runtime {artifact['runtime']!r} is not one this infer.py runs "
                          f"({', '.join(PREDICTORS)}); rebuild the bundle")
    try:
        predict = PREDICTORS[artifact["runtime"]](file, threads, artifact["precision"])
    except BundleError:
        raise
    except Exception as exc:  # a damaged or incomplete artifact (e.g. an IR without its .bin): say which
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        raise BundleError(f"{artifact['path']}: {artifact['runtime']} cannot load it ({why}); check the bundle "
                          "with `python -m pipeline verify THIS_FOLDER` or rebuild it") from None
    labels = manifest["labels"]
    rows = []
    for i in range(0, len(paths), batch):
        logits = np.asarray(predict(normalize(x[i:i + batch], pre)))
        for j, k in enumerate(np.argmax(logits, axis=1)):
            rows.append({"image": paths[i + j], "index": int(k), "label": labels[int(k)]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Classify images with this bundle's model.")
    ap.add_argument("images", nargs="+", help="image files (any size; resized to the model's input)")
    ap.add_argument("--artifact", help="file, format or precision of the artifact (default: the first)")
    ap.add_argument("--batch", type=int, default=64, help="images per inference call (default 64)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: those the report's latency was measured with; 0: the runtime's default)")
    ap.add_argument("--json", action="store_true", help="print one JSON list instead of 'IMAGE LABEL' lines")
    args = ap.parse_args(argv)
    if args.batch < 1 or (args.threads is not None and args.threads < 0):
        ap.error("--batch must be >= 1 and --threads >= 0")
    try:
        rows = classify(args.images, args.artifact, args.batch, args.threads)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyError, TypeError) as exc:  # a manifest missing a field or of the wrong shape: one line
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
