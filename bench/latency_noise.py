"""How noisy is the latency protocol, and what slowdown can it tell apart? (sets the gate tolerance)

On the `cpu` (ONNX Runtime) and `intel-cpu` (OpenVINO, reading the ONNX directly) targets,
with resnet8x4 (random weights; latency does not depend on them) at batch 1 and 1 thread:

1. noise: the full production path (`deploy_targets.measure`, one runner process per run)
   repeated N times with the default protocol; report the spread of p50.
2. sensitivity: N repetitions, each with a freshly loaded model, run the protocol at
   slowdown 0 (A) and at each artificial slowdown (B) in a shuffled order. The slowdown is
   the runner's hidden debug option: after every timed call it busy-waits `s` x that call's
   own duration inside the timed region, i.e. an exact, known `s` slowdown of every call.
   A slowdown counts as distinguished reliably when B's p50 exceeds A's in N/N
   repetitions AND every B p50 exceeds every A p50 (what a gate comparing against a
   stored baseline from another run needs).

Writes bench/results/latency_noise.json. Run: .venv/bin/python bench/latency_noise.py
(about 6-8 minutes; `--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from deploy_targets import Protocol, get_target, measure  # noqa: E402
from deploy_targets.remote import runner  # noqa: E402
from dskd.atomic import write_json  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "latency_noise.json"
TARGETS = ("cpu", "intel-cpu")
SLOWDOWNS_PCT = (1, 2, 3, 5, 10)


def export_model(folder: Path) -> tuple[Path, str]:
    """resnet8x4 from the model zoo (else a small local CNN) as ONNX with a dynamic batch."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(1)
    try:
        from dskd.models import create_model

        model, name = create_model("resnet8x4", 10), "resnet8x4"
    except Exception:  # the zoo is optional for this bench
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(128, 10),
        )  # fmt: skip
        name = "local-cnn"
    model.eval()
    path = folder / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False, opset_version=17,
        )  # fmt: skip
    return path, name


def spread(values: list[float]) -> dict[str, float]:
    med = statistics.median(values)
    return {
        "median_ms": round(med, 5),
        "min_ms": round(min(values), 5),
        "max_ms": round(max(values), 5),
        "spread_pct": round((max(values) - min(values)) / med * 100, 2),  # (max-min)/median
        "cov_pct": round(statistics.stdev(values) / statistics.mean(values) * 100, 2)
        if len(values) > 1
        else 0.0,
        "max_pair_ratio_pct": round(
            (max(values) / min(values) - 1) * 100, 2
        ),  # worst A/A false alarm
    }


def noise_phase(model: Path, target: str, repeats: int, protocol: Protocol) -> dict:
    """The production path, repeated: one runner process per measurement."""
    p50 = []
    cov = []
    for _ in range(repeats):
        m = measure(model, target, protocol=protocol, batch_sizes=(1,))
        p50.append(m.latency_at(1)["p50_ms"])
        cov.append(m.latency_at(1)["cov"])
    return {"p50_ms": p50, **spread(p50), "per_run_cov_median": round(statistics.median(cov), 4)}


def sensitivity_phase(
    model: Path, target: str, repeats: int, protocol: Protocol, levels_pct: tuple[int, ...]
) -> dict:
    """Interleaved A/B with a fresh model load per repetition; in-process runner calls."""
    tgt = get_target(target)
    runner.require_modules(tgt.runtime)
    images = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    levels = (0, *levels_pct)
    p50: dict[int, list[float]] = {lv: [] for lv in levels}
    for rep in range(repeats):
        backend = runner.load_backend(tgt.runtime, str(model), "fp32", tgt.threads or 1)
        order = list(levels)
        random.Random(rep).shuffle(order)
        for lv in order:
            entry = runner.measure_latency(backend, images, 1, protocol, slowdown=lv / 100)
            p50[lv].append(entry["p50_ms"])
        del backend
    base = p50[0]
    per_level = {}
    for lv in levels_pct:
        ratios = [b / a for a, b in zip(base, p50[lv], strict=True)]
        per_level[str(lv)] = {
            "p50_ms": p50[lv],
            "ratios_pct": [round((r - 1) * 100, 2) for r in ratios],
            "ranked_correctly": sum(r > 1 for r in ratios),
            "separable": min(p50[lv]) > max(base),
            "median_measured_pct": round((statistics.median(ratios) - 1) * 100, 2),
        }
    reliable = [
        lv
        for lv in levels_pct
        if per_level[str(lv)]["ranked_correctly"] == repeats and per_level[str(lv)]["separable"]
    ]
    # smallest level from which every larger level is reliable too
    smallest = next(
        (lv for lv in levels_pct if all(x in reliable for x in levels_pct if x >= lv)), None
    )
    return {
        "baseline_p50_ms": base,
        "baseline": spread(base),
        "levels": per_level,
        "smallest_reliable_pct": smallest,
    }


