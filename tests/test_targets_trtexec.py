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
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

import deploy_targets
from deploy_targets import get_target, measure, write_eval_npz
from deploy_targets.measure import resolve_where
from deploy_targets.remote import trtexec_tools as tt
from dskd.errors import UserError

FAST = deploy_targets.Protocol(
    warmup_seconds=0.02, min_iters=15, min_seconds=0.05, contention_retries=0
)

# --- CONSTRUCTED samples (format of trtexec 8.6/10; values invented) -----------------
EXPORT_TIMES = [
    # warm-up query: compute starts before --warmUp=200 ms, so it is dropped
    {"startEnqMs": 10.0, "endEnqMs": 10.1, "startH2dMs": 10.0, "endH2dMs": 10.05, "startComputeMs": 10.1,
     "endComputeMs": 10.6, "startD2hMs": 10.6, "endD2hMs": 10.62, "h2dMs": 0.05, "computeMs": 0.5,
     "d2hMs": 0.02, "latencyMs": 0.57, "endToEndMs": 0.62},
    {"startEnqMs": 201.0, "endEnqMs": 201.1, "startH2dMs": 201.0, "endH2dMs": 201.04, "startComputeMs": 201.1,
     "endComputeMs": 201.5, "startD2hMs": 201.5, "endD2hMs": 201.52, "h2dMs": 0.04, "computeMs": 0.4,
     "d2hMs": 0.02, "latencyMs": 0.46, "endToEndMs": 0.52},
    {"startEnqMs": 202.0, "endEnqMs": 202.1, "startH2dMs": 202.0, "endH2dMs": 202.05, "startComputeMs": 202.1,
     "endComputeMs": 202.6, "startD2hMs": 202.6, "endD2hMs": 202.63, "h2dMs": 0.05, "computeMs": 0.5,
     "d2hMs": 0.03, "latencyMs": 0.58, "endToEndMs": 0.63},
    {"startEnqMs": 203.0, "endEnqMs": 203.1, "startH2dMs": 203.0, "endH2dMs": 203.06, "startComputeMs": 203.1,
     "endComputeMs": 203.7, "startD2hMs": 203.7, "endD2hMs": 203.72, "h2dMs": 0.06, "computeMs": 0.6,
     "d2hMs": 0.02, "latencyMs": 0.68, "endToEndMs": 0.72},
]  # fmt: skip

# Older trtexec (7.x) named the transfers In/Out and had no latencyMs derivation change.
EXPORT_TIMES_OLD = [{"startInMs": 300.0, "endInMs": 300.1, "startComputeMs": 300.1, "endComputeMs": 300.9,
                     "startOutMs": 300.9, "endOutMs": 301.0, "inMs": 0.1, "computeMs": 0.8, "outMs": 0.1,
                     "latencyMs": 1.0, "endToEndMs": 1.0}]  # fmt: skip

EXPORT_PROFILE = [
    {"count": 120},
    {
        "name": "/c1/Conv + /Relu",
        "timeMs": 6.0,
        "averageMs": 0.05,
        "medianMs": 0.049,
        "percentage": 30.0,
    },
    {
        "name": "/c2/Conv + /Relu_1",
        "timeMs": 12.0,
        "averageMs": 0.1,
        "medianMs": 0.1,
        "percentage": 60.0,
    },
    {"name": "/fc/Gemm", "timeMs": 2.0, "averageMs": 0.0167, "percentage": 10.0},
]

SUMMARY_TRT10 = """\
[01/15/2025-10:02:11] [I] === Performance summary ===
[01/15/2025-10:02:11] [I] Throughput: 1987.25 qps
[01/15/2025-10:02:11] [I] Latency: min = 0.459961 ms, max = 0.912109 ms, mean = 0.502197 ms, median = 0.497803 ms, percentile(90%) = 0.521973 ms, percentile(95%) = 0.536133 ms, percentile(99%) = 0.604004 ms
[01/15/2025-10:02:11] [I] Enqueue Time: min = 0.0878906 ms, max = 0.228516 ms, mean = 0.103271 ms, median = 0.0998535 ms, percentile(90%) = 0.114258 ms, percentile(95%) = 0.121094 ms, percentile(99%) = 0.149414 ms
[01/15/2025-10:02:11] [I] H2D Latency: min = 0.0405273 ms, max = 0.0783691 ms, mean = 0.0447754 ms, median = 0.0441895 ms, percentile(90%) = 0.0478516 ms, percentile(95%) = 0.0495605 ms, percentile(99%) = 0.0561523 ms
[01/15/2025-10:02:11] [I] GPU Compute Time: min = 0.399414 ms, max = 0.821289 ms, mean = 0.437012 ms, median = 0.432129 ms, percentile(90%) = 0.453125 ms, percentile(95%) = 0.464844 ms, percentile(99%) = 0.524414 ms
[01/15/2025-10:02:11] [I] D2H Latency: min = 0.0161133 ms, max = 0.0419922 ms, mean = 0.0204102 ms, median = 0.0195312 ms, percentile(90%) = 0.0227051 ms, percentile(95%) = 0.0239258 ms, percentile(99%) = 0.0290527 ms
[01/15/2025-10:02:11] [I] Total Host Walltime: 3.00164 s
[01/15/2025-10:02:11] [I] Total GPU Compute Time: 2.60674 s
[01/15/2025-10:02:11] [I] Explanations of the performance metrics are printed in the verbose logs.
"""

