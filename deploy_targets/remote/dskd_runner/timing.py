"""The timed loop: warm-up, per-call timing, contention detection and statistics.

Every backend is timed by the same loop (time_calls) so that two runtimes' numbers differ
by the runtime, not by how they were timed. On CPU runtimes the loop also records how much
CPU the process got and how busy other processes kept the machine, so a number measured
under load is repeated or flagged instead of silently inflated.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._numpy import np
from .protocol import CPU_RUNTIMES, EXIT_RUNTIME_FAILURE, Protocol, RunnerError

MAX_SAMPLES_KEPT = 1000


def _spin_until(deadline: float) -> None:
    while time.perf_counter() < deadline:
        pass


@dataclass
class Timing:
    wall_ms: list[float]  # per call, host wall clock
    device_ms: list[float]  # per call, as reported by the step (GPU compute) or empty
    truncated: bool  # stopped by max_seconds before min_iters
    cpu_share: float  # process CPU time / wall time while timing (~1.0 on an idle machine)
    preemptions: int | None  # involuntary context switches while timing (Unix)
    others_cpu: float | None  # cores kept busy by other processes meanwhile (Linux)
    # the raw totals behind the three shares above, so that blocks can be added (merge_timings)
    span_s: float = 0.0  # wall seconds of the timed region
    own_s: float = 0.0  # this process's CPU seconds in it
    others_s: float | None = None  # other processes' busy CPU seconds in it

    def contended(self, protocol: Protocol) -> bool:
        busy = self.others_cpu is not None and self.others_cpu > protocol.max_other_cpu
        return self.cpu_share < protocol.min_cpu_share or busy

    def disturbance(self) -> float:
        """Lower is quieter; picks the best of several contended attempts."""
        return (1.0 - self.cpu_share) + (self.others_cpu or 0.0)


def _involuntary_switches() -> int | None:
    try:
        import resource
    except ImportError:  # not on Unix
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw)


def busy_cpu_seconds() -> float | None:
    """CPU seconds spent non-idle by all processes on all CPUs so far (Linux /proc/stat)."""
    try:
        with open("/proc/stat", "rb") as fh:
            first = fh.read(4096).decode("ascii", "replace").split("\n", 1)[0].split()
    except OSError:
        return None
    if len(first) < 8 or first[0] != "cpu" or not hasattr(os, "sysconf"):
        return None
    ticks = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def time_calls(
    step: Callable[[], float | None],
    protocol: Protocol,
    slowdown: float = 0.0,
) -> Timing:
    """Run `step` per the protocol and time every call.

    `step` may return a device-side duration in ms (TensorRT GPU compute time) or None.
    `slowdown` (debug only) busy-waits `slowdown` x the call's own duration inside the
    timed region: a known, proportional slowdown for calibrating the latency gate.
    """
    clock = time.perf_counter
    start = clock()
    step()  # at least one warm-up call, however short warmup_seconds is
    while clock() - start < protocol.warmup_seconds:
        step()
    wall: list[float] = []
    device: list[float] = []
    state = {"truncated": False}

    def more(elapsed: float) -> bool:
        if protocol.enough(len(wall), elapsed):
            return False
        if elapsed >= protocol.max_seconds:
            state["truncated"] = True
            return False
        return True

    timing = _timed_region(step, more, slowdown, wall, device)
    timing.truncated = state["truncated"]
    return timing


def time_block(step: Callable[[], float | None], calls: int, slowdown: float = 0.0) -> Timing:
    """One block of an interleaved A/B round: one untimed call (re-warm: caches and the
    runtime's threads after the other model ran), then `calls` timed ones, with the same
    per-call timing and the same CPU bookkeeping as time_calls. Blocks of one side add up
    with merge_timings."""
    step()
    wall: list[float] = []
    device: list[float] = []
    return _timed_region(step, lambda _elapsed: len(wall) < max(1, calls), slowdown, wall, device)


def merge_timings(blocks: list[Timing]) -> Timing:
    """The blocks of one side as one Timing: samples in time order, CPU shares over the summed
    timed spans (so a side's cpu_share/others_cpu mean what time_calls' do, over its blocks only)."""
    span = sum(b.span_s for b in blocks)
    own = sum(b.own_s for b in blocks)
    switches = [b.preemptions for b in blocks]
    others_s = [b.others_s for b in blocks]
    known = None not in others_s and span > 0
    others_total = sum(v for v in others_s if v is not None)
    return Timing(
        [v for b in blocks for v in b.wall_ms],
        [v for b in blocks for v in b.device_ms],
        any(b.truncated for b in blocks),
        round(own / span, 4) if span > 0 else 1.0,
        None if None in switches else sum(s for s in switches if s is not None),
        round(others_total / span, 3) if known else None,
        span, own, others_total if known else None,
    )


def _timed_region(
    step: Callable[[], float | None],
    more: Callable[[float], bool],
    slowdown: float,
    wall: list[float],
    device: list[float],
) -> Timing:
    """Time calls of `step` into `wall`/`device` while `more(seconds since the first)` says so
    (at least one call), with the garbage collector off and the process's and the machine's CPU
    use recorded around them: the one timed loop behind time_calls and time_block.

    `slowdown` (debug only) busy-waits `slowdown` x the call's own duration inside the timed
    region: a known, proportional slowdown for calibrating the latency gate.
    """
    clock = time.perf_counter
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed call is noise, not model latency (as timeit does)
    switches0, cpu0, busy0 = _involuntary_switches(), time.process_time(), busy_cpu_seconds()
    try:
        begin = clock()
        while True:
            t0 = clock()
            reported = step()
            t1 = clock()
            if slowdown > 0:
                _spin_until(t1 + (t1 - t0) * slowdown)
                t1 = clock()
                if reported is not None:  # the same known slowdown for a runtime-timed call
                    reported = float(reported) * (1.0 + slowdown)
            wall.append((t1 - t0) * 1e3)
            if reported is not None:
                device.append(float(reported))
            if not more(t1 - begin):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    span = clock() - begin
    own = time.process_time() - cpu0
    busy1, switches1 = busy_cpu_seconds(), _involuntary_switches()
    cpu_share = own / span if span > 0 else 1.0
    preempted = None if switches0 is None or switches1 is None else switches1 - switches0
    others = others_s = None
    if busy0 is not None and busy1 is not None and span > 0:
        others_s = max(0.0, (busy1 - busy0) - own)
        others = round(others_s / span, 3)
    return Timing(wall, device, False, round(cpu_share, 4), preempted, others, span, own, others_s)


def thin_samples(samples_ms: list[float], limit: int = MAX_SAMPLES_KEPT) -> list[float]:
    """At most `limit` samples, evenly strided in time order, for later statistics/plots."""
    stride = max(1, -(-len(samples_ms) // limit))
    return [round(v, 5) for v in samples_ms[::stride]]


def summarize(samples_ms: list[float]) -> dict[str, Any]:
    """p50/p90/p99/mean/std/CoV of latency samples in ms (std with ddof=1)."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise RunnerError("runtime", "no latency samples were collected", EXIT_RUNTIME_FAILURE)
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
    return {
        "iterations": int(a.size),
        "p50_ms": round(p50, 6),
        "p90_ms": round(p90, 6),
        "p99_ms": round(p99, 6),
        "mean_ms": round(mean, 6),
        "std_ms": round(std, 6),
        "cov": round(std / mean, 6) if mean > 0 else 0.0,
        "min_ms": round(float(a.min()), 6),
        "max_ms": round(float(a.max()), 6),
    }


def make_batch(images: Any, batch_size: int) -> Any:
    """First `batch_size` normalized images, repeated if the set is smaller."""
    reps = -(-batch_size // images.shape[0])
    return np.ascontiguousarray(np.concatenate([images] * reps)[:batch_size])


def measure_latency(
    backend: Any,
    images: Any,
    batch_size: int,
    protocol: Protocol,
    slowdown: float = 0.0,
) -> dict[str, Any]:
    """Time one batch size; host/wall latency at top level, GPU compute nested (TensorRT).

    On CPU runtimes a run during which the process got less than `min_cpu_share` of a core
    (other processes competed) is repeated; the least disturbed attempt is kept, and it is
    flagged `contended` if even that one fell short. GPU runtimes may sleep while waiting
    for the device, so their CPU share says nothing and is only recorded.
    """
    batch = make_batch(images, batch_size)
    backend.prepare(batch)
    cpu_bound = backend.name in CPU_RUNTIMES
    best = time_calls(lambda: backend.timed_step(batch), protocol, slowdown)
    attempts = 1
    while cpu_bound and best.contended(protocol) and attempts <= protocol.contention_retries:
        timing = time_calls(lambda: backend.timed_step(batch), protocol, slowdown)
        attempts += 1
        if not timing.contended(protocol) or timing.disturbance() < best.disturbance():
            best = timing
    return latency_entry(backend, best, batch_size, protocol, attempts)


def latency_entry(
    backend: Any, best: Timing, batch_size: int, protocol: Protocol, attempts: int = 1
) -> dict[str, Any]:
    """The result entry of one batch size from its Timing (measure_latency's, or one side's
    blocks of a paired round merged), so both are summarized and flagged the same way."""
    cpu_bound = backend.name in CPU_RUNTIMES
    # A runtime that times its own calls (OpenVINO's InferRequest.latency, what benchmark_app
    # reports) gives the headline numbers; the Python wall clock around the call is kept.
    runtime_timed = backend.timer == "runtime" and len(best.device_ms) == len(best.wall_ms)
    primary = best.device_ms if runtime_timed else best.wall_ms
    entry: dict[str, Any] = {"batch_size": batch_size, **summarize(primary)}
    entry["seconds"] = round(sum(best.wall_ms) / 1e3, 6)
    entry["throughput_ips"] = (
        round(batch_size * 1e3 / entry["mean_ms"], 3) if entry["mean_ms"] else 0.0
    )
    entry["truncated"] = best.truncated
    entry["cov_warning"] = entry["cov"] > protocol.cov_warn
    entry["cpu_share"] = best.cpu_share
    entry["others_cpu"] = best.others_cpu
    entry["preemptions"] = best.preemptions
    entry["attempts"] = attempts
    entry["contended"] = cpu_bound and best.contended(protocol)
    entry["samples_ms"] = thin_samples(primary)
    if runtime_timed:
        entry["python_wall"] = summarize(best.wall_ms)
        entry["latency_kind"] = "runtime"
    else:
        if best.device_ms:
            entry["gpu_compute"] = summarize(best.device_ms)
        entry["latency_kind"] = "host" if best.device_ms else "wall"
    entry.update(backend.run_config())
    return entry


def measure_throughput(
    backend: Any, images: Any, batch_size: int, streams: int, protocol: Protocol
) -> dict[str, Any]:
    """Images/s at `batch_size` with `streams` parallel streams (0 = the runtime's choice).

    Runs for the protocol's warm-up, then at least min_seconds (bounded by max_seconds),
    counting finished batches; what a server-style deployment gets, not a latency.
    """
    batch = make_batch(images, batch_size)
    done, seconds, info = backend.throughput(batch, streams, protocol)
    return {
        "batch_size": batch_size,
        "images_per_s": round(done * batch_size / seconds, 3) if seconds > 0 else 0.0,
        "batches": done,
        "seconds": round(seconds, 4),
        **info,
    }


def run_for(step: Callable[[], Any], protocol: Protocol) -> tuple[int, float]:
    """Warm up, then call `step` until min_seconds (and >= 1 call) or max_seconds passed."""
    clock = time.perf_counter
    start = clock()
    step()
    while clock() - start < protocol.warmup_seconds:
        step()
    calls, begin = 0, clock()
    limit = max(protocol.min_seconds, 1e-3)
    while True:
        step()
        calls += 1
        elapsed = clock() - begin
        if elapsed >= limit or elapsed >= protocol.max_seconds:
            return calls, elapsed
