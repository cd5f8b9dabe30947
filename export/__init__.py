"""Export a trained student (model.pt) to verified deployment artifacts.

    from export import export_all
    manifest = export_all("runs/x/model.pt", "runs/x/export", calib=load_data(...))

Formats: see `list_formats()`. Every artifact is checked (onnx.checker, parity against
PyTorch on real images, INT8 accuracy) before it is written, and listed with its sha256
in `manifest.json`. TensorRT engines are built where TensorRT runs; elsewhere the export
prepares their inputs and `tensorrt/build_trtexec.sh`. See docs/export.md.
"""

from export.api import ExportOptions, export_all, export_format, list_formats
from export.errors import ExportError
from export.formats import DEFAULT_FORMATS, FORMATS, FormatSpec, resolve_formats
from export.manifest import (
    ArtifactEntry,
    FileRecord,
    Manifest,
    SkippedFormat,
    read_manifest,
    verify_files,
    write_manifest,
)
from export.onnx_build import DEFAULT_OPSET, export_onnx, verify_onnx
from export.onnx_inspect import onnx_io, onnx_metadata, onnx_op_histogram, onnx_param_count
from export.parity import DEFAULT_TOLERANCES, Tolerance

__all__ = [
    "DEFAULT_FORMATS",
    "DEFAULT_OPSET",
    "DEFAULT_TOLERANCES",
    "FORMATS",
    "ArtifactEntry",
    "ExportError",
    "ExportOptions",
    "FileRecord",
    "FormatSpec",
    "Manifest",
    "SkippedFormat",
    "Tolerance",
    "export_all",
    "export_format",
    "export_onnx",
    "list_formats",
    "onnx_io",
    "onnx_metadata",
    "onnx_op_histogram",
    "onnx_param_count",
    "read_manifest",
    "resolve_formats",
    "verify_files",
    "verify_onnx",
    "write_manifest",
]
