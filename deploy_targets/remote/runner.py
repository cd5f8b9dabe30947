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
RUNNER_VERSION = 2
ERROR_PREFIX = "runner-error:"

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_MISSING_MODULE = 3
EXIT_BAD_INPUT = 4
EXIT_RUNTIME_FAILURE = 5

RUNTIMES = ("onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
# "latency": batch-size latencies only (one request, one stream, bound tensors);
# "throughput": also images/s at the largest batch size with several streams where the
# runtime has them (OpenVINO), one bound request otherwise.
HINTS = ("latency", "throughput")
THREADS_ALL = 0  # --threads 0: all physical cores this process may run on
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
                if reported is not None:  # the same known slowdown for a runtime-timed call
                    reported = float(reported) * (1.0 + slowdown)
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
    # A runtime that times its own calls (OpenVINO's InferRequest.latency, what benchmark_app
    # reports) gives the headline numbers; the Python wall clock around the call is kept.
    runtime_timed = backend.timer == "runtime" and len(best.device_ms) == len(best.wall_ms)
    primary = best.device_ms if runtime_timed else best.wall_ms
    entry: dict[str, Any] = {"batch_size": batch_size, **summarize(primary)}
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
    entry["samples_ms"] = thin_samples(primary)
    if runtime_timed:
        entry["python_wall"] = summarize(best.wall_ms)
        entry["latency_kind"] = "runtime"
    else:
        if best.device_ms:
            entry["gpu_compute"] = summarize(best.device_ms)
        entry["latency_kind"] = "host" if best.device_ms else "wall"
    entry.update(backend.run_config())
    return entry


def measure_throughput(
    backend: Backend, images: Any, batch_size: int, streams: int, protocol: Protocol
) -> dict[str, Any]:
    """Images/s at `batch_size` with `streams` parallel streams (0 = the runtime's choice).

    Runs for the protocol's warm-up, then at least min_seconds (bounded by max_seconds),
    counting finished batches; what a server-style deployment gets, not a latency.
    """
    batch = make_batch(images, batch_size)
    done, seconds, info = backend.throughput(batch, streams, protocol)
    return {
        "batch_size": batch_size,
        "images_per_s": round(done * batch_size / seconds, 3) if seconds > 0 else 0.0,
        "batches": done,
        "seconds": round(seconds, 4),
        **info,
    }


def _run_for(step: Callable[[], Any], protocol: Protocol) -> tuple[int, float]:
    """Warm up, then call `step` until min_seconds (and >= 1 call) or max_seconds passed."""
    clock = time.perf_counter
    start = clock()
    step()
    while clock() - start < protocol.warmup_seconds:
        step()
    calls, begin = 0, clock()
    limit = max(protocol.min_seconds, 1e-3)
    while True:
        step()
        calls += 1
        elapsed = clock() - begin
        if elapsed >= limit or elapsed >= protocol.max_seconds:
            return calls, elapsed


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
    """One loaded artifact, timed the way a deployment runs it: inputs bound once.

    `prepare(batch)` binds a batch (input and output buffers) before timing, so that
    `timed_step` is inference only, not Python's per-call conversion of arguments;
    `infer(batch)` returns logits for accuracy and is never timed.
    """

    name = ""
    version = ""
    max_batch: int | None = None  # engines with a fixed optimisation profile
    input_chw: tuple[int, ...] | None = None  # C, H, W when the artifact fixes them
    threads = 1
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
        done, seconds = _run_for(lambda: self.timed_step(batch), protocol)
        return done, seconds, {"streams": 1, "requests": 1, "hint": "latency", "threads": self.threads}

    def run_config(self) -> dict[str, Any]:
        """Threads/streams/hint/binding of the latency numbers (one request, one stream)."""
        return {"threads": self.threads, "streams": 1, "hint": "latency", "binding": self.binding}

    def describe(self) -> dict[str, Any]:
        return {}


class OrtBackend(Backend):
    """ONNX Runtime CPU: fixed intra-op threads, sequential execution, full graph opts.

    Timing uses IOBinding (input and output bound to pre-allocated numpy buffers once), so
    a call is `run_with_iobinding` only, as a C++ deployment would run it.
    """

    binding = "iobinding"

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
        self.threads = threads
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        self.input_chw = _static_chw(inp.shape)
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


class OpenVinoBackend(Backend):
    """OpenVINO CPU with a fixed thread count; FP32 means true f32 (no bf16/f16 downcast).

    Latency: one InferRequest compiled with the LATENCY hint and one stream, the input
    tensor set once (`set_input_tensor`, sharing the numpy buffer) and `infer()` timed, as
    `benchmark_app -hint latency -api sync` does; the latency is OpenVINO's own timing of the
    call (`InferRequest.latency`, benchmark_app's number), the Python wall clock around it is
    kept as `python_wall`. Throughput: a second compilation with the
    THROUGHPUT hint driven by an AsyncInferQueue.
    """

    binding = "set_input_tensor"
    timer = "runtime"  # InferRequest.latency: the C++ time of infer(), benchmark_app's number

    def __init__(self, artifact: str, threads: int, precision: str):
        import openvino as ov

        self.ov = ov
        self.core = ov.Core()
        self.threads = threads
        # f32 for fp32 and for the non-quantized parts of int8 models: some CPUs
        # would otherwise silently run bf16 and change both speed and accuracy.
        self.precision_hint = "f16" if precision == "fp16" else "f32"
        self.config = self._config("LATENCY", 1)
        try:
            self.model = self.core.read_model(artifact)
            self.compiled = self.core.compile_model(self.model, "CPU", self.config)
        except Exception as exc:
            raise RunnerError(
                "runtime",
                f"openvino cannot load {artifact}: {_one_line(exc)}",
                EXIT_RUNTIME_FAILURE,
            ) from exc
        self.name, self.version = "openvino", ov.get_version()
        self.request = self.compiled.create_infer_request()  # timed, inputs bound
        self.eval_request = self.compiled.create_infer_request()  # accuracy, never timed
        self.device_name = str(self.core.get_property("CPU", "FULL_DEVICE_NAME"))
        shape = self.model.inputs[0].get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        self.input_chw = _static_chw(dims)
        self.artifact = artifact
        self.dynamic_input = any(d is None for d in dims)
        self._bound: Any = None

    def _config(self, hint: str, streams: int) -> dict[str, Any]:
        config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": self.threads,
            "INFERENCE_PRECISION_HINT": self.precision_hint,
            "PERFORMANCE_HINT": hint,
        }
        if streams > 0:
            config["NUM_STREAMS"] = streams
        return config

    def infer(self, batch: Any) -> Any:
        self.eval_request.infer({0: batch})
        return self.eval_request.get_output_tensor(0).data.copy()

    def _compile_static(self, shape: tuple[int, ...], config: dict[str, Any]) -> Any:
        """The model compiled for exactly `shape`, as a fixed-batch deployment (and
        benchmark_app -shape) runs it: a dynamic batch costs shape inference per call."""
        if not self.dynamic_input:
            return self.compiled if config is self.config else self.core.compile_model(self.model, "CPU", config)
        model = self.core.read_model(self.artifact)  # a fresh copy: reshape() changes it in place
        model.reshape({model.inputs[0]: self.ov.PartialShape([int(d) for d in shape])})
        return self.core.compile_model(model, "CPU", config)

    def prepare(self, batch: Any) -> None:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if self._bound is None or self._bound.shape != x.shape:
            self.request = self._compile_static(x.shape, self.config).create_infer_request()
        self._bound = x
        self.request.set_input_tensor(self.ov.Tensor(self._bound, shared_memory=True))

    def timed_step(self, batch: Any) -> float | None:
        if self._bound is None:
            self.prepare(batch)
        self.request.infer(share_outputs=True)
        return float(self.request.latency)

    def run_config(self) -> dict[str, Any]:
        # a dynamic-batch model is reshaped to each timed batch size (static shapes)
        return dict(super().run_config(), reshaped_to_batch=self.dynamic_input)

    def throughput(self, batch: Any, streams: int, protocol: Protocol) -> tuple[int, float, dict]:
        """AsyncInferQueue over a THROUGHPUT-hint compilation, every request's input bound once."""
        ov = self.ov
        config = self._config("THROUGHPUT", streams)
        compiled = self._compile_static(batch.shape, config)
        jobs = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        queue = ov.AsyncInferQueue(compiled, jobs)
        x = np.ascontiguousarray(batch, dtype=np.float32)
        for request in queue:
            request.set_input_tensor(ov.Tensor(x, shared_memory=True))
        done = [0]

        def finished(request: Any, userdata: Any) -> None:
            done[0] += 1

        queue.set_callback(finished)
        clock = time.perf_counter
        start = clock()
        while clock() - start < max(protocol.warmup_seconds, 1e-3):
            queue.start_async()
        queue.wait_all()
        done[0], begin = 0, clock()
        limit = min(max(protocol.min_seconds, 1e-3), protocol.max_seconds)
        while clock() - begin < limit:
            queue.start_async()
        queue.wait_all()
        seconds = clock() - begin
        used = _property_str(compiled, "NUM_STREAMS", streams)
        info = {
            "streams": int(used) if used.isdigit() else used,
            "requests": jobs,
            "hint": "throughput",
            "threads": self.threads,
            "binding": "set_input_tensor+AsyncInferQueue",
        }
        del queue, compiled
        return done[0], seconds, info

    def describe(self) -> dict[str, Any]:
        props = {
            key: _property_str(self.compiled, key, self.config.get(key))
            for key in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT")
        }
        return {"device": self.device_name, "compiled": props}


