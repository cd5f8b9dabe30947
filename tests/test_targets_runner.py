"""The runner (local, real ONNX Runtime and OpenVINO) and measure() on local targets."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from deploy_targets import (
    DeviceError,
    Measurement,
    Protocol,
    artifact_format,
    measure,
    write_eval_npz,
)
from deploy_targets.evalset import check_eval_npz
from deploy_targets.remote import RUNNER_PATH, runner
from dskd.errors import UserError

# contention_retries=0: these tests check plumbing, not timing, so a busy machine need not rerun
FAST = Protocol(warmup_seconds=0.05, min_iters=20, min_seconds=0.2, contention_retries=0)
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
    torch.set_num_threads(1)

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
        out["onnx_int8"] = _quantize(onnx_path, root / "tiny.int8.onnx", x)
    return out


def _quantize(src: Path, dst: Path, x: np.ndarray) -> Path:
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


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_tiny_artifacts(tmp_path_factory.mktemp("artifacts"))


def _ort_predictions(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xn = ((x.astype(np.float32) / 255 - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(1, 3, 1, 1)).astype(
        np.float32
    )
    return sess.run(None, {"input": xn})[0].argmax(1)


def _run_cli(args: list[str], python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, str(RUNNER_PATH), *args], capture_output=True, text=True, timeout=120
    )


def test_runner_cli_protocol_and_accuracy(artifacts: dict, tmp_path: Path):
    out = tmp_path / "r.json"
    proc = _run_cli([
        "--artifact", str(artifacts["onnx"]), "--runtime", "onnxruntime", "--eval", str(artifacts["eval"]),
        "--threads", "1", "--batch-sizes", "1,3", "--min-iters", "25", "--min-seconds", "0.1",
        "--warmup-seconds", "0.05", "--out", str(out),
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["format"] == runner.RESULT_FORMAT
    assert [e["batch_size"] for e in res["latency"]] == [1, 3]
    for e in res["latency"]:
        assert e["iterations"] >= 25
        assert 0 < e["min_ms"] <= e["p50_ms"] <= e["p90_ms"] <= e["p99_ms"] <= e["max_ms"]
        assert e["cov"] == pytest.approx(e["std_ms"] / e["mean_ms"], rel=1e-3)
        assert e["latency_kind"] == "wall" and "gpu_compute" not in e
        kept = e["samples_ms"]
        assert 0 < len(kept) <= min(e["iterations"], runner.MAX_SAMPLES_KEPT)
        assert (
            min(kept) >= round(e["min_ms"], 5) - 1e-5 and max(kept) <= round(e["max_ms"], 5) + 1e-5
        )
    pred = _ort_predictions(artifacts["onnx"], artifacts["x"])
    acc = res["accuracy"]
    assert acc["n"] == N_EVAL
    assert acc["correct"] == int((pred == artifacts["y"]).sum())
    assert acc["agreement"] == pytest.approx(float((pred == artifacts["ref"]).mean()))
    assert acc["agreement"] >= 0.95  # ONNX Runtime vs PyTorch: same model, float rounding only
    env = res["environment"]
    assert env["runtime"] == "onnxruntime" and env["threads"] == 1 and env["cpu_count"] >= 1
    assert env["cpu_model"]


def test_openvino_reads_onnx_in_true_f32(artifacts: dict):
    ov = measure(artifacts["onnx"], "intel-cpu", eval_set=artifacts["eval"], protocol=FAST)
    ort = measure(artifacts["onnx"], "cpu", eval_set=artifacts["eval"], protocol=FAST)
    assert ov.runtime == "openvino" and ov.precision == "fp32"
    assert ov.environment["compiled"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert abs(ov.accuracy["correct"] - ort.accuracy["correct"]) <= 1
    assert ov.latency_at(1)["p50_ms"] > 0


def test_int8_qdq_is_detected_and_measured(artifacts: dict):
    assert artifact_format(artifacts["onnx_int8"]) == "onnx-qdq"
    assert artifact_format(artifacts["onnx"]) == "onnx"
    m = measure(artifacts["onnx_int8"], "cpu", eval_set=artifacts["eval"], protocol=FAST)
    assert m.precision == "int8" and m.artifact_format == "onnx-qdq"
    assert m.accuracy["agreement"] >= 0.5  # tiny random model: INT8 keeps most predictions
    with pytest.raises(UserError, match="--precision fp32: artifact tiny.int8.onnx is int8"):
        measure(artifacts["onnx_int8"], "cpu", precision="fp32", protocol=FAST)


def test_measurement_round_trips_through_json(artifacts: dict, tmp_path: Path):
    m = measure(artifacts["onnx"], "cpu", protocol=FAST, batch_sizes=[2])  # no eval: random input
    assert m.accuracy is None and m.top1 is None
    assert m.batch_sizes == [2] and m.p50_ms == m.latency_at(2)["p50_ms"]
    m.save(tmp_path / "m.json")
    back = Measurement.from_dict(json.loads((tmp_path / "m.json").read_text()))
    assert back == m
    with pytest.raises(KeyError):
        m.latency_at(1)


def test_missing_runtime_has_dedicated_exit_code(artifacts: dict, tmp_path: Path):
    venv = tmp_path / "bare"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    proc = _run_cli(
        [
            "--artifact",
            str(artifacts["onnx"]),
            "--runtime",
            "onnxruntime",
            "--out",
            str(tmp_path / "o.json"),
        ],
        python=str(venv / "bin" / "python"),
    )
    assert proc.returncode == runner.EXIT_MISSING_MODULE
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("runner-error: missing-module:") and "numpy, onnxruntime" in last
    assert not (tmp_path / "o.json").exists()


def test_bad_eval_set_is_rejected_on_both_sides(artifacts: dict, tmp_path: Path):
    bad = tmp_path / "bad.npz"
    np.savez(
        bad, x=np.zeros((4, 3, 16, 16), np.float32), y=np.zeros(4, np.int64), mean=MEAN, std=STD
    )
    with pytest.raises(UserError, match="x must be non-empty uint8"):
        check_eval_npz(bad)
    proc = _run_cli(
        [
            "--artifact",
            str(artifacts["onnx"]),
            "--runtime",
            "onnxruntime",
            "--eval",
            str(bad),
            "--out",
            str(tmp_path / "o.json"),
        ]
    )
    assert proc.returncode == runner.EXIT_BAD_INPUT
    assert "x must be uint8" in proc.stderr
    np.savez(tmp_path / "nostd.npz", x=np.zeros((1, 3, 2, 2), np.uint8), y=[0], mean=MEAN)
    with pytest.raises(UserError, match="missing std"):
        check_eval_npz(tmp_path / "nostd.npz")
    with pytest.raises(UserError, match="mean needs 3 values"):
        write_eval_npz(tmp_path / "e.npz", np.zeros((1, 3, 2, 2), np.uint8), [0], MEAN[:2], STD)
    assert not (tmp_path / "e.npz").exists()


def test_local_timeout_is_bounded(artifacts: dict):
    slow = Protocol(warmup_seconds=0.0, min_iters=1, min_seconds=600, max_seconds=600)
    with pytest.raises(DeviceError, match="^local: measurement did not finish within 2 s"):
        measure(artifacts["onnx"], "cpu", protocol=slow, timeout_s=2)


def test_time_calls_counts_and_truncates():
    calls = []
    t = runner.time_calls(lambda: calls.append(1), Protocol(0.0, 7, 0.0, 60.0))
    assert len(t.wall_ms) == 7 and t.device_ms == [] and not t.truncated
    assert len(calls) == 8  # one warm-up call, then exactly min_iters timed ones
    assert t.cpu_share >= 0 and (t.preemptions is None or t.preemptions >= 0)
    t = runner.time_calls(lambda: 1.5, Protocol(0.0, 10**9, 0.0, 0.05))
    assert t.truncated and len(t.wall_ms) == len(t.device_ms) and set(t.device_ms) == {1.5}


def test_contended_runs_are_retried_then_flagged(monkeypatch: pytest.MonkeyPatch):
    """A sleeping step gets almost no CPU: exactly what competing processes look like."""
    import time as _time

    runner.require_modules("onnxruntime")

    class Sleepy(runner.Backend):
        name = "onnxruntime"

        def timed_step(self, batch):
            _time.sleep(0.002)

    proto = Protocol(0.0, 5, 0.0, 60.0, min_cpu_share=0.9, contention_retries=2)
    entry = runner.measure_latency(Sleepy(), np.zeros((1, 3, 2, 2), np.float32), 1, proto)
    assert entry["contended"] and entry["attempts"] == 3 and entry["cpu_share"] < 0.9
    Sleepy.name = "tensorrt"  # GPU waits may sleep: recorded, never retried or flagged
    entry = runner.measure_latency(Sleepy(), np.zeros((1, 3, 2, 2), np.float32), 1, proto)
    assert not entry["contended"] and entry["attempts"] == 1


def test_thin_samples_keeps_order_and_bound():
    assert runner.thin_samples([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    thinned = runner.thin_samples([float(i) for i in range(2500)], limit=1000)
    assert len(thinned) <= 1000 and thinned[:3] == [0.0, 3.0, 6.0] and thinned == sorted(thinned)


def test_summarize_matches_numpy():
    runner.require_modules("onnxruntime")
    samples = [float(v) for v in np.random.default_rng(1).gamma(4.0, 1.0, 500)]
    s = runner.summarize(samples)
    a = np.asarray(samples)
    assert s["iterations"] == 500
    assert s["p50_ms"] == pytest.approx(np.median(a), abs=1e-6)
    assert s["p99_ms"] == pytest.approx(np.percentile(a, 99), abs=1e-6)
    assert s["std_ms"] == pytest.approx(a.std(ddof=1), abs=1e-6)
    assert s["cov"] == pytest.approx(a.std(ddof=1) / a.mean(), abs=1e-6)


def test_debug_slowdown_is_flagged(artifacts: dict, tmp_path: Path):
    out = tmp_path / "r.json"
    proc = _run_cli(
        [
            "--artifact",
            str(artifacts["onnx"]),
            "--runtime",
            "onnxruntime",
            "--min-iters",
            "5",
            "--min-seconds",
            "0",
            "--warmup-seconds",
            "0",
            "--debug-slowdown",
            "0.5",
            "--out",
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert any("debug slowdown" in w for w in json.loads(out.read_text())["warnings"])
    assert "--debug-slowdown" not in _run_cli(["--help"]).stdout  # hidden from users


def test_jetson_parsers_and_environment(tmp_path: Path):
    # Constructed from the documented layout of /etc/nv_tegra_release and `nvpmodel -q`.
    release = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n"
    info = runner.parse_nv_tegra_release(release)
    assert info["l4t"] == "36.4.3" and info["board"] == "generic"
    assert runner.parse_nvpmodel("NV Power Mode: 15W\n1\n") == {"name": "15W", "id": 1}
    assert runner.parse_nvpmodel("NV Power Mode: MAXN_SUPER\n2") == {"name": "MAXN_SUPER", "id": 2}
    assert runner.parse_nvpmodel("garbage") == {}
    f = tmp_path / "nv_tegra_release"
    f.write_text(release)
    assert runner.jetson_info(str(f))["l4t"] == "36.4.3"
    assert runner.jetson_info(str(tmp_path / "absent")) is None


def test_cpu_affinity_is_applied_and_recorded(artifacts: dict):
    m = measure(artifacts["onnx"], "cpu", protocol=FAST, cpu_affinity=(0,))
    assert m.environment["cpu_affinity"] == [0]
    with pytest.raises(UserError, match="--cpu-affinity 4096"):
        measure(artifacts["onnx"], "cpu", protocol=FAST, cpu_affinity=(4096,))


def test_device_files_parse_as_python_38():
    """JetPack 5 ships Python 3.8: the files copied to devices must not use newer syntax."""
    import ast

    from deploy_targets.remote import REMOTE_FILES

    for path in REMOTE_FILES:
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 8))


def test_busy_neighbours_are_detected():
    """Another process spinning on the machine while we time: flagged even if we keep our core."""
    runner.require_modules("onnxruntime")
    if runner._busy_cpu_seconds() is None:
        pytest.skip("no /proc/stat on this system")

    class Quick(runner.Backend):
        name = "onnxruntime"

        def timed_step(self, batch):
            sum(range(2000))

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        proto = Protocol(0.0, 5, 0.3, 60.0, contention_retries=1, max_other_cpu=0.2)
        entry = runner.measure_latency(Quick(), np.zeros((1, 3, 2, 2), np.float32), 1, proto)
    finally:
        hog.kill()
        hog.wait()
    assert entry["others_cpu"] > 0.2 and entry["contended"] and entry["attempts"] == 2
