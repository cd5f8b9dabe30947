"""Paired rounds: a candidate and its baseline timed alternately inside one runner process.

Why one process: judging a small slowdown needs many rounds, and a fresh runner per side
(interpreter start, runtime import, session creation, warm-up) costs several seconds each, so a
60 s budget held only about 6 rounds and the sign-test interval stayed as wide as the noise.
Here both sessions are created and warmed once; then every round times the two sides back to
back (order alternating, continuing the caller's numbering with `start` so that chunks of
rounds from successive calls keep alternating), each with the same short protocol and no
contention retries: a disturbed side is not re-measured alone (that would un-pair the round),
the whole round is judged on the host by regression_stats.paired_usable from the CPU share and
the other processes' load recorded for each side.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .protocol import Protocol
from .timing import measure_latency

CANDIDATE, BASELINE = "candidate", "baseline"
SIDE_KEYS = ("p50_ms", "mean_ms", "cpu_share", "others_cpu", "preemptions", "contended")


def round_order(index: int) -> tuple[str, str]:
    """C B for even rounds, B C for odd ones (the host's numbering, so chunks keep alternating)."""
    return (CANDIDATE, BASELINE) if index % 2 == 0 else (BASELINE, CANDIDATE)


def pair_rounds(candidate: Any, baseline: Any, images: Any, protocol: Protocol, rounds: int,
                start: int = 0) -> list[dict[str, Any]]:
    """`rounds` paired timings of two loaded backends at batch size 1.

    Both are warmed with the protocol's warm-up once; each side of a round then runs with a
    short re-warm (a tenth of the warm-up: caches after the other model ran) and no retries.
    """
    backends = {CANDIDATE: candidate, BASELINE: baseline}
    warm = replace(protocol, min_iters=1, min_seconds=0.0, contention_retries=0)
    for side in (CANDIDATE, BASELINE):
        measure_latency(backends[side], images, 1, warm)
    per_side = replace(protocol, warmup_seconds=protocol.warmup_seconds / 10, contention_retries=0)
    out: list[dict[str, Any]] = []
    for i in range(start, start + rounds):
        order = round_order(i)
        record: dict[str, Any] = {"index": i, "first": order[0]}
        for side in order:
            entry = measure_latency(backends[side], images, 1, per_side)
            record[side] = {k: entry.get(k) for k in SIDE_KEYS}
        out.append(record)
    return out