def _property_str(compiled: Any, key: str, fallback: Any) -> str:
    """A compiled model's property as text ('f32', '1', 'LATENCY'); `fallback` if unknown."""
    try:
        value = compiled.get_property(key)
    except Exception:  # property names differ between releases
        value = fallback
    to_string = getattr(value, "to_string", None)  # ov.Type -> 'f32'
    text = to_string() if callable(to_string) else str(value)
    return text.split(".")[-1]  # PerformanceMode.LATENCY -> LATENCY


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


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cpus:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        package, core = _read(base + "physical_package_id"), _read(base + "core_id")
        if package is None or core is None:
            cores.add(("cpu", cpu))  # no topology information: count the CPU itself
        else:
            cores.add((package.strip(), core.strip()))
    return max(1, len(cores))


def resolve_threads(threads: int) -> tuple[int, str]:
    """(threads to use, policy): 0 means all physical cores available to this process."""
    if threads == THREADS_ALL:
        return physical_cores(), "all physical cores"
    return threads, "explicit"


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


# --------------------------------------------------------------------------- pre-processing
#
# What a deployment does before inference for one camera/file image: decode, resize to
# the model's H x W, normalize to float32 N x C x H x W. Timed separately from inference
# (its own record, `preprocess`), so "end-to-end per image" = preprocess + inference.
# Pillow decodes when the device has it (what most deployments use); without it a small
# stdlib PNG decoder keeps the runner dependency-free.

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (8-bit only)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    import struct
    import zlib

    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def encode_png(image: Any) -> bytes:
    """H x W (grey) or H x W x 3 uint8 -> PNG bytes (filter 0), standard library only."""
    import struct
    import zlib

    img = np.ascontiguousarray(image, dtype=np.uint8)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    h, w = img.shape[:2]
    colour = 0 if img.ndim == 2 else 2
    rows = img.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw, 6))
        + _png_chunk(b"IEND", b"")
    )