def machine_info() -> dict:
    import onnxruntime
    import openvino

    return {
        "cpu": runner.cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.get_version(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),  # the machine may be shared
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3 repeats, short protocol, not written by default",
    )
    args = ap.parse_args(argv)
    protocol = Protocol()  # the defaults the pipeline uses
    repeats = args.repeats
    if args.quick:
        protocol, repeats = Protocol(warmup_seconds=0.1, min_iters=20, min_seconds=0.3), 3
    t_start = time.perf_counter()
    info = machine_info()
    results: dict = {"noise": {}, "sensitivity": {}}
    with tempfile.TemporaryDirectory(prefix="latency-noise-") as tmp:
        model, name = export_model(Path(tmp))
        for target in TARGETS:
            print(f"[noise] {target}: {repeats} runs", flush=True)
            results["noise"][target] = noise_phase(model, target, repeats, protocol)
        for target in TARGETS:
            print(f"[sensitivity] {target}: {repeats} x {len(SLOWDOWNS_PCT) + 1} runs", flush=True)
            results["sensitivity"][target] = sensitivity_phase(
                model, target, repeats, protocol, SLOWDOWNS_PCT
            )
    info["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    noise_band = max(
        max(r["max_pair_ratio_pct"] for r in results["noise"].values()),
        max(r["baseline"]["max_pair_ratio_pct"] for r in results["sensitivity"].values()),
    )
    smallest = [r["smallest_reliable_pct"] for r in results["sensitivity"].values()]
    smallest_all = None if None in smallest else max(smallest)
    floor = max(noise_band, smallest_all if smallest_all is not None else SLOWDOWNS_PCT[-1])
    tolerance = max(1, math.ceil(floor))
    report = {
        "benchmark": "latency protocol noise and sensitivity (deploy_targets)",
        "machine": info,
        "model": f"{name}, random weights, 3x32x32, batch 1, fp32",
        "threads": get_target("cpu").threads,
        "protocol": protocol.__dict__,
        "repeats": repeats,
        "slowdowns_pct": list(SLOWDOWNS_PCT),
        **results,
        "recommendation": {
            "latency_tolerance_pct": tolerance,
            "noise_band_pct": round(noise_band, 2),
            "smallest_reliable_slowdown_pct": smallest_all,
            "rule": "tolerance = ceil(max(worst p50 ratio between two unchanged runs, smallest slowdown "
            "distinguished in N/N interleaved repetitions and fully separable)) over both targets",
            "caveat": "measured on a shared machine; on a quiet dedicated device the band is narrower, "
            "so rerun this bench there to tighten the gate",
        },
        "quick": bool(args.quick),
        "runtime_s": round(time.perf_counter() - t_start, 1),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if args.quick and args.out == DEFAULT_OUT:
        print(f"quick run (not written): tolerance {tolerance}% noise band {noise_band:.2f}%")
    else:
        write_json(args.out, report)
        print(f"wrote {args.out}: tolerance {tolerance}%, noise band {noise_band:.2f}%, "
              f"smallest reliable slowdown {smallest_all}%, {report['runtime_s']} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
