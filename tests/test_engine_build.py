"""Building TensorRT engines where they run (over a real sshd, or locally), then measuring them.

TensorRT cannot exist here, so the device side uses TEST DOUBLES, clearly named:
* a FAKE `trtexec` (tests/fakes/trtexec.py) that prints trtexec's version banner, checks the
  flags build_trtexec.sh passes and writes a FAKE engine (JSON) where --saveEngine says;
* the FAKE `tensorrt` / `pycuda.driver` modules of tests/fakes/trt_runtime.py, which run
  that JSON "engine" with numpy inside the real runner.
Everything else is real: the kit's build_trtexec.sh from export.tensorrt_cmd, bash, sshd,
ssh/scp, the runner, and the pipeline's stages.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from deploy_targets import DeviceError, Protocol, measure, write_eval_npz
from deploy_targets.engine_build import TRTEXEC_CANDIDATES, build_engines
from dskd.errors import UserError
from export.tensorrt_cmd import build_script
from tests._sshd import Sshd
from tests.fakes import write_exe
from tests.fakes.device import fake_python, needs_sshd
from tests.fakes.trt_runtime import write_fake_tensorrt_lib
from tests.fakes.trtexec import fake_nvidia_smi, fake_trtexec_build

pytestmark = pytest.mark.timeout(180)

FAST = Protocol(warmup_seconds=0.02, min_iters=15, min_seconds=0.05, contention_retries=0)
CHW = (3, 8, 8)
CLASSES = 4

def _tiny_onnx(path: Path) -> None:
    """input N×3×8×8 -> GlobalAveragePool -> Flatten -> Gemm -> logits N×4 (a real ONNX model)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.linspace(-1, 1, CLASSES * CHW[0], dtype=np.float32).reshape(CLASSES, CHW[0]), "w")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
         helper.make_node("Gemm", ["f", "w"], ["logits"], transB=1)],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *CHW])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The kit (real build_trtexec.sh), the FAKE trtexecs and the FAKE tensorrt/pycuda modules."""
    from dskd.checkpoint import file_sha256

    root = tmp_path_factory.mktemp("trt_kit")
    kit = root / "kit"
    kit.mkdir()
    _tiny_onnx(kit / "model.onnx")
    shutil.copyfile(kit / "model.onnx", kit / "model.int8.qdq.onnx")  # the FAKE trtexec needs no real Q/DQ
    sums = {n: file_sha256(kit / n) for n in ("model.onnx", "model.int8.qdq.onnx")}
    script = kit / "build_trtexec.sh"
    script.write_text(build_script(["fp16", "int8"], CHW, "model.onnx", "model.int8.qdq.onnx", sums,
                                   batches=(1, 4, 8), workspace_mib=64))
    bins = {mode: fake_trtexec_build(root / f"bin-{mode}" / "trtexec", mode) for mode in ("ok", "fail", "slow")}
    fake_nvidia_smi(root / "bin-ok" / "nvidia-smi")
    lib = write_fake_tensorrt_lib(root / "lib")
    return {"kit": sorted(kit.iterdir()), "kit_dir": kit, "trtexec": bins, "lib": lib, "root": root,
            "python": fake_python(lib)}


@pytest.fixture(autouse=True)
def engine_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own device-side engine cache (never the real ~/.cache/dskd/engines)."""
    import shlex

    from deploy_targets import engine_build

    folder = tmp_path_factory.mktemp("engine-cache")
    monkeypatch.setattr(engine_build, "ENGINE_CACHE_EXPR", shlex.quote(str(folder)))
    return folder


@pytest.fixture()
def remote_tmp(tmp_path: Path) -> Path:
    """A temp base on the 'device' we can inspect for leftovers."""
    base = tmp_path / "device-tmp"
    base.mkdir()
    return base


