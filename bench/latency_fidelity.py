"""Does the pipeline's latency match the runtimes' own tools? (issue 20: latency fidelity)

For 3 zoo models (random weights: latency does not depend on them) x {OpenVINO FP32,
OpenVINO INT8, ORT FP32, ORT INT8} at 1 thread and at all physical cores, batch 1, on the
very same artifact file:

- pipeline: `deploy_targets.measure` (the production path: one runner process, inputs
  bound once, the runner's protocol), p50 of the timed calls;
- reference: OpenVINO's own `benchmark_app -hint latency -api sync` (the runner's very
  compile settings, `compile_config`: threads, f32 inference precision, one stream, through
  -load_config; float input), its Median; for ONNX Runtime a minimal `run_with_iobinding`
  loop in its own process with the runner's very session options (`session_options`), its
  median. Both sides are timed for the same whole number of seconds (benchmark_app's -t
  counts whole seconds) after the same 0.5 s warm-up (benchmark_app: its first inference).

Pipeline and reference run back to back, interleaved over several rounds (the order
alternates between rounds), and each row reports the medians over the rounds, the best
round of each side, each side's round-to-round spread and how busy other processes kept
the machine while the pipeline measured. The artifacts come from the project's own export
path (`export.export_all`, digits images calibrate INT8).

Run on a QUIET machine (nothing else running; the load average is recorded and a busy
machine is flagged), one command, about 15 minutes on 2 cores, bounded by --max-minutes:
    .venv/bin/python bench/latency_fidelity.py
writes bench/results/latency_fidelity.json. `--quick` runs one model and one round as a
smoke test; `--models`, `--variants` and `--threads` select rows for a targeted check, e.g.
    .venv/bin/python bench/latency_fidelity.py --models resnet8x4 --variants "OpenVINO INT8" \\
        --threads 1 --out /tmp/check.json
"""


from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from deploy_targets import Protocol, measure  # noqa: E402
from deploy_targets.remote import REMOTE_DIR, runner  # noqa: E402
from deploy_targets.remote.dskd_runner.backend_openvino import compile_config  # noqa: E402
from dskd.atomic import write_json  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "latency_fidelity.json"
MODELS = ("resnet8", "resnet8x4", "mobilenetv2")
# (label, target, export format, precision, reference tool)
VARIANTS = (
    ("OpenVINO FP32", "intel-cpu", "openvino", "fp32", "benchmark_app"),
    ("OpenVINO INT8", "intel-cpu", "openvino-int8", "int8", "benchmark_app"),
    ("ORT FP32", "cpu", "onnx", "fp32", "iobinding-loop"),
    ("ORT INT8", "cpu", "onnx-int8", "int8", "iobinding-loop"),
)
SEED = 0
GOAL_RATIO = 1.10  # pipeline p50 within 10 % of the reference
WARMUP_S = 0.5  # the pipeline's and the IOBinding loop's warm-up (benchmark_app: one inference)
# seconds of fixed cost per measurement besides the timed seconds (process start, imports,
# model compilation, warm-up), measured here; only used to estimate a run's length up front
OVERHEAD_S = {"pipeline": 2.0, "benchmark_app": 2.5, "iobinding-loop": 1.5}

# A minimal ONNX Runtime loop, the reference for the `cpu` target: the runner's own session
# options (imported from the runner package, so the two cannot drift), input and output
# bound once, nothing but run_with_iobinding timed.
IOBINDING_LOOP = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
path, threads, seconds, warmup, seed, remote_dir = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
sys.path.insert(0, remote_dir)
from dskd_runner.backend_ort import session_options
s = ort.InferenceSession(path, session_options(ort, threads), providers=["CPUExecutionProvider"])
inp = s.get_inputs()[0]
x = np.random.default_rng(seed).standard_normal((1, *inp.shape[1:])).astype(np.float32)
io = s.io_binding()
io.bind_cpu_input(inp.name, x)
io.bind_output(s.get_outputs()[0].name, "cpu")
t0 = time.perf_counter()
while time.perf_counter() - t0 < warmup:
    s.run_with_iobinding(io)
times = []
t0 = time.perf_counter()
while time.perf_counter() - t0 < seconds or len(times) < 50:
    a = time.perf_counter()
    s.run_with_iobinding(io)
    times.append((time.perf_counter() - a) * 1e3)
