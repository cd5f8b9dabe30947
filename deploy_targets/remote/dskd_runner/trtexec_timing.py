"""Timing a TensorRT engine with NVIDIA's trtexec instead of the Python loop.

The same protocol knobs (warm-up, min iterations, min seconds) become trtexec flags, and
its per-inference trace (--exportTimes) is summarized by the same statistics as every
other backend, so the two TensorRT timings can be compared row for row.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from typing import Any

from . import trtexec_tools as tt
from .environment import read_text
from .protocol import EXIT_RUNTIME_FAILURE, Protocol, RunnerError
from .timing import summarize, thin_samples


def trtexec_latency(
    trtexec: str,
    artifact: str,
    input_name: str,
    shape: tuple[int, ...],
    protocol: Protocol,
    timeout: float,
) -> dict[str, Any]:
    """Time with NVIDIA's trtexec instead of the Python loop (same protocol knobs)."""
    with tempfile.TemporaryDirectory(prefix="trtexec-") as tmp:
        times = os.path.join(tmp, "times.json")
        args = tt.trtexec_command(
            artifact,
            trtexec=trtexec,
            input_name=input_name,
            input_shape=shape,
            warmup_ms=protocol.warmup_seconds * 1e3,
            duration_s=protocol.min_seconds,
            iterations=protocol.min_iters,
            export_times=times,
        )
        try:
            proc = subprocess.run(
                args, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise RunnerError(
                "runtime", f"trtexec timed out after {timeout:.0f} s", EXIT_RUNTIME_FAILURE
            ) from exc
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["(no output)"]
            raise RunnerError("runtime", f"trtexec failed: {tail[0]}", EXIT_RUNTIME_FAILURE)
        trace = tt.parse_export_times(
            read_text(times, 1 << 28) or "[]", warmup_ms=protocol.warmup_seconds * 1e3
        )
        summary = tt.parse_summary(proc.stdout)
    host = [t["latency_ms"] for t in trace]
    gpu = [t["compute_ms"] for t in trace]
    entry: dict[str, Any] = {"batch_size": shape[0], **summarize(host)}
    entry.update(
        seconds=round(sum(host) / 1e3, 6),
        throughput_ips=round(shape[0] * 1e3 / entry["mean_ms"], 3) if entry["mean_ms"] else 0.0,
        truncated=False,
        cov_warning=entry["cov"] > protocol.cov_warn,
        gpu_compute=summarize(gpu),
        latency_kind="host",
        samples_ms=thin_samples(host),
        timed_by="trtexec",
        trtexec_summary=summary,
    )
    return entry