def _unfilter_row(kind: int, row: Any, prev: Any, bpp: int) -> Any:
    """Undo one PNG row filter (RFC 2083 6.3); rows are uint8 arrays of equal length."""
    if kind == 0:
        return row
    if kind == 2:
        return (row.astype(np.uint16) + prev).astype(np.uint8)
    if kind == 1:  # Sub: a running sum per byte position modulo 256
        out = row.astype(np.int64).reshape(-1, bpp).cumsum(axis=0) % 256
        return out.reshape(-1).astype(np.uint8)
    out = bytearray(row.tobytes())
    up = prev.tobytes()
    for i in range(len(out)):
        a = out[i - bpp] if i >= bpp else 0
        b = up[i]
        if kind == 3:
            out[i] = (out[i] + ((a + b) >> 1)) & 0xFF
        elif kind == 4:
            c = up[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            out[i] = (out[i] + pred) & 0xFF
        else:
            raise ValueError(f"unknown PNG filter type {kind}")
    return np.frombuffer(bytes(out), np.uint8)


def decode_png(data: bytes) -> Any:
    """PNG bytes -> H x W x C uint8 (8-bit, non-interlaced grey/RGB[A]); alpha dropped."""
    import struct
    import zlib

    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    pos, idat, header = len(PNG_SIGNATURE), [], None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        payload = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", payload)
        elif kind == b"IDAT":
            idat.append(payload)
        elif kind == b"IEND":
            break
    if header is None or not idat:
        raise ValueError("PNG without IHDR/IDAT")
    w, h, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in _PNG_CHANNELS or interlace:
        raise ValueError(
            f"PNG with bit depth {depth}, colour type {colour}, interlace {interlace}: "
            "only 8-bit non-interlaced grey/RGB(A) without Pillow (install pillow)"
        )
    bpp = _PNG_CHANNELS[colour]
    stride = w * bpp
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    if raw.size != h * (stride + 1):
        raise ValueError("PNG data is truncated")
    raw = raw.reshape(h, stride + 1)
    out = np.empty((h, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(h):
        prev = out[y] = _unfilter_row(int(raw[y, 0]), raw[y, 1:], prev, bpp)
    img = out.reshape(h, w, bpp)
    return img[:, :, :3] if bpp == 4 else img[:, :, :1] if bpp == 2 else img


def resize_bilinear(image: Any, height: int, width: int) -> Any:
    """H x W x C -> height x width x C float32, bilinear with half-pixel centres (no antialias)."""
    src_h, src_w = image.shape[:2]
    img = image.astype(np.float32)
    if (src_h, src_w) == (height, width):
        return img

    def axis(n_out: int, n_in: int) -> tuple[Any, Any, Any]:
        pos = (np.arange(n_out, dtype=np.float32) + 0.5) * (n_in / n_out) - 0.5
        pos = np.clip(pos, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, fy = axis(height, src_h)
    x0, x1, fx = axis(width, src_w)
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bottom = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


class Preprocessor:
    """Encoded image bytes -> normalized 1 x C x H x W float32 (decode, resize, normalize)."""

    def __init__(self, chw: tuple[int, ...], mean: Any, std: Any):
        self.c, self.h, self.w = (int(v) for v in chw)
        self.mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
        try:
            from PIL import Image

            self.pil: Any = Image
            self.decoder = f"Pillow {getattr(__import__('PIL'), '__version__', '')}".strip()
        except ImportError:
            self.pil, self.decoder = None, "builtin-png (stdlib zlib + numpy)"

    def decode_resize(self, data: bytes) -> Any:
        """H x W x C uint8/float32 pixels at the model's size (0..255 scale)."""
        if self.pil is not None:
            import io

            img = self.pil.open(io.BytesIO(data)).convert("L" if self.c == 1 else "RGB")
            img = img.resize((self.w, self.h), self.pil.BILINEAR)
            arr = np.asarray(img, dtype=np.float32)
            return arr[:, :, None] if arr.ndim == 2 else arr
        arr = decode_png(data)
        if self.c == 1 and arr.shape[2] == 3:  # ITU-R 601-2 luma, as Pillow's convert("L")
            arr = (arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[:, :, None]
        elif self.c == 3 and arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        return resize_bilinear(arr, self.h, self.w)

    def __call__(self, data: bytes) -> Any:
        pixels = self.decode_resize(data)
        x = pixels.transpose(2, 0, 1)[None] * np.float32(1.0 / 255.0)
        return np.ascontiguousarray((x - self.mean) / self.std, dtype=np.float32)


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a PNG or JPEG header, without decoding the pixels."""
    import struct

    if data.startswith(PNG_SIGNATURE) and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return int(h), int(w)
    pos = 2 if data[:2] == b"\xff\xd8" else len(data)
    while pos + 9 <= len(data):
        if data[pos] != 0xFF:
            break
        marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            h, w = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return int(h), int(w)
        pos += 2 + length
    raise ValueError("not a PNG or JPEG image")


def measure_preprocess(
    data: bytes, source: str, chw: tuple[int, ...], mean: Any, std: Any, protocol: Protocol
) -> dict[str, Any]:
    """Time decode + resize + normalize of one encoded image (a shorter run than inference)."""
    prep = Preprocessor(chw, mean, std)
    try:
        src_hw = image_size(data)
        prep(data)  # fails here, not inside the timing loop, on an unreadable image
    except Exception as exc:
        raise RunnerError(
            "bad-input", f"cannot decode image {source}: {_one_line(exc)}", EXIT_BAD_INPUT
        ) from exc
    short = Protocol(
        warmup_seconds=min(protocol.warmup_seconds, 0.2),
        min_iters=min(protocol.min_iters, 50),
        min_seconds=min(protocol.min_seconds, 1.0),
        max_seconds=min(protocol.max_seconds, 30.0),
    )
    def step() -> None:  # time_calls reads a returned value as a device time
        prep(data)

    stats = summarize(time_calls(step, short).wall_ms)
    return {
        "steps": "decode+resize+normalize",
        "source": source,
        "bytes": len(data),
        "source_hw": list(src_hw),
        "output_chw": [prep.c, prep.h, prep.w],
        "decoder": prep.decoder,
        **{k: stats[k] for k in ("iterations", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "cov")},
    }


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
        "physical_cores": physical_cores(),
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
    hint: str = "latency"
    streams: int = 0  # throughput mode's streams; 0 = the runtime's choice for the hint
    image_path: str | None = None  # an encoded image for the pre-processing timing


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
    if cfg.hint not in HINTS:
        raise RunnerError("usage", f"--hint {cfg.hint!r}: choose {', '.join(HINTS)}", EXIT_USAGE)
    if cfg.streams < 0:
        raise RunnerError("usage", "--streams must be >= 0 (0: the runtime's choice)", EXIT_USAGE)
    ev = load_eval(cfg.eval_path) if cfg.eval_path else None
    image = _read_image(cfg.image_path) if cfg.image_path else None
    threads, threads_policy = resolve_threads(cfg.threads)
    backend = load_backend(cfg.runtime, cfg.artifact, cfg.precision, threads)
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
        throughput = None
        if cfg.hint == "throughput":
            if cfg.streams > 1 and cfg.runtime != "openvino":
                warnings.append(
                    f"--streams {cfg.streams}: {cfg.runtime} has no parallel streams here; "
                    "throughput measured with one bound request"
                )
            throughput = measure_throughput(
                backend, images, max(cfg.batch_sizes), cfg.streams, cfg.protocol
            )
        preprocess = _preprocess(image, cfg.image_path, ev, images.shape[1:], cfg.protocol)
        if preprocess is not None:
            for entry in latency:
                per_image = entry["p50_ms"] / entry["batch_size"]
                entry["end_to_end_per_image_ms"] = round(preprocess["p50_ms"] + per_image, 6)
        accuracy = evaluate(backend, ev, cfg.eval_batch_size) if ev is not None else None
        env = environment(backend, threads)
        runtime_config = dict(backend.run_config(), threads_policy=threads_policy)
        if backend.threads is None:
            runtime_config["threads_policy"] = "not applicable (GPU)"
        runtime_config.update(mode_hint=cfg.hint, throughput_streams=cfg.streams)
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
        "threads": threads,
        "runtime_config": runtime_config,
        "protocol": asdict(cfg.protocol),
        "latency": latency,
        "throughput": throughput,
        "preprocess": preprocess,
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


def _read_image(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise RunnerError("bad-input", f"cannot read image {path}: {exc}", EXIT_BAD_INPUT) from exc


def _preprocess(
    image: bytes | None,
    image_path: str | None,
    ev: EvalSet | None,
    chw: tuple[int, ...],
    protocol: Protocol,
) -> dict[str, Any] | None:
    """Pre-processing timing of the given image, else of eval image 0 as a PNG; None without either."""
    if image is None and ev is None:
        return None
    if ev is not None:
        mean, std = ev.mean, ev.std
    else:  # an image without an eval set: ImageNet-style constants do not change the timing
        mean, std = np.full(chw[0], 0.5, np.float32), np.full(chw[0], 0.25, np.float32)
    if image is None:
        image = encode_png(ev.x[0].transpose(1, 2, 0))
        source = "eval-set image 0 as PNG"
    else:
        source = os.path.basename(str(image_path))
    return measure_preprocess(image, source, tuple(chw), mean, std, protocol)


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
    p.add_argument("--threads", type=int, default=1, help="runtime threads; 0 = all physical cores")
    p.add_argument("--hint", default="latency", choices=HINTS,
                   help="throughput: also images/s at the largest batch size with --streams")
    p.add_argument("--streams", type=int, default=0, help="throughput mode's streams (0: runtime's choice)")
    p.add_argument("--image", dest="image_path", default=None,
                   help="an encoded image (JPEG/PNG) whose decode+resize+normalize is timed")
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
        hint=args.hint,
        streams=args.streams,
        image_path=args.image_path,
    )
    try:
        if cfg.threads < 0 or cfg.eval_batch_size < 1:
            raise RunnerError(
                "usage", "--threads must be >= 0 (0: all physical cores), --eval-batch-size >= 1", EXIT_USAGE
            )
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