print(json.dumps({"median_ms": float(np.median(times)), "iterations": len(times)}))
"""


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine_info() -> dict[str, Any]:
    import onnxruntime
    import openvino

    return {
        "cpu": runner.cpu_model(),
        "cpu_count": os.cpu_count(),
        "physical_cores": runner.physical_cores(),
        "python": sys.version.split()[0],
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.get_version(),
    }


def build_artifacts(model_name: str, work: Path) -> dict[str, Path]:
    """A random-init zoo model saved as a checkpoint and exported by the project's own path."""
    import torch

    from dskd.checkpoint import save_model
    from dskd.data import load_data
    from dskd.models import create_model
    from export import DEFAULT_TOLERANCES, export_all

    torch.manual_seed(SEED)
    bundle = load_data("digits", input_size=32, in_chans=3)
    model = create_model(model_name, len(bundle.class_names)).eval()
    ckpt = work / f"{model_name}.pt"
    meta = {"model": model_name, "num_classes": len(bundle.class_names),
            "class_names": list(bundle.class_names), "input_size": 32, "in_chans": 3,
            "mean": list(bundle.mean), "std": list(bundle.std), "method": "random-init", "top1": None}  # fmt: skip
    save_model(ckpt, model.state_dict(), meta)
    out = work / model_name
    formats = sorted({v[2] for v in VARIANTS})
    # random weights: top-1 parity means nothing, so only the batch-1 consistency bound is kept
    loose = {k: replace(t, max_rel_diff=None, min_top1_agreement=0.0, max_top1_drop=None)
             for k, t in DEFAULT_TOLERANCES.items()}  # fmt: skip
    manifest = export_all(ckpt, out, formats=formats, calib=bundle, calib_size=128,
                          parity_size=64, tolerances=loose)  # fmt: skip
    return {fmt: out / manifest.artifact(fmt).path for fmt in formats}


def pipeline_p50(artifact: Path, target: str, precision: str, threads: int, seconds: float) -> dict:
    """The production path's batch-1 p50 (no contention retries: the reference has none)."""
    proto = Protocol(warmup_seconds=WARMUP_S, min_iters=200, min_seconds=seconds, contention_retries=0)
    m = measure(artifact, target, precision=precision, threads=threads, protocol=proto)
    e = m.latency_at(1)
    return {"p50_ms": e["p50_ms"], "cov": e["cov"], "iterations": e["iterations"], "threads": m.threads,
            "contended": e["contended"], "others_cpu": e.get("others_cpu"), "binding": e.get("binding")}  # fmt: skip


def benchmark_app_command(
    artifact: Path, seconds: float, config: Path, chw: tuple[int, ...] = (3, 32, 32)
) -> list[str]:
    exe = Path(sys.executable).with_name("benchmark_app")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "openvino.tools.benchmark.main"]
    return [*base, "-m", str(artifact), "-d", "CPU", "-hint", "latency", "-api", "sync",
            "-load_config", str(config), "-t", str(max(1, round(seconds))),
            "-shape", f"[1,{','.join(map(str, chw))}]", "-ip", "f32"]  # fmt: skip


def write_ov_config(path: Path, threads: int, precision: str = "fp32") -> Path:
    """benchmark_app refuses -nthreads with -hint; the runner's own compile settings
    (`compile_config`: threads, inference precision, LATENCY, 1 stream) go through -load_config."""
    cfg = {"CPU": {k: str(v) for k, v in compile_config(threads, precision, "LATENCY", 1).items()}}
    path.write_text(json.dumps(cfg))
    return path


def parse_benchmark_app_median(text: str) -> float:
    """The 'Median: 135.77 us' (or '... 1.23 ms') line of benchmark_app's latency statistics, in ms."""
    m = re.search(r"Median:\s+([0-9.]+)\s*(ms|us)\b", text)
    if not m:
        raise RuntimeError(f"benchmark_app printed no median: {text.strip()[-300:]}")
    return float(m.group(1)) / (1e3 if m.group(2) == "us" else 1.0)


def reference_ms(
    tool: str, artifact: Path, threads: int, seconds: float, work: Path, chw: tuple[int, ...] = (3, 32, 32),
    precision: str = "fp32",
) -> float:
    """The reference tool's median batch-1 latency in ms on the same artifact and threads."""
    if tool == "benchmark_app":
        cfg = write_ov_config(work / f"ov-{threads}-{precision}.json", threads, precision)
        cmd = benchmark_app_command(artifact, seconds, cfg, chw)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark_app failed: {(proc.stdout + proc.stderr)[-300:]}")
        return parse_benchmark_app_median(proc.stdout)
    cmd = [sys.executable, "-c", IOBINDING_LOOP, str(artifact), str(threads), str(seconds), str(WARMUP_S), str(SEED),
           str(REMOTE_DIR)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["median_ms"])


def spread(values: list[float]) -> float:
    """(max - min) / median of one side's rounds: how much the machine moved the number."""
    return (max(values) - min(values)) / statistics.median(values)