def _processes_working_in(folder: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.readlink(proc / "cwd").startswith(str(folder)):
                    found.append(proc.name)
            except OSError:
                continue
    return found


def _one_line(exc: BaseException) -> str:
    assert "\n" not in str(exc)
    return str(exc)


@pytest.mark.slow
@needs_sshd
def test_build_over_ssh_then_measure_the_downloaded_engine(sshd: Sshd, fakes: dict, tmp_path: Path,
                                                          remote_tmp: Path):
    out = tmp_path / "engines"
    built = build_engines(fakes["kit"], ["fp16", "int8"], sshd.device, out_dir=out, ssh=sshd.options(),
                          remote_python=fakes["python"], timeout_s=60, trtexec=str(fakes["trtexec"]["ok"]),
                          remote_tmp=str(remote_tmp))
    assert sorted(built) == ["fp16", "int8"]
    assert list(remote_tmp.iterdir()) == []  # the private folder on the device is gone
    for precision, b in built.items():
        assert b.local_engine_path == out / f"model.{precision}.engine" and b.where == sshd.device
        engine = json.loads(b.local_engine_path.read_text())
        # built by the kit's script from the right ONNX with the TensorRT 10 flags of that precision
        assert engine["fake_engine_from"] == ("model.int8.qdq.onnx" if precision == "int8" else "model.onnx")
        assert ("--int8" in engine["flags"]) == (precision == "int8")
        assert engine["chw"] == list(CHW) and engine["max_batch"] == 8
        info = json.loads(b.info_path.read_text())
        assert b.info_path.name == f"model.{precision}.engine.json"
        assert info["tensorrt_version"] == b.tensorrt_version == "10.3.0"
        assert info["gpu_name"] == b.gpu_name and b.gpu_name  # 'unknown' here: no GPU on the sshd host
        assert info["engine_sha256"] == b.sha256 and info["built_on"] == sshd.device
        assert info["trtexec"] == str(fakes["trtexec"]["ok"])
        assert info["build_script_info"]["precision"] == precision  # the script's own JSON came back
        assert "Engine built in" in b.log and b.log_path.read_text().startswith("&&&& RUNNING")
    # the downloaded engine runs on the 'device' in the real runner (FAKE tensorrt there)
    w = np.asarray(json.loads(built["fp16"].local_engine_path.read_text())["w"], np.float32)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (24, *CHW), dtype=np.uint8)
    mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
    xn = (x / 255.0 - mean.reshape(1, 3, 1, 1)) / std.reshape(1, 3, 1, 1)
    y = (xn.mean(axis=(2, 3)) @ w.T).argmax(1)
    y[:6] = (y[:6] + 1) % CLASSES  # six wrong labels: top-1 is 18/24 exactly
    ev = write_eval_npz(tmp_path / "eval.npz", x, y, mean, std)
    m = measure(built["fp16"].local_engine_path, "jetson-orin", eval_set=ev, device=sshd.device,
                precision="fp16", ssh=sshd.options(), remote_python=fakes["python"], protocol=FAST,
                remote_tmp=str(remote_tmp), batch_sizes=(1, 8))
    assert m.accuracy["correct"] == 18 and m.where == sshd.device
    assert m.environment["gpu"] == "FAKE GPU" and m.latency_at(8)["p50_ms"] > 0
    # the board state is probed before and after; the sshd host is no Jetson, and the record says so
    assert "not a Jetson" in m.environment["board_state"]["before"]["error"]
    assert m.environment["board_state"]["at_max_clocks"] is None
    assert list(remote_tmp.iterdir()) == []


