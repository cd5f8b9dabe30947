"""Red-team findings on a deploy bundle's infer.py (pipeline/bundle_infer.py) run from an unpacked
bundle, each reproduced as a test that failed before its fix: planted modules beside it, files
changed after the bundle was written, decoding that differed from the pipeline's, and tracebacks
where one `error:` line (exit 2) belongs.

Bundles are built by hand (or with pipeline.bundle.write_bundle) around a real tiny ONNX model
(one conv, global average pool) and run by the real infer.py in a fresh interpreter with the real
ONNX Runtime; the decoding comparison runs in-process against dskd/data/decode.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.bundle_verify import BUNDLE_FORMAT, MANIFEST

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
INFER_SRC = REPO / "pipeline" / "bundle_infer.py"
SIZE = 8
LABELS = ["a", "b", "c", "d"]
PRE = {"input_size": SIZE, "in_chans": 3, "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3], "layout": "NCHW",
       "input": "input", "output": "logits", "scale": "x/255 then (x - mean) / std"}
MARKER = "PLANTED-CODE-RAN"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(4, 3, 3, 3)).astype(np.float32)


def _model(w: np.ndarray, batch: str | int = "N") -> bytes:
    """A real ONNX model: Conv 3->4 (3x3, pad 1), GlobalAveragePool, Flatten -> 4 logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["c"], ["g"]), helper.make_node("Flatten", ["g"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _manifest(files: dict[str, bytes], artifact: dict, **over) -> dict:
    return {"format": BUNDLE_FORMAT, "target": "cpu", "runtime": "onnxruntime", "labels": LABELS,
            "preprocessing": dict(PRE), "artifacts": [artifact],
            "files": {n: {"sha256": _sha(d), "size_bytes": len(d)} for n, d in files.items()}, **over}


def _bundle(root: Path, model: bytes, **over) -> Path:
    """A flat bundle folder: infer.py (this checkout's), model.onnx and a manifest recording both."""
    root.mkdir(parents=True)
    files = {"infer.py": INFER_SRC.read_bytes(), "model.onnx": model}
    for name, data in files.items():
        (root / name).write_bytes(data)
    artifact = {"format": "onnx", "precision": "fp32", "runtime": "onnxruntime", "path": "model.onnx",
                "files": ["model.onnx"], "sha256": _sha(model), "top1": None, "agreement": None, "measured": True}
    (root / MANIFEST).write_text(json.dumps(_manifest(files, artifact, **over)))
    return root


def _edit_manifest(bundle: Path, edit) -> None:
    m = json.loads((bundle / MANIFEST).read_text())
    edit(m)
    (bundle / MANIFEST).write_text(json.dumps(m))


def _images(folder: Path, n: int = 6, seed: int = 1) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)):
        Image.fromarray(img).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return paths


