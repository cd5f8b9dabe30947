"""CPU benchmark of the exported students: latency, throughput, size and accuracy per runtime.

    python bench/export_cpu.py --models runs/r8x4/model.pt runs/r20/model.pt \
        --data ../shared/data/cifar10-jpg.tar.gz

For each checkpoint: export (onnx, onnx-int8, openvino, openvino-int8) with calibration on
the training split, then through torch eager FP32, ORT FP32, ORT INT8, OpenVINO FP32
(INFERENCE_PRECISION_HINT=f32), OpenVINO auto (the CPU plugin's own choice: bf16 on CPUs
with AVX512_BF16/AMX) and OpenVINO INT8 (auto precision for the layers left in float):
batch-1 latency p50/p90 over --runs runs after warm-up, batch-64 throughput, file size,
top-1 on the whole test split, INT8 top-1 drop. Writes bench/results/export_cpu.json and
prints a Markdown table. `--limit N` keeps N images per class and split (dry runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from deploy_targets.remote.dskd_runner.environment import cpu_model  # noqa: E402
from dskd.atomic import write_json  # noqa: E402
from dskd.checkpoint import build_model, file_sha256  # noqa: E402
from dskd.errors import UserError  # noqa: E402
from export import export_all  # noqa: E402
from export.imagesets import normalize_uint8  # noqa: E402
from export.ort_quant import cpu_flags  # noqa: E402
from export.runners import (  # noqa: E402
    Predictor,
    compiled_precision,
    openvino_predictor,
    ort_predictor,
    run_batched,
    torch_predictor,
)
from export.versions import tool_versions  # noqa: E402

FORMATS = ("onnx", "onnx-int8", "openvino", "openvino-int8")
GOAL_INT8_DROP = 0.5  # top-1 points on CIFAR-10
GOAL_OV_INT8_SPEEDUP = 3.0  # vs torch eager FP32, batch 1


def machine_info(threads: int) -> dict[str, Any]:
    model = cpu_model()  # the same reading the device runner records
    flags = cpu_flags()
    isa = sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                          "amx_bf16", "amx_int8", "amx_tile"})
    return {"cpu": model, "machine": platform.machine(), "logical_cpus": os.cpu_count(),
            "isa": isa, "threads": threads, "python": platform.python_version(),
            "versions": tool_versions()}


def time_batch1(predict: Predictor, x: np.ndarray, runs: int, warmup: int) -> dict[str, float]:
    """Per-call wall time of single images, cycling through `x`, after `warmup` calls."""
    for i in range(warmup):
        predict(x[i % len(x)][None])
    times = np.empty(runs)
    for i in range(runs):
        sample = np.ascontiguousarray(x[i % len(x)][None])
        t0 = time.perf_counter()
        predict(sample)
        times[i] = time.perf_counter() - t0
    ms = times * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "mean_ms": float(ms.mean()), "runs": runs}


def time_batch64(predict: Predictor, x: np.ndarray, runs: int, warmup: int = 3) -> float:
    """Images per second at batch 64 (median of `runs` batches)."""
    reps = int(np.ceil(64 / len(x)))
    batch = np.ascontiguousarray(np.concatenate([x] * reps)[:64])
    for _ in range(warmup):
        predict(batch)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        predict(batch)
        times.append(time.perf_counter() - t0)
    return float(64 / np.median(times))


def bench_model(ckpt: Path, args: argparse.Namespace) -> dict[str, Any]:
    from dskd.data import load_data
    from dskd.models import count_macs, count_params

    model, meta = build_model(ckpt)
    size, chans = int(meta["input_size"]), int(meta["in_chans"])
    bundle = load_data(args.data, input_size=size, in_chans=chans, progress=False,
                       limit_per_class=args.limit, cache_dir=args.cache_dir)
    tag = f"{ckpt.parent.name}-{meta['model']}-{file_sha256(ckpt)[:8]}"
    out = Path(args.work) / tag
    t0 = time.perf_counter()
    manifest = export_all(ckpt, out, formats=FORMATS, calib=bundle, threads=args.threads,
                          calib_size=args.calib_size, parity_size=args.parity_size)
    export_s = time.perf_counter() - t0
    x = normalize_uint8(bundle.test_x.numpy(), meta["mean"], meta["std"])
    y = bundle.test_y.numpy()
    timing_x = x[: max(64, min(len(x), 256))]

    def artifact(fmt: str) -> Path:
        return out / manifest.artifact(fmt).path

    def size_of(fmt: str) -> int:
        return manifest.artifact(fmt).size_bytes

    runtimes: list[tuple[str, str, Any, int, str]] = [
        ("torch eager FP32", "fp32", lambda: torch_predictor(model, args.threads),
         ckpt.stat().st_size, ckpt.name),
        ("ORT FP32", "fp32", lambda: ort_predictor(artifact("onnx"), args.threads),
         size_of("onnx"), "model.onnx"),
        ("ORT INT8", "int8", lambda: ort_predictor(artifact("onnx-int8"), args.threads),
         size_of("onnx-int8"), "model.int8.onnx"),
        ("OpenVINO FP32", "fp32", lambda: openvino_predictor(artifact("openvino"), "f32",
                                                             args.threads),
         size_of("openvino"), "openvino/model.xml+bin"),
        ("OpenVINO auto", "auto", lambda: openvino_predictor(artifact("openvino"), None,
                                                             args.threads),
         size_of("openvino"), "openvino/model.xml+bin"),
        ("OpenVINO INT8", "int8", lambda: openvino_predictor(artifact("openvino-int8"), None,
                                                             args.threads),
         size_of("openvino-int8"), "openvino-int8/model.xml+bin"),
    ]
    results: dict[str, Any] = {}
    for name, precision, make, nbytes, file in runtimes:
        predict = make()
        lat = time_batch1(predict, timing_x, args.runs, args.warmup)
        thr = time_batch64(predict, timing_x, args.batch_runs)
        logits = run_batched(predict, x, 64)
        top1 = float(np.mean(np.argmax(logits, 1) == y) * 100)
        entry = {"precision": precision, "file": file, "size_bytes": int(nbytes),
                 "batch1": lat, "batch64_images_per_s": thr, "top1": top1,
                 "test_images": int(len(y))}
        if name.startswith("OpenVINO"):
            xml = artifact("openvino-int8" if "INT8" in name else "openvino")
            entry["compiled_inference_precision"] = compiled_precision(
                xml, "f32" if name == "OpenVINO FP32" else None, args.threads)
        results[name] = entry
        print(f"  {meta['model']:<10} {name:<17} p50 {lat['p50_ms']:.3f} ms  "
              f"b64 {thr:,.0f} img/s  top-1 {top1:.2f}", file=sys.stderr)
    base = results["torch eager FP32"]["batch1"]["p50_ms"]
    for entry in results.values():
        entry["speedup_b1_vs_torch"] = base / entry["batch1"]["p50_ms"]
    drops = {"ORT INT8 vs ORT FP32": results["ORT FP32"]["top1"] - results["ORT INT8"]["top1"],
             "OpenVINO INT8 vs OpenVINO FP32":
                 results["OpenVINO FP32"]["top1"] - results["OpenVINO INT8"]["top1"]}
    ov_speedup = results["OpenVINO INT8"]["speedup_b1_vs_torch"]
    return {
        "checkpoint": str(ckpt), "sha256": file_sha256(ckpt), "model": meta["model"],
        "method": meta.get("method"), "checkpoint_top1": meta.get("top1"),
        "params": count_params(model), "macs": count_macs(model, size, chans),
        "input": [chans, size, size], "export_seconds": export_s, "export_dir": str(out),
        "data": {"spec": str(args.data), "fingerprint": bundle.fingerprint,
                 "test_images": int(len(y)), "limit_per_class": args.limit},
        "runtimes": results, "int8_top1_drop": drops,
        "goals": {
            "int8_drop_le_0.5": {d: v <= GOAL_INT8_DROP for d, v in drops.items()},
            "openvino_int8_speedup_ge_3x": {"value": ov_speedup,
                                             "met": ov_speedup >= GOAL_OV_INT8_SPEEDUP},
        },
    }


def same_arch_comparison(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Latency of checkpoints of one architecture (e.g. DSKD vs CE): should be equal within
    noise, since the exported graphs are identical. Noise = the p90-p50 spread."""
    out = []
    by_arch: dict[str, list[dict[str, Any]]] = {}
    for m in models:
        by_arch.setdefault(m["model"], []).append(m)
    for arch, group in by_arch.items():
        for other in group[1:]:
            first = group[0]
            for rt in ("ORT FP32", "OpenVINO INT8"):
                a, b = first["runtimes"][rt]["batch1"], other["runtimes"][rt]["batch1"]
                noise = max(a["p90_ms"] - a["p50_ms"], b["p90_ms"] - b["p50_ms"])
                out.append({"model": arch, "runtime": rt,
                            "a": f"{first['method']} {first['sha256'][:8]}",
                            "b": f"{other['method']} {other['sha256'][:8]}",
                            "p50_ms": [a["p50_ms"], b["p50_ms"]], "noise_ms": noise,
                            "equal_within_noise": abs(a["p50_ms"] - b["p50_ms"]) <= noise})
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"CPU: {report['machine']['cpu']} ({', '.join(report['machine']['isa'])}), "
        f"{report['machine']['threads']} threads",
        "",
        "| model | runtime | file | size KiB | b1 p50 ms | b1 p90 ms | b64 img/s | "
        "speed-up b1 | top-1 % | INT8 drop |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in report["models"]:
        for name, r in m["runtimes"].items():
            drop = ""
            if name == "ORT INT8":
                drop = f"{m['int8_top1_drop']['ORT INT8 vs ORT FP32']:+.2f}"
            elif name == "OpenVINO INT8":
                drop = f"{m['int8_top1_drop']['OpenVINO INT8 vs OpenVINO FP32']:+.2f}"
            prec = r.get("compiled_inference_precision")
            label = f"{name} ({prec})" if prec and name == "OpenVINO auto" else name
            lines.append(
                f"| {m['model']} ({m['method']}) | {label} | {r['file']} | "
                f"{r['size_bytes'] / 1024:,.0f} | {r['batch1']['p50_ms']:.3f} | "
                f"{r['batch1']['p90_ms']:.3f} | {r['batch64_images_per_s']:,.0f} | "
                f"{r['speedup_b1_vs_torch']:.2f}× | {r['top1']:.2f} | {drop} |")
    lines.append("")
    for m in report["models"]:
        g = m["goals"]
        lines.append(
            f"- {m['model']} ({m['method']}): INT8 drop ≤ {GOAL_INT8_DROP} "
            f"{'met' if all(g['int8_drop_le_0.5'].values()) else 'NOT met'}; OpenVINO INT8 "
            f"{g['openvino_int8_speedup_ge_3x']['value']:.2f}× torch eager at batch 1 "
            f"({'met' if g['openvino_int8_speedup_ge_3x']['met'] else 'NOT met'}, goal ≥ 3×)")
    for c in report["same_architecture"]:
        lines.append(
            f"- {c['model']} {c['runtime']}: {c['a']} {c['p50_ms'][0]:.3f} ms vs {c['b']} "
            f"{c['p50_ms'][1]:.3f} ms (noise ±{c['noise_ms']:.3f}): "
            f"{'equal within noise' if c['equal_within_noise'] else 'DIFFERENT'}")
    if report["dry_run"]:
        lines.append("- dry run (--limit): accuracies are on a subset, not the full test split")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", required=True, type=Path, help="model.pt files")
    p.add_argument("--data", required=True, help="data spec (e.g. ../shared/data/cifar10-jpg.tar.gz)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "export_cpu.json")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "export_cpu",
                   help="where the exports go (git-ignored)")
    p.add_argument("--cache-dir", default=None, help="decoded-data cache (default ~/.cache/dskd)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=200, help="timed batch-1 runs (≥ 200 for reports)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--batch-runs", type=int, default=30, help="timed batch-64 runs")
    p.add_argument("--calib-size", type=int, default=300)
    p.add_argument("--parity-size", type=int, default=1000)
    p.add_argument("--limit", type=int, default=None,
                   help="first N images per class and split only (dry runs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        models = []
        for ckpt in args.models:
            print(f"benchmarking {ckpt}", file=sys.stderr)
            models.append(bench_model(ckpt, args))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = {
        "benchmark": "export_cpu", "created_utc": dt.datetime.now(dt.timezone.utc)
        .strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python " + " ".join(shlex.quote(a) for a in
                                        ["bench/export_cpu.py", *(argv or sys.argv[1:])]),
        "machine": machine_info(args.threads), "dry_run": args.limit is not None,
        "settings": {"runs_batch1": args.runs, "warmup": args.warmup,
                     "runs_batch64": args.batch_runs, "calib_size": args.calib_size},
        "models": models, "same_architecture": same_arch_comparison(models),
    }
    write_json(args.out, report)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
