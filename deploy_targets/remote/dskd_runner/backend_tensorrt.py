"""A serialized TensorRT engine via the TensorRT Python API with pycuda buffers.

NOT run on this project's machines (no TensorRT here): tested against the FAKE tensorrt /
pycuda of the test suite, which checks the calls, the parsing and which CUDA context is
current at each call, not real engines.

CUDA context (why ONE primary context, current for the whole runner process): the runner's
pairing (pairing.py) keeps a candidate and a baseline backend alive in one process and times
them alternately (X Y Y X blocks). TensorRT runs an engine, and frees its memory, in whatever
CUDA context is current on the thread, and an engine's execution context, buffers, stream and
events belong to the context current when they were made. With one context per backend (the
earlier design) the backend made last stayed current and the other one's engine ran under it.
So every backend of the process uses the device's primary context (pycuda
`Device.retain_primary_context`, cuDevicePrimaryCtxRetain), retained once and made current once
by the first backend (`_primary_context`), as NVIDIA advises for several engines on one GPU: no
context switch between them, one context's memory, and the context torch and the CUDA runtime
use, so a Torch-TensorRT side shares it too. The runner is single-threaded, so nothing makes
another context current in between, and no push/pop sits inside a timed call. It is never
detached while the process lives: pycuda's `detach` of a primary context that is not current
pushes it and releases it without a pop (src/cpp/cuda.hpp), and releasing it while another
backend lives would reset that backend's memory; the driver frees it at process exit. `close`
frees this backend's buffers, stream, events and TensorRT objects (the shared context is
current), so closing one backend leaves the other intact.

Needs pycuda >= 2017.1 (retain_primary_context; JetPack's and PyPI's current pycuda have it).
"""

from __future__ import annotations

import contextlib
from typing import Any

from ._numpy import np
from .backends import Backend, static_chw
from .protocol import EXIT_BAD_INPUT, EXIT_RUNTIME_FAILURE, RunnerError


def cuda_version_string(v: int) -> str:
    """12040 -> '12.4' (the CUDA driver API's integer version)."""
    return f"{v // 1000}.{(v % 1000) // 10}"


_PRIMARY: list[Any] = []  # the device's retained primary context, current for the rest of the process


def _primary_context(device: Any) -> Any:
    """The primary context of `device`: retained and made current by the first caller, then shared."""
    if not _PRIMARY:
        ctx = device.retain_primary_context()
        ctx.push()
        _PRIMARY.append(ctx)
    return _PRIMARY[0]


class TensorRtBackend(Backend):
    """TensorRT engine via the Python API (TRT >= 8.5 name-based I/O) with pycuda buffers.

    Host latency = H2D copy + execute + D2H copy timed on the host; GPU compute time =
    CUDA events around execute only, the same split trtexec reports. Buffers (pinned host
    and device) are allocated once per batch shape in prepare(); a timed call copies the
    batch into pinned memory, H2D, executes, D2H, as a deployment's loop does. Each public
    call runs with the device's primary context current (module docstring: why).
    """

    binding = "device-buffers+cuda-events"
    threads = None  # a GPU engine has no CPU thread setting

    def __init__(self, artifact: str):
        import pycuda.driver as cuda
        import tensorrt as trt

        cuda.init()
        self.cuda = cuda
        self.device = cuda.Device(0)
        self.context = self.engine = self.stream = self.start_evt = self.end_evt = None
        self.h_in = self.h_out = self.d_in = self.d_out = None
        self._bound_shape: tuple[int, ...] | None = None
        self.context_cuda: Any = _primary_context(self.device)  # shared by every backend (module docstring)
        self._closed = False
        try:
            self._load(artifact, trt)
        except BaseException:
            with contextlib.suppress(Exception):  # the load error is the one to report
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
        self.start_evt, self.end_evt = cuda.Event(), cuda.Event()

    def prepare(self, batch: Any) -> None:
        """Bind buffers for batch.shape (the shared context is current)."""
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
        self._free_device_buffers()
        self.d_in = cuda.mem_alloc(self.h_in.nbytes)
        self.d_out = cuda.mem_alloc(self.h_out.nbytes)
        self.context.set_tensor_address(self.input_name, int(self.d_in))
        self.context.set_tensor_address(self.output_name, int(self.d_out))
        self._bound_shape = tuple(batch.shape)

    def _run(self, batch: Any) -> float:
        """One H2D + execute + D2H; the GPU ms of execute."""
        if self._closed:
            raise RunnerError("runtime", "tensorrt backend used after close", EXIT_RUNTIME_FAILURE)
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
        cuda = self.cuda  # device queries: no context needed
        major, minor = self.device.compute_capability()
        return {
            "gpu": self.device.name(),
            "compute_capability": f"{major}.{minor}",
            "cuda_driver_version": cuda_version_string(cuda.get_driver_version()),
            "max_batch": self.max_batch,
        }

    def _free_device_buffers(self) -> None:
        for buf in (self.d_in, self.d_out):
            if buf is not None:
                buf.free()
        self.d_in = self.d_out = None

    def close(self) -> None:
        """Free our buffers, stream, events and TensorRT objects in the shared context (current).

        The context itself stays: another backend may live in it (module docstring). Safe to call
        twice, and after a failed load.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._free_device_buffers()
        finally:
            # dropped here, not left to the garbage collector (execution context before engine)
            self.h_in = self.h_out = self.stream = self.start_evt = self.end_evt = None
            self.context = None
            self.engine = None
            self._bound_shape = None
