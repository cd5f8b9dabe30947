"""The format registry (export/formats.py) and the target registry (deploy_targets/registry.py)
keep their extension claims:

- a format = one module + one entry: a toy "onnx-copy" format registered FROM THIS MODULE is
  listed, built by the real export API (real ONNX Runtime parity check), recognised by its own
  detector, and shipped by the deploy bundle with exactly its declared files, which the
  bundle's infer.py then runs;
- a target on an existing runtime = one entry: a toy target is listed and resolves its formats;
- every format that can be built here (ONNX Runtime and OpenVINO) writes exactly its declared
  files, is recognised as itself by its detector, and the bundle copies exactly those files.

Real exports of the session's digits checkpoint (16×16): seconds, not minutes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy_targets.artifacts import artifact_format, companion_files
from deploy_targets.registry import (
    REACH_LOCAL,
    Target,
    get_target,
    list_targets,
    register_target,
    targets_table,
    unregister_target,
)
from dskd.errors import UserError
from export.api import export_all, export_format
from export.detect import Detector, onnx_is_quantized
from export.errors import ExportError
from export.formats import (
    FORMATS,
    BundleSpec,
    Companion,
    FormatSpec,
    detect_formats,
    kinds,
    list_formats,
    register_format,
    resolve_formats,
    unregister_format,
)
from pipeline.bundle import INFER, MANIFEST, README, verify_bundle, write_bundle
from pipeline.bundle_infer import PREDICTORS

# The formats the CPU machines here can build (TensorRT engines are built on a GPU / Jetson).
BUILDABLE = ("onnx", "onnx-int8", "openvino", "openvino-fp16", "openvino-int8")


# --------------------------------------------------------------------------- a toy format


def build_onnx_copy(job, spec: FormatSpec) -> None:
    """The toy format's builder: a copy of the FP32 ONNX plus a class-names file, checked for
    parity through real ONNX Runtime like every other artifact."""
    from export.build_onnx import onnx_fp32
    from export.runners import ort_predictor

    main = job.main_path(spec)
    main.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_fp32(job), main)
    labels = main.with_name(spec.companions[0].name_for(main.name))
    labels.write_text("\n".join(job.meta["class_names"]) + "\n", encoding="utf-8")
    parity = job.check(spec, ort_predictor(main, job.opts.threads), "onnxruntime CPU (onnx-copy)")
    job.record(spec, parity, {"copied_from": "model.onnx"})


def build_onnx_copy_forgetting_its_labels(job, spec: FormatSpec) -> None:
    """A broken builder: writes the main file but not the declared companion."""
    from export.build_onnx import onnx_fp32
    from export.runners import ort_predictor

    main = job.main_path(spec)
    main.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_fp32(job), main)
    job.record(spec, job.check(spec, ort_predictor(main, 1), "onnxruntime CPU"), {})


COPY_DETECTOR = Detector((".onnx",), "ONNX copy",
                         lambda p: p.name.endswith(".copy.onnx") and not onnx_is_quantized(p))
ONNX_COPY = FormatSpec(
    "onnx-copy", "fp32", "onnxruntime", "onnx-copy/model.copy.onnx", "onnx", build_onnx_copy, COPY_DETECTOR,
    companions=(Companion(".labels.txt", "class names", needed_to_run=False),),
    modules=("onnx", "onnxruntime"), description="TEST ONLY: a copy of the FP32 ONNX",
    bundle=BundleSpec("model.copy.onnx"))


@pytest.fixture
def onnx_copy():
    spec = register_format(ONNX_COPY)
    yield spec
    unregister_format(spec.name)


@pytest.fixture
def export_dir(tmp_path: Path, digits_checkpoint: Path) -> Path:
    """A fresh export folder and the session's checkpoint copied beside it (read-only fixture)."""
    shutil.copyfile(digits_checkpoint, tmp_path / "model.pt")
    return tmp_path


def _row(entry, export_root: Path, run_dir: Path) -> dict:
    """The report row a `pipeline run` writes for an exported artifact (what write_bundle reads)."""
    return {"format": entry.format, "precision": entry.precision, "runtime": entry.runtime, "shipped": True,
            "measured": False, "top1": None, "agreement": None,
            "path": str((export_root / entry.path).relative_to(run_dir))}


def _meta(bundle, target: str, runtime: str) -> dict:
    return {"target": target, "runtime": runtime, "labels": list(bundle.class_names),
            "preprocessing": {"input_size": 16, "in_chans": 3, "mean": list(bundle.mean), "std": list(bundle.std),
                              "layout": "NCHW", "input": "input", "output": "logits",
                              "scale": "x/255 then (x - mean) / std"}}


