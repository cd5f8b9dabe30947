"""The Backend contract, module checks and the runtime -> backend dispatch.

A backend is one loaded artifact, timed the way a deployment runs it: inputs bound once
(`prepare`), then `timed_step` is inference only. Each runtime lives in its own module
(backend_ort, backend_openvino, backend_tensorrt, backend_torch_trt), imported only when
that runtime is asked for, so a device needs only the runtime it measures.
"""

from __future__ import annotations

import sys
from typing import Any

from ._numpy import np
from .protocol import (
    EXIT_MISSING_MODULE,
    EXIT_USAGE,
    RUNTIME_MODULES,
    RUNTIMES,
    Protocol,
    RunnerError,
)
from .timing import run_for


class Backend:
    """One loaded artifact, timed the way a deployment runs it: inputs bound once.

    `prepare(batch)` binds a batch (input and output buffers) before timing, so that
    `timed_step` is inference only, not Python's per-call conversion of arguments;
    `infer(batch)` returns logits for accuracy and is never timed.
    """

    name = ""
    version = ""
    max_batch: int | None = None  # engines with a fixed optimisation profile
    input_chw: tuple[int, ...] | None = None  # C, H, W when the artifact fixes them
    threads: int | None = 1
    hint = "latency"
    binding = "none"  # how inputs/outputs are bound for timing, recorded with every number
    # "wall": the host clock around timed_step; "runtime": the ms timed_step returns is the
    # runtime's own measurement of the whole inference call (headline numbers use it)
    timer = "wall"

    def infer(self, batch: Any) -> Any:
        raise NotImplementedError

    def prepare(self, batch: Any) -> None:
        """Bind a batch (and its output buffer) before timing."""

    def timed_step(self, batch: Any) -> float | None:
        self.infer(batch)
        return None

    def throughput(self, batch: Any, streams: int, protocol: Protocol) -> tuple[int, float, dict]:
        """(batches done, seconds, config): one bound request back to back, one stream."""
        self.prepare(batch)
        done, seconds = run_for(lambda: self.timed_step(batch), protocol)
        return done, seconds, {"streams": 1, "requests": 1, "hint": "latency", "threads": self.threads}

    def run_config(self) -> dict[str, Any]:
        """Threads/streams/hint/binding of the latency numbers (one request, one stream)."""
        return {"threads": self.threads, "streams": 1, "hint": "latency", "binding": self.binding}

    def describe(self) -> dict[str, Any]:
        return {}


def static_chw(shape: Any) -> tuple[int, ...] | None:
    """C, H, W of an input shape when all three are fixed positive integers."""
    dims = list(shape)[1:]
    if dims and all(isinstance(d, int) and d > 0 for d in dims):
        return tuple(dims)
    return None


def require_modules(runtime: str) -> None:
    """Import numpy and the runtime's modules; report every missing one at once."""
    missing = ["numpy"] if np is None else []
    for name in RUNTIME_MODULES[runtime]:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
        except Exception as exc:  # e.g. a CUDA library that fails to load
            raise RunnerError(
                "missing-module",
                f"{name} is installed but fails to import: {exc}",
                EXIT_MISSING_MODULE,
                (name,),
            ) from exc
    if missing:
        pip = [{"torch_tensorrt": "torch-tensorrt"}.get(m, m) for m in missing]
        raise RunnerError(
            "missing-module",
            f"{sys.executable} lacks {', '.join(missing)}: install with "
            f"'{sys.executable} -m pip install {' '.join(pip)}' or choose another python",
            EXIT_MISSING_MODULE,
            tuple(missing),
        )


def load_backend(runtime: str, artifact: str, precision: str, threads: int) -> Backend:
    """Open the artifact with the runtime (modules must already be importable)."""
    if runtime == "onnxruntime":
        from .backend_ort import OrtBackend

        return OrtBackend(artifact, threads)
    if runtime == "openvino":
        from .backend_openvino import OpenVinoBackend

        return OpenVinoBackend(artifact, threads, precision)
    if runtime == "tensorrt":
        from .backend_tensorrt import TensorRtBackend

        return TensorRtBackend(artifact)
    if runtime == "torch-tensorrt":
        from .backend_torch_trt import TorchTrtBackend

        return TorchTrtBackend(artifact)
    raise RunnerError(
        "usage", f"unknown runtime {runtime!r}: choose {', '.join(RUNTIMES)}", EXIT_USAGE
    )
