"""ONNX Runtime on the CPU, timed through IOBinding (what a C++ deployment's loop runs)."""

from __future__ import annotations

from typing import Any

from ._numpy import np
from .backends import Backend, static_chw
from .protocol import EXIT_RUNTIME_FAILURE, RunnerError, one_line


def session_options(ort: Any, threads: int) -> Any:
    """Fixed intra-op threads, one inter-op thread, sequential execution, full graph opts:
    the settings the latency numbers are taken with (bench/latency_fidelity.py's reference
    loop uses this very function, so the two cannot drift apart)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


class OrtBackend(Backend):
    """ONNX Runtime CPU: fixed intra-op threads, sequential execution, full graph opts.

    Timing uses IOBinding (input and output bound to pre-allocated numpy buffers once), so
    a call is `run_with_iobinding` only, as a C++ deployment would run it.
    """

    binding = "iobinding"

    def __init__(self, artifact: str, threads: int):
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(
                artifact, session_options(ort, threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise RunnerError(
                "runtime",
                f"onnxruntime cannot load {artifact}: {one_line(exc)}",
                EXIT_RUNTIME_FAILURE,
            ) from exc
        self.name, self.version = "onnxruntime", ort.__version__
        self.threads = threads
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        self.input_chw = static_chw(inp.shape)
        self._bound: tuple[Any, Any, Any] | None = None  # (binding, input, output) kept alive

    def infer(self, batch: Any) -> Any:
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def prepare(self, batch: Any) -> None:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        probe = self.infer(x)  # the output's shape and dtype for this batch
        out = np.empty(probe.shape, dtype=probe.dtype)
        io = self.session.io_binding()
        io.bind_cpu_input(self.input_name, x)
        io.bind_output(self.output_name, "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
        self._bound = (io, x, out)

    def timed_step(self, batch: Any) -> float | None:
        if self._bound is None:
            self.prepare(batch)
        self.session.run_with_iobinding(self._bound[0])
        return None

    def describe(self) -> dict[str, Any]:
        return {"providers": self.session.get_providers()}
