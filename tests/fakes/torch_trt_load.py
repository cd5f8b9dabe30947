"""FAKE torch_tensorrt (NOT NVIDIA's) whose `load` opens an `.ep` file, for the runner's
`torch-tensorrt` runtime.

The real `torch_tensorrt.load(path)` returns the ExportedProgram saved by `torch_tensorrt.save`,
whose graph calls TensorRT engines on a CUDA GPU. This FAKE returns the plain PyTorch
ExportedProgram saved with the REAL `torch.export.save` (no TensorRT inside), so the runner's
command path, loading, binding, timing loop, accuracy and result parsing run for real on this
CPU machine. It proves nothing about real torch-tensorrt, TensorRT engines or GPU timing.
"""

from __future__ import annotations

from pathlib import Path

from tests.fakes import write_text

FAKE_VERSION = "0.0+fake-load"

FAKE_TORCH_TENSORRT_LOAD = f'''"""FAKE torch_tensorrt for tests (NOT the real package): load() = torch.export.load()."""
__version__ = "{FAKE_VERSION}"
LOADED = []


def load(path, **kwargs):
    import torch

    LOADED.append(path)
    return torch.export.load(path)
'''


def write_fake_torch_trt_load_lib(lib: Path) -> Path:
    """A folder to put on PYTHONPATH that holds the FAKE `torch_tensorrt` package above."""
    write_text(Path(lib) / "torch_tensorrt" / "__init__.py", FAKE_TORCH_TENSORRT_LOAD)
    return Path(lib)
