"""bench/export_cpu.py dry run: every runtime measured, JSON and table written (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("export_cpu", ROOT / "bench" / "export_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_dry_run(tmp_path, capsys, digits_checkpoint):
    ckpt = digits_checkpoint  # a resnet8 trained 3 CE epochs on digits (tests/conftest.py)
    bench = load_bench()
    out = tmp_path / "export_cpu.json"
    rc = bench.main(["--models", str(ckpt), "--data", "digits", "--limit", "20",
                     "--runs", "5", "--warmup", "2", "--batch-runs", "2", "--threads", "1",
                     "--calib-size", "100", "--parity-size", "100", "--out", str(out),
                     "--work", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["machine"]["threads"] == 1
    (model,) = report["models"]
    assert set(model["runtimes"]) == {"torch eager FP32", "ORT FP32", "ORT INT8", "OpenVINO FP32",
                                      "OpenVINO auto", "OpenVINO INT8"}
    for r in model["runtimes"].values():
        assert r["batch1"]["runs"] == 5 and r["batch1"]["p50_ms"] > 0
        assert r["batch64_images_per_s"] > 0 and r["size_bytes"] > 0
        assert r["test_images"] == 200 and 0 <= r["top1"] <= 100
    # FP32 runtimes agree with PyTorch on every test image's top-1
    fp32 = {model["runtimes"][k]["top1"] for k in ("torch eager FP32", "ORT FP32", "OpenVINO FP32")}
    assert len(fp32) == 1
    assert model["runtimes"]["OpenVINO FP32"]["compiled_inference_precision"] == "f32"
    assert set(model["int8_top1_drop"]) == {"ORT INT8 vs ORT FP32", "OpenVINO INT8 vs OpenVINO FP32"}
    table = capsys.readouterr().out
    assert "| resnet8 (ce) | OpenVINO INT8 |" in table and "INT8 drop" in table


def test_bench_rejects_bad_checkpoint(tmp_path, capsys):
    bench = load_bench()
    rc = bench.main(["--models", str(tmp_path / "missing.pt"), "--data", "digits",
                     "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "no such file" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
