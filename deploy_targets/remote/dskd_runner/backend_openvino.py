"""OpenVINO on the CPU, timed as `benchmark_app -hint latency -api sync` times it."""

from __future__ import annotations

import time
from typing import Any

from ._numpy import np
from .backends import Backend, static_chw
from .protocol import EXIT_RUNTIME_FAILURE, Protocol, RunnerError, one_line


def compile_config(threads: int, precision: str, hint: str, streams: int) -> dict[str, Any]:
    """The CPU plugin settings the numbers are taken with (the fidelity bench hands the same
    settings to benchmark_app through -load_config). f32 for fp32 and for the non-quantized
    parts of int8 models: some CPUs would otherwise silently run bf16 and change both speed
    and accuracy."""
    config: dict[str, Any] = {
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": "f16" if precision == "fp16" else "f32",
        "PERFORMANCE_HINT": hint,
    }
    if streams > 0:
        config["NUM_STREAMS"] = streams
    return config


def property_str(compiled: Any, key: str, fallback: Any) -> str:
    """A compiled model's property as text ('f32', '1', 'LATENCY'); `fallback` if unknown."""
    try:
        value = compiled.get_property(key)
    except Exception:  # property names differ between releases
        value = fallback
    to_string = getattr(value, "to_string", None)  # ov.Type -> 'f32'
    text = to_string() if callable(to_string) else str(value)
    return text.split(".")[-1]  # PerformanceMode.LATENCY -> LATENCY


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
        self.precision = precision
        self.config = compile_config(threads, precision, "LATENCY", 1)
        try:
            self.model = self.core.read_model(artifact)
            self.compiled = self.core.compile_model(self.model, "CPU", self.config)
        except Exception as exc:
            raise RunnerError(
                "runtime",
                f"openvino cannot load {artifact}: {one_line(exc)}",
                EXIT_RUNTIME_FAILURE,
            ) from exc
        self.name, self.version = "openvino", ov.get_version()
        self.request = self.compiled.create_infer_request()  # timed, inputs bound
        self.eval_request = self.compiled.create_infer_request()  # accuracy, never timed
        self.device_name = str(self.core.get_property("CPU", "FULL_DEVICE_NAME"))
        shape = self.model.inputs[0].get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        self.input_chw = static_chw(dims)
        self.artifact = artifact
        self.dynamic_input = any(d is None for d in dims)
        self._bound: Any = None

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
        config = compile_config(self.threads, self.precision, "THROUGHPUT", streams)
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
        used = property_str(compiled, "NUM_STREAMS", streams)
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
            key: property_str(self.compiled, key, self.config.get(key))
            for key in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT",
                        "ENABLE_CPU_PINNING")
        }
        return {"device": self.device_name, "compiled": props}
