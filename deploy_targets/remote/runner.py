"""Measure latency and accuracy of one artifact with one runtime, the same way everywhere.

This file is copied to edge devices and run there with the device's own Python, so it
uses only the standard library, numpy and the runtime being measured (onnxruntime,
openvino or tensorrt + pycuda). Locally the pipeline runs the very same file, so a
number measured on a laptop and one measured on a Jetson come from identical code.

Exit codes (the host turns them into one-line errors):
  0 ok, 2 bad arguments, 3 a Python module is missing, 4 bad input file,
  5 the runtime failed.  The last stderr line starts with ``runner-error:``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

RESULT_FORMAT = "dskd-measurement/1"
RUNNER_VERSION = 1
ERROR_PREFIX = "runner-error:"

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_MISSING_MODULE = 3
EXIT_BAD_INPUT = 4
EXIT_RUNTIME_FAILURE = 5

RUNTIMES = ("onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
# pip names for the modules a runtime needs, for the "install X" hint
RUNTIME_MODULES = {
    "onnxruntime": ("onnxruntime",),
    "openvino": ("openvino",),
    "tensorrt": ("tensorrt", "pycuda"),
}
JETSON_RELEASE_FILE = "/etc/nv_tegra_release"

try:
    import numpy as np
except ImportError:  # reported, with its exit code, by require_modules()
    np = None


class RunnerError(Exception):
    """A failure with a dedicated exit code and a one-line message for the host."""

    def __init__(self, kind: str, message: str, exit_code: int, missing: tuple[str, ...] = ()):
        super().__init__(message)
        self.kind = kind
        self.exit_code = exit_code
        self.missing = missing


# --------------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class Protocol:
    """Timing protocol: time-based warm-up, then >= min_iters AND >= min_seconds.

    max_seconds bounds one batch size's timing so a very slow model cannot hang the run;
    a run cut by it is flagged `truncated`. cov_warn is the per-iteration coefficient of
    variation above which the result carries a noise warning.
    """

    warmup_seconds: float = 0.5
    min_iters: int = 50
    min_seconds: float = 2.0
    max_seconds: float = 120.0
    cov_warn: float = 0.2
    # CPU runtimes: a timing run is "contended" when the process got less than min_cpu_share
    # of a core, or other processes kept more than max_other_cpu cores busy meanwhile (on
    # SMT/VM siblings that slows us without taking our CPU time); it is repeated up to
    # contention_retries times and flagged if every attempt was contended.
    min_cpu_share: float = 0.9
    contention_retries: int = 2
    max_other_cpu: float = 0.2

    def validate(self) -> None:
        if self.warmup_seconds < 0 or self.min_seconds < 0:
            raise RunnerError("usage", "warmup/min seconds must be >= 0", EXIT_USAGE)
        if self.min_iters < 1:
            raise RunnerError("usage", "min-iters must be >= 1", EXIT_USAGE)
        if self.max_seconds <= 0:
            raise RunnerError("usage", "max-seconds must be > 0", EXIT_USAGE)
        if (
            self.contention_retries < 0
            or not 0 <= self.min_cpu_share <= 1
            or self.max_other_cpu < 0
        ):
            raise RunnerError(
                "usage",
                "contention-retries and max-other-cpu must be >= 0, min-cpu-share in [0, 1]",
                EXIT_USAGE,
            )


def _spin_until(deadline: float) -> None:
    while time.perf_counter() < deadline:
        pass


@dataclass
class Timing:
    wall_ms: list[float]  # per call, host wall clock
    device_ms: list[float]  # per call, as reported by the step (GPU compute) or empty
    truncated: bool  # stopped by max_seconds before min_iters
    cpu_share: float  # process CPU time / wall time while timing (~1.0 on an idle machine)
    preemptions: int | None  # involuntary context switches while timing (Unix)
    others_cpu: float | None  # cores kept busy by other processes meanwhile (Linux)

    def contended(self, protocol: Protocol) -> bool:
        busy = self.others_cpu is not None and self.others_cpu > protocol.max_other_cpu
        return self.cpu_share < protocol.min_cpu_share or busy

    def disturbance(self) -> float:
        """Lower is quieter; picks the best of several contended attempts."""
        return (1.0 - self.cpu_share) + (self.others_cpu or 0.0)


def _involuntary_switches() -> int | None:
    try:
        import resource
    except ImportError:  # not on Unix
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw)


def _busy_cpu_seconds() -> float | None:
    """CPU seconds spent non-idle by all processes on all CPUs so far (Linux /proc/stat)."""
    line = (_read("/proc/stat", 4096) or "").split("\n", 1)[0].split()
    if len(line) < 8 or line[0] != "cpu" or not hasattr(os, "sysconf"):
        return None
    ticks = [int(v) for v in line[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def time_calls(
    step: Callable[[], float | None],
    protocol: Protocol,
    slowdown: float = 0.0,
) -> Timing:
    """Run `step` per the protocol and time every call.

    `step` may return a device-side duration in ms (TensorRT GPU compute time) or None.
    `slowdown` (debug only) busy-waits `slowdown` x the call's own duration inside the
    timed region: a known, proportional slowdown for calibrating the latency gate.
    """
    clock = time.perf_counter
    start = clock()
    step()  # at least one warm-up call, however short warmup_seconds is
    while clock() - start < protocol.warmup_seconds:
        step()
    wall: list[float] = []
    device: list[float] = []
    truncated = False
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed call is noise, not model latency (as timeit does)
    switches0, cpu0, busy0 = _involuntary_switches(), time.process_time(), _busy_cpu_seconds()
    try:
        begin = clock()
        while True:
            t0 = clock()
            reported = step()
            t1 = clock()
            if slowdown > 0:
                _spin_until(t1 + (t1 - t0) * slowdown)
                t1 = clock()
            wall.append((t1 - t0) * 1e3)
            if reported is not None:
                device.append(float(reported))
            elapsed = t1 - begin
            if len(wall) >= protocol.min_iters and elapsed >= protocol.min_seconds:
                break
            if elapsed >= protocol.max_seconds:
                truncated = True
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    span = clock() - begin
    own = time.process_time() - cpu0
    busy1, switches1 = _busy_cpu_seconds(), _involuntary_switches()
    cpu_share = own / span if span > 0 else 1.0
    preempted = None if switches0 is None or switches1 is None else switches1 - switches0
    others = None
    if busy0 is not None and busy1 is not None and span > 0:
        others = round(max(0.0, (busy1 - busy0) - own) / span, 3)
    return Timing(wall, device, truncated, round(cpu_share, 4), preempted, others)


MAX_SAMPLES_KEPT = 1000


def thin_samples(samples_ms: list[float], limit: int = MAX_SAMPLES_KEPT) -> list[float]:
    """At most `limit` samples, evenly strided in time order, for later statistics/plots."""
    stride = max(1, -(-len(samples_ms) // limit))
    return [round(v, 5) for v in samples_ms[::stride]]


def summarize(samples_ms: list[float]) -> dict[str, float | int]:
    """p50/p90/p99/mean/std/CoV of latency samples in ms (std with ddof=1)."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise RunnerError("runtime", "no latency samples were collected", EXIT_RUNTIME_FAILURE)
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
    return {
        "iterations": int(a.size),
        "p50_ms": round(p50, 6),
        "p90_ms": round(p90, 6),
        "p99_ms": round(p99, 6),
        "mean_ms": round(mean, 6),
        "std_ms": round(std, 6),
        "cov": round(std / mean, 6) if mean > 0 else 0.0,
        "min_ms": round(float(a.min()), 6),
        "max_ms": round(float(a.max()), 6),
    }