@pytest.mark.slow
@needs_sshd
def test_rerun_reuses_the_engine_cached_on_the_device(sshd: Sshd, fakes: dict, tmp_path: Path, remote_tmp: Path,
                                                      engine_cache: Path):
    """The second build of the same kit on the same device copies the cached engine: the FAKE
    trtexec given the second time always fails, so a rebuild could not succeed."""
    common = dict(ssh=sshd.options(), remote_python=fakes["python"], timeout_s=60, remote_tmp=str(remote_tmp))
    first = build_engines(fakes["kit"], ["fp16"], sshd.device, out_dir=tmp_path / "a",
                          trtexec=str(fakes["trtexec"]["ok"]), **common)["fp16"]
    assert first.cached is False and len(first.cache_key) == 32
    cached = sorted(p.name for p in (engine_cache / first.cache_key).iterdir())
    assert cached == ["model.fp16.engine", "model.fp16.engine.json", "model.fp16.engine.sha256"]
    again = build_engines(fakes["kit"], ["fp16"], sshd.device, out_dir=tmp_path / "b",
                          trtexec=str(fakes["trtexec"]["fail"]), **common)["fp16"]
    assert again.cached is True and again.cache_key == first.cache_key and again.sha256 == first.sha256
    assert again.local_engine_path.read_bytes() == first.local_engine_path.read_bytes()
    info = json.loads(again.info_path.read_text())
    assert info["cache"]["hit"] is True and info["cache"]["key"] == first.cache_key
    assert "not rebuilt" in again.log_path.read_text()
    assert list(remote_tmp.iterdir()) == []
    # a corrupted cache entry is not trusted: the build runs again (and here fails, naming FakeOp)
    (engine_cache / first.cache_key / "model.fp16.engine").write_text("{}")
    with pytest.raises(DeviceError, match="FakeOp"):
        build_engines(fakes["kit"], ["fp16"], sshd.device, out_dir=tmp_path / "c",
                      trtexec=str(fakes["trtexec"]["fail"]), **common)


def test_engine_cache_key_covers_every_input():
    from deploy_targets.engine_build import engine_cache_key

    base = dict(sources={"model.onnx": "a" * 64, "build_trtexec.sh": "b" * 64}, precision="fp16",
                builder="onnx", tensorrt_version="10.3.0", device_model="Orin | NVIDIA Jetson AGX Orin")
    key = engine_cache_key(**base)
    assert key == engine_cache_key(**dict(base, sources=dict(reversed(base["sources"].items()))))
    for change in (dict(sources={"model.onnx": "c" * 64, "build_trtexec.sh": "b" * 64}),
                   dict(precision="int8"), dict(builder="torch-tensorrt"), dict(tensorrt_version="10.3.1"),
                   dict(device_model="Orin | NVIDIA Jetson Orin Nano")):
        assert engine_cache_key(**dict(base, **change)) != key, change


