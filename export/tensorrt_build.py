"""TensorRT engine builds through the Python API, on the device that will run them.

Engines are specific to the GPU and TensorRT version that built them, so each engine
gets `<engine>.json` with both. TensorRT cannot be installed on the export machine used
for this project's tests: everything that needs `import tensorrt` is here, behind
`tensorrt_status()`, and the version logic it relies on (export.tensorrt_cmd) is
tested without it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from dskd.atomic import atomic_path, write_json
from dskd.errors import UserError
from export.errors import ExportError
from export.tensorrt_cmd import BuildPlan, TrtVersion, plan_build
from export.versions import have, tool_version


def tensorrt_status() -> tuple[TrtVersion | None, str]:
    """(version, '') when the TensorRT Python API and a CUDA GPU are usable, else (None, why)."""
    if not have("tensorrt"):
        return None, ("TensorRT is not installed here (it needs an NVIDIA GPU): the engine is "
                      "built on the device with build_trtexec.sh, or by running the export there")
    version = tool_version("tensorrt")
    try:
        import torch

        if not torch.cuda.is_available():
            return None, "TensorRT is installed but no CUDA GPU is visible to torch"
    except ImportError:
        pass
    return TrtVersion.parse(version or "0"), ""


def gpu_name() -> str:
    """The GPU the engine is built for (torch, then nvidia-smi, then the Jetson board name)."""
    try:
        import torch

        if torch.cuda.is_available():
            cc = torch.cuda.get_device_capability()
            return f"{torch.cuda.get_device_name()} (sm_{cc[0]}{cc[1]})"
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False).stdout.strip()
        if out:
            return out.splitlines()[0]
    model = Path("/proc/device-tree/model")
    if model.exists():
        return model.read_bytes().rstrip(b"\0").decode(errors="replace")
    return "unknown"


def calibration_cache_key(onnx_sha256: str, data_sha256: str, version: TrtVersion) -> str:
    """A calibration cache is valid only for the same graph, the same images, the same TRT."""
    text = f"{onnx_sha256}:{data_sha256}:{version}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def calibration_cache_name(onnx_sha256: str, data_sha256: str, version: TrtVersion) -> str:
    return f"calib-{calibration_cache_key(onnx_sha256, data_sha256, version)}.cache"


def _make_calibrator(trt: Any, batches: np.ndarray, cache_path: Path, batch_size: int) -> Any:
    """IInt8EntropyCalibrator2 feeding normalized batches from a CUDA buffer (torch)."""
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.index = 0
            self.device = torch.empty((batch_size, *batches.shape[1:]), dtype=torch.float32,
                                      device="cuda")

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index + batch_size > len(batches):
                return None
            chunk = torch.from_numpy(batches[self.index:self.index + batch_size])
            self.device.copy_(chunk)
            self.index += batch_size
            return [int(self.device.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path.exists() else None

        def write_calibration_cache(self, cache: Any) -> None:
            with atomic_path(cache_path) as tmp:
                tmp.write_bytes(bytes(cache))

    return EntropyCalibrator()


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, precision: str,
                 chw: tuple[int, int, int], batches: tuple[int, int, int] = (1, 16, 64),
                 input_name: str = "input", workspace_mib: int = 1024,
                 timing_cache: str | os.PathLike | None = None, int8_mode: str = "qdq",
                 calib_x: np.ndarray | None = None, calib_data_sha256: str = "",
                 strongly_typed: bool = False) -> dict[str, Any]:
    """Build and save one engine; `onnx_path` is the Q/DQ model for int8 'qdq', the FP32 one
    for fp16 and for the calibrator, and an FP16 (AutoCast) one where the plan needs it."""
    version, why = tensorrt_status()
    if version is None:
        raise UserError(f"tensorrt-{precision}: {why}")
    plan = plan_build(version, precision, int8_mode, strongly_typed)
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    onnx_path = _fp16_onnx_if_needed(plan, onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if version.major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if plan.strongly_typed and version.has_strongly_typed_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path.name}: TensorRT {version} could not parse it ({errors[:300]})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    lo, opt, hi = batches
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (lo, *chw), (opt, *chw), (hi, *chw))
    config.add_optimization_profile(profile)
    cache_file = None
    if plan.uses_calibrator:
        if calib_x is None:
            raise UserError("the TensorRT INT8 calibrator needs calibration data (--calib-data)")
        from dskd.checkpoint import file_sha256

        cache_file = engine_path.parent / calibration_cache_name(
            file_sha256(onnx_path), calib_data_sha256, version)
        calib_batch = min(32, len(calib_x))
        config.int8_calibrator = _make_calibrator(trt, calib_x, cache_file, calib_batch)
        calib_profile = builder.create_optimization_profile()
        shape = (calib_batch, *chw)
        calib_profile.set_shape(input_name, shape, shape, shape)
        config.set_calibration_profile(calib_profile)
    timing = None
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        blob = timing_cache.read_bytes() if timing_cache.exists() else b""
        timing = config.create_timing_cache(blob)
        config.set_timing_cache(timing, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{engine_path.name}: TensorRT {version} failed to build the engine")
    with atomic_path(engine_path, suffix=".engine") as tmp:
        tmp.write_bytes(bytes(serialized))
    if timing is not None and timing_cache is not None:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    info = engine_info(version, plan, batches, onnx_path, cache_file)
    write_json(Path(str(engine_path) + ".json"), info)
    return info


def engine_info(version: TrtVersion, plan: BuildPlan, batches: tuple[int, int, int],
                onnx_path: Path, calib_cache: Path | None) -> dict[str, Any]:
    return {
        "tensorrt_version": str(version), "gpu_name": gpu_name(), "precision": plan.precision,
        "builder_flags": list(plan.builder_flags), "strongly_typed": plan.strongly_typed,
        "int8_calibrator": plan.uses_calibrator, "notes": plan.notes,
        "profile": {"min": batches[0], "opt": batches[1], "max": batches[2]},
        "onnx": onnx_path.name, "calibration_cache": calib_cache.name if calib_cache else None,
        "built_by": "export.tensorrt_build", "built_utc": dt.datetime.now(dt.timezone.utc)
        .strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _fp16_onnx_if_needed(plan: BuildPlan, onnx_path: Path) -> Path:
    """Strongly typed FP16 needs the FP16 cast in the graph: ModelOpt AutoCast makes it."""
    if not plan.needs_fp16_onnx:
        return onnx_path
    out = onnx_path.with_name(onnx_path.stem + ".fp16.onnx")
    if out.exists():
        return out
    if not have("modelopt"):
        raise UserError("strongly typed FP16 TensorRT needs an FP16 ONNX: pip install "
                        "nvidia-modelopt (AutoCast), or use TensorRT 10 with --fp16")
    proc = subprocess.run(["python3", "-m", "modelopt.onnx.autocast", "--onnx_path",
                           str(onnx_path), "--output_path", str(out)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.exists():
        raise ExportError(f"{onnx_path.name}: ModelOpt AutoCast failed "
                          f"({(proc.stderr.strip().splitlines() or ['?'])[-1][:200]})")
    return out


def engine_predictor(engine_path: str | os.PathLike, input_name: str = "input",
                     output_name: str = "logits") -> Any:
    """predict(x) through a built engine (TensorRT ≥ 8.5 tensor API, CUDA buffers via torch)."""
    version, why = tensorrt_status()
    if version is None:
        raise UserError(why)
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise ExportError(f"{Path(engine_path).name}: TensorRT could not load the engine "
                          "(built by another TensorRT version or for another GPU?)")
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16}
    in_dtype = dtypes[engine.get_tensor_dtype(input_name)]
    out_dtype = dtypes[engine.get_tensor_dtype(output_name)]

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.cuda.stream(stream):
            inp = torch.from_numpy(np.ascontiguousarray(x)).to("cuda", in_dtype)
            context.set_input_shape(input_name, tuple(inp.shape))
            out = torch.empty(tuple(context.get_tensor_shape(output_name)), dtype=out_dtype,
                              device="cuda")
            context.set_tensor_address(input_name, int(inp.data_ptr()))
            context.set_tensor_address(output_name, int(out.data_ptr()))
            if not context.execute_async_v3(stream.cuda_stream):
                raise ExportError(f"{Path(engine_path).name}: TensorRT inference failed")
            result = out.float().cpu()
        stream.synchronize()
        return result.numpy()

    return predict
