"""A tiny CNN as ONNX (FP32 and static QDQ INT8) with its evaluation set, and the runner as a child.

Deploy-target tests need real artifacts with a known top-1, not a zoo model: this one exports
and quantizes in about a second.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

from deploy_targets import write_eval_npz
from deploy_targets.remote import RUNNER_PATH

N_EVAL = 64
MEAN = np.array([0.5, 0.4, 0.3], np.float32)
STD = np.array([0.2, 0.25, 0.3], np.float32)


def build_tiny_artifacts(root: Path, quantized: bool = True) -> dict:
    """A tiny CNN exported to ONNX (input `input`, output `logits`, dynamic batch), its eval set
    (labels = the model's own predictions with 10 flipped, so top-1 is known) and, optionally,
    a static QDQ INT8 version."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.fc = nn.Linear(16, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.c2(torch.relu(self.c1(x))))
            return self.fc(x.mean((2, 3)))

    model = Tiny().eval()
    onnx_path = root / "tiny.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but fast and stable
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(2, 3, 16, 16),), str(onnx_path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False, opset_version=17,
        )  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (N_EVAL, 3, 16, 16), dtype=np.uint8)
    with torch.no_grad():
        xn = (
            torch.from_numpy(x).float() / 255 - torch.from_numpy(MEAN).view(1, 3, 1, 1)
        ) / torch.from_numpy(STD).view(1, 3, 1, 1)
        ref = model(xn).argmax(1).numpy()
    y = ref.copy()
    y[:10] = (y[:10] + 1) % 5
    eval_path = write_eval_npz(root / "eval.npz", x, y, MEAN, STD, ref_pred=ref)
    out = {"onnx": onnx_path, "eval": eval_path, "n": N_EVAL, "ref": ref, "y": y, "x": x}
    if quantized:
        out["onnx_int8"] = quantize_tiny(onnx_path, root / "tiny.int8.onnx", x)
    return out


def quantize_tiny(src: Path, dst: Path, x: np.ndarray) -> Path:
    """Static QDQ INT8 (per-channel weights) of `src`, calibrated on the first 16 images of `x`."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            xn = (x[:16].astype(np.float32) / 255 - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(
                1, 3, 1, 1
            )
            self.items = iter([{"input": xn[i : i + 4]} for i in range(0, 16, 4)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )
    return dst


def run_runner_cli(args: list[str], python: str = sys.executable) -> subprocess.CompletedProcess:
    """deploy_targets/remote/runner.py as the device runs it: a script in a child process."""
    return subprocess.run(
        [python, str(RUNNER_PATH), *args], capture_output=True, text=True, timeout=120
    )
