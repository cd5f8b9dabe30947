"""Export a trained student (model.pt) to verified deployment artifacts.

    from export import export_all
    manifest = export_all("runs/x/model.pt", "runs/x/export", calib=load_data(...))

Formats: see `list_formats()` and the registry in export/formats.py. Every artifact is checked
(onnx.checker, parity against PyTorch on real images, INT8 accuracy) before it is written, and
listed with its sha256 in `manifest.json`. TensorRT engines are built where TensorRT runs;
elsewhere the export prepares their inputs and `tensorrt/build_trtexec.sh`. See docs/export.md.

The names below are imported on first use (PEP 562), so `import export.formats` (the CLI's
recipe check, deploy_targets' artifact detection) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ExportOptions": "export.options",
    "export_all": "export.api",
    "export_format": "export.api",
    "list_formats": "export.formats",
    "ExportError": "export.errors",
    "DEFAULT_FORMATS": "export.formats",
    "FORMATS": "export.formats",
    "FormatSpec": "export.formats",
    "register_format": "export.formats",
    "resolve_formats": "export.formats",
    "ArtifactEntry": "export.manifest",
    "FileRecord": "export.manifest",
    "Manifest": "export.manifest",
    "SkippedFormat": "export.manifest",
    "read_manifest": "export.manifest",
    "verify_files": "export.manifest",
    "write_manifest": "export.manifest",
    "DEFAULT_OPSET": "export.onnx_build",
    "export_onnx": "export.onnx_build",
    "verify_onnx": "export.onnx_build",
    "onnx_io": "export.onnx_inspect",
    "onnx_metadata": "export.onnx_inspect",
    "onnx_op_histogram": "export.onnx_inspect",
    "onnx_param_count": "export.onnx_inspect",
    "DEFAULT_TOLERANCES": "export.parity",
    "Tolerance": "export.parity",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'export' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