# trtexec 8.x prints one percentile and an End-to-End line, without timestamps when piped.
SUMMARY_TRT8 = """\
[I] Throughput: 512.5 qps
[I] Latency: min = 1.8 ms, max = 2.9 ms, mean = 1.95 ms, median = 1.93 ms, percentile(99%) = 2.4 ms
[I] End-to-End Host Latency: min = 1.9 ms, max = 3.5 ms, mean = 2.1 ms, median = 2.05 ms, percentile(99%) = 2.9 ms
[I] GPU Compute Time: min = 1.7 ms, max = 2.7 ms, mean = 1.85 ms, median = 1.83 ms, percentile(99%) = 2.3 ms
[I] Total GPU Compute Time: 1.85 s
"""


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
    assert s["gpu_compute"] == {
        "min_ms": 0.399414,
        "max_ms": 0.821289,
        "mean_ms": 0.437012,
        "median_ms": 0.432129,
        "p90_ms": 0.453125,
        "p95_ms": 0.464844,
        "p99_ms": 0.524414,
    }
    assert s["host_latency"]["median_ms"] == 0.497803 and s["host_latency"]["p99_ms"] == 0.604004
    assert s["h2d"]["mean_ms"] == 0.0447754 and s["d2h"]["max_ms"] == 0.0419922 and "enqueue" in s
    assert (
        s["throughput_qps"] == 1987.25
        and s["host_walltime_s"] == 3.00164
        and s["total_gpu_compute_s"] == 2.60674
    )
    old = tt.parse_summary(SUMMARY_TRT8)
    assert old["host_latency"] == {
        "min_ms": 1.8,
        "max_ms": 2.9,
        "mean_ms": 1.95,
        "median_ms": 1.93,
        "p99_ms": 2.4,
    }
    assert old["end_to_end"]["p99_ms"] == 2.9 and old["gpu_compute"]["median_ms"] == 1.83
    assert tt.parse_summary("no summary here") == {}


# --- FAKE tensorrt / pycuda / trtexec (test doubles) ----------------------------------

FAKE_TENSORRT = '''
"""FAKE tensorrt for tests (NOT NVIDIA's): the TRT >= 8.5 name-based API over numpy.
The 'engine' file is JSON: logits = global-average-pool(x) @ w.T, input (-1, C, H, W)."""
import json
import numpy as np
import pycuda.driver as _cuda

__version__ = "0.0+fake"

class Logger:
    WARNING = 2
    def __init__(self, level):
        self.level = level

class TensorIOMode:
    INPUT = "INPUT"
    OUTPUT = "OUTPUT"

def nptype(dtype):
    return np.dtype(dtype).type

class Runtime:
    def __init__(self, logger):
        pass
    def deserialize_cuda_engine(self, blob):
        try:
            return _Engine(json.loads(blob))
        except ValueError:
            return None

class _Engine:
    num_io_tensors = 2
    num_optimization_profiles = 1
    def __init__(self, spec):
        self.w = np.asarray(spec["w"], np.float32)
        self.chw = tuple(spec["chw"])
        self.max_batch = spec["max_batch"]
    def get_tensor_name(self, i):
        return ("input", "logits")[i]
    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name == "input" else TensorIOMode.OUTPUT
    def get_tensor_shape(self, name):
        return (-1, *self.chw) if name == "input" else (-1, self.w.shape[0])
    def get_tensor_dtype(self, name):
        return "float32"
    def get_tensor_profile_shape(self, name, profile):
        return [(1, *self.chw), (1, *self.chw), (self.max_batch, *self.chw)]
    def create_execution_context(self):
        return _Context(self)

class _Context:
    def __init__(self, engine):
        self.engine, self.shape, self.addr = engine, None, {}
    def set_input_shape(self, name, shape):
        if shape[0] > self.engine.max_batch or tuple(shape[1:]) != self.engine.chw:
            return False
        self.shape = tuple(shape)
        return True
    def get_tensor_shape(self, name):
        return (self.shape[0], self.engine.w.shape[0])
    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr
    def execute_async_v3(self, stream_handle):
        x = _cuda._MEM[self.addr["input"]].view(np.float32).reshape(self.shape)
        logits = x.mean(axis=(2, 3)) @ self.engine.w.T
        _cuda._MEM[self.addr["logits"]][:] = logits.astype(np.float32).reshape(-1).view(np.uint8)
        return True
'''