@pytest.mark.slow
def test_local_build_finds_trtexec_on_path_and_records_the_gpu(fakes: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", f"{fakes['trtexec']['ok'].parent}{os.pathsep}{os.environ['PATH']}")
    built = build_engines(fakes["kit"], ["int8"], None, out_dir=tmp_path, timeout_s=60)
    b = built["int8"]
    assert b.where == "local" and b.gpu_name == "FAKE GPU 3000"  # from (FAKE) nvidia-smi
    info = json.loads(b.info_path.read_text())
    assert info["gpu_name"] == "FAKE GPU 3000" and info["trtexec"] == str(fakes["trtexec"]["ok"])
    assert json.loads(b.local_engine_path.read_text())["fake_engine_from"] == "model.int8.qdq.onnx"
    # an explicit version wins over the banner and picks the script's TensorRT 8.6 branch
    again = build_engines(fakes["kit"], ["fp16"], None, out_dir=tmp_path / "v8", trt_version="8.6.1")
    assert again["fp16"].tensorrt_version == "8.6.1"


@pytest.mark.slow
@needs_sshd
def test_missing_trtexec_is_one_line_naming_host_and_fix(sshd: Sshd, fakes: dict, tmp_path: Path,
                                                         remote_tmp: Path):
    common = dict(out_dir=tmp_path, ssh=sshd.options(), remote_tmp=str(remote_tmp))
    with pytest.raises(DeviceError) as err:
        build_engines(fakes["kit"], ["fp16"], sshd.device, trtexec="/nonexistent/trtexec", **common)
    msg = _one_line(err.value)
    assert msg.startswith(f"{sshd.device}: /nonexistent/trtexec is not an executable file")
    assert "install TensorRT / JetPack there or pass the trtexec path" in msg
    if shutil.which("trtexec") is None and not any(Path(c).exists() for c in TRTEXEC_CANDIDATES):
        with pytest.raises(DeviceError, match="trtexec not found .looked on PATH and in /usr/src/tensorrt"):
            build_engines(fakes["kit"], ["fp16"], sshd.device, **common)
    assert list(remote_tmp.iterdir()) == [] and list(tmp_path.iterdir()) == [remote_tmp]


@pytest.mark.slow
@needs_sshd
def test_failing_build_keeps_the_log_and_names_the_error(sshd: Sshd, fakes: dict, tmp_path: Path,
                                                         remote_tmp: Path):
    out = tmp_path / "engines"
    with pytest.raises(DeviceError) as err:
        build_engines(fakes["kit"], ["fp16"], sshd.device, out_dir=out, ssh=sshd.options(),
                      trtexec=str(fakes["trtexec"]["fail"]), remote_tmp=str(remote_tmp))
    msg = _one_line(err.value)
    assert "TensorRT fp16 engine build failed (exit status 1)" in msg
    assert "No importer registered for op: FakeOp" in msg and str(out / "model.fp16.build.log") in msg
    assert "FAILED TensorRT.trtexec" in (out / "model.fp16.build.log").read_text()
    assert not (out / "model.fp16.engine").exists()
    assert list(remote_tmp.iterdir()) == []


@pytest.mark.slow
@needs_sshd
def test_build_timeout_is_bounded_and_cleans_up(sshd: Sshd, fakes: dict, tmp_path: Path, remote_tmp: Path):
    with pytest.raises(DeviceError) as err:
        build_engines(fakes["kit"], ["int8"], sshd.device, out_dir=tmp_path / "e", ssh=sshd.options(),
                      trtexec=str(fakes["trtexec"]["slow"]), remote_tmp=str(remote_tmp), timeout_s=2)
    assert "TensorRT int8 engine build did not finish within 2 s and was stopped" in _one_line(err.value)
    assert list(remote_tmp.iterdir()) == []
    assert _processes_working_in(remote_tmp) == []  # the fake trtexec was stopped, not left running


@pytest.mark.slow
def test_corrupted_kit_and_bad_arguments(fakes: dict, tmp_path: Path):
    kit = tmp_path / "kit"
    shutil.copytree(fakes["kit_dir"], kit)
    (kit / "model.onnx").write_bytes((kit / "model.onnx").read_bytes() + b"\0")  # not what the script lists
    trtexec = str(fakes["trtexec"]["ok"])
    with pytest.raises(DeviceError, match="^local: .*kit arrived incomplete or corrupted"):
        build_engines(sorted(kit.iterdir()), ["fp16"], None, out_dir=tmp_path / "o", trtexec=trtexec)
    no_script = [p for p in fakes["kit"] if p.name != "build_trtexec.sh"]
    with pytest.raises(UserError, match="kit lacks build_trtexec.sh"):
        build_engines(no_script, ["fp16"], None, out_dir=tmp_path / "o", trtexec=trtexec)
    with pytest.raises(UserError, match="engine precision 'fp32': choose from fp16, int8"):
        build_engines(fakes["kit"], ["fp32"], None, out_dir=tmp_path / "o", trtexec=trtexec)
    with pytest.raises(UserError, match="TensorRT version 'ten' not understood"):
        build_engines(fakes["kit"], ["fp16"], None, out_dir=tmp_path / "o", trt_version="ten")


# --------------------------------------------------------------------------- the pipeline, end to end
def _user_ssh_config(sshd: Sshd, folder: Path) -> Path:
    """Stand-in for the user's ~/.ssh/config: `ssh`/`scp` wrappers first on PATH add -F with a Host
    entry for the test sshd (the pipeline passes no SSH options, like a user with a config)."""
    folder.mkdir()
    cfg = folder / "ssh_config"
    cfg.write_text(f"Host 127.0.0.1\n  IdentityFile {sshd.client_key}\n  IdentitiesOnly yes\n"
                   f"  UserKnownHostsFile {sshd.known_hosts}\n")
    for tool in ("ssh", "scp"):
        write_exe(folder / tool, f'#!/bin/sh\nexec {shutil.which(tool)} -F {cfg} "$@"\n')
    return folder


@pytest.mark.slow
@needs_sshd
@pytest.mark.timeout(600)  # trains a tiny student on a shared 2-core machine, then builds and measures twice
def test_pipeline_builds_engines_on_the_device_and_measures_them(sshd: Sshd, fakes: dict, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  engine_cache: Path):
    from dskd.checkpoint import file_sha256
    from pipeline.recipe import load_recipe
    from pipeline.run import execute

    monkeypatch.setenv("PATH", f"{_user_ssh_config(sshd, tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    recipe = load_recipe("digits-smoke", {
        "data.input_size": 8, "data.in_chans": 1, "data.limit_per_class": 20,
        "teacher.model": "resnet8", "teacher.epochs": 1, "student.model": "resnet8", "student.epochs": 1,
        "student.method": "kd", "student.options": {}, "export.calib_size": 32, "target.name": "jetson-orin",
        "target.device": sshd.device, "target.python": fakes["python"], "target.batch_sizes": [1],
        "target.min_iters": 10, "target.min_seconds": 0.05, "target.warmup_seconds": 0.02,
        "target.timeout_s": 120.0, "target.allow_unmeasured": True,
    })
    recipe.target.trtexec = str(fakes["trtexec"]["ok"])  # FAKE trtexec on the 'device'
    run_dir = tmp_path / "run"
    report = execute(recipe, run_dir)
    assert report["target"]["measured"] is True and report["target"]["environment"]["gpu"] == "FAKE GPU"
    engines = {a["precision"]: a for a in report["artifacts"] if a["runtime"] == "tensorrt"}
    assert sorted(engines) == ["fp16", "int8"]
    deploy = json.loads(next((run_dir / "stages").glob("deploy-*/stage.json")).read_text())["outputs"]
    for precision, a in engines.items():
        rec = next(r for r in deploy["artifacts"] if r["format"] == a["format"])
        assert a["measured"] is True and a["format"] == f"tensorrt-{precision}", a.get("not_measured_reason")
        path = run_dir / a["path"]
        assert path.name == f"model.{precision}.engine" and path.parent.name == "engines"
        assert a["size_bytes"] == path.stat().st_size and a["shipped"] is True
        assert a["sha256"] == file_sha256(path)
        assert 0.0 <= a["top1"] <= 100.0 and a["latency_ms"]["p50"] > 0
        assert a["where"] == sshd.device and rec["environment"]["gpu"] == "FAKE GPU"
        info = json.loads((path.parent / f"{path.name}.json").read_text())
        assert info["tensorrt_version"] == "10.3.0" and rec["engine_build"]["tensorrt_version"] == "10.3.0"
        assert info["engine_sha256"] == a["sha256"] and (run_dir / rec["engine_build"]["log"]).exists()
        assert info["cache"]["stored"] is True and info["cache"]["hit"] is False  # kept on the device
    # a failing build on the device is recorded with its reason; the run goes on
    shutil.rmtree(engine_cache)  # (a cached engine would be reused without running trtexec at all)
    recipe.target.trtexec = str(fakes["trtexec"]["fail"])
    report = execute(recipe, run_dir, force=["deploy"])
    for a in (a for a in report["artifacts"] if a["runtime"] == "tensorrt"):
        assert a["measured"] is False and a["path"] is None
        assert a["not_measured_reason"].startswith(f"engine build failed: {sshd.device}: TensorRT")
        assert "FakeOp" in a["not_measured_reason"]


