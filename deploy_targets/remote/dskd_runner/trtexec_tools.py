"""Build trtexec command lines and parse what trtexec writes (standard library only).

Part of the runner package copied to the device. Formats follow NVIDIA's trtexec
(samples/common/sampleReporting.cpp): `--exportTimes` writes one JSON object per
inference (warm-up ones included) with start/end timestamps and the derived
`h2dMs`, `computeMs`, `d2hMs`, `latencyMs` (= H2D + compute + D2H) and `endToEndMs`;
`--exportProfile` writes `[{"count": N}, {"name", "timeMs", "averageMs", ...}, ...]`;
the summary prints lines such as
`GPU Compute Time: min = 0.1 ms, max = 0.3 ms, mean = ..., median = ..., percentile(90%) = ... ms`.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Older trtexec releases named the transfer fields In/Out instead of H2d/D2h.
_ALIASES = {
    "h2dMs": ("h2dMs", "inMs"),
    "computeMs": ("computeMs",),
    "d2hMs": ("d2hMs", "outMs"),
    "latencyMs": ("latencyMs",),
    "endToEndMs": ("endToEndMs",),
    "startComputeMs": ("startComputeMs",),
}

SUMMARY_METRICS = {
    "Latency": "host_latency",
    "End-to-End Host Latency": "end_to_end",
    "Enqueue Time": "enqueue",
    "H2D Latency": "h2d",
    "GPU Compute Time": "gpu_compute",
    "D2H Latency": "d2h",
}

_LINE = re.compile(
    r"^(?:\[[^\]]*\]\s*)*(?P<name>[A-Za-z0-9][A-Za-z0-9 -]*?):\s*(?P<body>min = .*)$"
)
_FIELD = re.compile(
    r"(?P<key>min|max|mean|median|percentile\((?P<pct>[\d.]+)%\))\s*=\s*(?P<val>[-+\d.eE]+|inf|nan)\s*ms"
)
_THROUGHPUT = re.compile(r"Throughput:\s*([-+\d.eE]+)\s*qps")
_WALLTIME = re.compile(r"Total Host Walltime:\s*([-+\d.eE]+)\s*s")
_GPU_TOTAL = re.compile(r"Total GPU Compute Time:\s*([-+\d.eE]+)\s*s")


def shape_spec(input_name: str, shape: tuple[int, ...] | list[int]) -> str:
    """`--shapes` value: `input:1x3x32x32`."""
    if not re.fullmatch(r"[A-Za-z0-9_.:/-]+", input_name):
        raise ValueError(f"input name {input_name!r} cannot be passed to trtexec --shapes")
    return f"{input_name}:{'x'.join(str(int(d)) for d in shape)}"


def trtexec_command(
    engine: str,
    *,
    trtexec: str = "trtexec",
    input_name: str = "input",
    input_shape: tuple[int, ...] | None = None,
    warmup_ms: float = 500.0,
    duration_s: float = 2.0,
    iterations: int = 50,
    export_times: str | None = None,
    export_profile: str | None = None,
    use_spin_wait: bool = True,
    use_cuda_graph: bool = False,
) -> list[str]:
    """Argument list to time a prebuilt engine with our protocol.

    trtexec runs at least `iterations` and at least `duration_s`, after `warmup_ms` of
    warm-up, like the Python loop. With a profile requested the per-layer profiler runs
    in a separate pass so it does not inflate the timed one.
    """
    args = [
        trtexec,
        f"--loadEngine={engine}",
        f"--warmUp={int(round(warmup_ms))}",
        f"--duration={max(0, int(round(duration_s)))}",
        f"--iterations={int(iterations)}",
        "--avgRuns=1",
    ]
    if input_shape is not None:
        args.append(f"--shapes={shape_spec(input_name, input_shape)}")
    if use_spin_wait:
        args.append("--useSpinWait")
    if use_cuda_graph:
        args.append("--useCudaGraph")
    if export_times:
        args.append(f"--exportTimes={export_times}")
    if export_profile:
        args += [f"--exportProfile={export_profile}", "--separateProfileRun"]
    return args


def _pick(entry: dict[str, Any], key: str) -> float | None:
    for name in _ALIASES[key]:
        if name in entry:
            return float(entry[name])
    return None


def parse_export_times(text: str, warmup_ms: float = 0.0) -> list[dict[str, float]]:
    """Per-inference times from `--exportTimes` JSON, dropping warm-up entries.

    trtexec exports the warm-up queries too; like its own summary, entries whose compute
    started before `warmup_ms` are dropped.
    """
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("trtexec --exportTimes JSON must be a list")
    out = []
    for entry in data:
        if not isinstance(entry, dict):
            raise ValueError("trtexec --exportTimes entries must be objects")
        start = _pick(entry, "startComputeMs")
        if start is not None and start < warmup_ms:
            continue
        compute = _pick(entry, "computeMs")
        h2d, d2h = _pick(entry, "h2dMs"), _pick(entry, "d2hMs")
        latency = _pick(entry, "latencyMs")
        if compute is None:
            raise ValueError("trtexec --exportTimes entry lacks computeMs")
        if latency is None:
            latency = compute + (h2d or 0.0) + (d2h or 0.0)
        item = {"compute_ms": compute, "latency_ms": latency}
        if h2d is not None:
            item["h2d_ms"] = h2d
        if d2h is not None:
            item["d2h_ms"] = d2h
        e2e = _pick(entry, "endToEndMs")
        if e2e is not None:
            item["end_to_end_ms"] = e2e
        out.append(item)
    return out


def parse_export_profile(text: str) -> dict[str, Any]:
    """Per-layer times from `--exportProfile` JSON: {'count': N, 'layers': [...]}, slowest first."""
    data = json.loads(text)
    if not isinstance(data, list) or not data:
        raise ValueError("trtexec --exportProfile JSON must be a non-empty list")
    count = None
    layers = []
    for entry in data:
        if "count" in entry and "name" not in entry:
            count = int(entry["count"])
            continue
        layer = {
            "name": str(entry["name"]),
            "time_ms": float(entry["timeMs"]),
            "average_ms": float(entry["averageMs"]),
            "percentage": float(entry["percentage"]),
        }
        if "medianMs" in entry:
            layer["median_ms"] = float(entry["medianMs"])
        layers.append(layer)
    layers.sort(key=lambda layer: layer["time_ms"], reverse=True)
    return {"count": count, "layers": layers}


def _stat_key(key: str, pct: str | None) -> str:
    if pct is None:
        return f"{key}_ms"
    return f"p{pct.rstrip('0').rstrip('.') if '.' in pct else pct}_ms"


def parse_summary(text: str) -> dict[str, Any]:
    """The `=== Performance summary ===` block as {'gpu_compute': {'median_ms': ...}, ...}."""
    out: dict[str, Any] = {}
    for raw in text.splitlines():
        line = raw.strip()
        m = _LINE.match(line)
        if m and m.group("name") in SUMMARY_METRICS:
            stats = {
                _stat_key(f.group("key"), f.group("pct")): float(f.group("val"))
                for f in _FIELD.finditer(m.group("body"))
            }
            if stats:
                out[SUMMARY_METRICS[m.group("name")]] = stats
            continue
        for pattern, key in (
            (_THROUGHPUT, "throughput_qps"),
            (_WALLTIME, "host_walltime_s"),
            (_GPU_TOTAL, "total_gpu_compute_s"),
        ):
            found = pattern.search(line)
            if found:
                out[key] = float(found.group(1))
    return out