def _predict(model: bytes, x_uint8: np.ndarray, pre: dict = PRE) -> list[int]:
    """What the model gives for uint8 N x C x H x W, normalized as the deploy stage does."""
    mean = np.asarray(pre["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre["std"], np.float32).reshape(1, -1, 1, 1)
    x = np.ascontiguousarray((x_uint8.astype(np.float32) / np.float32(255.0) - mean) / std)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.argmax(sess.run(None, {"input": x})[0], axis=1).tolist()


def _decoded(paths: list[str], chans: int = 3) -> np.ndarray:
    from dskd.data.decode import decode_image

    return np.stack([decode_image(p, SIZE, chans) for p in paths])


def _infer(bundle: Path, args: list[str], cwd: Path, how: str = "isolated",
           env: dict | None = None) -> subprocess.CompletedProcess:
    """infer.py in a fresh interpreter: `python -I /abs/infer.py` (isolated), `python infer.py`
    from the bundle folder (relative) or `python /abs/infer.py` from elsewhere (absolute)."""
    if how == "relative":
        argv, cwd = [sys.executable, "infer.py"], bundle
    elif how == "absolute":
        argv = [sys.executable, str(bundle / "infer.py")]
    elif how == "isolated-relative":
        argv, cwd = [sys.executable, "-I", "infer.py"], bundle
    else:
        argv = [sys.executable, "-I", str(bundle / "infer.py")]
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([*argv, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**base, "OMP_NUM_THREADS": "1", **(env or {})})


def _one_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, (proc.returncode,
                                                                                        proc.stderr)
    assert lines[0].startswith("error: ")
    return lines[0]


def _labels(proc: subprocess.CompletedProcess) -> list[int]:
    assert proc.returncode == 0, proc.stderr
    return [r["index"] for r in json.loads(proc.stdout)]


@pytest.fixture(scope="module")
def model() -> bytes:
    return _model(_weights())


# ---------------------------------------------------------------- 1. planted modules beside infer.py
@pytest.mark.parametrize("how", ["relative", "absolute", "isolated", "isolated-relative"])
def test_infer_runs_every_way_it_is_started(how: str, model: bytes, tmp_path: Path):
    """Dropping its own folder from sys.path keeps `python infer.py`, `python /abs/infer.py` and
    `python -I infer.py` working, with the predictions the model gives for the pipeline's decode."""
    bundle = _bundle(tmp_path / "b", model)
    paths = _images(tmp_path / "img")
    assert _labels(_infer(bundle, ["--json", *paths], tmp_path, how)) == _predict(model, _decoded(paths))


@pytest.mark.parametrize("planted", ["numpy", "json", "__future__"])
@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_a_module_planted_beside_infer_never_runs(planted: str, how: str, model: bytes, tmp_path: Path):
    """Before: the script's folder was sys.path[0], so `import numpy` (and the stdlib `json`, and
    even `from __future__ import annotations`) ran a planted NAME.py. Now the planted file never
    runs, and infer.py refuses the bundle, naming the file."""
    bundle = _bundle(tmp_path / "b", model)
    marker = tmp_path / "ran"
    (bundle / f"{planted}.py").write_text(f"open({str(marker)!r}, 'w').write('{MARKER}')\n")
    proc = _infer(bundle, _images(tmp_path / "img", 2), tmp_path, how)
    assert not marker.exists(), proc.stderr
    line = _one_error(proc)
    assert line.startswith(f"error: {planted}.py: a Python/native module file that manifest.json does not list")
    assert "python -m pipeline verify" in line


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_a_listed_module_beside_infer_is_still_not_imported(how: str, model: bytes, tmp_path: Path):
    """The sys.path clean-up alone: a `numpy.py` that even the manifest lists (so the refusal of
    unlisted code does not fire) is not imported; the installed numpy is, and infer.py runs."""
    bundle = _bundle(tmp_path / "b", model)
    marker = tmp_path / "ran"
    planted = f"open({str(marker)!r}, 'w').write('{MARKER}')\n".encode()
    (bundle / "numpy.py").write_bytes(planted)
    _edit_manifest(bundle, lambda m: m["files"].update({"numpy.py": {"sha256": _sha(planted),
                                                                      "size_bytes": len(planted)}}))
    paths = _images(tmp_path / "img", 3)
    assert _labels(_infer(bundle, ["--json", *paths], tmp_path, how)) == _predict(model, _decoded(paths))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["evil.py", "evil.pyc", "zzz.pth", "libevil.so", "libevil.so.1", "pkg"])
def test_unlisted_code_beside_infer_is_refused(name: str, model: bytes, tmp_path: Path):
    """Before: any .py/.pth/.so lying beside infer.py went unnoticed. Now one error line names it."""
    bundle = _bundle(tmp_path / "b", model)
    if name == "pkg":
        (bundle / "pkg").mkdir()
        (bundle / "pkg" / "__init__.py").write_text("")
    else:
        (bundle / name).write_bytes(b"\x7fELF not really")
    line = _one_error(_infer(bundle, _images(tmp_path / "img", 1), tmp_path))
    assert line.startswith(f"error: {name}: a Python") and "delete it" in line


# ---------------------------------------------------------------- 2. files changed after the bundle
def _negated(index: tuple[int, ...]) -> bytes:
    w = _weights()
    w[index] = -w[index]
    return _model(w)


def _negate_one_conv_weight(bundle: Path, model: bytes) -> None:
    """The first single conv weight whose negation changes the model's predictions on the test
    images (the images _images writes): a same-size file that predicts otherwise."""
    x = _decoded(_images(bundle.parent / "probe"))
    want = _predict(model, x)
    for index in np.ndindex(*_weights().shape):
        if _predict(_negated(index), x) != want:
            (bundle / "model.onnx").write_bytes(_negated(index))
            return
    raise AssertionError("no single weight changes the predictions")


def _tampered_cases() -> dict:
    def negated(b: Path, model: bytes) -> None:
        _negate_one_conv_weight(b, model)

    def truncated(b: Path, model: bytes) -> None:
        (b / "model.onnx").write_bytes(model[:-7])

    def missing(b: Path, model: bytes) -> None:
        (b / "model.onnx").unlink()

    def artifact_sha(b: Path, model: bytes) -> None:
        _edit_manifest(b, lambda m: m["artifacts"][0].update(sha256="0" * 64))

    def unrecorded(b: Path, model: bytes) -> None:
        _edit_manifest(b, lambda m: m["files"].pop("model.onnx"))

    def folder(b: Path, model: bytes) -> None:
        (b / "model.onnx").unlink()
        (b / "model.onnx").mkdir()

    def symlink(b: Path, model: bytes) -> None:  # same bytes, elsewhere: refused like `pipeline verify`
        (b.parent / "elsewhere.onnx").write_bytes(model)
        (b / "model.onnx").unlink()
        (b / "model.onnx").symlink_to(b.parent / "elsewhere.onnx")

    return {
        "one conv weight negated": (negated, "error: model.onnx: sha256 differs from the one manifest.json records"),
        "truncated": (truncated, f"error: model.onnx: {len(_model(_weights())) - 7} bytes where manifest.json "
                                 f"records {len(_model(_weights()))}"),
        "missing": (missing, "error: model.onnx: missing from the bundle (manifest.json lists it)"),
        "artifact sha256 not the files entry": (artifact_sha, "error: manifest.json: artifact model.onnx: its "
                                                "sha256 is not the one `files` records for model.onnx"),
        "not recorded in files": (unrecorded, "error: model.onnx: manifest.json `files` records no sha256 and size"),
        "a folder": (folder, "error: model.onnx: not a regular file"),
        "a symlink": (symlink, "error: model.onnx: not a regular file"),
    }


@pytest.mark.parametrize("case", list(_tampered_cases()))
def test_a_changed_artifact_is_refused_before_it_is_loaded(case: str, model: bytes, tmp_path: Path):
    """Before: a model with one conv weight negated (manifest untouched) ran, exit 0, and gave other
    predictions than the report measured. Now every file the runtime reads is checked first."""
    bundle = _bundle(tmp_path / "b", model)
    paths = _images(tmp_path / "img")
    assert _labels(_infer(bundle, ["--json", *paths], tmp_path)) == _predict(model, _decoded(paths))
    change, expected = _tampered_cases()[case]
    change(bundle, model)
    if case == "one conv weight negated":  # the attack matters: this model predicts otherwise
        assert _predict((bundle / "model.onnx").read_bytes(), _decoded(paths)) != _predict(model, _decoded(paths))
        assert (bundle / "model.onnx").stat().st_size == len(model)
    line = _one_error(_infer(bundle, ["--json", *paths], tmp_path))
    assert line.startswith(expected), line
    assert "python -m pipeline verify" in line


def test_an_intact_artifact_its_runtime_cannot_load_is_one_error_line(tmp_path: Path):
    """The files match the manifest but ONNX Runtime cannot parse the model (a bundle written
    from a broken export): one line naming it, after the checks passed."""
    bundle = _bundle(tmp_path / "b", b"not an onnx model")
    line = _one_error(_infer(bundle, _images(tmp_path / "img", 1), tmp_path))
    assert line.startswith("error: model.onnx: onnxruntime cannot load it (") and "pipeline verify" in line


def test_write_bundle_output_passes_the_checks_and_a_changed_byte_does_not(model: bytes, tmp_path: Path):
    """A bundle as pipeline.bundle.write_bundle writes it (README, real manifest) runs; after one
    byte of its ONNX changes, it does not."""
    from pipeline.bundle import write_bundle

    run_dir = tmp_path / "run"
    src = run_dir / "stages" / "export" / "model.onnx"
    src.parent.mkdir(parents=True)
    src.write_bytes(model)
    rows = [{"format": "onnx", "precision": "fp32", "runtime": "onnxruntime", "shipped": True, "measured": True,
             "top1": None, "agreement": None, "path": str(src.relative_to(run_dir))}]
    write_bundle(tmp_path / "out" / "cpu", rows, run_dir, {"target": "cpu", "runtime": "onnxruntime",
                                                          "labels": LABELS, "preprocessing": dict(PRE)})
    bundle = tmp_path / "out" / "cpu"
    paths = _images(tmp_path / "img")
    assert _labels(_infer(bundle, ["--json", *paths], tmp_path)) == _predict(model, _decoded(paths))
    readme = (bundle / "README.txt").read_text()  # says how to decode, for those not using infer.py
    assert "EXIF orientation applied, transparency composited on black, 16-bit scaled to 8 bits" in readme
    _negate_one_conv_weight(bundle, model)
    assert _one_error(_infer(bundle, paths, tmp_path)).startswith("error: model.onnx: sha256 differs")


def test_a_changed_tensorrt_build_kit_is_refused_before_the_script_runs(tmp_path: Path):
    """Building the engine runs the bundle's script: its script and inputs are checked first (a
    changed script never runs). FAKE tensorrt/pycuda (tests/fakes) only so infer.py gets that far."""
    from tests.fakes.trt_runtime import write_fake_tensorrt_lib

    lib = write_fake_tensorrt_lib(tmp_path / "lib")
    marker = tmp_path / "built"
    script = f"#!/bin/bash\ntouch {marker}\nexit 1\n".encode()
    files = {"infer.py": INFER_SRC.read_bytes(), "build_trtexec.sh": script, "model.onnx": b"onnx bytes"}
    bundle = tmp_path / "b"
    bundle.mkdir()
    for name, data in files.items():
        (bundle / name).write_bytes(data)
    artifact = {"format": "tensorrt-fp16", "precision": "fp16", "runtime": "tensorrt", "path": "model.fp16.engine",
                "files": [], "build": {"script": "build_trtexec.sh", "builder": "onnx", "inputs": ["model.onnx"]}}
    (bundle / MANIFEST).write_text(json.dumps(_manifest(files, artifact, runtime="tensorrt")))
    paths = _images(tmp_path / "img", 1)
    env = {"PYTHONPATH": str(lib)}
    (bundle / "model.onnx").write_bytes(b"onnx bytez")  # an input changed: nothing runs
    line = _one_error(_infer(bundle, paths, tmp_path, "absolute", env))
    assert line.startswith("error: model.onnx: sha256 differs") and not marker.exists()
    (bundle / "model.onnx").write_bytes(b"onnx bytes")
    (bundle / "build_trtexec.sh").write_bytes(script.replace(b"exit 1", b"exit 2"))  # the script changed
    line = _one_error(_infer(bundle, paths, tmp_path, "absolute", env))
    assert line.startswith("error: build_trtexec.sh: sha256 differs") and not marker.exists()
    (bundle / "build_trtexec.sh").write_bytes(script)  # intact: the script runs (and fails, exit 1)
    proc = _infer(bundle, paths, tmp_path, "absolute", env)
    assert proc.returncode == 2 and marker.exists(), proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: build_trtexec.sh fp16 failed (exit 1)")


# ---------------------------------------------------------------- 3. decoding as the pipeline decodes
def _save(img: Image.Image, path: Path, **kw) -> str:
    img.save(path, **kw)
    return str(path)


def _exif_rotated(path: Path, fmt: str) -> str:
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (6, 10, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    return _save(img, path, format=fmt, exif=exif.tobytes())


def _image_cases() -> dict:
    rng = np.random.default_rng(2)

    def rgba(p: Path) -> str:
        a = rng.integers(0, 256, (12, 12, 4), dtype=np.uint8)
        a[..., 3] = np.where(rng.random((12, 12)) < 0.5, 0, rng.integers(0, 256, (12, 12)))
        return _save(Image.fromarray(a, "RGBA"), p.with_suffix(".png"))

    def la(p: Path) -> str:
        return _save(Image.fromarray(rng.integers(0, 256, (12, 12, 2), dtype=np.uint8), "LA"), p.with_suffix(".png"))

    def p_transparent(p: Path) -> str:
        img = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).quantize(16)
        return _save(img, p.with_suffix(".png"), transparency=3)

    def grey16(p: Path) -> str:
        img = Image.fromarray(rng.integers(0, 65536, (12, 12), dtype=np.uint16))
        assert img.mode.startswith("I;16")
        return _save(img, p.with_suffix(".png"))

    def big_jpeg(p: Path) -> str:  # decoded at a reduced scale (draft), as the pipeline does
        return _save(Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)), p.with_suffix(".jpg"),
                     quality=90)

    def cmyk(p: Path) -> str:
        return _save(Image.fromarray(rng.integers(0, 256, (9, 9, 4), dtype=np.uint8), "CMYK"), p.with_suffix(".jpg"))

    def float_tiff(p: Path) -> str:
        return _save(Image.fromarray(rng.normal(128, 90, (10, 10)).astype(np.float32), "F"), p.with_suffix(".tif"))

    return {"RGBA": rgba, "LA": la, "P with transparency": p_transparent, "I;16 grey": grey16,
            "EXIF-rotated JPEG": lambda p: _exif_rotated(p.with_suffix(".jpg"), "JPEG"),
            "EXIF-rotated PNG": lambda p: _exif_rotated(p.with_suffix(".png"), "PNG"),
            "big JPEG": big_jpeg, "CMYK": cmyk, "float TIFF": float_tiff}


