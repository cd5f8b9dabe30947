"""A serialized TensorRT engine via the TensorRT Python API with pycuda buffers.

NOT run on this project's machines (no TensorRT here): tested against the FAKE tensorrt /
pycuda of the test suite, which checks the calls and the parsing, not real engines.
"""

from __future__ import annotations

from typing import Any

from ._numpy import np
from .backends import Backend, static_chw
from .protocol import EXIT_BAD_INPUT, EXIT_RUNTIME_FAILURE, RunnerError


def cuda_version_string(v: int) -> str:
    """12040 -> '12.4' (the CUDA driver API's integer version)."""
    return f"{v // 1000}.{(v % 1000) // 10}"


class TensorRtBackend(Backend):
    """TensorRT engine via the Python API (TRT >= 8.5 name-based I/O) with pycuda buffers.

    Host latency = H2D copy + execute + D2H copy timed on the host; GPU compute time =
    CUDA events around execute only, the same split trtexec reports. Buffers (pinned host
    and device) are allocated once per batch shape in prepare(); a timed call copies the
    batch into pinned memory, H2D, executes, D2H, as a deployment's loop does.
    """

    binding = "device-buffers+cuda-events"
    threads = None  # a GPU engine has no CPU thread setting

    def __init__(self, artifact: str):
        import pycuda.driver as cuda
        import tensorrt as trt

        cuda.init()
        self.cuda = cuda
        self.device = cuda.Device(0)
        self.context_cuda = self.device.make_context()
        self.d_in = self.d_out = None
        try:
            self._load(artifact, trt)
        except BaseException:
            self.close()
            raise

    def _load(self, artifact: str, trt: Any) -> None:
        cuda = self.cuda
        logger = trt.Logger(trt.Logger.WARNING)
        with open(artifact, "rb") as fh:
            blob = fh.read()
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(blob)
        if self.engine is None:
            raise RunnerError(
                "runtime",
                f"tensorrt cannot deserialize {artifact}: engines only run with the TensorRT "
                "version and GPU they were built for; rebuild it on this device",
                EXIT_RUNTIME_FAILURE,
            )
        self.trt = trt
        self.name, self.version = "tensorrt", trt.__version__
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise RunnerError(
                "bad-input", f"{artifact}: expected one input and an output", EXIT_BAD_INPUT
            )
        self.input_name, self.output_name = inputs[0], outputs[0]
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.input_chw = static_chw(shape)
        if shape[0] == -1 and self.engine.num_optimization_profiles > 0:
            self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        elif shape[0] > 0:
            self.max_batch = int(shape[0])
        self.in_dtype = trt.nptype(self.engine.get_tensor_dtype(self.input_name))
        self.out_dtype = trt.nptype(self.engine.get_tensor_dtype(self.output_name))
        self._bound_shape: tuple[int, ...] | None = None
        self.start_evt, self.end_evt = cuda.Event(), cuda.Event()

    def prepare(self, batch: Any) -> None:
        if self._bound_shape == batch.shape:
            return
        cuda = self.cuda
        if not self.context.set_input_shape(self.input_name, tuple(batch.shape)):
            raise RunnerError(
                "bad-input",
                f"engine does not accept input shape {tuple(batch.shape)} (max batch {self.max_batch})",
                EXIT_BAD_INPUT,
            )
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        self.h_in = cuda.pagelocked_empty(batch.shape, self.in_dtype)
        self.h_out = cuda.pagelocked_empty(out_shape, self.out_dtype)
        for buf in (self.d_in, self.d_out):
            if buf is not None:
                buf.free()
        self.d_in = cuda.mem_alloc(self.h_in.nbytes)
        self.d_out = cuda.mem_alloc(self.h_out.nbytes)
        self.context.set_tensor_address(self.input_name, int(self.d_in))
        self.context.set_tensor_address(self.output_name, int(self.d_out))
        self._bound_shape = tuple(batch.shape)

    def _run(self, batch: Any) -> float:
        cuda = self.cuda
        np.copyto(self.h_in, batch, casting="same_kind")
        cuda.memcpy_htod_async(self.d_in, self.h_in, self.stream)
        self.start_evt.record(self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise RunnerError("runtime", "tensorrt execute_async_v3 failed", EXIT_RUNTIME_FAILURE)
        self.end_evt.record(self.stream)
        cuda.memcpy_dtoh_async(self.h_out, self.d_out, self.stream)
        self.stream.synchronize()
        return float(self.start_evt.time_till(self.end_evt))

    def timed_step(self, batch: Any) -> float | None:
        return self._run(batch)

    def infer(self, batch: Any) -> Any:
        self.prepare(batch)
        self._run(batch)
        return np.array(self.h_out, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        cuda = self.cuda
        major, minor = self.device.compute_capability()
        return {
            "gpu": self.device.name(),
            "compute_capability": f"{major}.{minor}",
            "cuda_driver_version": cuda_version_string(cuda.get_driver_version()),
            "max_batch": self.max_batch,
        }

    def close(self) -> None:
        """Free device memory and TensorRT objects while our CUDA context is still current."""
        for buf in (self.d_in, self.d_out):
            if buf is not None:
                buf.free()
        self.d_in = self.d_out = None
        self.context = self.engine = None
        self.context_cuda.pop()