def test_a_format_registered_from_a_test_is_listed_built_detected_and_bundled(
        onnx_copy: FormatSpec, export_dir: Path, digits_rgb, tmp_path: Path):
    assert "onnx-copy" in list_formats() and [s.name for s in resolve_formats("onnx-copy")] == ["onnx-copy"]
    assert onnx_copy.files == ("onnx-copy/model.copy.onnx", "onnx-copy/model.copy.labels.txt")

    run_dir = export_dir
    out = run_dir / "artifacts"
    entry = export_format(run_dir / "model.pt", out, "onnx-copy", calib=digits_rgb, parity_size=64, opset=17)
    assert entry.format == "onnx-copy" and entry.parity["passed"]
    assert [f.path for f in entry.files] == list(onnx_copy.files)
    assert (out / "onnx-copy" / "model.copy.labels.txt").read_text().split() == list(digits_rgb.class_names)

    main = out / entry.path
    assert "onnx-copy" in [s.name for s in detect_formats(main)]  # its own detector knows it
    other = shutil.copyfile(main, tmp_path / "model.onnx")  # the same graph under the FP32 ONNX's name
    assert [s.name for s in detect_formats(other)] == ["onnx"]  # ...and only its own files
    assert artifact_format(main) == "onnx"  # its kind: what measurements and report.json call it
    assert companion_files(main, "onnx") == [main]  # the labels file is not needed to run

    tar = write_bundle(tmp_path / "bundle" / "cpu", [_row(entry, out, run_dir)], run_dir,
                       _meta(digits_rgb, "cpu", "onnxruntime"))
    bundle = tmp_path / "bundle" / "cpu"
    assert sorted(p.name for p in bundle.iterdir()) == sorted(
        [INFER, MANIFEST, README, "model.copy.onnx", "model.copy.labels.txt"])
    art = json.loads((bundle / MANIFEST).read_text())["artifacts"]
    assert [(a["format"], a["path"], a["files"]) for a in art] == [
        ("onnx-copy", "model.copy.onnx", ["model.copy.labels.txt", "model.copy.onnx"])]
    assert verify_bundle(bundle)["ok"] and verify_bundle(tar)["ok"]
    assert tar.stat().st_mode & 0o777 == 0o644  # was 0600 (mkstemp): another account could not fetch it

    # the bundle's infer.py runs it by its runtime and predicts what ONNX Runtime predicts here
    images = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        Image.fromarray(digits_rgb.test_x[i].numpy().transpose(1, 2, 0)).save(p)
        images.append(str(p))
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-I", str(bundle / INFER), "--json", *images], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from export.runners import ort_predictor

    x = digits_rgb.test_x[:4].numpy().astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(digits_rgb.mean).reshape(1, -1, 1, 1)) / np.float32(digits_rgb.std).reshape(1, -1, 1, 1)
    want = np.argmax(ort_predictor(main, 1)(np.ascontiguousarray(x, dtype=np.float32)), axis=1).tolist()
    assert [r["index"] for r in json.loads(proc.stdout)] == want


def test_a_builder_that_misses_a_declared_file_fails_and_writes_nothing(export_dir: Path, digits_rgb):
    spec = register_format(dataclasses.replace(ONNX_COPY, name="onnx-copy-broken",
                                               builder=build_onnx_copy_forgetting_its_labels))
    try:
        with pytest.raises(ExportError, match=r"onnx-copy-broken: the build wrote no onnx-copy/model\.copy\.labels\.txt"):
            export_all(export_dir / "model.pt", export_dir / "out", formats=[spec.name], calib=digits_rgb,
                       parity_size=16, opset=17)
        assert not (export_dir / "out").exists()  # all or nothing: the staging folder is gone too
    finally:
        unregister_format(spec.name)


def test_a_bundle_is_not_written_when_an_artifact_lacks_a_declared_file(tmp_path: Path):
    """The IR-without-its-.bin bundle: refused, naming the file, and nothing is left behind."""
    xml = tmp_path / "run" / "artifacts" / "openvino" / "model.xml"
    xml.parent.mkdir(parents=True)
    xml.write_text("<net/>")
    row = {"format": "openvino", "precision": "fp32", "runtime": "openvino", "shipped": True,
           "path": "artifacts/openvino/model.xml"}
    meta = {"target": "intel-cpu", "runtime": "openvino", "labels": ["a"],
            "preprocessing": {"input_size": 4, "in_chans": 1, "mean": [0.5], "std": [0.25]}}
    with pytest.raises(UserError, match=r"has no model\.bin beside it \(weights file"):
        write_bundle(tmp_path / "out" / "intel-cpu", [row], tmp_path / "run", meta)
    assert not (tmp_path / "out" / "intel-cpu").exists() and not (tmp_path / "out" / "intel-cpu.tar.gz").exists()


def test_format_and_target_registries_refuse_inconsistent_entries():
    with pytest.raises(ValueError, match="already registered"):
        register_format(FORMATS["onnx"])
    with pytest.raises(ValueError, match="needs a builder"):
        register_format(dataclasses.replace(ONNX_COPY, name="no-builder", builder=None))
    with pytest.raises(ValueError, match="share one runtime"):
        register_target(Target("mixed", ("onnx", "openvino-int8"), REACH_LOCAL, 1, "mixed runtimes"))
    with pytest.raises(ValueError, match="not in export/formats.py"):
        register_target(Target("typo", ("onnx-int4",), REACH_LOCAL, 1, "unknown format"))
    assert "mixed" not in [t.name for t in list_targets()] and "typo" not in [t.name for t in list_targets()]