@pytest.mark.parametrize("chans", [3, 1])
@pytest.mark.parametrize("case", list(_image_cases()))
def test_infer_decodes_every_image_as_the_pipeline_does(case: str, chans: int, tmp_path: Path):
    """Before: infer.py called img.convert(...) only, so RGBA/LA/P with transparency lost the black
    background, 16-bit greys clipped, EXIF rotation was ignored (digits as RGBA PNGs: pipeline
    24.72 % top-1, infer.py 10 %). Now its array equals dskd/data/decode.py's for the same file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bundle_infer_under_test", INFER_SRC)
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    path = _image_cases()[case](tmp_path / "img")
    got = infer.load_images([path], {**PRE, "in_chans": chans})
    want = _decoded([path], chans)
    assert got.dtype == np.uint8 and got.shape == want.shape == (1, chans, SIZE, SIZE)
    np.testing.assert_array_equal(got, want)


def test_rgba_images_through_infer_give_the_pipelines_predictions(model: bytes, tmp_path: Path):
    """End to end: RGBA PNGs through the real infer.py predict what the model gives for the
    pipeline's decode of them (and, with these images, not what a plain convert('RGB') gives)."""
    bundle = _bundle(tmp_path / "b", model)
    rng = np.random.default_rng(5)
    paths = []
    (tmp_path / "img").mkdir()
    for i in range(12):
        a = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
        a[..., 3] = rng.integers(0, 40, (SIZE, SIZE))  # mostly transparent: on black, nearly dark
        paths.append(_save(Image.fromarray(a, "RGBA"), tmp_path / "img" / f"{i}.png"))
    want = _predict(model, _decoded(paths))
    plain = np.stack([np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p in paths])
    assert _predict(model, plain) != want  # the images tell the two decodes apart
    assert _labels(_infer(bundle, ["--json", *paths], tmp_path)) == want


