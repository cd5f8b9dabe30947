"""One call shape for every runtime: `predict(x_float32_nchw) -> logits`, for parity and benchmarks."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from dskd.errors import UserError

Predictor = Callable[[np.ndarray], np.ndarray]

# OpenVINO picks bf16 by itself on CPUs with AVX512_BF16 or AMX (this one has AVX512_BF16):
# "f32" pins true FP32 so parity and FP32 timings mean FP32; None leaves the CPU plugin's choice.
OV_PRECISIONS = ("f32", "bf16", "f16", None)


def run_batched(predict: Predictor, x: np.ndarray, batch: int = 64) -> np.ndarray:
    outs = [predict(np.ascontiguousarray(x[i:i + batch])) for i in range(0, len(x), batch)]
    return np.concatenate(outs, axis=0).astype(np.float32)


def torch_predictor(model: Any, threads: int | None = None) -> Predictor:
    """PyTorch eager FP32 (the reference). `threads` sets torch's process-wide thread count."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = model.eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()

    return predict


def ort_session(path: str | os.PathLike, threads: int = 2) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install onnxruntime") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_predictor(path: str | os.PathLike, threads: int = 2) -> Predictor:
    """ONNX Runtime CPU session; input `input`, output `logits`."""
    sess = ort_session(path, threads)
    in_name = sess.get_inputs()[0].name
    out_name = sess.get_outputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        return sess.run([out_name], {in_name: x})[0]

    return predict


@functools.lru_cache(maxsize=1)
def ov_core() -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise UserError("openvino is not installed: pip install openvino") from None
    return ov.Core()


def openvino_compile(xml: str | os.PathLike, precision: str | None = "f32", threads: int = 2) -> Any:
    """Compile an IR for the CPU with one stream and `threads` threads.

    precision "f32" sets INFERENCE_PRECISION_HINT=f32: without it the CPU plugin runs
    bf16 on CPUs with native bf16 (AVX512_BF16/AMX), silently changing the numbers.
    """
    if precision not in OV_PRECISIONS:
        raise UserError(f"OpenVINO precision '{precision}' unknown; use f32, bf16, f16 or auto")
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                              "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    core = ov_core()
    return core.compile_model(core.read_model(str(xml)), "CPU", config)


def openvino_predictor(xml: str | os.PathLike, precision: str | None = "f32",
                       threads: int = 2) -> Predictor:
    compiled = openvino_compile(xml, precision, threads)
    request = compiled.create_infer_request()
    out = compiled.outputs[0]

    def predict(x: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: x})[out], copy=True)

    return predict


def compiled_precision(xml: str | os.PathLike, precision: str | None, threads: int = 2) -> str:
    """The precision the CPU plugin actually chose (e.g. 'bf16' when left to 'auto')."""
    hint = openvino_compile(xml, precision, threads).get_property("INFERENCE_PRECISION_HINT")
    return str(hint.get_type_name() if hasattr(hint, "get_type_name") else hint)
