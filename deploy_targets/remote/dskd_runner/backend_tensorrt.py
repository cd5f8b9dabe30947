"""A serialized TensorRT engine via the TensorRT Python API with pycuda buffers.

NOT run on this project's machines (no TensorRT here): tested against the FAKE tensorrt /
pycuda of the test suite, which checks the calls, the parsing and which CUDA context is
current at each call, not real engines.

CUDA context (why the device's PRIMARY context, made current around every call): the
runner's pairing (pairing.py) keeps a candidate and a baseline backend alive in one process
and times them alternately (X Y Y X blocks). TensorRT runs an engine, and frees its memory,
in whatever CUDA context is current on the thread, and an engine's execution context,
buffers, stream and events belong to the context that was current when they were made. With
one context per backend, made current once at creation (the earlier design), the backend made
last stayed current and the other one's engine ran under it. So here:

* every backend retains the device's primary context (pycuda `Device.retain_primary_context`,
  cuDevicePrimaryCtxRetain): one context for all engines of the process, as NVIDIA advises for
  several engines on one GPU (no context switch between them, one context's memory overhead,
  the context torch and the CUDA runtime use too, so a Torch-TensorRT side pairs the same way);
* every call that touches CUDA state (load, prepare, each timed call, infer, close) pushes it on
  entry and pops it on exit (`_current`), so the call runs in the right context whatever the
  thread did before, and nothing stays current between calls: creation order and closing
  order cannot leave one backend under another's context. Push/pop of an already-alive
  context is a driver call of about a microsecond, paid equally by both sides of a pair;
* close frees this backend's buffers, stream, events and TensorRT objects with the context
  current, then detaches its own reference (cuDevicePrimaryCtxRelease). The driver resets
  the primary context only when its last reference goes, so closing one backend leaves the
  other's engine and buffers intact.

Needs pycuda >= 2017.1 (retain_primary_context; JetPack's and PyPI's current pycuda have it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
        # our reference to the primary context (not made current here: _current does that)
        self.context_cuda: Any = self.device.retain_primary_context()
        try:
            with self._current():
                self._load(artifact, trt)
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def _current(self) -> Iterator[None]:
        """Our CUDA context current for the block, the thread's previous state after it."""
        self.context_cuda.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

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
        if self._bound_shape == batch.shape:
            return
        with self._current():
            self._prepare(batch)

    def _prepare(self, batch: Any) -> None:
        """Bind buffers for batch.shape (our context current)."""
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
        """One H2D + execute + D2H (our context current); the GPU ms of execute."""
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
        self.context_cuda.push()  # _current inline: this is the timed call
        try:
            return self._run(batch)
        finally:
            self.cuda.Context.pop()

    def infer(self, batch: Any) -> Any:
        with self._current():
            self._prepare(batch)
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
        """Free our buffers, stream, events and TensorRT objects with our context current,
        then release our reference to it (the other backend's reference keeps it alive).
        Safe to call twice, and after a failed load."""
        ctx, self.context_cuda = self.context_cuda, None
        if ctx is None:
            return
        ctx.push()
        try:
            self._free_device_buffers()
            # dropped here, not left to the garbage collector: pycuda and TensorRT free them
            # in the context current now, which must be ours (execution context before engine)
            self.h_in = self.h_out = self.stream = self.start_evt = self.end_evt = None
            self.context = None
            self.engine = None
            self._bound_shape = None
        finally:
            self.cuda.Context.pop()
            ctx.detach()
