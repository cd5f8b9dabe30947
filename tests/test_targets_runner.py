"""The runner (local, real ONNX Runtime and OpenVINO) and measure() on local targets."""

from __future__ import annotations

import json
import subprocess
import sys
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
from deploy_targets.remote import runner
from deploy_targets.remote.dskd_runner import timing
from dskd.errors import UserError
from tests.helpers.artifacts import MEAN, N_EVAL, STD, build_tiny_artifacts
from tests.helpers.artifacts import run_runner_cli as _run_cli

# contention_retries=0: these tests check plumbing, not timing, so a busy machine need not rerun
FAST = Protocol(warmup_seconds=0.05, min_iters=20, min_seconds=0.2, contention_retries=0)

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


def test_runner_cli_protocol_and_accuracy(artifacts: dict, tmp_path: Path):
    out = tmp_path / "r.json"
    proc = _run_cli([
        "--artifact", str(artifacts["onnx"]), "--runtime", "onnxruntime", "--eval", str(artifacts["eval"]),
        "--threads", "1", "--batch-sizes", "1,3",
        "--protocol", Protocol(warmup_seconds=0.05, min_iters=25, min_seconds=0.1).to_json(), "--out", str(out),
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
            "--protocol",
            '{"min_iters": 5, "min_seconds": 0, "warmup_seconds": 0}',
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
    if timing.busy_cpu_seconds() is None:
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


def test_protocol_travels_as_one_json_document(artifacts: dict, tmp_path: Path):
    """The timing protocol is one JSON document whose keys are Protocol's fields (declared once);
    unknown keys, wrong types and broken JSON are one-line usage errors (exit 2)."""
    from dataclasses import fields

    proto = Protocol(0.1, 7, 0.0, 9.0, 0.3, 0.5, 1, 0.4)
    assert Protocol.from_json(proto.to_json()) == proto
    assert set(json.loads(proto.to_json())) == {f.name for f in fields(Protocol)}
    out = tmp_path / "r.json"
    base = ["--artifact", str(artifacts["onnx"]), "--runtime", "onnxruntime", "--out", str(out)]
    for doc, message in (('{"min_iter": 5}', "unknown key(s) min_iter; known: warmup_seconds"),
                         ('{"min_iters": "5"}', "min_iters must be a number, got '5'"),
                         ('{"min_iters": 2.5}', "min_iters must be a number"),
                         ("min_iters=5", "--protocol is not JSON")):  # fmt: skip
        proc = _run_cli([*base, "--protocol", doc])
        assert proc.returncode == runner.EXIT_USAGE, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("runner-error: usage:") and message in lines[0]
        assert not out.exists()
    proc = _run_cli([*base, "--protocol", '{"min_iters": 5, "min_seconds": 0, "warmup_seconds": 0}'])
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["protocol"] == dict(Protocol().to_dict(), min_iters=5, min_seconds=0.0, warmup_seconds=0.0)
    assert res["runner_version"] == runner.RUNNER_VERSION == 5


def test_staged_runner_runs_on_its_own(artifacts: dict, tmp_path: Path):
    """What the device gets: runner.py + dskd_runner.zip (deterministic bytes), nothing else
    from this repository; run isolated (-I: no PYTHONPATH, no current folder on the path)."""
    import shutil

    from deploy_targets.remote import package_zip_bytes, stage_runner

    assert package_zip_bytes() == package_zip_bytes()
    files = stage_runner(tmp_path)
    assert [f.name for f in files] == ["runner.py", "dskd_runner.zip"]
    model = shutil.copy(artifacts["onnx"], tmp_path / "m.onnx")
    proc = subprocess.run(
        [sys.executable, "-I", "runner.py", "--artifact", str(model), "--runtime", "onnxruntime",
         "--protocol", '{"min_iters": 3, "min_seconds": 0, "warmup_seconds": 0}', "--out", "r.json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["latency"][0]["iterations"] >= 3
