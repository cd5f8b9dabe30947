"""Recognise an artifact's format and precision from the file itself, not from its name alone."""

from __future__ import annotations

import hashlib
from pathlib import Path

from dskd.errors import UserError

FORMATS = ("onnx", "onnx-qdq", "openvino-ir", "trt-engine", "torch-trt-ep")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
EP_SUFFIX = ".ep"  # a Torch-TensorRT ExportedProgram (torch_tensorrt.save), format "torch-trt-ep"
# Ops that only appear in quantized ONNX graphs (QDQ or QOperator style).
_QUANT_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
}


def _onnx_is_quantized(path: Path) -> bool:
    try:
        import onnx
    except ImportError:  # fall back to the op names stored as plain strings in the protobuf
        data = path.read_bytes()
        return any(op.encode() in data for op in _QUANT_OPS)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UserError(f"artifact {path}: not a readable ONNX file ({exc}); re-export it") from exc
    ops = {node.op_type for node in model.graph.node}
    for fn in model.functions:
        ops.update(node.op_type for node in fn.node)
    return bool(ops & _QUANT_OPS)


def artifact_format(path: str | Path) -> str:
    """onnx | onnx-qdq | openvino-ir | trt-engine | torch-trt-ep; UserError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"artifact {path} does not exist: export it first or fix the path")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx-qdq" if _onnx_is_quantized(path) else "onnx"
    if suffix == ".xml":
        if not path.with_suffix(".bin").is_file():
            raise UserError(
                f"artifact {path}: OpenVINO IR needs {path.with_suffix('.bin').name} beside it"
            )
        return "openvino-ir"
    if suffix in ENGINE_SUFFIXES:
        return "trt-engine"
    if suffix == EP_SUFFIX:
        return "torch-trt-ep"
    raise UserError(
        f"artifact {path}: unknown format {suffix or '(no suffix)'}: expected .onnx, .xml (OpenVINO IR), "
        f"{'/'.join(ENGINE_SUFFIXES)} (TensorRT engine) or {EP_SUFFIX} (Torch-TensorRT program)"
    )


def onnx_input_chw(path: str | Path) -> tuple[int | None, ...] | None:
    """(C, H, W) of an ONNX model's image input (None for a dynamic dim); UserError if no model.

    Checked before anything reaches a device: an empty or foreign file named .onnx parses
    as an empty ModelProto that only the runtime (on the device) would reject.
    Returns None when the onnx package is missing here (the runtime checks it then).
    """
    try:
        import onnx
    except ImportError:
        return None
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UserError(
            f"artifact {path}: not a readable ONNX file ({' '.join(str(exc).split())[:160]}); re-export it"
        ) from None
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if not graph.node or not inputs or not graph.output:
        raise UserError(
            f"artifact {path}: not an ONNX model (no graph inputs, outputs or nodes): re-export it"
        )
    if len(inputs) != 1:
        raise UserError(
            f"artifact {path}: has {len(inputs)} inputs; targets feed one N×C×H×W image batch"
        )
    tensor = inputs[0].type.tensor_type
    if not tensor.HasField("shape"):
        return (None, None, None)
    dims = tensor.shape.dim
    if len(dims) != 4:
        raise UserError(
            f"artifact {path}: input '{inputs[0].name}' has rank {len(dims)}; "
            "targets feed N×C×H×W images"
        )
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[1:])


def detected_precision(path: str | Path, fmt: str) -> str | None:
    """fp32/int8 when the file tells; None for TensorRT engines (the caller must say)."""
    if fmt == "onnx-qdq":
        return "int8"
    if fmt == "onnx":
        return "fp32"
    if fmt == "openvino-ir":
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        return "int8" if 'type="FakeQuantize"' in text or 'type="FakeConvert"' in text else "fp32"
    if fmt == "torch-trt-ep":  # export/torch_trt.py names it model.<precision>.ep
        middle = Path(path).suffixes[-2:-1]
        return middle[0][1:] if middle and middle[0][1:] in ("fp16", "int8", "fp32") else None
    return None


def companion_files(path: str | Path, fmt: str) -> list[Path]:
    """Every file the artifact needs on the device (IR = .xml + .bin)."""
    path = Path(path)
    if fmt == "openvino-ir":
        return [path, checked_companion(path, path.with_suffix(".bin").name, "weights file")]
    if fmt in ("onnx", "onnx-qdq"):
        return [path, *_onnx_external_files(path)]
    return [path]


def _onnx_external_files(path: Path) -> list[Path]:
    """Weights stored beside the .onnx (external data), which must travel with it."""
    try:
        import onnx
        from onnx.external_data_helper import uses_external_data
    except ImportError:
        return []
    model = onnx.load(str(path), load_external_data=False)
    files: list[Path] = []
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if not location:
                raise UserError(f"artifact {path}: tensor {tensor.name!r} has external data without a location")
            extra = checked_companion(path, location, "external data")
            if extra not in files:
                files.append(extra)
    return files


def checked_companion(path: Path, name: str, what: str) -> Path:
    """A file the artifact needs on the device: a plain file beside it, never a link or a special file.

    Checked locally before any upload, because scp follows links: a weights file that is a
    symlink to ~/.ssh/id_ed25519 would otherwise be copied to the device.
    """
    import stat

    extra = path.parent / name
    if Path(name).name != name or name in (".", ".."):
        raise UserError(f"artifact {path}: {what} {name!r} is not a file name beside the model "
                        "(no folders, no '..'); re-export it with its data beside it")
    try:
        st = extra.lstat()
    except OSError:
        raise UserError(f"artifact {path}: {what} {name!r} missing beside it; copy it into "
                        f"{path.parent} or re-export") from None
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"artifact {path}: {what} {name!r} is a symbolic link; copy the real file "
                        "beside the model (links are never sent to a device)")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"artifact {path}: {what} {name!r} is not a regular file; re-export the model")
    return extra


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