def measure_latency(
    backend: Backend,
    images: Any,
    batch_size: int,
    protocol: Protocol,
    slowdown: float = 0.0,
) -> dict[str, Any]:
    """Time one batch size; host/wall latency at top level, GPU compute nested (TensorRT).

    On CPU runtimes a run during which the process got less than `min_cpu_share` of a core
    (other processes competed) is repeated; the least disturbed attempt is kept, and it is
    flagged `contended` if even that one fell short. GPU runtimes may sleep while waiting
    for the device, so their CPU share says nothing and is only recorded.
    """
    batch = make_batch(images, batch_size)
    backend.prepare(batch)
    cpu_bound = backend.name in ("onnxruntime", "openvino")
    best = time_calls(lambda: backend.timed_step(batch), protocol, slowdown)
    attempts = 1
    while cpu_bound and best.contended(protocol) and attempts <= protocol.contention_retries:
        timing = time_calls(lambda: backend.timed_step(batch), protocol, slowdown)
        attempts += 1
        if not timing.contended(protocol) or timing.disturbance() < best.disturbance():
            best = timing
    entry: dict[str, Any] = {"batch_size": batch_size, **summarize(best.wall_ms)}
    entry["seconds"] = round(sum(best.wall_ms) / 1e3, 6)
    entry["throughput_ips"] = (
        round(batch_size * 1e3 / entry["mean_ms"], 3) if entry["mean_ms"] else 0.0
    )
    entry["truncated"] = best.truncated
    entry["cov_warning"] = entry["cov"] > protocol.cov_warn
    entry["cpu_share"] = best.cpu_share
    entry["others_cpu"] = best.others_cpu
    entry["preemptions"] = best.preemptions
    entry["attempts"] = attempts
    entry["contended"] = cpu_bound and best.contended(protocol)
    entry["samples_ms"] = thin_samples(best.wall_ms)
    if best.device_ms:
        entry["gpu_compute"] = summarize(best.device_ms)
    entry["latency_kind"] = "host" if best.device_ms else "wall"
    return entry


