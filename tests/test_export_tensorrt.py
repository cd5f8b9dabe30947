"""TensorRT version handling, trtexec command lines and the generated build script.

TensorRT cannot be installed on this machine (no NVIDIA GPU). The script is run for real
with bash against `fake_trtexec` (tests/fakes/trtexec.py), a FAKE that records its arguments
and writes the engine file, so the script's version branches, checksum check and engine-info files
are exercised; the engine build itself is skipped with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dskd.errors import UserError
from export.tensorrt_build import calibration_cache_key, calibration_cache_name, tensorrt_status
from export.tensorrt_cmd import (
    SCRIPT_BRANCHES,
    TrtVersion,
    build_script,
    command_line,
    plan_build,
    trtexec_command,
)
from export.versions import have
from tests.fakes.device import fake_python
from tests.fakes.trtexec import fake_trtexec_recorder

CHW = (3, 32, 32)
V8_5, V8_6, V10, V11 = (TrtVersion(8, 5, 2), TrtVersion(8, 6, 1), TrtVersion(10, 3, 0),
                        TrtVersion(11, 0, 0))


@pytest.mark.parametrize("text, expected", [
    ("10.3.0", (10, 3, 0)),
    ("8.6.1", (8, 6, 1)),
    ("8.6.1.6", (8, 6, 1)),
    ("10.3.0.30-1+cuda12.5", (10, 3, 0)),
    ("TensorRT v100300", (10, 3, 0)),
    ("[TensorRT v8601] # trtexec", (8, 6, 1)),
    (100300, (10, 3, 0)),
    ("11", (11, 0, 0)),
])
def test_version_parse(text, expected):
    v = TrtVersion.parse(text)
    assert (v.major, v.minor, v.patch) == expected


def test_version_parse_rejects_garbage_and_orders():
    with pytest.raises(UserError):
        TrtVersion.parse("tensorrt")
    assert TrtVersion.parse("8.6.1") < TrtVersion.parse("10.3.0") < TrtVersion.parse("11.0")
    assert str(TrtVersion.parse("v100300")) == "10.3.0"


def test_fp16_flags_by_version():
    for v in (V8_5, V8_6, V10):
        argv = trtexec_command(v, "m.onnx", "m.engine", "fp16", CHW)
        assert "--fp16" in argv and "--int8" not in argv and "--stronglyTyped" not in argv
    argv = trtexec_command(V11, "m.fp16.onnx", "m.engine", "fp16", CHW)
    assert not {"--fp16", "--int8", "--best", "--stronglyTyped"} & set(argv)
    assert plan_build(V11, "fp16").needs_fp16_onnx
    assert not plan_build(V10, "fp16").needs_fp16_onnx


def test_int8_qdq_and_calibrator_by_version():
    argv = trtexec_command(V10, "q.onnx", "m.engine", "int8", CHW)
    assert "--int8" in argv and "--fp16" in argv and not any(a.startswith("--calib") for a in argv)
    argv = trtexec_command(V10, "m.onnx", "m.engine", "int8", CHW, int8_mode="calibrator",
                           calib_cache="c.cache")
    assert "--calib=c.cache" in argv and "--int8" in argv
    assert plan_build(V10, "int8", "calibrator").uses_calibrator
    argv = trtexec_command(V11, "q.onnx", "m.engine", "int8", CHW)
    assert "--int8" not in argv and "--calib" not in " ".join(argv)
    with pytest.raises(UserError, match="removed INT8 calibration"):
        trtexec_command(V11, "m.onnx", "m.engine", "int8", CHW, int8_mode="calibrator",
                        calib_cache="c.cache")
    with pytest.raises(UserError, match="calibration cache"):
        trtexec_command(V10, "m.onnx", "m.engine", "int8", CHW, int8_mode="calibrator")


def test_strongly_typed_and_best():
    argv = trtexec_command(V10, "q.onnx", "m.engine", "int8", CHW, strongly_typed=True)
    assert "--stronglyTyped" in argv and "--int8" not in argv
    with pytest.raises(UserError, match="TensorRT 10"):
        trtexec_command(V8_6, "q.onnx", "m.engine", "int8", CHW, strongly_typed=True)
    assert "--best" in trtexec_command(V10, "m.onnx", "m.engine", "int8", CHW, best=True)
    with pytest.raises(UserError, match="--best was removed"):
        trtexec_command(V11, "m.onnx", "m.engine", "int8", CHW, best=True)


def test_shapes_cache_pool_and_build_only():
    argv = trtexec_command(V10, "m.onnx", "out/m.engine", "fp16", (1, 28, 28),
                           batches=(1, 8, 32), timing_cache="t.cache", workspace_mib=512)
    assert argv[:3] == ["trtexec", "--onnx=m.onnx", "--saveEngine=out/m.engine"]
    assert "--minShapes=input:1x1x28x28" in argv
    assert "--optShapes=input:8x1x28x28" in argv
    assert "--maxShapes=input:32x1x28x28" in argv
    assert "--timingCacheFile=t.cache" in argv
    assert "--memPoolSize=workspace:512M" in argv and "--skipInference" in argv
    v86 = trtexec_command(V8_6, "m.onnx", "m.engine", "fp16", CHW, workspace_mib=512)
    assert "--memPoolSize=workspace:512" in v86 and "--skipInference" in v86
    v85 = trtexec_command(V8_5, "m.onnx", "m.engine", "fp16", CHW)
    assert "--buildOnly" in v85 and "--skipInference" not in v85
    v82 = trtexec_command(TrtVersion(8, 2, 1), "m.onnx", "m.engine", "fp16", CHW, workspace_mib=64)
    assert "--workspace=64" in v82
    assert "--timingCacheFile" not in " ".join(
        trtexec_command(V10, "m.onnx", "m.engine", "fp16", CHW, timing_cache=None))
    with pytest.raises(UserError, match="min <= opt <= max"):
        trtexec_command(V10, "m.onnx", "m.engine", "fp16", CHW, batches=(4, 2, 8))
    with pytest.raises(UserError):
        trtexec_command(V10, "m.onnx", "m.engine", "int4", CHW)
    assert command_line(["trtexec", "--onnx=a b.onnx"]) == "trtexec '--onnx=a b.onnx'"


def test_calibration_cache_key_covers_model_data_and_version():
    base = calibration_cache_key("a" * 64, "b" * 64, V10)
    assert base == calibration_cache_key("a" * 64, "b" * 64, TrtVersion.parse("10.3.0.30"))
    assert base != calibration_cache_key("c" * 64, "b" * 64, V10)
    assert base != calibration_cache_key("a" * 64, "d" * 64, V10)
    assert base != calibration_cache_key("a" * 64, "b" * 64, TrtVersion(10, 4, 0))
    assert calibration_cache_name("a" * 64, "b" * 64, V10) == f"calib-{base}.cache"


# --------------------------------------------------------------------------- the script

@pytest.fixture()
def kit(tmp_path):
    for name in ("model.onnx", "model.int8.qdq.onnx"):
        (tmp_path / name).write_bytes(name.encode() * 10)
    sums = {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest()
            for n in ("model.onnx", "model.int8.qdq.onnx")}
    script = build_script(["fp16", "int8"], CHW, "model.onnx", "model.int8.qdq.onnx", sums)
    (tmp_path / "build_trtexec.sh").write_text(script)
    return tmp_path, fake_trtexec_recorder(tmp_path / "bin" / "fake_trtexec")


def run_script(kit_dir: Path, fake: Path, version: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRTEXEC": str(fake), "TRT_VERSION": version,
           "FAKE_LOG": str(kit_dir / "calls.log")}
    return subprocess.run(["bash", str(kit_dir / "build_trtexec.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils sha256sum")
@pytest.mark.parametrize("version, fp16, int8", [
    ("10.3.0.30-1+cuda12.5", ["--fp16", "--memPoolSize=workspace:1024M"], ["--int8", "--fp16"]),
    ("8.6.2", ["--fp16", "--memPoolSize=workspace:1024", "--skipInference"], ["--int8"]),
    ("8.5.2", ["--fp16", "--buildOnly"], ["--int8", "--buildOnly"]),
])
def test_script_picks_flags_for_the_device_version(kit, version, fp16, int8):
    kit_dir, fake = kit
    proc = run_script(kit_dir, fake, version)
    assert proc.returncode == 0, proc.stderr
    calls = (kit_dir / "calls.log").read_text().splitlines()
    assert len(calls) == 2
    assert "--onnx=model.onnx" in calls[0].split() and set(fp16) <= set(calls[0].split())
    assert "--onnx=model.int8.qdq.onnx" in calls[1].split() and set(int8) <= set(calls[1].split())
    for p in ("fp16", "int8"):
        info = json.loads((kit_dir / f"model.{p}.engine.json").read_text())
        assert info["tensorrt_version"] == version and info["precision"] == p
        assert info["gpu_name"]
        assert (kit_dir / f"model.{p}.engine").exists()


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils sha256sum")
def test_script_on_tensorrt_11_builds_strongly_typed(kit):
    kit_dir, fake = kit
    proc = run_script(kit_dir, fake, "11.0.0", "int8")
    assert proc.returncode == 0, proc.stderr
    (call,) = (kit_dir / "calls.log").read_text().splitlines()
    assert "--int8" not in call.split() and "--onnx=model.int8.qdq.onnx" in call.split()
    script = (kit_dir / "build_trtexec.sh").read_text()
    assert "modelopt.onnx.autocast --onnx_path model.onnx --output_path model.fp16.onnx" in script


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils sha256sum")
def test_script_refuses_changed_inputs_and_unknown_precision(kit):
    kit_dir, fake = kit
    (kit_dir / "model.onnx").write_bytes(b"tampered")
    proc = run_script(kit_dir, fake, "10.3.0")
    assert proc.returncode != 0 and not (kit_dir / "calls.log").exists()
    (kit_dir / "model.onnx").write_bytes(b"model.onnx" * 10)
    proc = run_script(kit_dir, fake, "10.3.0", "fp8")
    assert proc.returncode == 2 and "unknown precision fp8" in proc.stderr


def test_script_branches_cover_every_major():
    patterns = [p for p, _, _ in SCRIPT_BRANCHES]
    assert patterns[-1] == "*"  # anything newer falls to the strongly typed branch
    assert [v.major for _, v, _ in SCRIPT_BRANCHES] == [8, 8, 10, 11]


# --------------------------------------------------------------------------- the build


def test_engine_build_skipped_with_reason_without_tensorrt(tmp_path):
    if have("tensorrt"):
        pytest.skip("TensorRT is installed: the real build runs in test_export on a GPU box")
    from export.tensorrt_build import build_engine

    version, why = tensorrt_status()
    assert version is None and "TensorRT is not installed" in why
    with pytest.raises(UserError, match="build_trtexec.sh"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", "fp16", CHW,
                     calib_x=np.zeros((1, *CHW), np.float32))
    assert not (tmp_path / "m.engine").exists()


# --------------------------------------------------------------------------- torch-tensorrt builder
# The build script (export/torch_trt.py) runs here with the REAL torch (torch.export of a real zoo
# model) and FAKE torch_tensorrt / tensorrt / modelopt packages (tests/fakes/torch_trt.py): what is
# tested is our script, its version checks, its arguments and its output, not torch-tensorrt.
TT_CHW = (1, 8, 8)


@pytest.fixture(scope="module")
def student_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from dskd.checkpoint import save_model
    from dskd.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=4, in_chans=TT_CHW[0])
    path = tmp_path_factory.mktemp("student") / "model.pt"
    save_model(path, model.state_dict(), {"model": "resnet8", "num_classes": 4, "class_names": list("abcd"),
                                          "input_size": TT_CHW[1], "in_chans": TT_CHW[0], "mean": [0.5],
                                          "std": [0.25]})
    return path


def _fake_lib(root: Path, **kw) -> Path:
    import torch

    from tests.fakes.torch_trt import write_fake_torch_trt_lib

    kw.setdefault("torch_tensorrt", torch.__version__.split("+")[0])  # the pair torch-tensorrt wants
    return write_fake_torch_trt_lib(root, **kw)


def _run_kit(kit_dir: Path, lib: Path, *args: str) -> subprocess.CompletedProcess:
    import sys

    env = {**os.environ, "PYTHONPATH": str(lib)}
    return subprocess.run([sys.executable, str(kit_dir / "build_torch_trt.py"), *args], capture_output=True,
                          text=True, env=env, timeout=300, check=False)


def test_torch_trt_builder_names_and_command():
    from export.torch_trt import build_command, check_builder, parse_result

    assert check_builder("Torch-TensorRT") == "torch-tensorrt" and check_builder("onnx") == "onnx"
    with pytest.raises(UserError, match="export.trt_builder 'trt': choose 'onnx' or 'torch-tensorrt'"):
        check_builder("trt")
    assert build_command("env X=1 python3", "int8", ep=True) == [
        "env", "X=1", "python3", "build_torch_trt.py", "--precision", "int8", "--out", "model.int8.engine",
        "--ep", "model.int8.ep"]
    with pytest.raises(UserError, match="precision 'fp32'"):
        build_command("python3", "fp32")
    line = '@@dskd-torch-trt {"engine_sha256": "ab", "precision": "fp16"}'
    assert parse_result(f"noise\n{line}\n")["precision"] == "fp16"
    with pytest.raises(UserError, match="printed no result line"):
        parse_result("Traceback ...\n@@dskd-torch-trt {not json")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_torch_trt_kit_exports_the_real_student(student_pt: Path, tmp_path: Path, precision: str):
    import torch

    from dskd.checkpoint import build_model
    from export.torch_trt import parse_result, write_kit

    calib = np.random.default_rng(0).integers(0, 256, (40, *TT_CHW), dtype=np.uint8)
    files = write_kit(student_pt, tmp_path / "kit", [precision], calib_x=calib, mean=[0.5], std=[0.25],
                      batches=(1, 2, 4), workspace_mib=64, device="cpu")
    names = sorted(p.name for p in files)
    assert names == sorted(["model.pt", "dskd_models.zip", "build_torch_trt.py"]
                           + (["calib.npz"] if precision == "int8" else []))
    proc = _run_kit(tmp_path / "kit", _fake_lib(tmp_path / "lib"), "--precision", precision)
    assert proc.returncode == 0, proc.stderr
    result = parse_result(proc.stdout)
    engine = tmp_path / "kit" / f"model.{precision}.engine"
    assert result["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    assert result["profile"] == {"min": 1, "opt": 2, "max": 4} and result["input_chw"] == list(TT_CHW)
    assert json.loads((tmp_path / "kit" / f"model.{precision}.engine.json").read_text()) == result
    fake = json.loads(engine.read_bytes())  # the FAKE converter's record of what it was given
    assert fake["shapes"] == [[1, *TT_CHW], [2, *TT_CHW], [4, *TT_CHW]]
    want = ["torch.float16"] + (["torch.int8"] if precision == "int8" else [])
    assert fake["precisions"] == want and fake["workspace_size"] == 64 << 20
    # the exported program (dynamic batch 1..4) computes what the student computes
    model, _ = build_model(student_pt)
    for key in ("min_shape", "max_shape"):
        batch, logits = fake["outputs"][key]
        x = torch.randn(batch, *TT_CHW, generator=torch.Generator().manual_seed(0))
        assert np.allclose(np.asarray(logits), model(x).detach().numpy(), atol=1e-4)


@pytest.mark.slow
def test_torch_trt_script_refuses_bad_versions_and_missing_modelopt(student_pt: Path, tmp_path: Path):
    from export.torch_trt import write_kit

    calib = np.zeros((4, *TT_CHW), dtype=np.uint8)
    write_kit(student_pt, tmp_path / "kit", ["fp16", "int8"], calib_x=calib, mean=[0.5], std=[0.25],
              batches=(1, 2, 4), device="cpu")
    proc = _run_kit(tmp_path / "kit", _fake_lib(tmp_path / "old", torch_tensorrt="2.6.0"), "--precision", "fp16")
    assert proc.returncode == 2 and "torch-tensorrt 2.6.0 needs torch 2.6" in proc.stderr
    proc = _run_kit(tmp_path / "kit", _fake_lib(tmp_path / "nomo", modelopt=False), "--precision", "int8")
    assert proc.returncode == 3 and "pip install nvidia-modelopt" in proc.stderr
    assert not (tmp_path / "kit" / "model.int8.engine").exists()
    with pytest.raises(UserError, match="int8 needs calibration images"):
        write_kit(student_pt, tmp_path / "k2", ["int8"], device="cpu")


@pytest.mark.slow
def test_engine_build_with_the_torch_trt_builder(student_pt: Path, tmp_path: Path):
    """build_engines(builder="torch-tensorrt") on 'this device': no trtexec needed, the TensorRT
    version comes from python's (FAKE) tensorrt, the engine is cached under a builder-specific key."""
    from deploy_targets.engine_build import build_engines
    from export.torch_trt import write_kit

    kit = write_kit(student_pt, tmp_path / "kit", ["fp16"], batches=(1, 2, 4), device="cpu")
    lib = _fake_lib(tmp_path / "lib")
    python = fake_python(lib)
    cache = tmp_path / "cache"
    common = dict(out_dir=tmp_path / "out", remote_python=python, timeout_s=300, builder="torch-tensorrt",
                  cache_dir=str(cache), trtexec=str(tmp_path / "no-trtexec-here"))
    built = build_engines(kit, ["fp16"], None, **common)["fp16"]
    assert built.tensorrt_version == "10.14.1" and built.cached is False
    info = json.loads(built.info_path.read_text())
    assert info["cache"]["builder"] == "torch-tensorrt" and info["build_script_info"]["builder"] == "torch-tensorrt"
    assert json.loads(built.local_engine_path.read_bytes())["fake_engine"] is True
    again = build_engines(kit, ["fp16"], None, **common)["fp16"]
    assert again.cached is True and again.sha256 == built.sha256
    assert (cache / again.cache_key / "model.fp16.engine").is_file()
    with pytest.raises(UserError, match="kit lacks build_torch_trt.py"):
        build_engines([p for p in kit if p.name != "build_torch_trt.py"], ["fp16"], None, **common)