@pytest.mark.slow
@needs_sshd
@pytest.mark.timeout(600)  # trains a tiny student, then two torch.export builds on a 2-core machine
def test_pipeline_with_the_torch_tensorrt_builder(sshd: Sshd, fakes: dict, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, engine_cache: Path):
    """export.trt_builder = "torch-tensorrt": the deploy stage ships the torch-tensorrt kit, the
    device (sshd, FAKE torch_tensorrt/modelopt over the REAL torch, no trtexec) builds both engines
    with build_torch_trt.py (fp16, and int8 through the FAKE ModelOpt Q/DQ), and the runner measures
    them (FAKE tensorrt). The kit is built for cpu here: torch has no GPU on this machine."""
    import torch

    from export import torch_trt
    from pipeline.recipe import load_recipe
    from pipeline.run import execute
    from tests.fakes.torch_trt import write_fake_torch_trt_lib

    monkeypatch.setattr(torch_trt, "DEFAULT_DEVICE", "cpu")
    monkeypatch.setenv("PATH", f"{_user_ssh_config(sshd, tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    lib = write_fake_torch_trt_lib(tmp_path / "tt-lib", torch_tensorrt=torch.__version__.split("+")[0],
                                   tensorrt=None)  # tensorrt + pycuda: the runner's FAKE ones
    recipe = load_recipe("digits-smoke", {
        "data.input_size": 8, "data.in_chans": 1, "data.limit_per_class": 20,
        "teacher.model": "resnet8", "teacher.epochs": 1, "student.model": "resnet8", "student.epochs": 1,
        "student.method": "kd", "student.options": {}, "export.calib_size": 32, "target.name": "jetson-orin",
        "export.trt_builder": "torch-tensorrt", "target.device": sshd.device,
        "target.python": fake_python(fakes["lib"], lib), "target.batch_sizes": [1],
        "target.min_iters": 10, "target.min_seconds": 0.05, "target.warmup_seconds": 0.02,
        "target.timeout_s": 300.0, "target.allow_unmeasured": True, "target.trtexec": "/nonexistent/trtexec",
    })
    report = execute(recipe, tmp_path / "run")
    engines = {a["precision"]: a for a in report["artifacts"] if a["runtime"] == "tensorrt"}
    assert sorted(engines) == ["fp16", "int8"]
    for precision, a in engines.items():
        assert a["measured"] is True, a.get("not_measured_reason")
        info = json.loads((tmp_path / "run" / a["path"]).with_suffix(".engine.json").read_text())
        assert info["cache"]["builder"] == "torch-tensorrt"
        script = info["build_script_info"]
        assert script["builder"] == "torch-tensorrt" and script["precision"] == precision
        fake = json.loads((tmp_path / "run" / a["path"]).read_bytes())
        assert fake["precisions"] == ["torch.float16"] + (["torch.int8"] if precision == "int8" else [])
        assert fake["shapes"][0] == [1, 1, 8, 8]  # the student's input, from its checkpoint
    # the deploy bundle ships the torch-tensorrt kit (not the ONNX one) beside the engines built on the device
    manifest = json.loads((tmp_path / "run" / "bundle" / "jetson-orin" / "manifest.json").read_text())
    for e in (e for e in manifest["artifacts"] if e["runtime"] == "tensorrt"):
        assert e["build"]["script"] == "build_torch_trt.py" and e["build"]["builder"] == "torch-tensorrt"
        assert {"model.pt", "dskd_models.zip"} <= set(e["build"]["inputs"]) and e["path"] in e["files"]
    assert "build_trtexec.sh" not in manifest["files"] and "build_torch_trt.py" in manifest["files"]
