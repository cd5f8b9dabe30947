"""End to end: `python -m pipeline run` on digits, caching, gates, baselines, bundles, CLI exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dskd.errors import UserError
from pipeline.recipe import load_recipe
from pipeline.report import validate_report
from pipeline.run import execute
from tests.helpers.cli import set_args

REPO = Path(__file__).resolve().parents[1]

# A tiny but real budget: the student must learn, gates are set where such a student lands.
FAST = {
    "data.input_size": 16, "data.in_chans": 1,
    "teacher.model": "resnet14", "teacher.epochs": 8,
    "student.model": "resnet8", "student.epochs": 6, "student.method": "kd", "student.options": {},
    "target.min_iters": 30, "target.min_seconds": 0.2, "target.warmup_seconds": 0.05,
    "gates.min_top1": 50.0, "gates.max_top1_drop": 2.0, "gates.max_size_mb": 5.0, "gates.max_latency_ms": 1000.0,
}


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, CI="1", OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "base"
    report = execute(load_recipe("digits-smoke", FAST), run_dir)
    assert report["passed"], [g for g in report["gates"] if not g["passed"]]
    return run_dir


def _stage_states(run_dir: Path) -> dict[str, bool]:
    last = json.loads((run_dir / "last_run.json").read_text())
    return {n: s["cached"] for n, s in last["stages"].items()}


@pytest.mark.slow
def test_run_passes_and_writes_a_valid_report(base_run: Path):
    report = json.loads((base_run / "report.json").read_text())
    assert validate_report(report) == []
    assert report["schema_version"] == 1 and report["target"]["name"] == "cpu"
    fp32 = next(a for a in report["artifacts"] if a["precision"] == "fp32")
    int8 = next(a for a in report["artifacts"] if a["precision"] == "int8")
    assert fp32["top1"] == pytest.approx(report["student"]["top1"], abs=0.01)  # the ONNX is the student
    assert fp32["agreement"] == pytest.approx(100.0)
    assert int8["size_bytes"] < fp32["size_bytes"]
    for key in ("p50", "p90", "p99"):
        assert fp32["latency_ms"][key] > 0
    for name in ("report.md", "report.html", "gates.junit.xml", "plots/accuracy_vs_latency.png",
                 "plots/latency_distribution.png", "plots/training_curves.png", "bundle/cpu.tar.gz"):
        assert (base_run / name).exists(), name
    assert "PASSED" in (base_run / "report.md").read_text()


@pytest.mark.slow
def test_second_run_is_served_from_cache(base_run: Path):
    report = execute(load_recipe("digits-smoke", FAST), base_run)
    assert report["passed"]
    states = _stage_states(base_run)
    # Everything is cached but the report, which is rewritten so that it is always this run's verdict.
    assert {n for n, cached in states.items() if not cached} == {"report"}, states


@pytest.mark.slow
def test_changing_a_gate_reruns_only_gate_and_report(base_run: Path, tmp_path: Path):
    report = execute(load_recipe("digits-smoke", {**FAST, "gates.max_size_mb": 4.0}), base_run)
    states = _stage_states(base_run)
    assert {n for n, cached in states.items() if not cached} == {"gate", "report"}, states
    assert report["passed"]
    execute(load_recipe("digits-smoke", FAST), base_run)  # restore for the other tests


@pytest.mark.slow
def test_impossible_gate_exits_1_naming_it(base_run: Path, tmp_path: Path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(base_run, run_dir)  # a run folder can move: nothing in it depends on its path
    proc = cli("run", "--out", str(run_dir), *set_args({**FAST, "gates.min_top1": 100.0}))  # percent, at most 100: a 1-epoch model never reaches it
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "failed gates" in proc.stdout and "min_top1" in proc.stdout
    assert "FAILED" in proc.stdout
    assert "[distill] cached" in proc.stderr and "[gate] running" in proc.stderr


@pytest.mark.slow
def test_bundle_verifies_and_detects_tampering(base_run: Path, tmp_path: Path):
    import shutil
    import tarfile

    ok = cli("verify", str(base_run / "bundle" / "cpu.tar.gz"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    manifest = json.loads((base_run / "bundle" / "cpu" / "manifest.json").read_text())
    assert manifest["labels"] == [str(i) for i in range(10)]
    assert {"input_size", "in_chans", "mean", "std"} <= set(manifest["preprocessing"])
    assert any(f.endswith("infer.py") for f in manifest["files"])
    copy = tmp_path / "cpu"
    shutil.copytree(base_run / "bundle" / "cpu", copy)
    onnx = next(copy.glob("*.onnx"))
    onnx.write_bytes(onnx.read_bytes() + b"x")
    bad = cli("verify", str(copy))
    assert bad.returncode == 1 and "sha256 differs" in bad.stdout
    with tarfile.open(base_run / "bundle" / "cpu.tar.gz") as tar:
        assert all(not m.name.startswith(("/", "..")) for m in tar.getmembers())


@pytest.mark.slow
def test_example_inference_script_runs(base_run: Path, tmp_path: Path):
    from PIL import Image

    img = tmp_path / "digit.png"
    Image.new("L", (8, 8), 128).save(img)
    proc = subprocess.run([sys.executable, "infer.py", str(img)], cwd=base_run / "bundle" / "cpu",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] in [str(i) for i in range(10)]


@pytest.mark.slow
def test_gate_command_alone_and_junit(base_run: Path, tmp_path: Path):
    junit = tmp_path / "gates.xml"
    ok = cli("gate", str(base_run / "report.json"), "--junit", str(junit))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "<testsuite" in junit.read_text() and 'failures="0"' in junit.read_text()
    bad = cli("gate", str(base_run), "--set", "gates.max_size_mb=0.001")
    assert bad.returncode == 1 and "max_size_mb" in bad.stdout
    wrong = cli("gate", str(base_run), "--set", "gates.max_sise_mb=1")
    assert wrong.returncode == 2 and "max_size_mb" in wrong.stderr


@pytest.mark.slow
def test_baseline_catches_slowdown_and_accuracy_drop(base_run: Path, tmp_path: Path):
    # Candidate: a bigger student (about 3.4x the MACs of resnet8) trained for a single epoch.
    worse = {**FAST, "student.model": "resnet20", "student.epochs": 1,
             "gates.max_top1_regression": 1.0, "gates.max_latency_regression": 0.5,
             "gates.min_top1": 0.0, "gates.max_top1_drop": 100.0,
             "teacher.checkpoint": str(next((base_run / "stages").glob("teacher-*")) / "model.pt")}
    report = execute(load_recipe("digits-smoke", worse), tmp_path / "cand", baseline=str(base_run / "report.json"))
    assert not report["passed"]
    failed = {(g["name"], g["artifact"]) for g in report["gates"] if not g["passed"]}
    assert ("max_top1_regression", "onnxruntime/fp32") in failed
    assert ("max_latency_regression", "onnxruntime/fp32") in failed
    fp32 = next(a for a in report["artifacts"] if a["precision"] == "fp32")
    assert fp32["baseline_comparison"]["rounds"] >= 3
    same = cli("gate", str(base_run), "--baseline", str(base_run), "--set", "gates.max_top1_regression=0.0")
    assert same.returncode == 0, same.stdout  # a report never regresses against itself


@pytest.mark.slow
def test_jetson_without_device_records_not_measured(base_run: Path, tmp_path: Path):
    import shutil

    fast = FAST
    run_dir = tmp_path / "jetson"
    shutil.copytree(base_run, run_dir)  # same teacher, student and ONNX: only the target's stages run
    proc = cli("run", "--target", "jetson-orin", "--out", str(run_dir), *set_args(fast))
    assert proc.returncode == 1, proc.stdout + proc.stderr  # unmeasured latency fails by default
    assert "[distill] cached" in proc.stderr and "[export] cached" in proc.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["target"]["measured"] is False and report["target"]["reason"]
    shipped = [a for a in report["artifacts"] if a["shipped"]]
    assert shipped and all(not a["measured"] for a in shipped)
    onnx_int8 = next(a for a in report["artifacts"] if a["format"] == "onnx-int8")
    assert onnx_int8["top1"] is not None  # INT8 accuracy known before anything reaches a device
    assert any(p.name == "build_trtexec.sh" for p in run_dir.rglob("build_trtexec.sh"))
    allowed = cli("run", "--target", "jetson-orin", "--out", str(run_dir), "--allow-unmeasured", *set_args(fast))
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "--epochs", "3"], "unknown flag --epochs"),
    (["run", "--set", "student.epoch=3"], "did you mean 'student.epochs'"),
    (["run", "--set", "student.epochs=-1"], "student.epochs"),
    (["run", "--set", "gates.min_top1=\"high\""], "gates.min_top1"),
    (["run", "--target", "jetson-nano-xl"], "is not known"),
    (["run", "--recipe", "nope"], "recipe 'nope' not found"),
    (["run", "--force", "distil"], "not a stage"),
    (["run", "--set", "target.precision=int4"], "unknown key 'target.precision'"),
    (["run", "--set", "gates.min_accuracy=3"], "unknown key 'gates.min_accuracy'"),
])
@pytest.mark.slow
def test_bad_usage_exits_2_with_one_line(args: list[str], message: str, tmp_path: Path):
    proc = cli(*args, "--out", str(tmp_path / "r"), timeout=120) if args[0] == "run" and "--force" in args else cli(*args, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:") and message in lines[-1], proc.stderr
    assert not (tmp_path / "r" / "stages").exists()


CIFAR10 = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10.exists(), reason=f"{CIFAR10} not present (the project's CIFAR-10 archive)")
def test_cifar10_recipe_end_to_end_on_a_subset(tmp_path: Path):
    tiny = {"data.spec": str(CIFAR10), "data.limit_per_class": 30,
            "teacher.model": "resnet8", "teacher.epochs": 2, "teacher.precision": "fp32",
            "student.model": "resnet8", "student.epochs": 1, "student.precision": "fp32",
            "export.calib_size": 100,
            "target.min_iters": 30, "target.min_seconds": 0.2, "target.warmup_seconds": 0.05,
            "gates.min_top1": 0.0, "gates.max_top1_drop": 100.0, "gates.max_latency_ms": 1000.0}
    report = execute(load_recipe("cifar10-resnet", tiny), tmp_path / "c10")
    assert validate_report(report) == []
    assert report["recipe"]["name"] == "cifar10-resnet" and report["student"]["method"] == "dskd"
    assert report["passed"], [g for g in report["gates"] if not g["passed"]]
    manifest = json.loads((tmp_path / "c10" / "bundle" / "cpu" / "manifest.json").read_text())
    assert manifest["labels"] == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                  "ship", "truck"]
    assert manifest["preprocessing"]["input_size"] == 32 and manifest["preprocessing"]["in_chans"] == 3


def test_unreadable_baseline_or_manifest_is_one_line_naming_the_file(tmp_path: Path) -> None:
    from pipeline.bundle import MANIFEST, verify_bundle
    from pipeline.run import load_baseline

    bad = tmp_path / "report.json"
    bad.write_text('{"artifacts": [')
    with pytest.raises(UserError, match=rf"^--baseline {re.escape(str(bad))}: not valid JSON \("):
        load_baseline(str(tmp_path))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / MANIFEST).write_text("not json")
    with pytest.raises(UserError, match=rf"^{re.escape(str(bundle / MANIFEST))}: not valid JSON \("):
        verify_bundle(bundle)
