"""TensorRT / Jetson paths that cannot run on this machine.

* trtexec command lines and the parsing of its --exportTimes / --exportProfile JSON and
  summary text, against samples CONSTRUCTED by hand from the format NVIDIA's trtexec
  writes (samples/common/sampleReporting.cpp); they are not captured from a real run.
* The runner's TensorRT code path, driven by a FAKE `tensorrt` + `pycuda.driver`
  (numpy pretending to be a GPU) so the plumbing — shapes, buffers, GPU vs host time,
  accuracy — runs here. The fakes are test doubles, not NVIDIA's libraries.
* A real engine run, skipped with the reason when tensorrt/pycuda/a GPU are absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import deploy_targets
from deploy_targets import get_target, measure
from deploy_targets.measure import resolve_where
from deploy_targets.remote.dskd_runner import trtexec_tools as tt
from dskd.errors import UserError
from tests.helpers.trtexec_samples import (
    EXPORT_PROFILE,
    EXPORT_TIMES,
    EXPORT_TIMES_OLD,
    SUMMARY_TRT8,
    SUMMARY_TRT10,
)

FAST = deploy_targets.Protocol(
    warmup_seconds=0.02, min_iters=15, min_seconds=0.05, contention_retries=0
)


def test_trtexec_command_line():
    args = tt.trtexec_command(
        "/d/model.fp16.engine", trtexec="/usr/src/tensorrt/bin/trtexec", input_name="input",
        input_shape=(8, 3, 32, 32), warmup_ms=500, duration_s=2.0, iterations=50,
        export_times="/d/times.json", export_profile="/d/profile.json",
    )  # fmt: skip
    assert args == [
        "/usr/src/tensorrt/bin/trtexec", "--loadEngine=/d/model.fp16.engine", "--warmUp=500", "--duration=2",
        "--iterations=50", "--avgRuns=1", "--shapes=input:8x3x32x32", "--useSpinWait",
        "--exportTimes=/d/times.json", "--exportProfile=/d/profile.json", "--separateProfileRun",
    ]  # fmt: skip
    plain = tt.trtexec_command("m.engine", use_spin_wait=False, use_cuda_graph=True)
    assert (
        "--useSpinWait" not in plain
        and "--useCudaGraph" in plain
        and not any(a.startswith("--shapes") for a in plain)
    )
    with pytest.raises(ValueError):
        tt.shape_spec("in put", (1, 3))


def test_parse_export_times_drops_warmup_and_keeps_both_clocks():
    trace = tt.parse_export_times(json.dumps(EXPORT_TIMES), warmup_ms=200)
    assert [t["compute_ms"] for t in trace] == [0.4, 0.5, 0.6]
    assert [t["latency_ms"] for t in trace] == [0.46, 0.58, 0.68]
    assert (
        trace[0]["h2d_ms"] == 0.04
        and trace[0]["d2h_ms"] == 0.02
        and trace[0]["end_to_end_ms"] == 0.52
    )
    assert len(tt.parse_export_times(json.dumps(EXPORT_TIMES))) == 4
    old = tt.parse_export_times(json.dumps(EXPORT_TIMES_OLD))
    assert old == [
        {"compute_ms": 0.8, "latency_ms": 1.0, "h2d_ms": 0.1, "d2h_ms": 0.1, "end_to_end_ms": 1.0}
    ]
    derived = tt.parse_export_times(json.dumps([{"computeMs": 1.0, "h2dMs": 0.25, "d2hMs": 0.25}]))
    assert derived[0]["latency_ms"] == 1.5
    with pytest.raises(ValueError):
        tt.parse_export_times('{"not": "a list"}')
    with pytest.raises(ValueError):
        tt.parse_export_times('[{"latencyMs": 1.0}]')


def test_parse_export_profile():
    prof = tt.parse_export_profile(json.dumps(EXPORT_PROFILE))
    assert prof["count"] == 120
    assert [layer["name"] for layer in prof["layers"]] == [
        "/c2/Conv + /Relu_1",
        "/c1/Conv + /Relu",
        "/fc/Gemm",
    ]
    assert prof["layers"][0] == {
        "name": "/c2/Conv + /Relu_1",
        "time_ms": 12.0,
        "average_ms": 0.1,
        "percentage": 60.0,
        "median_ms": 0.1,
    }
    assert "median_ms" not in prof["layers"][2]


def test_parse_summary_separates_gpu_compute_and_host_latency():
    s = tt.parse_summary(SUMMARY_TRT10)
    assert s["gpu_compute"] == {"min_ms": 0.399414, "max_ms": 0.821289, "mean_ms": 0.437012, "median_ms": 0.432129,
                                "p90_ms": 0.453125, "p95_ms": 0.464844, "p99_ms": 0.524414}  # fmt: skip
    assert s["host_latency"]["median_ms"] == 0.497803 and s["host_latency"]["p99_ms"] == 0.604004
    assert s["h2d"]["mean_ms"] == 0.0447754 and s["d2h"]["max_ms"] == 0.0419922 and "enqueue" in s
    assert (
        s["throughput_qps"] == 1987.25
        and s["host_walltime_s"] == 3.00164
        and s["total_gpu_compute_s"] == 2.60674
    )
    old = tt.parse_summary(SUMMARY_TRT8)
    assert old["host_latency"] == {"min_ms": 1.8, "max_ms": 2.9, "mean_ms": 1.95, "median_ms": 1.93, "p99_ms": 2.4}
    assert old["end_to_end"]["p99_ms"] == 2.9 and old["gpu_compute"]["median_ms"] == 1.83
    assert tt.parse_summary("no summary here") == {}


# --- FAKE tensorrt / pycuda / trtexec (test doubles): tests/fakes/trt_runtime.py, tests/fakes/trtexec.py


# `fake_gpu` (a FAKE engine, FAKE tensorrt/pycuda and a FAKE trtexec) is a fixture of tests/conftest.py.


def test_tensorrt_runner_path_with_fake_gpu(fake_gpu: dict, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYTHONPATH", str(fake_gpu["lib"]))
    m = measure(
        fake_gpu["engine"], "x86-gpu", eval_set=fake_gpu["eval"], batch_sizes=(1, 8), protocol=FAST
    )
    assert (m.runtime, m.precision, m.artifact_format) == ("tensorrt", "fp16", "trt-engine")
    assert m.accuracy["n"] == 40 and m.accuracy["correct"] == 32 and m.accuracy["agreement"] == 1.0
    for entry in m.latency:
        assert entry["latency_kind"] == "host"
        gpu = entry["gpu_compute"]
        assert gpu["iterations"] == entry["iterations"] >= FAST.min_iters
        assert gpu["p50_ms"] > 0  # GPU compute is part of the host latency, reported apart
    assert m.environment["gpu"] == "FAKE GPU" and m.environment["max_batch"] == 8
    assert m.environment["runtime_version"] == "0.0+fake"
    with pytest.raises(UserError, match="batch size 16 exceeds the engine's max batch 8"):
        measure(fake_gpu["engine"], "x86-gpu", batch_sizes=(16,), protocol=FAST)


def test_tensorrt_timing_with_trtexec(fake_gpu: dict, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYTHONPATH", str(fake_gpu["lib"]))
    proto = deploy_targets.Protocol(warmup_seconds=0.2, min_iters=3, min_seconds=0.0)
    m = measure(
        fake_gpu["engine"],
        "x86-gpu",
        precision="fp16",
        protocol=proto,
        trtexec=str(fake_gpu["trtexec"]),
        batch_sizes=(2,),
    )
    entry = m.latency_at(2)
    assert (
        entry["timed_by"] == "trtexec" and entry["iterations"] == 3
    )  # the warm-up query was dropped
    assert entry["p50_ms"] == pytest.approx(0.58) and entry["gpu_compute"][
        "p50_ms"
    ] == pytest.approx(0.5)
    assert entry["trtexec_summary"]["gpu_compute"]["median_ms"] == 0.432129


def test_corrupt_engine_is_a_one_line_error(
    fake_gpu: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("PYTHONPATH", str(fake_gpu["lib"]))
    bad = tmp_path / "other.engine"
    bad.write_bytes(b"\x00not an engine")
    with pytest.raises(deploy_targets.DeviceError, match="rebuild it on this device"):
        measure(bad, "x86-gpu", protocol=FAST, input_shape=(3, 8, 8))


def test_jetson_runs_locally_only_on_a_jetson(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import deploy_targets.registry as registry

    orin = get_target("jetson-orin")
    monkeypatch.setattr(registry, "JETSON_RELEASE_FILE", tmp_path / "absent")
    with pytest.raises(UserError, match="pass --device user@jetson"):
        resolve_where(orin, None)
    release = tmp_path / "nv_tegra_release"
    release.write_text(
        "# R35 (release), REVISION: 4.1, GCID: 1, BOARD: t186ref, EABI: aarch64, DATE: x\n"
    )
    monkeypatch.setattr(registry, "JETSON_RELEASE_FILE", release)
    assert resolve_where(orin, None) is None  # local run on the Jetson itself
    assert str(resolve_where(orin, "nvidia@orin:22")) == "nvidia@orin:22"


def _real_tensorrt_missing() -> str | None:
    for module in ("tensorrt", "pycuda.driver"):
        try:
            __import__(module)
        except Exception as exc:
            return f"{module} not importable here ({type(exc).__name__}): real TensorRT run skipped"
    if not (Path("/dev/nvidia0").exists() or Path("/dev/nvhost-ctrl-gpu").exists()):
        return "no NVIDIA GPU visible: real TensorRT run skipped"
    return None


@pytest.mark.skipif(_real_tensorrt_missing() is not None, reason=str(_real_tensorrt_missing()))
def test_real_tensorrt_engine(tmp_path: Path):  # pragma: no cover - needs a GPU
    import tensorrt as trt

    from tests.helpers.artifacts import build_tiny_artifacts

    art = build_tiny_artifacts(tmp_path, quantized=False)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    network = builder.create_network(
        0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    )
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(Path(art["onnx"]).read_bytes()), parser.get_error(0)
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 3, 16, 16), (8, 3, 16, 16), (64, 3, 16, 16))
    config.add_optimization_profile(profile)
    engine = tmp_path / "tiny.fp16.engine"
    engine.write_bytes(bytes(builder.build_serialized_network(network, config)))
    target = "jetson-orin" if deploy_targets.is_jetson() else "x86-gpu"
    m = measure(engine, target, eval_set=art["eval"], batch_sizes=(1, 8), protocol=FAST)
    assert m.accuracy["agreement"] >= 0.95
    assert all(e["gpu_compute"]["p50_ms"] > 0 for e in m.latency)
    assert os.path.basename(m.artifact) == "tiny.fp16.engine"
