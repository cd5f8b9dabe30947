"""Recognise an artifact's format and precision from the file itself, not from its name alone.

The kinds, their suffixes, their detectors and the files each needs beside it all come from the
format registry (export/formats.py); this module applies them to files users hand to a target.
"""

from __future__ import annotations

from pathlib import Path

from dskd.errors import UserError
from dskd.hashing import file_sha256
from export import formats as registry
from export.detect import checked_companion, ep_named_precision, ir_is_fake_quantized


def kinds() -> tuple[str, ...]:
    """Every artifact kind (onnx, onnx-qdq, openvino-ir, trt-engine, torch-trt-ep, ...)."""
    return registry.kinds()


def artifact_format(path: str | Path) -> str:
    """The artifact kind of the file (the first registry entry whose detector recognises it);
    UserError for a missing file, a file a declared companion is missing beside, or an unknown one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"artifact {path} does not exist: export it first or fix the path")
    specs = list(registry.FORMATS.values())
    # a file no entry's content test claims (a model.fp32.ep) is still of the kind its suffix names
    spec = next((s for s in specs if s.detects(path)), None) or next(
        (s for s in specs if path.suffix.lower() in s.detector.suffixes), None)
    if spec is not None:
        for extra in spec.companion_paths(path, needed_to_run_only=True):
            if not extra.is_file():
                raise UserError(f"artifact {path}: {spec.detector.label} needs {extra.name} beside it")
        return spec.kind
    suffix = path.suffix.lower()
    raise UserError(
        f"artifact {path}: unknown format {suffix or '(no suffix)'}: expected {registry.suffix_help()}"
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
    """fp32/int8 when the file tells (the precision a CPU runs it in: an FP16-compressed IR
    computes in f32); None for TensorRT engines (the caller must say)."""
    if fmt == "onnx-qdq":
        return "int8"
    if fmt == "onnx":
        return "fp32"
    if fmt == "openvino-ir":
        return "int8" if ir_is_fake_quantized(Path(path)) else "fp32"
    if fmt == "torch-trt-ep":  # export/torch_trt.py names it model.<precision>.ep
        return ep_named_precision(Path(path))
    return None


def companion_files(path: str | Path, fmt: str) -> list[Path]:
    """Every file the artifact needs on the device: the main file, the companions its kind's
    registry entry declares needed to run (IR = .xml + .bin), and what the file itself names
    (ONNX external data); each checked to be a plain file beside it."""
    path = Path(path)
    spec = registry.kind_spec(fmt)
    files = [path]
    for c in spec.companions:
        if c.needed_to_run:
            files.append(checked_companion(path, c.name_for(path.name), c.what))
    extra = spec.detector.extra_files
    return files + ([p for p in extra(path) if p not in files] if extra else [])


def sha256_of(path: str | Path) -> str:
    """The artifact's sha256 (one hashing helper for the project: dskd.hashing)."""
    return file_sha256(path)
