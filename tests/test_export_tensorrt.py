"""TensorRT version handling, trtexec command lines and the generated build script.

TensorRT cannot be installed on this machine (no NVIDIA GPU). The script is run for real
with bash against `fake_trtexec`, a stand-in that records its arguments and writes the
engine file, so the script's version branches, checksum check and engine-info files
are exercised; the engine build itself is skipped with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
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

FAKE_TRTEXEC = """#!/usr/bin/env bash
# fake_trtexec: stands in for TensorRT's trtexec (not installable here)
echo "$@" >> "$FAKE_LOG"
for a in "$@"; do case "$a" in --saveEngine=*) echo fake-engine > "${a#--saveEngine=}";; esac; done
"""


@pytest.fixture()
def kit(tmp_path):
    for name in ("model.onnx", "model.int8.qdq.onnx"):
        (tmp_path / name).write_bytes(name.encode() * 10)
    sums = {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest()
            for n in ("model.onnx", "model.int8.qdq.onnx")}
    script = build_script(["fp16", "int8"], CHW, "model.onnx", "model.int8.qdq.onnx", sums)
    (tmp_path / "build_trtexec.sh").write_text(script)
    fake = tmp_path / "bin" / "fake_trtexec"
    fake.parent.mkdir()
    fake.write_text(FAKE_TRTEXEC)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return tmp_path, fake


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
