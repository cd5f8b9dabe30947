"""Deploy bundles that run: every target's bundle, unpacked into an empty folder, verifies and
its infer.py (a fresh `python -I` process, run from another folder) predicts exactly what the
report measured for each artifact; TensorRT bundles are checked for consistency (no TensorRT here).

One real `pipeline run` per target, all in one output folder so the student is trained once
(teacher 1 epoch; the student 3 short epochs with CE, so that it is trained well enough for its
INT8 artifacts to pass the export parity check and ship). A few minutes on 2 quiet cores.
"""

from __future__ import annotations

import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.bundle import INFER, MANIFEST, README, write_bundle
from tests.fakes.trt_runtime import write_fake_tensorrt_lib
from tests.fakes.trtexec import fake_trtexec_build

pytestmark = pytest.mark.slow  # real pipeline runs, fresh interpreters, torch.export: seconds to minutes each
REPO = Path(__file__).resolve().parents[1]
OVERRIDES = {
    "teacher.model": "resnet8", "teacher.epochs": 1,
    "student.model": "resnet8", "student.method": "ce", "student.options": {}, "student.epochs": 3,
    "student.batch_size": 16,
    "target.min_iters": 10, "target.min_seconds": 0.1, "target.warmup_seconds": 0.02,
    "gates.min_top1": 0.0, "gates.max_top1_drop": 100.0, "gates.max_latency_ms": 1000.0,
}
CPU_TARGETS = ("cpu", "intel-cpu")
TRT_TARGETS = ("jetson-orin",)
# A file name as a README or script would mention one.
FILE_TOKEN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.(?:onnx|xml|bin|engine|sh|py|json|txt|cache|tar\.gz)\b")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "CI": "1", "OMP_NUM_THREADS": "1"}


def _set_args() -> list[str]:
    return [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """target -> {report, eval (the deploy stage's eval.npz, copied), out}: one run per target."""
    out = tmp_path_factory.mktemp("bundles") / "run"
    keep = out.parent / "per-target"
    keep.mkdir()
    result = {}
    for target in CPU_TARGETS + TRT_TARGETS:
        extra = ["--allow-unmeasured"] if target in TRT_TARGETS else []
        proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--target", target, "--out", str(out),
                               *_set_args(), *extra], cwd=REPO, env=_env(), capture_output=True, text=True,
                              timeout=1800)
        assert proc.returncode in (0, 1), proc.stderr[-3000:]
        report = json.loads((out / "report.json").read_text())
        assert report["target"]["name"] == target
        deploy = json.loads((out / "last_run.json").read_text())["stages"]["deploy"]["folder"]
        ev = keep / f"{target}.eval.npz"
        shutil.copyfile(out / deploy / "eval.npz", ev)
        shutil.copyfile(out / "report.json", keep / f"{target}.report.json")  # for a person reading a failure
        # OUT/bundle/ holds only the last invocation's bundle (the next run moves it to OUT/previous/)
        assert sorted(p.name for p in (out / "bundle").iterdir()) == [target, f"{target}.tar.gz"]
        tar = keep / f"{target}.tar.gz"
        shutil.copyfile(out / "bundle" / f"{target}.tar.gz", tar)
        result[target] = {"report": report, "eval": ev, "out": out, "rc": proc.returncode, "tar": tar}
    return result


def unpack(run: dict, target: str, dest: Path) -> Path:
    """The archive, as a user gets it, into an empty folder."""
    dest.mkdir()
    assert not any(dest.iterdir())
    with tarfile.open(run["tar"]) as tar:
        tar.extractall(dest, filter="data")
    assert [p.name for p in dest.iterdir()] == [target]
    return dest / target


def verify_cli(path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "verify", str(path), *flags], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)