def run_row(model: str, variant: tuple, artifact: Path, threads: int, rounds: int,
            seconds: float, work: Path) -> dict[str, Any]:
    """Pipeline and reference back to back, the order alternating per round."""
    label, target, _fmt, precision, tool = variant
    pipe, ref, contended, others, loads, used = [], [], 0, [], [], threads
    for r in range(rounds):
        order = ("pipeline", "reference") if r % 2 == 0 else ("reference", "pipeline")
        loads.append(load_avg()[0])
        for who in order:
            if who == "pipeline":
                res = pipeline_p50(artifact, target, precision, threads, seconds)
                pipe.append(res["p50_ms"])
                contended += bool(res["contended"])
                others.append(res["others_cpu"])
                used = res["threads"]
            else:
                ref.append(reference_ms(tool, artifact, used or runner.physical_cores(), seconds, work,
                                        precision=precision))  # fmt: skip
    p, q = statistics.median(pipe), statistics.median(ref)
    noise = max(spread(pipe), spread(ref))
    busy = [o for o in others if o is not None]
    return {
        "model": model, "variant": label, "target": target, "precision": precision,
        "threads": used, "threads_asked": "all" if threads == 0 else threads, "reference": tool,
        "artifact": artifact.name,
        "pipeline_p50_ms": round(p, 5), "reference_median_ms": round(q, 5),
        "ratio": round(p / q, 4), "within_goal": abs(p / q - 1) <= GOAL_RATIO - 1,
        # best (least disturbed) round of each side: the load-robust estimate on a shared machine
        "pipeline_best_ms": round(min(pipe), 5), "reference_best_ms": round(min(ref), 5),
        "ratio_best": round(min(pipe) / min(ref), 4),
        # a gap smaller than the round-to-round spread cannot be told from the machine's noise
        "round_spread_pct": round(100 * noise, 1), "gap_within_noise": abs(p / q - 1) <= noise,
        "pipeline_rounds_ms": [round(v, 5) for v in pipe], "reference_rounds_ms": [round(v, 5) for v in ref],
        "pipeline_contended_rounds": contended,
        "others_cpu_max": max(busy) if busy else None, "load_avg_1m_per_round": loads,
    }  # fmt: skip