# --------------------------------------------------------------------------- inputs


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
        raise RunnerError(
            "missing-module",
            f"{sys.executable} lacks {', '.join(missing)}: install with "
            f"'{sys.executable} -m pip install {' '.join(missing)}' or choose another python",
            EXIT_MISSING_MODULE,
            tuple(missing),
        )


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class EvalSet:
    x: Any  # uint8 N x C x H x W
    y: Any  # int64 N
    mean: Any  # float32 C
    std: Any  # float32 C
    ref_pred: Any | None


def load_eval(path: str) -> EvalSet:
    """Load and check an evaluation .npz (x uint8 NCHW, y, mean, std, optional ref_pred)."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RunnerError(
            "bad-input", f"cannot read eval set {path}: {exc}", EXIT_BAD_INPUT
        ) from exc
    with data:
        missing = [k for k in ("x", "y", "mean", "std") if k not in data.files]
        if missing:
            raise RunnerError(
                "bad-input",
                f"eval set {path} lacks {', '.join(missing)}: rebuild it",
                EXIT_BAD_INPUT,
            )
        x, y = data["x"], data["y"]
        mean = data["mean"].astype(np.float32).reshape(-1)
        std = data["std"].astype(np.float32).reshape(-1)
        ref = data["ref_pred"].astype(np.int64).reshape(-1) if "ref_pred" in data.files else None
    if x.dtype != np.uint8 or x.ndim != 4:
        raise RunnerError(
            "bad-input", f"eval set {path}: x must be uint8 N x C x H x W", EXIT_BAD_INPUT
        )
    n, c = x.shape[:2]
    if y.reshape(-1).shape[0] != n or mean.shape[0] != c or std.shape[0] != c:
        raise RunnerError(
            "bad-input",
            f"eval set {path}: y/mean/std do not match x's N={n}, C={c}",
            EXIT_BAD_INPUT,
        )
    if ref is not None and ref.shape[0] != n:
        raise RunnerError(
            "bad-input", f"eval set {path}: ref_pred must have N={n} entries", EXIT_BAD_INPUT
        )
    if n == 0:
        raise RunnerError("bad-input", f"eval set {path} is empty", EXIT_BAD_INPUT)
    return EvalSet(x, y.reshape(-1).astype(np.int64), mean, std, ref)


def normalize(x_uint8: Any, mean: Any, std: Any) -> Any:
    """(x/255 - mean)/std per channel, float32: the same preprocessing as training."""
    x = x_uint8.astype(np.float32) / np.float32(255.0)
    return (x - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)


def make_batch(images: Any, batch_size: int) -> Any:
    """First `batch_size` normalized images, repeated if the set is smaller."""
    reps = -(-batch_size // images.shape[0])
    return np.ascontiguousarray(np.concatenate([images] * reps)[:batch_size])


# --------------------------------------------------------------------------- backends


class Backend:
    """One loaded artifact. Subclasses fill name/version and implement infer()."""

    name = ""
    version = ""
    max_batch: int | None = None  # engines with a fixed optimisation profile
    input_chw: tuple[int, ...] | None = None  # C, H, W when the artifact fixes them

    def infer(self, batch: Any) -> Any:
        raise NotImplementedError

    def prepare(self, batch: Any) -> None:
        """Bind a batch shape before timing (TensorRT allocates buffers here)."""

    def timed_step(self, batch: Any) -> float | None:
        self.infer(batch)
        return None

    def describe(self) -> dict[str, Any]:
        return {}


class OrtBackend(Backend):
    """ONNX Runtime CPU: fixed intra-op threads, sequential execution, full graph opts."""

    def __init__(self, artifact: str, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(artifact, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise RunnerError(
                "runtime",
                f"onnxruntime cannot load {artifact}: {_one_line(exc)}",
                EXIT_RUNTIME_FAILURE,
            ) from exc
        self.name, self.version = "onnxruntime", ort.__version__
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        self.input_chw = _static_chw(inp.shape)

    def infer(self, batch: Any) -> Any:
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def describe(self) -> dict[str, Any]:
        return {"providers": self.session.get_providers()}


class OpenVinoBackend(Backend):
    """OpenVINO CPU with a fixed thread count; FP32 means true f32 (no bf16/f16 downcast)."""

    def __init__(self, artifact: str, threads: int, precision: str):
        import openvino as ov

        core = ov.Core()
        self.config = {
            "INFERENCE_NUM_THREADS": threads,
            # f32 for fp32 and for the non-quantized parts of int8 models: some CPUs
            # would otherwise silently run bf16 and change both speed and accuracy.
            "INFERENCE_PRECISION_HINT": "f16" if precision == "fp16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        try:
            model = core.read_model(artifact)
            self.compiled = core.compile_model(model, "CPU", self.config)
        except Exception as exc:
            raise RunnerError(
                "runtime",
                f"openvino cannot load {artifact}: {_one_line(exc)}",
                EXIT_RUNTIME_FAILURE,
            ) from exc
        self.name, self.version = "openvino", ov.get_version()
        self.request = self.compiled.create_infer_request()
        self.device_name = str(core.get_property("CPU", "FULL_DEVICE_NAME"))
        shape = model.inputs[0].get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        self.input_chw = _static_chw(dims)

    def infer(self, batch: Any) -> Any:
        self.request.infer({0: batch})
        return self.request.get_output_tensor(0).data.copy()

    def timed_step(self, batch: Any) -> float | None:
        self.request.infer({0: batch})
        return None

    def describe(self) -> dict[str, Any]:
        props = {}
        for key in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS"):
            try:
                value = self.compiled.get_property(key)
            except Exception:  # property names differ between releases
                value = self.config.get(key)
            to_string = getattr(value, "to_string", None)  # ov.Type -> 'f32'
            props[key] = to_string() if callable(to_string) else str(value)
        return {"device": self.device_name, "compiled": props}


class TensorRtBackend(Backend):
    """TensorRT engine via the Python API (TRT >= 8.5 name-based I/O) with pycuda buffers.

    Host latency = H2D copy + execute + D2H copy timed on the host; GPU compute time =
    CUDA events around execute only, the same split trtexec reports.
    """

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
        self.input_chw = _static_chw(shape)
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
            "cuda_driver_version": _cuda_version_string(cuda.get_driver_version()),
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


def _cuda_version_string(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _static_chw(shape: Any) -> tuple[int, ...] | None:
    dims = list(shape)[1:]
    if dims and all(isinstance(d, int) and d > 0 for d in dims):
        return tuple(dims)
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def load_backend(runtime: str, artifact: str, precision: str, threads: int) -> Backend:
    """Open the artifact with the runtime (modules must already be importable)."""
    if runtime == "onnxruntime":
        return OrtBackend(artifact, threads)
    if runtime == "openvino":
        return OpenVinoBackend(artifact, threads, precision)
    if runtime == "tensorrt":
        return TensorRtBackend(artifact)
    raise RunnerError(
        "usage", f"unknown runtime {runtime!r}: choose {', '.join(RUNTIMES)}", EXIT_USAGE
    )


# --------------------------------------------------------------------------- accuracy


def evaluate(backend: Backend, ev: EvalSet, batch_size: int) -> dict[str, Any]:
    """Top-1 over the whole set, and agreement with the reference (PyTorch) predictions."""
    if backend.max_batch:
        batch_size = min(batch_size, backend.max_batch)
    preds = []
    for i in range(0, ev.x.shape[0], batch_size):
        logits = np.asarray(backend.infer(normalize(ev.x[i : i + batch_size], ev.mean, ev.std)))
        preds.append(logits.reshape(logits.shape[0], -1).argmax(axis=1))
    pred = np.concatenate(preds).astype(np.int64)
    result: dict[str, Any] = {
        "n": int(pred.shape[0]),
        "correct": int((pred == ev.y).sum()),
        "top1": round(float((pred == ev.y).mean()), 6),
        "predictions_sha256": hashlib.sha256(pred.tobytes()).hexdigest(),
    }
    if ev.ref_pred is not None:
        result["agreement"] = round(float((pred == ev.ref_pred).mean()), 6)
    return result


# --------------------------------------------------------------------------- environment


def _read(path: str, limit: int = 4096) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


def _command(args: list[str], timeout: float = 10.0) -> str | None:
    """stdout of a short probe command, or None if absent/failing (never hangs)."""
    if shutil.which(args[0]) is None:
        return None
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def cpu_model() -> str:
    info = _read("/proc/cpuinfo", 1 << 16) or ""
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", info, re.MULTILINE)
        if m and m.group(1).strip():
            return m.group(1).strip()
    model = _read("/proc/device-tree/model")
    if model:
        return model.strip("\x00\n ")
    return platform.processor() or platform.machine()


def parse_nv_tegra_release(text: str) -> dict[str, str]:
    """'# R36 (release), REVISION: 4.3, ...' -> {'l4t': '36.4.3', ...}."""
    out: dict[str, str] = {"raw": text.strip().splitlines()[0] if text.strip() else ""}
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if m:
        out["l4t"] = f"{m.group(1)}.{m.group(2)}"
    board = re.search(r"BOARD:\s*([^,\s]+)", text)
    if board:
        out["board"] = board.group(1)
    return out


def parse_nvpmodel(text: str) -> dict[str, Any]:
    """`nvpmodel -q` prints 'NV Power Mode: MAXN' then the mode id on its own line."""
    out: dict[str, Any] = {}
    m = re.search(r"NV Power Mode:\s*(\S+)", text)
    if m:
        out["name"] = m.group(1)
        rest = text[m.end() :].split()
        if rest and rest[0].isdigit():
            out["id"] = int(rest[0])
    return out


def jetson_info(release_file: str = JETSON_RELEASE_FILE) -> dict[str, Any] | None:
    """JetPack/L4T version and power mode; None when not on a Jetson."""
    text = _read(release_file)
    if text is None:
        return None
    info: dict[str, Any] = parse_nv_tegra_release(text)
    jetpack = _command(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"])
    info["jetpack"] = jetpack.split("+")[0] if jetpack else None
    model = _read("/proc/device-tree/model")
    if model:
        info["model"] = model.strip("\x00\n ")
    nvp = _command(["nvpmodel", "-q"])
    info["power_mode"] = parse_nvpmodel(nvp) if nvp else None
    return info


def environment(backend: Backend, threads: int) -> dict[str, Any]:
    """What the number was measured on: enough to tell two machines or setups apart."""
    env: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "runtime": backend.name,
        "runtime_version": backend.version,
    }
    if hasattr(os, "sched_getaffinity"):
        env["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        env["load_avg_1m"] = round(os.getloadavg()[0], 2)
    governor = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    if governor:
        env["cpu_governor"] = governor.strip()
    env.update(backend.describe())
    if backend.name == "tensorrt":
        smi = _command(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
        if smi:
            name, _, driver = smi.splitlines()[0].partition(",")
            env["gpu"], env["driver_version"] = name.strip(), driver.strip()
    jetson = jetson_info()
    if jetson is not None:
        env["jetson"] = jetson
    return env


# --------------------------------------------------------------------------- trtexec timing


def trtexec_latency(
    trtexec: str,
    artifact: str,
    input_name: str,
    shape: tuple[int, ...],
    protocol: Protocol,
    timeout: float,
) -> dict[str, Any]:
    """Time with NVIDIA's trtexec instead of the Python loop (same protocol knobs)."""
    try:
        from . import trtexec_tools as tt  # imported as a package module on the host
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import trtexec_tools as tt  # copied beside runner.py on the device
    with tempfile.TemporaryDirectory(prefix="trtexec-") as tmp:
        times = os.path.join(tmp, "times.json")
        args = tt.trtexec_command(
            artifact,
            trtexec=trtexec,
            input_name=input_name,
            input_shape=shape,
            warmup_ms=protocol.warmup_seconds * 1e3,
            duration_s=protocol.min_seconds,
            iterations=protocol.min_iters,
            export_times=times,
        )
        try:
            proc = subprocess.run(
                args, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise RunnerError(
                "runtime", f"trtexec timed out after {timeout:.0f} s", EXIT_RUNTIME_FAILURE
            ) from exc
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["(no output)"]
            raise RunnerError("runtime", f"trtexec failed: {tail[0]}", EXIT_RUNTIME_FAILURE)
        trace = tt.parse_export_times(
            _read(times, 1 << 28) or "[]", warmup_ms=protocol.warmup_seconds * 1e3
        )
        summary = tt.parse_summary(proc.stdout)
    host = [t["latency_ms"] for t in trace]
    gpu = [t["compute_ms"] for t in trace]
    entry: dict[str, Any] = {"batch_size": shape[0], **summarize(host)}
    entry.update(
        seconds=round(sum(host) / 1e3, 6),
        throughput_ips=round(shape[0] * 1e3 / entry["mean_ms"], 3) if entry["mean_ms"] else 0.0,
        truncated=False,
        cov_warning=entry["cov"] > protocol.cov_warn,
        gpu_compute=summarize(gpu),
        latency_kind="host",
        samples_ms=thin_samples(host),
        timed_by="trtexec",
        trtexec_summary=summary,
    )
    return entry


# --------------------------------------------------------------------------- main


@dataclass
class RunConfig:
    artifact: str
    runtime: str
    precision: str
    threads: int
    batch_sizes: tuple[int, ...]
    protocol: Protocol
    eval_path: str | None = None
    eval_batch_size: int = 64
    input_shape: tuple[int, ...] | None = None
    trtexec: str | None = None
    slowdown: float = 0.0
    timeout: float = 600.0
    cpu_affinity: tuple[int, ...] | None = None


def run(cfg: RunConfig) -> dict[str, Any]:
    """Load, measure every batch size, evaluate accuracy; return the result record."""
    if cfg.runtime not in RUNTIMES:
        raise RunnerError(
            "usage", f"unknown runtime {cfg.runtime!r}: choose {', '.join(RUNTIMES)}", EXIT_USAGE
        )
    cfg.protocol.validate()
    require_modules(cfg.runtime)
    if cfg.cpu_affinity:
        pin_cpus(cfg.cpu_affinity)
    if not os.path.isfile(cfg.artifact):
        raise RunnerError("bad-input", f"artifact {cfg.artifact} does not exist", EXIT_BAD_INPUT)
    ev = load_eval(cfg.eval_path) if cfg.eval_path else None
    backend = load_backend(cfg.runtime, cfg.artifact, cfg.precision, cfg.threads)
    try:
        images = _latency_images(backend, ev, cfg.input_shape)
        warnings: list[str] = []
        latency = []
        for bs in cfg.batch_sizes:
            if backend.max_batch and bs > backend.max_batch:
                raise RunnerError(
                    "bad-input",
                    f"batch size {bs} exceeds the engine's max batch {backend.max_batch}",
                    EXIT_BAD_INPUT,
                )
            if cfg.trtexec and cfg.runtime == "tensorrt":
                shape = (bs, *images.shape[1:])
                entry = trtexec_latency(
                    cfg.trtexec, cfg.artifact, backend.input_name, shape, cfg.protocol, cfg.timeout
                )
            else:
                entry = measure_latency(backend, images, bs, cfg.protocol, cfg.slowdown)
            if entry["cov_warning"]:
                warnings.append(
                    f"batch {bs}: latency CoV {entry['cov']:.2f} > {cfg.protocol.cov_warn:.2f}: "
                    "the machine is noisy; close other load or raise --min-seconds"
                )
            if entry.get("contended"):
                warnings.append(
                    f"batch {bs}: CPU contention in all {entry['attempts']} attempts (runner got "
                    f"{entry['cpu_share']:.0%} of a core, other processes used "
                    f"{entry['others_cpu'] or 0:.2f} cores): the latency is inflated; "
                    "rerun on an idle machine"
                )
            if entry["truncated"]:
                warnings.append(
                    f"batch {bs}: stopped at max {cfg.protocol.max_seconds:g} s before min-iters"
                )
            latency.append(entry)
        accuracy = evaluate(backend, ev, cfg.eval_batch_size) if ev is not None else None
        env = environment(backend, cfg.threads)
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    if cfg.slowdown:
        warnings.append(f"debug slowdown {cfg.slowdown:g} active: latency is artificially inflated")
    return {
        "format": RESULT_FORMAT,
        "runner_version": RUNNER_VERSION,
        "runtime": cfg.runtime,
        "precision": cfg.precision,
        "artifact": os.path.basename(cfg.artifact),
        "artifact_sha256": file_sha256(cfg.artifact),
        "threads": cfg.threads,
        "protocol": asdict(cfg.protocol),
        "latency": latency,
        "accuracy": accuracy,
        "environment": env,
        "warnings": warnings,
    }


def pin_cpus(cpus: tuple[int, ...]) -> None:
    """Pin this process (and the runtime threads it starts later) to the given CPUs."""
    if not hasattr(os, "sched_setaffinity"):
        raise RunnerError("usage", "--cpu-affinity needs Linux (sched_setaffinity)", EXIT_USAGE)
    try:
        os.sched_setaffinity(0, set(cpus))
    except (OSError, ValueError) as exc:
        raise RunnerError(
            "usage",
            f"--cpu-affinity {','.join(map(str, cpus))}: {exc}; this machine has CPUs 0..{(os.cpu_count() or 1) - 1}",
            EXIT_USAGE,
        ) from exc


def _latency_images(
    backend: Backend, ev: EvalSet | None, input_shape: tuple[int, ...] | None
) -> Any:
    """Real eval images when given (first 64), else seeded random data of the input shape."""
    if ev is not None:
        return normalize(ev.x[:64], ev.mean, ev.std)
    chw = tuple(input_shape) if input_shape else backend.input_chw
    if not chw:
        raise RunnerError(
            "usage",
            "the artifact has dynamic C/H/W: pass --eval or --input-shape C,H,W",
            EXIT_USAGE,
        )
    rng = np.random.default_rng(0)
    return rng.standard_normal((8, *chw)).astype(np.float32)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _cpu_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected CPU numbers such as 0,1, got {text!r}") from exc
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected CPU numbers such as 0,1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Measure an artifact's latency and accuracy.")
    p.add_argument("--artifact", required=True)
    p.add_argument("--runtime", required=True, choices=RUNTIMES)
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument(
        "--eval", dest="eval_path", default=None, help=".npz with x, y, mean, std[, ref_pred]"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-sizes", type=_int_list, default=(1,))
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument(
        "--cpu-affinity", type=_cpu_list, default=None, help="pin to these CPUs, e.g. 2,3"
    )
    p.add_argument("--input-shape", type=_int_list, default=None, help="C,H,W when no --eval")
    p.add_argument("--warmup-seconds", type=float, default=Protocol.warmup_seconds)
    p.add_argument("--min-iters", type=int, default=Protocol.min_iters)
    p.add_argument("--min-seconds", type=float, default=Protocol.min_seconds)
    p.add_argument("--max-seconds", type=float, default=Protocol.max_seconds)
    p.add_argument("--cov-warn", type=float, default=Protocol.cov_warn)
    p.add_argument("--min-cpu-share", type=float, default=Protocol.min_cpu_share)
    p.add_argument("--contention-retries", type=int, default=Protocol.contention_retries)
    p.add_argument("--max-other-cpu", type=float, default=Protocol.max_other_cpu)
    p.add_argument("--trtexec", default=None, help="time TensorRT engines with this trtexec binary")
    p.add_argument("--timeout", type=float, default=600.0, help="bound for child tools (trtexec)")
    p.add_argument("--out", required=True, help="where to write the JSON result")
    p.add_argument("--debug-slowdown", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def write_json_atomic(path: str, obj: Any) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".result.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = RunConfig(
        artifact=args.artifact,
        runtime=args.runtime,
        precision=args.precision,
        threads=args.threads,
        batch_sizes=args.batch_sizes,
        protocol=Protocol(
            warmup_seconds=args.warmup_seconds,
            min_iters=args.min_iters,
            min_seconds=args.min_seconds,
            max_seconds=args.max_seconds,
            cov_warn=args.cov_warn,
            min_cpu_share=args.min_cpu_share,
            contention_retries=args.contention_retries,
            max_other_cpu=args.max_other_cpu,
        ),
        eval_path=args.eval_path,
        eval_batch_size=args.eval_batch_size,
        input_shape=args.input_shape,
        trtexec=args.trtexec,
        slowdown=args.debug_slowdown,
        timeout=args.timeout,
        cpu_affinity=args.cpu_affinity,
    )
    try:
        if cfg.threads < 1 or cfg.eval_batch_size < 1:
            raise RunnerError("usage", "--threads and --eval-batch-size must be >= 1", EXIT_USAGE)
        result = run(cfg)
        write_json_atomic(args.out, result)
    except RunnerError as exc:
        sys.stderr.write(f"{ERROR_PREFIX} {exc.kind}: {exc}\n")
        return exc.exit_code
    except Exception as exc:  # one line for the host, whatever went wrong
        sys.stderr.write(f"{ERROR_PREFIX} runtime: {type(exc).__name__}: {_one_line(exc)}\n")
        return EXIT_RUNTIME_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
