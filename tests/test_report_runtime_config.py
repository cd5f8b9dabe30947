"""Issue 20, the pipeline side: threads/streams/hint, pre-processing and throughput of a real
measurement reach report.json, report.md and report.html, and `pipeline bench` takes the flags.

Real OpenVINO / ONNX Runtime measurements of a tiny model (the `tiny_fp32` fixture), passed
through the deploy stage's own functions; no pipeline run (that costs minutes here).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.recipe import Recipe, TargetConfig
from pipeline.report import artifact_rows, to_markdown, validate_report
from pipeline.report_html import num, to_html
from pipeline.run import report_artifact
from pipeline.ship_stages import _deploy_config, _measure, _record

QUICK = {"min_iters": 20, "min_seconds": 0.2, "warmup_seconds": 0.05}


def _ctx(**target: object) -> SimpleNamespace:
    return SimpleNamespace(recipe=Recipe(target=TargetConfig(**{**QUICK, **target})), options={})


def _report(rows: list[dict]) -> dict:
    return {"schema_version": 1, "recipe": {"name": "cfg", "config": {}}, "passed": True, "gates": [],
            "target": {"name": "intel-cpu", "runtime": "openvino", "measured": True},
            "teacher": {"model": "t", "top1": 90.0},
            "student": {"model": "s", "method": "dskd", "top1": 89.0, "params": 1, "macs": 1},
            "artifacts": rows}


def test_recipe_hint_and_streams_reach_report_json_md_and_html(tiny_fp32: dict):
    ctx = _ctx(name="intel-cpu", threads=2, hint="throughput", streams=2, batch_sizes=[1, 2])
    m = _measure(ctx, tiny_fp32["onnx"], "intel-cpu", "fp32", tiny_fp32["eval"], None, [1, 2])
    assert m.runtime_config["threads"] == 2 and m.throughput["streams"] == 2  # the recipe reached the runner
    deploy_row = {"format": "onnx", "precision": "fp32", "runtime": "openvino", "path": "a.onnx",
                  "sha256": "0" * 64, "size_bytes": 1000, "shipped": True}
    row = report_artifact(_record(deploy_row, m))
    report = json.loads(json.dumps(_report([row])))  # what report.json holds
    assert validate_report(report) == []
    a = report["artifacts"][0]
    assert a["runtime_config"] == m.runtime_config and a["throughput"] == m.throughput
    assert a["preprocess"]["p50_ms"] == m.preprocess["p50_ms"] > 0
    e2e = next(e for e in a["latency_by_batch"] if e["batch_size"] == 1)["end_to_end_per_image_ms"]
    config = "2 threads, 1 stream, latency hint"
    md, page = to_markdown(report, {}), to_html(report, {})
    for text in (md, page):
        assert config in text and "threads / streams / hint" in text and "images/s" in text
        # as both renderers write a number (3 decimals from 1 ms up, 3 significant digits below)
        assert num(m.preprocess["p50_ms"], 3) in text and num(e2e, 3) in text
        assert f"{m.throughput['images_per_s']:.1f}" in text and "batch 2, 2 streams" in text
    assert artifact_rows(report)[0][5] == config  # the terminal table too


def test_latency_only_run_has_no_throughput_column_and_old_rows_render(tiny_fp32: dict):
    ctx = _ctx(name="cpu")
    m = _measure(ctx, tiny_fp32["onnx"], "cpu", "fp32", None, None, [1])
    assert m.throughput is None and m.preprocess is None and m.runtime_config["hint"] == "latency"
    row = report_artifact(_record({"format": "onnx", "precision": "fp32", "runtime": "onnxruntime",
                                   "size_bytes": 10, "shipped": True}, m))
    old = {k: v for k, v in row.items() if k not in ("runtime_config", "throughput", "preprocess")}
    report = _report([row, dict(old, precision="int8")])  # a report written before issue 20
    md, page = to_markdown(report, {}), to_html(report, {})
    for text in (md, page):
        assert "images/s" not in text and "1 thread, 1 stream, latency hint" in text


def test_deploy_cache_key_changes_only_for_non_default_hint_and_streams():
    default = _deploy_config(_ctx())
    assert "hint" not in default and "streams" not in default  # old runs stay cached
    assert _deploy_config(_ctx(hint="throughput"))["hint"] == "throughput"
    assert _deploy_config(_ctx(streams=4))["streams"] == 4


@pytest.mark.slow
def test_bench_flags_reach_the_runner(tiny_fp32: dict, tmp_path: Path, capsys: pytest.CaptureFixture):
    from PIL import Image

    photo = tmp_path / "frame.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "m.json"
    code = main(["bench", str(tiny_fp32["onnx"]), "--target", "cpu", "--threads", "2", "--hint", "throughput",
                 "--streams", "0", "--image", str(photo), "--data", str(tiny_fp32["eval"]), "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    saved = json.loads(out.read_text())
    assert saved["runtime_config"]["threads"] == 2 and saved["runtime_config"]["mode_hint"] == "throughput"
    assert saved["preprocess"]["source"] == "frame.jpg" and saved["throughput"]["images_per_s"] > 0
    assert "2 threads, 1 stream, latency hint" in text and "images/s" in text and "pre-processing" in text


@pytest.mark.parametrize(("flags", "want"), [
    (["--hint", "fast"], "error: --hint 'fast': choose latency or throughput"),
    (["--streams", "-1"], "error: --streams -1: must be >= 0"),
    (["--image", "nope.png"], "error: --image nope.png: no such file"),
])
def test_bench_bad_flags_are_one_line_exit_2(tiny_fp32: dict, flags: list[str], want: str, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", str(tiny_fp32["onnx"]), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(want), err


def test_bundle_manifest_carries_runtime_config_and_infer_uses_its_threads(tiny_fp32: dict, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    from PIL import Image

    import pipeline.bundle_infer as infer
    from pipeline.bundle import MANIFEST, write_bundle

    m = _measure(_ctx(name="cpu", threads=2), tiny_fp32["onnx"], "cpu", "fp32", None, None, [1])
    row = report_artifact(_record({"format": "onnx", "precision": "fp32", "runtime": "onnxruntime",
                                   "path": tiny_fp32["onnx"].name, "shipped": True}, m))
    meta = {"target": "cpu", "runtime": "onnxruntime", "labels": list("abcde"),
            "preprocessing": {"input_size": 16, "in_chans": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
                              "layout": "NCHW", "input": "input", "output": "logits",
                              "scale": "x/255 then (x - mean) / std"}}
    write_bundle(tmp_path / "bundle" / "cpu", [row], tiny_fp32["onnx"].parent, meta)
    bundle = tmp_path / "bundle" / "cpu"
    entry = json.loads((bundle / MANIFEST).read_text())["artifacts"][0]
    assert entry["runtime_config"] == m.runtime_config and entry["runtime_config"]["threads"] == 2
    assert main(["verify", str(bundle)]) == 0  # the extra field keeps the bundle valid
    seen: list[int] = []
    real = infer.PREDICTORS["onnxruntime"]

    def recording(path: Path, threads: int, precision: str):
        seen.append(threads)
        return real(path, threads, precision)

    monkeypatch.setattr(infer, "HERE", bundle)
    monkeypatch.setitem(infer.PREDICTORS, "onnxruntime", recording)
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(image)
    assert len(infer.classify([str(image)], None, 4, None)) == 1  # default: the measured threads
    assert len(infer.classify([str(image)], None, 4, 1)) == 1  # --threads overrides
    assert seen == [2, 1]
    # "all physical cores" of the machine that measured: the device's runtime default (all of its cores)
    assert infer.measured_threads({"runtime_config": {"threads": 8, "threads_policy": "all physical cores"}}) == 0
    assert infer.measured_threads({}) == 0 and infer.measured_threads({"runtime_config": {"threads": None}}) == 0


@pytest.mark.parametrize("value", ["many", "-1", "1.5", ""])
def test_bench_threads_rejects_what_the_recipe_rejects(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`pipeline bench --threads` takes the recipe's values (count, "all", 0 = default), one line otherwise."""
    from pipeline.cli import main

    assert main(["bench", "missing.onnx", "--threads", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--threads" in err
    assert '"all"' in err or (value == "" and "is empty" in err)  # every empty flag value: one rule (argv)


def test_bench_threads_values_match_target_threads() -> None:
    from pipeline.cli import _bench_threads

    assert _bench_threads(None) is None and _bench_threads("0") is None
    assert _bench_threads("ALL") == "all" and _bench_threads("3") == 3