# --------------------------------------------------------------------------- a toy target


def test_a_target_on_an_existing_runtime_is_one_entry():
    register_target(Target("toy-int8-first", ("onnx-int8", "onnx"), REACH_LOCAL, 1,
                           "TEST ONLY: ONNX Runtime here, INT8 preferred"))
    try:
        assert "toy-int8-first" in [t.name for t in list_targets()]
        t = get_target("toy-int8-first")
        assert (t.runtime, t.precisions) == ("onnxruntime", ("int8", "fp32"))
        assert (t.export_format("int8"), t.artifact_format("int8")) == ("onnx-int8", "onnx-qdq")
        assert (t.export_format("fp32"), t.artifact_format("fp32")) == ("onnx", "onnx")
        assert t.accepts == ("onnx", "onnx-qdq")
        row = next(r for r in targets_table() if r["target"] == "toy-int8-first")
        assert (row["runtime"], row["precisions"], row["ok"]) == ("onnxruntime", "int8,fp32", True), row
    finally:
        unregister_target("toy-int8-first")
    assert "toy-int8-first" not in [t.name for t in list_targets()]


# --------------------------------------------------------------------------- the vocabularies derived


def test_derived_vocabularies_keep_their_report_values():
    """report.json and measurements name artifact kinds: derived now, the same values as before."""
    assert kinds() == ("onnx", "onnx-qdq", "openvino-ir", "trt-engine", "torch-trt-ep")
    assert list_formats() == ["onnx", "onnx-int8", "openvino", "openvino-fp16", "openvino-int8",
                              "tensorrt-fp16", "tensorrt-int8"]
    for t in list_targets():
        for name in dict(t.export_formats).values():
            assert FORMATS[name].runtime == t.runtime and FORMATS[name].kind in t.accepts
    for spec in FORMATS.values():  # every bundled format has an infer.py predictor for its runtime
        if spec.bundle is not None:
            assert spec.runtime in PREDICTORS, spec.name
    from deploy_targets.engine_build import engine_file

    for p in ("fp16", "int8"):  # the bundle's engine name is the one the device build writes
        assert FORMATS[f"tensorrt-{p}"].bundle.file_name(p, None) == engine_file(p)


def test_the_export_docs_table_lists_every_format_with_its_files():
    """docs/export.md's "Formats" table is the user's view of the registry: same names, same main files."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text(encoding="utf-8")
    rows = [ln.split("|")[1:3] for ln in text.split("## Formats", 1)[1].split("\n\n")[1].splitlines()[2:]]
    table = {name.strip(" `"): files.split("`")[1] for name, files in rows}
    assert table == {n: FORMATS[n].path for n in list_formats()}


@pytest.mark.slow  # five real exports, nncf included: ~40 s here
def test_every_buildable_format_writes_exactly_its_declared_files_and_bundles_them(
        export_dir: Path, digits_rgb, tmp_path: Path):
    run_dir = export_dir
    out = run_dir / "artifacts"
    manifest = export_all(run_dir / "model.pt", out, formats=list(BUILDABLE), calib=digits_rgb, parity_size=64,
                          calib_size=100)
    assert sorted(a.format for a in manifest.artifacts) == sorted(BUILDABLE), manifest.skipped
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    declared = {f for name in BUILDABLE for f in FORMATS[name].files}
    assert on_disk == declared  # nothing undeclared written, nothing declared missing
    for a in manifest.artifacts:
        spec = FORMATS[a.format]
        assert [f.path for f in a.files] == list(spec.files)
        main = out / a.path
        assert spec in detect_formats(main), (a.format, [s.name for s in detect_formats(main)])
        assert artifact_format(main) == spec.kind

    rows = [_row(a, out, run_dir) for a in manifest.artifacts]
    for target, runtime in (("cpu", "onnxruntime"), ("intel-cpu", "openvino")):
        mine = [r for r in rows if r["runtime"] == runtime]
        write_bundle(tmp_path / target, mine, run_dir, _meta(digits_rgb, target, runtime))
        bundled = json.loads((tmp_path / target / MANIFEST).read_text())
        for art in bundled["artifacts"]:
            spec = FORMATS[art["format"]]
            assert len(art["files"]) == len(spec.files)  # exactly the declared files, renamed flat
            assert art["path"] == spec.bundle.file_name(spec.precision, Path(spec.path).name)
        names = {n for art in bundled["artifacts"] for n in art["files"]}
        assert set(bundled["files"]) == names | {INFER, README}
        assert verify_bundle(tmp_path / target)["ok"]
    assert sorted(json.loads((tmp_path / "intel-cpu" / MANIFEST).read_text())["files"]) == sorted(
        [INFER, README, "model.fp32.xml", "model.fp32.bin", "model.fp16.xml", "model.fp16.bin",
         "model.int8.xml", "model.int8.bin"])
