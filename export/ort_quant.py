"""Static QDQ INT8 for ONNX Runtime (and the symmetric variant TensorRT takes).

Activation type: ONNX Runtime's x86 kernels multiply uint8 activations by int8 weights
(U8S8, VPMADDUBSW / VNNI VPDPBUSD). S8S8 models are executed there by converting, which
is slower: on this AMD EPYC (AVX512-VNNI) a QDQ ResNet-20 at batch 1 ran 0.35 ms with
U8S8 and 0.98 ms with S8S8 (FP32: 0.81 ms). So "auto" picks uint8 activations on x86 and
int8 on ARM (where S8S8 has the dot-product kernels). x86 CPUs without VNNI can saturate
the 16-bit intermediate of VPMADDUBSW with U8S8; there `reduce_range` (7-bit weights) is
turned on, as ONNX Runtime's quantization guide advises.

TensorRT only accepts symmetric signed INT8 Q/DQ (zero point 0), so `for_tensorrt=True`
makes a separate S8S8 symmetric model; it is verified here through ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dskd.atomic import atomic_path
from dskd.errors import UserError
from export.errors import ExportError

ACTIVATION_TYPES = ("auto", "uint8", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_activation_type(requested: str = "auto", machine: str | None = None,
                           flags: set[str] | None = None) -> tuple[str, bool, str]:
    """(activation type, reduce_range, why) for the CPU at hand (or the given one)."""
    if requested not in ACTIVATION_TYPES:
        raise UserError(f"--int8-activations '{requested}': choose {', '.join(ACTIVATION_TYPES)}")
    machine = (machine or platform.machine()).lower()
    x86 = machine in ("x86_64", "amd64", "i686", "i386")
    flags = cpu_flags() if flags is None else flags
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if requested == "int8":
        return "int8", False, "requested: S8S8"
    if requested == "uint8" or x86:
        reduce = x86 and not vnni
        why = "x86: U8S8 is ONNX Runtime's fast path" + (
            "; no VNNI, so weights use 7 bits (reduce_range) to avoid saturation" if reduce else
            " (VNNI present)")
        return "uint8", reduce, why if requested == "auto" else "requested: U8S8"
    return "int8", False, f"{machine}: S8S8 is ONNX Runtime's fast path on ARM"


class ArrayCalibrationReader:
    """onnxruntime CalibrationDataReader over normalized float32 batches."""

    def __init__(self, x: np.ndarray, batch: int = 32, input_name: str = "input") -> None:
        self._batches = [x[i:i + batch] for i in range(0, len(x), batch)]
        self._name = input_name
        self._it = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        nxt = next(self._it, None)
        return None if nxt is None else {self._name: np.ascontiguousarray(nxt)}

    def rewind(self) -> None:
        self._it = iter(self._batches)


def quantize_onnx_int8(fp32_onnx: str | os.PathLike, out_path: str | os.PathLike,
                       calib_x: np.ndarray, activation_type: str = "auto",
                       calibrate_method: str = "minmax", for_tensorrt: bool = False,
                       metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Pre-process (shape inference + graph optimisation), then static QDQ quantization with
    per-channel int8 weights, calibrated on `calib_x` (normalized training images)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibrate_method not in CALIBRATION_METHODS:
        raise UserError(f"--calib-method '{calibrate_method}': choose "
                        f"{', '.join(CALIBRATION_METHODS)}")
    if for_tensorrt:
        act, reduce_range, why = "int8", False, "TensorRT: symmetric signed INT8 Q/DQ only"
    else:
        act, reduce_range, why = choose_activation_type(activation_type)
    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibrate_method]
    extra = {"WeightSymmetric": True, "ActivationSymmetric": for_tensorrt}
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=out_path.parent) as work, \
            atomic_path(out_path, suffix=".onnx") as tmp:
        pre = Path(work) / "pre.onnx"
        quiet = io.StringIO()
        previous = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs at INFO/WARNING
        try:
            with contextlib.redirect_stdout(quiet):
                quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=False)
                quantize_static(
                    str(pre), str(tmp), ArrayCalibrationReader(calib_x),
                    quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
                    activation_type=qtype[act], weight_type=QuantType.QInt8,
                    calibrate_method=method, extra_options=extra,
                )
        except Exception as exc:  # noqa: BLE001 - report any quantizer failure in one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"{out_path.name}: INT8 quantization failed ({first[:200]})") from None
        finally:
            logging.getLogger().setLevel(previous)
        proto = onnx.load(str(tmp))
        if metadata:
            from export.onnx_build import set_metadata

            set_metadata(proto, metadata)
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        from export.onnx_build import verify_onnx

        verify_onnx(tmp)
    return {"activation_type": act, "weight_type": "int8", "per_channel": True,
            "reduce_range": reduce_range, "activation_choice": why, "format": "QDQ",
            "calibrate_method": calibrate_method, "symmetric_activations": for_tensorrt,
            "calibration_images": int(len(calib_x))}