@pytest.mark.slow
def test_trt_check_records_what_is_absent(tmp_path: Path):
    """bench/trt_check.py (the prepared engine-path check for a CUDA machine) run here, where neither
    TensorRT nor torch-tensorrt can be imported: every check is recorded as not run, with why."""
    import sys

    if have("tensorrt") or have("torch_tensorrt"):
        pytest.skip("TensorRT or torch-tensorrt is importable here: the check would run them for real")
    repo = Path(__file__).resolve().parents[1]
    results = tmp_path / "trt_check.json"
    proc = subprocess.run([sys.executable, str(repo / "bench" / "trt_check.py"), "--work", str(tmp_path / "w"),
                           "--results", str(results)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(results.read_text())
    env = report["environment"]
    assert env["modules"]["tensorrt"]["present"] is False and env["modules"]["torch_tensorrt"]["present"] is False
    assert "ModuleNotFoundError" in env["modules"]["tensorrt"]["error"]
    assert set(report["checks"]) == {"onnx-builder", "torch-tensorrt-builder", "torch-tensorrt-ep"}
    for name, check in report["checks"].items():
        assert check["ran"] is False and "needs CUDA" in check["why"], (name, check)


@pytest.mark.slow
def test_torch_trt_ep_is_built_by_the_kit_and_measured_through_torch_tensorrt_load(student_pt: Path,
                                                                                    tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch):
    """The optional Torch-TensorRT ExportedProgram: `build_torch_trt.py --ep` writes model.fp16.ep
    (FAKE torch_tensorrt.compile/save: the REAL exported graph, no TensorRT) and the runner measures
    it through `torch_tensorrt.load` (FAKE: torch.export.load): it predicts what the student does."""
    import torch

    from deploy_targets import Protocol, measure, write_eval_npz
    from dskd.checkpoint import build_model
    from export.torch_trt import build_command, ep_file, write_kit

    write_kit(student_pt, tmp_path / "kit", ["fp16"], batches=(1, 2, 4), device="cpu")
    lib = _fake_lib(tmp_path / "lib")
    argv = build_command("python3", "fp16", ep=True)[1:]  # ['build_torch_trt.py', '--precision', ...]
    proc = _run_kit(tmp_path / "kit", lib, *argv[1:])
    assert proc.returncode == 0, proc.stderr
    ep = tmp_path / "kit" / ep_file("fp16")
    assert ep.is_file()
    model, _ = build_model(student_pt)
    x = np.random.default_rng(1).integers(0, 256, (20, *TT_CHW), dtype=np.uint8)
    with torch.no_grad():
        ref = model(torch.from_numpy(((x / 255.0 - 0.5) / 0.25).astype(np.float32))).argmax(1).numpy()
    ev = write_eval_npz(tmp_path / "eval.npz", x, ref, [0.5], [0.25], ref_pred=ref)
    monkeypatch.setenv("PYTHONPATH", str(lib))
    m = measure(ep, "x86-gpu", eval_set=ev, precision="fp16", batch_sizes=(1, 4), eval_batch_size=4,  # profile max
                protocol=Protocol(warmup_seconds=0.02, min_iters=10, min_seconds=0.05, contention_retries=0))
    assert (m.runtime, m.artifact_format) == ("torch-tensorrt", "torch-trt-ep")
    assert m.accuracy["n"] == 20 and m.accuracy["agreement"] == 1.0
    assert [e["batch_size"] for e in m.latency] == [1, 4]  # the .ep keeps the kit's dynamic batch


@pytest.mark.slow
def test_torch_tensorrt_builder_never_builds_onnx_engines_here(student_pt: Path, tmp_path: Path):
    """With export.trt_builder = "torch-tensorrt" (ExportOptions.trt_build_here=False) the export writes
    only the ONNX device kit and says the engines come from torch-tensorrt on the target, even on a
    machine with TensorRT, where it would otherwise build them from the ONNX itself."""
    from export.api import export_all

    with pytest.warns(UserWarning, match="synthetic noise images"):  # (no test images given: not the point here)
        manifest = export_all(student_pt, tmp_path / "out", formats=["tensorrt-fp16"], trt_build_here=False)
    assert [a.format for a in manifest.artifacts if a.format.startswith("tensorrt")] == []
    (skipped,) = [s for s in manifest.skipped if s.format == "tensorrt-fp16"]
    assert "torch-tensorrt builder" in skipped.reason and skipped.prepared


def test_a_rejected_int8_leaves_a_kit_that_builds_fp16(tmp_path: Path, digits_rgb, digits_checkpoint):
    """Before: the INT8 Q/DQ ONNX failed its parity check AFTER build_trtexec.sh was written with its
    checksum, so the shipped kit listed a file it did not hold: `sha256sum -c` failed on the device for
    fp16 too, and `pipeline run --target jetson-orin` crashed writing the bundle (FileNotFoundError)."""
    from export.api import export_all
    from export.parity import DEFAULT_TOLERANCES, Tolerance
    from pipeline.bundle import _script_inputs

    strict = {**DEFAULT_TOLERANCES, "int8": Tolerance(max_rel_diff=0.0, min_top1_agreement=1.0)}
    manifest = export_all(digits_checkpoint, tmp_path, formats=["tensorrt-fp16", "tensorrt-int8"],
                          calib=digits_rgb, on_parity_failure="reject", tolerances=strict)
    skipped = {s.format: s for s in manifest.skipped}
    assert (skipped["tensorrt-int8"].details or {}).get("rejected"), skipped
    script = tmp_path / "tensorrt" / "build_trtexec.sh"
    text = script.read_text()
    assert "build_int8" not in text and "model.int8.qdq.onnx" not in text
    assert all((script.parent / n).is_file() for n in _script_inputs(script)) and _script_inputs(script)
    assert not (tmp_path / "tensorrt" / "model.int8.qdq.onnx").exists()