def write_images(ev_path: Path, folder: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The test split the report was measured on, as PNG files (real images for infer.py)."""
    folder.mkdir()
    with np.load(ev_path) as ev:
        x, y, ref = ev["x"], ev["y"], ev["ref_pred"]
    paths = []
    for i, img in enumerate(x):
        p = folder / f"{i:04d}.png"
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(p)
        paths.append(str(p))
    return paths, y, ref


def run_infer(bundle: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """infer.py in a fresh isolated interpreter (-I: no PYTHONPATH, no script-folder imports of the
    checkout), from another folder; it imports nothing of this project (numpy, Pillow, the runtime)."""
    return subprocess.run([sys.executable, "-I", str(bundle / INFER), *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)


def infer_fp16_json(bundle: Path, paths: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`infer.py --artifact fp16 --json IMAGES` with `env` (its PYTHONPATH holds the FAKE TensorRT
    libraries, so no -I here, unlike run_infer): the TensorRT bundles' build-then-run path."""
    return subprocess.run([sys.executable, str(bundle / INFER), "--artifact", "fp16", "--json", *paths],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def mentioned_names(text: str) -> set[str]:
    return set(FILE_TOKEN.findall(text))


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_bundle_unpacks_verifies_and_predicts_what_the_report_measured(runs: dict, target: str, tmp_path: Path):
    run = runs[target]
    bundle = unpack(run, target, tmp_path / "empty")
    v = verify_cli(bundle)
    if run["report"]["passed"]:
        assert v.returncode == 0 and v.stdout.startswith("OK"), v.stdout + v.stderr
    else:  # a short run's INT8 can fail its parity gate: the bundle is intact, but not to be shipped
        assert v.returncode == 1 and "FAILED its gates" in v.stdout, v.stdout + v.stderr
        v = verify_cli(bundle, "--allow-failed-gates")
        assert v.returncode == 0 and v.stdout.startswith("OK") and "FAILED its gates" in v.stdout, v.stdout
    manifest = json.loads((bundle / MANIFEST).read_text())
    files = set(manifest["files"])
    assert {INFER, README} <= files
    shipped = [a for a in run["report"]["artifacts"] if a.get("shipped") and not a.get("rejected")]
    assert {a["precision"] for a in shipped} == {e["precision"] for e in manifest["artifacts"]}
    # INT8 ships unless its export parity check rejected it (then the report says so, with its numbers;
    # with this short training the OpenVINO INT8 IR can be: its distinct files are proved by
    # test_openvino_fp32_and_int8_keep_distinct_files_and_both_run).
    expected = {"fp32", "int8"} if target == "cpu" else {"fp32"}
    assert expected <= {e["precision"] for e in manifest["artifacts"]}, run["report"]["artifacts"]
    names = [e["path"] for e in manifest["artifacts"]]
    assert len(set(names)) == len(names)
    for e in manifest["artifacts"]:
        assert set(e["files"]) <= files and e["path"] in e["files"]
        if e["runtime"] == "openvino":  # the IR is two files: both ship, under the artifact's own stem
            assert sorted(e["files"]) == sorted([e["path"], e["path"].removesuffix(".xml") + ".bin"])
    paths, y, ref = write_images(run["eval"], tmp_path / "images")
    threads = str(run["report"]["recipe"]["config"]["target"]["threads"])
    for a in shipped:
        e = next(e for e in manifest["artifacts"] if e["precision"] == a["precision"])
        proc = run_infer(bundle, ["--artifact", e["path"], "--json", "--threads", threads, *paths], tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        pred = np.array([r["index"] for r in json.loads(proc.stdout)])
        assert [r["image"] for r in json.loads(proc.stdout)] == paths
        top1 = round(100.0 * round(float((pred == y).mean()), 6), 4)
        agreement = round(100.0 * round(float((pred == ref).mean()), 6), 4)
        assert (top1, agreement) == (a["top1"], a["agreement"]), (e["path"], top1, agreement, a)


@pytest.mark.parametrize("target", CPU_TARGETS + TRT_TARGETS)
def test_every_name_the_readme_mentions_is_in_the_bundle(runs: dict, target: str, tmp_path: Path):
    bundle = unpack(runs[target], target, tmp_path / "empty")
    manifest = json.loads((bundle / MANIFEST).read_text())
    files = set(manifest["files"]) | {MANIFEST}
    built_on_device = {e["path"] for e in manifest["artifacts"] if e.get("build") and not e["files"]}
    readme = (bundle / README).read_text()
    missing = mentioned_names(readme) - files - built_on_device
    assert not missing, (missing, readme)
    pre = manifest["preprocessing"]
    assert f"N x {pre['in_chans']} x {pre['input_size']} x {pre['input_size']}" in readme
    assert pre["in_chans"] == 1 and pre["input_size"] == 16  # the digits-smoke recipe's real input


def onnx_input_chw(path: Path) -> tuple[int, ...]:
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value for d in dims[1:])


@pytest.mark.parametrize("target", TRT_TARGETS)
def test_tensorrt_bundle_is_consistent_and_says_it_needs_tensorrt(runs: dict, target: str, tmp_path: Path):
    """No TensorRT here: the kit is checked for consistency; infer.py fails in one clear line."""
    run = runs[target]
    assert run["rc"] == 0 and not run["report"]["target"]["measured"]  # --allow-unmeasured
    bundle = unpack(run, target, tmp_path / "empty")
    v = verify_cli(bundle)
    assert v.returncode == 0, v.stdout + v.stderr
    manifest = json.loads((bundle / MANIFEST).read_text())
    files = set(manifest["files"])
    assert manifest["runtime"] == "tensorrt"
    assert {e["precision"] for e in manifest["artifacts"]} == {"fp16", "int8"}
    script_text = {}
    for e in manifest["artifacts"]:
        b = e["build"]
        assert b["script"] in files and set(b["inputs"]) <= files and e["path"] not in files
        script_text[b["script"]] = text = (bundle / b["script"]).read_text()
        assert f"--saveEngine={e['path']}" in text  # the script writes the engine infer.py loads
        for onnx_name in b["inputs"]:  # the engine's input shape is the model's real one
            chw = "x".join(map(str, onnx_input_chw(bundle / onnx_name)))
            assert all(s.endswith(chw) for s in b["profile_shapes"].values()), b["profile_shapes"]
    for text in script_text.values():  # every file the script reads is in the bundle
        produced = set(re.findall(r"--output_path (\S+)", text))
        read = set(re.findall(r"--onnx=(\S+)", text)) | {ln.split("  ", 1)[1] for ln in text.splitlines()
                                                          if re.match(r"^[0-9a-f]{64}  ", ln)}
        assert read - produced <= files, read - produced - files
    assert (bundle / "build_trtexec.sh").stat().st_mode & 0o100
    py_compile.compile(str(bundle / INFER), doraise=True, cfile=str(tmp_path / "infer.pyc"))
    paths, _, _ = write_images(run["eval"], tmp_path / "images")
    proc = run_infer(bundle, paths[:2], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: tensorrt is not installed here: run this bundle on the device")
    assert not list(bundle.glob("*.engine"))  # nothing was built or half-written


def test_openvino_fp32_and_int8_keep_distinct_files_and_both_run(tmp_path: Path):
    """Two IRs both named model.xml in their export folders: each ships with its own .bin, and
    infer.py runs each to the predictions its own weights give (computed here with numpy)."""
    import onnx
    import openvino as ov
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"fp32": rng.normal(size=(16, 3)).astype(np.float32), "int8": rng.normal(size=(16, 3)).astype(np.float32)}
    run_dir = tmp_path / "run"
    rows = []
    for precision, fmt in (("fp32", "openvino"), ("int8", "openvino-int8")):
        graph = helper.make_graph(
            [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["logits"])],
            "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 4, 4])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
            [numpy_helper.from_array(weights[precision], "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 8
        src = tmp_path / f"{precision}.onnx"
        onnx.save(model, str(src))
        xml = run_dir / "stages" / "optimize" / "artifacts" / fmt / "model.xml"
        xml.parent.mkdir(parents=True)
        ov.save_model(ov.convert_model(str(src)), str(xml), compress_to_fp16=False)
        rows.append({"format": fmt, "precision": precision, "runtime": "openvino", "shipped": True,
                     "measured": True, "top1": None, "agreement": None, "path": str(xml.relative_to(run_dir))})
    meta = {"target": "intel-cpu", "runtime": "openvino", "labels": ["a", "b", "c"],
            "preprocessing": {"input_size": 4, "in_chans": 1, "mean": [0.5], "std": [0.25], "layout": "NCHW",
                              "input": "input", "output": "logits", "scale": "x/255 then (x - mean) / std"}}
    tar = write_bundle(tmp_path / "out" / "intel-cpu", rows, run_dir, meta)
    dest = tmp_path / "empty"
    dest.mkdir()
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    bundle = dest / "intel-cpu"
    assert sorted(p.name for p in bundle.iterdir()) == sorted(
        [INFER, MANIFEST, README, "model.fp32.xml", "model.fp32.bin", "model.int8.xml", "model.int8.bin"])
    assert verify_cli(bundle).returncode == 0
    imgs = rng.integers(0, 256, size=(5, 4, 4), dtype=np.uint8)
    paths = []
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    x = ((imgs.astype(np.float32) / 255.0 - 0.5) / 0.25).reshape(5, 16)
    for precision, w in weights.items():
        proc = run_infer(bundle, ["--artifact", f"model.{precision}.xml", "--json", *paths], tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert [r["index"] for r in json.loads(proc.stdout)] == list(np.argmax(x @ w, axis=1))
    assert list(np.argmax(x @ weights["fp32"], axis=1)) != list(np.argmax(x @ weights["int8"], axis=1))


def fake_engine_predictions(engine: dict, paths: list[str], pre: dict) -> list[int]:
    """What the FAKE tensorrt (tests/fakes/trt_runtime.py) computes for these images, preprocessed
    as the deploy stage does: argmax(global-average-pool((x/255 - mean) / std) @ w.T)."""
    size, chans = int(pre["input_size"]), int(pre["in_chans"])
    x = np.stack([np.asarray(Image.open(p), dtype=np.float32).reshape(size, size, chans).transpose(2, 0, 1)
                  for p in paths]) / np.float32(255.0)
    x = (x - np.float32(pre["mean"]).reshape(1, -1, 1, 1)) / np.float32(pre["std"]).reshape(1, -1, 1, 1)
    return np.argmax(x.mean(axis=(2, 3)) @ np.asarray(engine["w"], np.float32).T, axis=1).tolist()


@pytest.mark.parametrize("target", TRT_TARGETS)
def test_tensorrt_infer_builds_the_engine_with_the_bundle_script_then_runs_it(runs: dict, target: str,
                                                                              tmp_path: Path):
    """With a FAKE tensorrt/pycuda/trtexec (tests/fakes, no GPU here): infer.py, finding no engine, runs
    the bundle's own build_trtexec.sh (real bash, real sha256 check of the kit), loads the engine
    that script wrote through the TensorRT API path, and predicts what that engine computes."""
    lib = write_fake_tensorrt_lib(tmp_path / "fake-lib")
    trtexec = fake_trtexec_build(tmp_path / "bin" / "trtexec")
    bundle = unpack(runs[target], target, tmp_path / "empty")
    paths, _, _ = write_images(runs[target]["eval"], tmp_path / "images")
    paths = paths[:70]  # more than one batch of 64
    env = {**_env(), "PYTHONPATH": str(lib), "TRTEXEC": str(trtexec), "TRT_VERSION": "10.3.0"}

    first = infer_fp16_json(bundle, paths, tmp_path, env)
    assert first.returncode == 0, first.stderr
    assert "building model.fp16.engine with build_trtexec.sh" in first.stderr
    assert (bundle / "model.fp16.engine").is_file() and (bundle / "model.fp16.engine.json").is_file()
    engine = json.loads((bundle / "model.fp16.engine").read_text())
    assert engine["fake_engine_from"] == "model.onnx"  # the FAKE trtexec built it from the bundle's ONNX
    pre = json.loads((bundle / MANIFEST).read_text())["preprocessing"]
    assert [r["index"] for r in json.loads(first.stdout)] == fake_engine_predictions(engine, paths, pre)
    again = infer_fp16_json(bundle, paths, tmp_path, env)  # the engine is kept: no second build
    assert again.returncode == 0 and "building" not in again.stderr and again.stdout == first.stdout
    # The engine built on the device is not in the manifest: verify says so (verify before building).
    v = verify_cli(bundle)
    assert v.returncode == 1 and "model.fp16.engine: not in the manifest" in v.stdout


def test_torch_tensorrt_bundle_builds_with_its_own_script_then_runs(tmp_path: Path):
    """export.trt_builder = "torch-tensorrt": the bundle ships that builder's kit (checkpoint, model zoo
    source, build_torch_trt.py; calib.npz for int8), its README names exactly its files and the engine's
    real input shape, and infer.py, finding no engine, runs `python build_torch_trt.py --precision fp16`
    (REAL torch.export of the student, FAKE torch_tensorrt converter: tests/fakes/torch_trt.py), then runs
    that engine through the TensorRT API path (FAKE tensorrt/pycuda), in pieces of the profile's max N."""
    import torch

    from dskd.checkpoint import save_model
    from dskd.models import create_model
    from export.torch_trt import write_kit
    from tests.fakes.torch_trt import write_fake_torch_trt_lib

    torch.manual_seed(0)
    chw = (1, 8, 8)
    pre = {"input_size": 8, "in_chans": 1, "mean": [0.5], "std": [0.25], "layout": "NCHW", "input": "input",
           "output": "logits", "scale": "x/255 then (x - mean) / std"}
    run_dir = tmp_path / "run"
    pt = run_dir / "student" / "model.pt"
    pt.parent.mkdir(parents=True)
    save_model(pt, create_model("resnet8", num_classes=4, in_chans=1).state_dict(),
               {"model": "resnet8", "num_classes": 4, "class_names": list("abcd"), "input_size": 8, "in_chans": 1,
                "mean": [0.5], "std": [0.25]})
    rng = np.random.default_rng(0)
    kit = write_kit(pt, run_dir / "stages" / "deploy" / "torch_trt_kit", ["fp16", "int8"],
                    calib_x=rng.integers(0, 256, (16, *chw), dtype=np.uint8), mean=[0.5], std=[0.25],
                    batches=(1, 4, 8), device="cpu")
    rows = [{"format": f"tensorrt-{p}", "precision": p, "runtime": "tensorrt", "shipped": True, "measured": False,
             "top1": None, "agreement": None, "path": None, "prepared": [str(f.relative_to(run_dir)) for f in kit]}
            for p in ("fp16", "int8")]
    meta = {"target": "jetson-orin", "runtime": "tensorrt", "labels": list("abcd"), "preprocessing": pre}
    tar = write_bundle(tmp_path / "out" / "jetson-orin", rows, run_dir, meta)
    dest = tmp_path / "empty"
    dest.mkdir()
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    bundle = dest / "jetson-orin"
    names = sorted(p.name for p in bundle.iterdir())
    assert names == sorted([INFER, MANIFEST, README, "build_torch_trt.py", "model.pt", "dskd_models.zip", "calib.npz"])
    v = verify_cli(bundle)
    assert v.returncode == 0, v.stdout + v.stderr
    builds = {e["precision"]: e["build"] for e in json.loads((bundle / MANIFEST).read_text())["artifacts"]}
    assert builds["fp16"]["builder"] == "torch-tensorrt" and "calib.npz" not in builds["fp16"]["inputs"]
    assert builds["int8"]["inputs"] == ["calib.npz", "dskd_models.zip", "model.pt"]
    assert builds["fp16"]["profile_shapes"] == {"min": "1x1x8x8", "opt": "4x1x8x8", "max": "8x1x8x8"}
    readme = (bundle / README).read_text()
    assert [ln for ln in readme.splitlines() if ln.startswith("Files: ")] == ["Files: " + ", ".join(names)]
    assert "input 'input': float32, N x 1 x 8 x 8 (NCHW), N from 1 to 8 (the TensorRT engine's build profile)" in readme
    assert "python3 build_torch_trt.py --precision int8" in readme and "nvidia-modelopt" in readme
    assert mentioned_names(readme) <= set(names) | {"model.fp16.engine", "model.int8.engine"}

    images = tmp_path / "images"
    images.mkdir()
    paths = []
    for i, img in enumerate(rng.integers(0, 256, (11, 8, 8), dtype=np.uint8)):
        Image.fromarray(img).save(images / f"{i}.png")
        paths.append(str(images / f"{i}.png"))
    lib_trt = write_fake_tensorrt_lib(tmp_path / "trt-lib")
    lib_tt = write_fake_torch_trt_lib(tmp_path / "tt-lib", torch_tensorrt=torch.__version__.split("+")[0], tensorrt=None)
    env = {**_env(), "PYTHONPATH": f"{lib_trt}:{lib_tt}"}

    first = infer_fp16_json(bundle, paths, tmp_path, env)
    assert first.returncode == 0, first.stderr
    assert "building model.fp16.engine with build_torch_trt.py" in first.stderr
    engine = json.loads((bundle / "model.fp16.engine").read_bytes())
    assert engine["fake_engine"] is True and engine["shapes"] == [[1, *chw], [4, *chw], [8, *chw]]
    assert json.loads((bundle / "model.fp16.engine.json").read_text())["builder"] == "torch-tensorrt"
    assert '"builder": "torch-tensorrt"' in first.stderr  # the build's own output: not in --json's stdout
    assert [r["index"] for r in json.loads(first.stdout)] == fake_engine_predictions(engine, paths, pre)
    again = infer_fp16_json(bundle, paths, tmp_path, env)  # the engine is kept: no second build
    assert again.returncode == 0 and "building" not in again.stderr and again.stdout == first.stdout
