"""How an existing file is recognised as a format: the detectors the format registry names.

A detector answers "is this file an artifact of this format?" from the file itself (its suffix
and, where the suffix is shared, its content), never from its folder or its name alone: an
INT8 ONNX and an FP32 ONNX are both `.onnx`. Light on purpose (no torch, onnx imported only when
a file is read), because `deploy_targets` recognises artifacts with them before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dskd.errors import UserError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
EP_SUFFIX = ".ep"  # a Torch-TensorRT ExportedProgram (torch_tensorrt.save)
# Ops that only appear in quantized ONNX graphs (QDQ or QOperator style).
QUANT_OPS = frozenset({
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
})


@dataclass(frozen=True)
class Detector:
    """Recognises a file as one format: `suffixes` first (cheap), then `test` on the content.

    `label` names the family in messages ("OpenVINO IR"); `extra_files` lists files beyond the
    declared companions that the file itself says it needs (ONNX external data).
    """

    suffixes: tuple[str, ...]
    label: str
    test: Callable[[Path], bool]
    extra_files: Callable[[Path], list[Path]] | None = None

    def __call__(self, path: str | Path) -> bool:
        path = Path(path)
        return path.suffix.lower() in self.suffixes and self.test(path)


def onnx_is_quantized(path: Path) -> bool:
    """True when the graph (or one of its functions) holds a quantization op."""
    try:
        import onnx
    except ImportError:  # fall back to the op names stored as plain strings in the protobuf
        data = path.read_bytes()
        return any(op.encode() in data for op in QUANT_OPS)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UserError(f"artifact {path}: not a readable ONNX file ({exc}); re-export it") from exc
    ops = {node.op_type for node in model.graph.node}
    for fn in model.functions:
        ops.update(node.op_type for node in fn.node)
    return bool(ops & QUANT_OPS)


def onnx_external_files(path: Path) -> list[Path]:
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


def ir_is_fake_quantized(path: Path) -> bool:
    """An OpenVINO IR quantized by NNCF carries FakeQuantize (or FakeConvert) layers."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return 'type="FakeQuantize"' in text or 'type="FakeConvert"' in text


def ir_has_fp16_weights(path: Path) -> bool:
    """An IR saved with compress_to_fp16 stores its weights as f16 constants."""
    return 'element_type="f16"' in path.read_text(encoding="utf-8", errors="replace")


def ep_named_precision(path: Path) -> str | None:
    """export/torch_trt.py names its programs model.<precision>.ep; None when the name does not say."""
    middle = path.suffixes[-2:-1]
    return middle[0][1:] if middle and middle[0][1:] in ("fp16", "int8", "fp32") else None


ONNX_FP32 = Detector((".onnx",), "ONNX", lambda p: not onnx_is_quantized(p), onnx_external_files)
ONNX_QDQ = Detector((".onnx",), "ONNX", onnx_is_quantized, onnx_external_files)
IR_FP32 = Detector((".xml",), "OpenVINO IR", lambda p: not ir_is_fake_quantized(p) and not ir_has_fp16_weights(p))
IR_FP16 = Detector((".xml",), "OpenVINO IR", lambda p: not ir_is_fake_quantized(p) and ir_has_fp16_weights(p))
IR_INT8 = Detector((".xml",), "OpenVINO IR", ir_is_fake_quantized)
TRT_ENGINE = Detector(ENGINE_SUFFIXES, "TensorRT engine", lambda p: True)  # the precision is inside, unreadable here


def torch_trt_program(precision: str) -> Detector:
    """A `.ep` of this precision, or of any precision when its name does not say."""
    return Detector((EP_SUFFIX,), "Torch-TensorRT program", lambda p: ep_named_precision(p) in (None, precision))
