"""A Torch-TensorRT ExportedProgram (`.ep`) loaded with `torch_tensorrt.load`.

For users who deploy inside PyTorch: the program holds TensorRT engines as submodules and
runs on the GPU. Timed like the TensorRT backend: the input lives in a pre-allocated
device tensor, a timed call copies the batch host -> device, runs the program and copies
the logits back, with CUDA events around the program (GPU compute time). Without CUDA
(the FAKE torch_tensorrt of the tests, which loads a plain ExportedProgram) it runs on the
CPU and only the wall clock is recorded.

NOT run on this project's machines (no torch-tensorrt here): the real run is untested.
"""

from __future__ import annotations

from typing import Any

from ._numpy import np
from .backends import Backend, static_chw
from .protocol import EXIT_BAD_INPUT, EXIT_RUNTIME_FAILURE, RunnerError, one_line


def example_chw(program: Any) -> tuple[int, ...] | None:
    """C, H, W of the program's first example input, when the file kept one."""
    example = getattr(program, "example_inputs", None)
    try:
        args = example[0] if example else ()
        return static_chw(tuple(int(d) for d in args[0].shape)) if args else None
    except (TypeError, IndexError, AttributeError):
        return None


class TorchTrtBackend(Backend):
    """torch_tensorrt.load(artifact).module(), inputs bound to device tensors once."""

    binding = "device-tensors+cuda-events"
    threads = None  # GPU: no CPU thread setting

    def __init__(self, artifact: str):
        import torch
        import torch_tensorrt

        self.torch = torch
        try:
            program = torch_tensorrt.load(artifact)
        except Exception as exc:
            raise RunnerError(
                "runtime",
                f"torch_tensorrt cannot load {artifact}: {one_line(exc)}; an .ep runs only with "
                "the torch / torch-tensorrt / TensorRT release it was saved with",
                EXIT_RUNTIME_FAILURE,
            ) from exc
        module = program.module() if hasattr(program, "module") else program
        if not callable(module):
            raise RunnerError(
                "bad-input", f"{artifact}: torch_tensorrt.load returned no program", EXIT_BAD_INPUT
            )
        self.module = module
        self.name, self.version = "torch-tensorrt", str(getattr(torch_tensorrt, "__version__", ""))
        self.cuda = bool(torch.cuda.is_available())
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.input_chw = example_chw(program)
        self._x: Any = None  # device input tensor
        self._host: Any = None  # pinned host copy of the batch
        self._out: Any = None  # host output buffer
        if self.cuda:
            self.start_evt = torch.cuda.Event(enable_timing=True)
            self.end_evt = torch.cuda.Event(enable_timing=True)
        else:
            self.binding = "cpu-tensors (no CUDA)"

    def _forward(self, x: Any) -> Any:
        out = self.module(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    def prepare(self, batch: Any) -> None:
        torch = self.torch
        host = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        self._host = host.pin_memory() if self.cuda else host
        self._x = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        with torch.inference_mode():
            self._x.copy_(self._host)
            probe = self._forward(self._x)
        self._out = torch.empty(probe.shape, dtype=probe.dtype, pin_memory=self.cuda)

    def timed_step(self, batch: Any) -> float | None:
        torch = self.torch
        if self._x is None:
            self.prepare(batch)
        with torch.inference_mode():
            self._x.copy_(self._host, non_blocking=self.cuda)
            if not self.cuda:
                self._out.copy_(self._forward(self._x))
                return None
            self.start_evt.record()
            out = self._forward(self._x)
            self.end_evt.record()
            self._out.copy_(out, non_blocking=True)
            torch.cuda.synchronize()
        return float(self.start_evt.elapsed_time(self.end_evt))

    def infer(self, batch: Any) -> Any:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            return self._forward(x).float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        torch = self.torch
        info: dict[str, Any] = {"torch": torch.__version__, "torch_device": str(self.device)}
        if self.cuda:
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda_runtime_version"] = torch.version.cuda
        return info