def threads_stability(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per thread count: the pipeline's round-to-round spread and speed-up over 1 thread,
    the data behind each target's default thread count (docs/benchmarks.md)."""
    out: dict[str, Any] = {}
    one = {(r["model"], r["variant"]): r for r in rows if r["threads"] == 1}
    for t in sorted({r["threads"] for r in rows}):
        sel = [r for r in rows if r["threads"] == t]
        spreads = [spread(r["pipeline_rounds_ms"]) for r in sel]
        speedups = [one[(r["model"], r["variant"])]["pipeline_best_ms"] / r["pipeline_best_ms"]
                    for r in sel if (r["model"], r["variant"]) in one]  # fmt: skip
        out[str(t)] = {
            "median_round_spread_pct": round(100 * statistics.median(spreads), 1),
            "max_round_spread_pct": round(100 * max(spreads), 1),
            "median_speedup_vs_1_thread": round(statistics.median(speedups), 3) if speedups else None,
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    """The docs table: median over the interleaved rounds of each side, their ratio, the noise."""
    lines = [
        "| model | variant | threads | pipeline p50 ms | reference | reference median ms | ratio | round spread |",
        "|---|---|---|---:|---|---:|---:|---:|",
    ]
    for r in report["rows"]:
        mark = "" if r["within_goal"] else " ✗"
        lines.append(f"| {r['model']} | {r['variant']} | {r['threads']} | {r['pipeline_p50_ms']:.3f} | "
                     f"{r['reference']} | {r['reference_median_ms']:.3f} | {r['ratio']:.2f}{mark} | "
                     f"{r['round_spread_pct']:.0f} % |")  # fmt: skip
    return "\n".join(lines)


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def plan(args: argparse.Namespace) -> tuple[list[str], list[tuple], list[int]]:
    """Models, variants and thread counts to run; bad selections are one-line errors (exit 2)."""
    models = _csv(args.models)
    unknown = [m for m in models if m not in MODELS]
    labels = {v[0]: v for v in VARIANTS}
    bad_variants = [v for v in _csv(args.variants) if v not in labels]
    threads: list[int] = []
    for t in _csv(args.threads):
        if t == "all":
            threads.append(0)
        elif t.isdigit() and int(t) >= 1:
            threads.append(int(t))
        else:
            raise SystemExit(f"error: --threads {args.threads}: expected counts >= 1 and/or 'all', e.g. 1,all")
    if unknown or not models:
        raise SystemExit(f"error: --models {args.models}: choose from {','.join(MODELS)}")
    if bad_variants or not _csv(args.variants):
        raise SystemExit(f"error: --variants {args.variants}: choose from {','.join(labels)}")
    if args.seconds < 1 or args.rounds < 1:
        raise SystemExit(f"error: --seconds {args.seconds} / --rounds {args.rounds}: need whole seconds >= 1 "
                         "(benchmark_app's -t) and >= 1 round")  # fmt: skip
    if args.quick:
        models, args.rounds = models[:1], 1
    return models, [labels[v] for v in _csv(args.variants)], list(dict.fromkeys(threads))


def estimate_seconds(models: list[str], variants: list[tuple], threads: list[int], rounds: int, seconds: int) -> float:
    per_round = sum(2 * seconds + OVERHEAD_S["pipeline"] + OVERHEAD_S[v[4]] for v in variants)
    return len(models) * (30 + len(threads) * rounds * per_round)  # ~30 s: exporting one model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    p.add_argument("--threads", default="1,all", help="thread counts: numbers and/or 'all' (every physical core)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=2, help="timed seconds per measurement (whole seconds)")
    p.add_argument("--max-minutes", type=float, default=30.0, help="refuse a plan estimated to take longer")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--quick", action="store_true", help="one model, one round (smoke test)")
    args = p.parse_args(argv)
    try:
        models, variants, thread_counts = plan(args)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    estimate = estimate_seconds(models, variants, thread_counts, args.rounds, args.seconds)
    if estimate > args.max_minutes * 60:
        print(f"error: --max-minutes {args.max_minutes:g}: this plan takes about {estimate / 60:.0f} min; "
              "lower --rounds/--seconds or raise --max-minutes", file=sys.stderr)  # fmt: skip
        return 2
    before = load_avg()
    quiet = before[0] < 0.5
    print(f"about {estimate / 60:.0f} min; load average {before}" +
          ("" if quiet else " -- NOT a quiet machine: the comparison will be noisy"), flush=True)  # fmt: skip
    started = time.perf_counter()
    report: dict[str, Any] = {
        "bench": "latency_fidelity",
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/latency_fidelity.py", *(argv or sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_avg_before": before,
        "quiet_before": quiet,
        "seeds": {"torch_init": SEED, "inputs": SEED},
        "settings": {"models": models, "variants": [v[0] for v in variants], "rounds": args.rounds,
                     "seconds": args.seconds, "warmup_seconds": WARMUP_S,
                     "threads": ["all" if t == 0 else t for t in thread_counts], "batch_size": 1, "goal_ratio": GOAL_RATIO,
                     "benchmark_app": "-hint latency -api sync -ip f32 -t SECONDS -load_config {runner's compile_config}",
                     "iobinding_loop": "runner's session_options, input/output bound once"},
        "rows": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="latency-fidelity-") as tmp:
        work = Path(tmp)
        for model in models:
            if time.perf_counter() - started > args.max_minutes * 60:
                report["stopped_early"] = f"--max-minutes {args.max_minutes:g} passed before {model}: rows incomplete"
                break
            arts = build_artifacts(model, work)
            for threads in thread_counts:
                for variant in variants:
                    row = run_row(model, variant, arts[variant[2]], threads, args.rounds, args.seconds, work)
                    report["rows"].append(row)
                    print(f"{model:12s} {variant[0]:14s} {row['threads']}T pipeline {row['pipeline_p50_ms']:.3f} ms "
                          f"{row['reference']} {row['reference_median_ms']:.3f} ms ratio {row['ratio']:.2f} "
                          f"(spread {row['round_spread_pct']:.0f} %)", flush=True)  # fmt: skip
    report["load_avg_after"] = load_avg()
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    rows = report["rows"]
    if not rows:
        write_json(args.out, report)
        print(f"error: no row measured ({report.get('stopped_early', 'nothing selected')})", file=sys.stderr)
        return 1
    ratios = [r["ratio"] for r in rows]
    report["summary"] = {
        "rows": len(ratios),
        "within_goal": sum(r["within_goal"] for r in rows),
        "outside_goal_but_within_noise": sum((not r["within_goal"]) and r["gap_within_noise"] for r in rows),
        "best_round_within_goal": sum(abs(r["ratio_best"] - 1) <= GOAL_RATIO - 1 for r in rows),
        "median_ratio_best": round(statistics.median(r["ratio_best"] for r in rows), 4),
        "median_ratio": round(statistics.median(ratios), 4),
        "max_ratio": round(max(ratios), 4),
        "min_ratio": round(min(ratios), 4),
    }
    report["threads_stability"] = threads_stability(rows)
    report["markdown"] = markdown(report)
    write_json(args.out, report)
    print(report["markdown"])
    print(f"wrote {args.out} ({report['wall_seconds']} s)")
    return 1 if "stopped_early" in report else 0


if __name__ == "__main__":
    sys.exit(main())