# ---------------------------------------------------------------- 4. one error line, never a traceback
@pytest.mark.parametrize(("module", "expected"), [("numpy", "error: numpy is not installed here: pip install numpy"),
                                                  ("PIL", "error: PIL.Image is not installed here: pip install Pillow")])
def test_a_missing_numpy_or_pillow_is_one_error_line(module: str, expected: str, model: bytes, tmp_path: Path):
    """Before: a ModuleNotFoundError traceback. The package is made unimportable in the child
    (sys.modules[name] = None: `import name` raises ImportError, as when it is not installed)."""
    bundle = _bundle(tmp_path / "b", model)
    img = _images(tmp_path / "img", 1)[0]
    code = (f"import sys, runpy; sys.modules[{module!r}] = None; sys.argv = ['infer.py', {img!r}]; "
            f"runpy.run_path({str(bundle / 'infer.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert _one_error(proc) == expected


def _png_header_only(path: Path, w: int, h: int) -> str:
    """A PNG that declares w x h RGB pixels (no pixel data): what a decompression bomb's header says."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return str(path)


@pytest.mark.parametrize(("w", "h", "claimed"), [(30000, 30000, "900.0"), (7000, 7000, "49.0")])
def test_a_decompression_bomb_is_one_error_line_naming_the_file(w: int, h: int, claimed: str, model: bytes,
                                                                 tmp_path: Path):
    """Before: 30000x30000 gave a PIL.Image.DecompressionBombError traceback (and 7000x7000, under
    Pillow's limit, was decoded: 49 megapixels). Now the header is checked against the pipeline's
    default cap (40 megapixels, --max-image-mp) before any pixel is decoded."""
    bundle = _bundle(tmp_path / "b", model)
    bomb = _png_header_only(tmp_path / "bomb.png", w, h)
    line = _one_error(_infer(bundle, [bomb], tmp_path))
    assert line.startswith(f"error: {bomb}: image of ") and f"{claimed} megapixels, over the cap of 40" in line
    assert "--max-image-mp" in line


def _inconsistent_cases() -> dict:
    return {
        "input size": lambda b: _edit_manifest(b, lambda m: m["preprocessing"].update(input_size=10)),
        "channels": lambda b: _edit_manifest(b, lambda m: m["preprocessing"].update(in_chans=1, mean=[0.5],
                                                                                    std=[0.25])),
        "fewer labels than outputs": lambda b: _edit_manifest(b, lambda m: m.update(labels=["a"])),
    }


@pytest.mark.parametrize("case", list(_inconsistent_cases()))
def test_a_model_that_does_not_match_the_manifest_is_one_error_line(case: str, tmp_path: Path):
    """Before: ONNX Runtime's InvalidArgument traceback (input size, channels) or an IndexError
    (fewer labels than the model's outputs). Now: the bundle is inconsistent, run verify."""
    model = _model(_weights(), batch=4)  # a fixed input shape, as some exporters write
    bundle = _bundle(tmp_path / "b", model)
    paths = _images(tmp_path / "img", 4)
    pred = _labels(_infer(bundle, ["--json", *paths], tmp_path))
    assert max(pred) >= 1  # so one label is too few for these images (an IndexError before)
    _inconsistent_cases()[case](bundle)
    line = _one_error(_infer(bundle, paths, tmp_path))
    assert line.startswith("error: model.onnx: ") and "the bundle is inconsistent" in line
    assert "python -m pipeline verify" in line
    if case == "fewer labels than outputs":
        assert "outputs of shape (4, 4) for 4 images, where manifest.json lists 1 labels" in line


# ---------------------------------------------------------------- infer.py stays a device script
def test_infer_parses_as_python_38_and_imports_nothing_before_cleaning_sys_path():
    """JetPack 5 ships Python 3.8; and `from __future__ import ...` is itself an import (from the
    script's folder, before anything else runs), so infer.py has none."""
    import ast

    tree = ast.parse(INFER_SRC.read_text(), feature_version=(3, 8))
    first = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in first)
    assert [a.name for a in first[0].names] == ["sys"]
    for node in ast.walk(tree):  # annotations are strings: never evaluated on 3.8
        if isinstance(node, ast.FunctionDef):
            for a in [*node.args.args, *node.args.kwonlyargs, node.returns]:
                ann = getattr(a, "annotation", a)
                assert not isinstance(ann, (ast.Subscript, ast.BinOp)), (node.name, ast.unparse(ann))