FAKE_PYCUDA_DRIVER = '''
"""FAKE pycuda.driver for tests (NOT the real pycuda): host arrays pretend to be GPU memory."""
import itertools
import time
import numpy as np

_MEM = {}
_IDS = itertools.count(4096, 4096)

def init():
    pass

def get_driver_version():
    return 12040

class _Ctx:
    def pop(self):
        pass

class Device:
    def __init__(self, index):
        self.index = index
    def make_context(self):
        return _Ctx()
    def name(self):
        return "FAKE GPU"
    def compute_capability(self):
        return (8, 7)

class Stream:
    handle = 0
    def synchronize(self):
        pass

class Event:
    def record(self, stream=None):
        self.t = time.perf_counter()
    def time_till(self, other):
        return (other.t - self.t) * 1e3

class _Alloc:
    def __init__(self, nbytes):
        self.ptr = next(_IDS)
        _MEM[self.ptr] = np.zeros(nbytes, np.uint8)
    def __int__(self):
        return self.ptr
    def free(self):
        _MEM.pop(self.ptr, None)

def pagelocked_empty(shape, dtype):
    return np.empty(shape, dtype)

def mem_alloc(nbytes):
    return _Alloc(nbytes)

def memcpy_htod_async(dst, src, stream=None):
    _MEM[int(dst)][:] = np.ascontiguousarray(src).reshape(-1).view(np.uint8)

def memcpy_dtoh_async(dst, src, stream=None):
    dst.reshape(-1).view(np.uint8)[:] = _MEM[int(src)]
'''

FAKE_TRTEXEC = '''#!{python}
"""FAKE trtexec for tests (NOT NVIDIA's): writes the constructed --exportTimes sample and
prints the constructed summary, after checking the flags the runner passes."""
import sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
flags = [a for a in sys.argv[1:] if "=" not in a]
assert "loadEngine" in args and "shapes" in args and "--useSpinWait" in flags, sys.argv
open(args["exportTimes"], "w").write({times!r})
sys.stdout.write({summary!r})
'''


def write_fake_tensorrt_lib(lib: Path) -> Path:
    """A PYTHONPATH folder with the FAKE `tensorrt` and `pycuda` packages above."""
    (lib / "tensorrt").mkdir(parents=True)
    (lib / "pycuda").mkdir()
    (lib / "tensorrt" / "__init__.py").write_text(FAKE_TENSORRT)
    (lib / "pycuda" / "__init__.py").write_text('"""FAKE pycuda package for tests."""\n')
    (lib / "pycuda" / "driver.py").write_text(FAKE_PYCUDA_DRIVER)
    return lib


@pytest.fixture(scope="module")
def fake_gpu(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("fake_gpu")
    lib = write_fake_tensorrt_lib(root / "lib")
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    engine = root / "model.fp16.engine"
    engine.write_text(json.dumps({"w": w.tolist(), "chw": [3, 8, 8], "max_batch": 8}))
    x = rng.integers(0, 256, (40, 3, 8, 8), dtype=np.uint8)
    mean, std = np.array([0.5, 0.5, 0.5], np.float32), np.array([0.25, 0.25, 0.25], np.float32)
    xn = (x.astype(np.float32) / 255 - mean.reshape(1, 3, 1, 1)) / std.reshape(1, 3, 1, 1)
    ref = (xn.mean(axis=(2, 3)) @ w.T).argmax(1)
    y = ref.copy()
    y[:8] = (y[:8] + 1) % 4
    eval_path = write_eval_npz(root / "eval.npz", x, y, mean, std, ref_pred=ref)
    trtexec = root / "trtexec"
    trtexec.write_text(
        FAKE_TRTEXEC.format(
            python=sys.executable, times=json.dumps(EXPORT_TIMES), summary=SUMMARY_TRT10
        )
    )
    trtexec.chmod(trtexec.stat().st_mode | stat.S_IXUSR)
    return {"lib": lib, "engine": engine, "eval": eval_path, "trtexec": trtexec}


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

    from tests.test_targets_runner import build_tiny_artifacts

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
