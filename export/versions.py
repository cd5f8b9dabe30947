"""Which tools are installed, and at which versions: recorded beside every artifact."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

# distribution names to report, keyed by the import name
_TOOLS = {
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
    "onnxslim": ("onnxslim",),
    "openvino": ("openvino",),
    "nncf": ("nncf",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu11", "tensorrt_lean"),
    "numpy": ("numpy",),
}


def have(module: str) -> bool:
    """True when `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def tool_version(module: str) -> str | None:
    for dist in _TOOLS.get(module, (module,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    if module == "tensorrt" and have("tensorrt"):  # JetPack installs it from a .deb
        try:
            import tensorrt

            return str(tensorrt.__version__)
        except Exception:  # noqa: BLE001 - a broken install reports no version
            return None
    return None


def tool_versions() -> dict[str, str]:
    """Versions of the installed tools that touch an artifact (absent ones are left out)."""
    out = {"python": platform.python_version()}
    for module in _TOOLS:
        version = tool_version(module)
        if version:
            out[module] = version
    return out
