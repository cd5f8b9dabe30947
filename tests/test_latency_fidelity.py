"""The pipeline's batch-1 latency against the runtimes' own bound-tensor loops (issue 20).

The bound is generous (medians of interleaved rounds within 1.5x either way) so a busy,
shared machine does not make it flake; before inputs were bound once, OpenVINO's number
was 1.3-1.7x the runtime's own on a quiet machine. The precise comparison, row by row,
is bench/latency_fidelity.py (docs/benchmarks.md, "Latency fidelity").
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import warnings
from pathlib import Path

import pytest

from deploy_targets import Protocol, measure

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 5  # medians of 5 interleaved rounds: one disturbed round cannot decide
BOUND = 1.5


def load_bench():
    spec = importlib.util.spec_from_file_location("latency_fidelity", ROOT / "bench" / "latency_fidelity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The zoo's resnet8 (random weights) as ONNX: ~0.2 ms a call here, long enough that Python's
    per-call overhead and timer jitter do not decide the ratio as they would for a toy model."""
    import torch

    from dskd.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet8", 10).eval()
    path = tmp_path_factory.mktemp("fidelity") / "resnet8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False, opset_version=17,
        )  # fmt: skip
    return {"onnx": path}


def _interleaved(pipeline, reference) -> tuple[float, float]:
    pipe, ref = [], []
    for r in range(ROUNDS):  # the order alternates so a load change hits both sides
        for who in (("p", "r") if r % 2 == 0 else ("r", "p")):
            (pipe if who == "p" else ref).append(pipeline() if who == "p" else reference())
    return statistics.median(pipe), statistics.median(ref)


@pytest.mark.slow
def test_ort_pipeline_matches_an_iobinding_loop(tiny: dict, tmp_path: Path):
    bench = load_bench()
    proto = Protocol(warmup_seconds=0.2, min_iters=100, min_seconds=0.3, contention_retries=0)
    model = tiny["onnx"]

    def pipeline() -> float:
        return measure(model, "cpu", threads=1, protocol=proto).latency_at(1)["p50_ms"]

    def reference() -> float:
        return bench.reference_ms("iobinding-loop", model, 1, 0.3, tmp_path)

    p, r = _interleaved(pipeline, reference)
    assert 1 / BOUND < p / r < BOUND, f"pipeline {p:.4f} ms vs iobinding loop {r:.4f} ms"


@pytest.mark.slow
def test_openvino_pipeline_matches_benchmark_app(tiny: dict, tmp_path: Path):
    """OpenVINO reads the ONNX file directly; benchmark_app ships in the openvino wheel."""
    bench = load_bench()
    proto = Protocol(warmup_seconds=0.2, min_iters=100, min_seconds=0.3, contention_retries=0)
    model = tiny["onnx"]

    def pipeline() -> float:
        e = measure(model, "intel-cpu", threads=1, protocol=proto).latency_at(1)
        assert e["latency_kind"] == "runtime" and e["binding"] == "set_input_tensor"
        assert e["python_wall"]["p50_ms"] >= e["p50_ms"] * 0.9  # the wall clock includes the call
        return e["p50_ms"]

    def reference() -> float:
        return bench.reference_ms("benchmark_app", model, 1, 1.0, tmp_path)

    p, r = _interleaved(pipeline, reference)
    assert 1 / BOUND < p / r < BOUND, f"pipeline {p:.4f} ms vs benchmark_app {r:.4f} ms"


def test_benchmark_app_median_is_parsed_in_ms():
    bench = load_bench()
    assert bench.parse_benchmark_app_median("[ INFO ]    Median:        135.77 us\n") == pytest.approx(0.13577)
    assert bench.parse_benchmark_app_median("[ INFO ]    Median:        2.50 ms\n") == 2.5
    with pytest.raises(RuntimeError, match="no median"):
        bench.parse_benchmark_app_median("Count: 10 iterations")


def test_references_use_the_runners_own_settings(tmp_path: Path):
    """benchmark_app gets the runner's compile settings and the IOBinding loop its session
    options from the runner package itself, so a setting cannot differ between the sides."""
    from deploy_targets.remote.dskd_runner.backend_openvino import compile_config

    bench = load_bench()
    for threads, precision in ((1, "int8"), (2, "fp32")):
        cfg = json.loads(bench.write_ov_config(tmp_path / "ov.json", threads, precision).read_text())["CPU"]
        assert cfg == {k: str(v) for k, v in compile_config(threads, precision, "LATENCY", 1).items()}
        assert cfg["INFERENCE_NUM_THREADS"] == str(threads) and cfg["NUM_STREAMS"] == "1"
    assert "from dskd_runner.backend_ort import session_options" in bench.IOBINDING_LOOP
    cmd = bench.benchmark_app_command(Path("m.xml"), 2, tmp_path / "ov.json")
    assert cmd[cmd.index("-t") + 1] == "2"  # the same whole seconds as the pipeline's min_seconds


def test_bench_plan_is_validated_and_bounded(capsys: pytest.CaptureFixture):
    bench = load_bench()
    assert bench.main(["--models", "resnet9"]) == 2
    assert "error: --models resnet9: choose from" in capsys.readouterr().err
    assert bench.main(["--variants", "ORT INT4"]) == 2
    assert bench.main(["--threads", "0"]) == 2
    assert "error: --threads 0: expected counts >= 1 and/or 'all'" in capsys.readouterr().err
    assert bench.main(["--seconds", "0"]) == 2
    assert bench.main(["--max-minutes", "1"]) == 2  # the full plan takes longer: refused up front
    assert "lower --rounds/--seconds or raise --max-minutes" in capsys.readouterr().err
