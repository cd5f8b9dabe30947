"""Paired rounds: a candidate and its baseline timed alternately inside one runner process.

Why one process: judging a small slowdown needs many rounds, and a fresh runner per side
(interpreter start, runtime import, session creation, warm-up) costs several seconds each, so a
60 s budget held only about 6 rounds and the sign-test interval stayed as wide as the noise.
Here both sessions are created and warmed once; then every round times the two sides with the
same short protocol and no contention retries: a disturbed side is not re-measured alone (that
would un-pair the round), the whole round is judged on the host by
regression_stats.paired_usable from the CPU share and the other processes' load recorded for
each side.

Why blocks (RUNNER_VERSION 5): timing side X for ~0.5 s and then side Y left the two halves
of a round under different machine states (a neighbour's phase, a preemption burst), and the
per-round ratios of one artifact against itself scattered by 10-15 % on a shared 2-core
machine. Now the sides alternate in short blocks inside the round, in the order X Y Y X X Y Y X
... (X = the round's first side, alternating per round as before), so both sides sample the
same ~second of machine state, and a drift that is linear over any four consecutive blocks
adds the same to both. Each block starts with one untimed call (the re-warm after the other
model ran). Each side keeps the protocol's stop rule, counted over its own timed calls only
(>= min_iters calls and >= min_seconds of them; max_seconds bounds it), and the round ends at
the first whole X Y Y X group after both sides met it, so both sides get the same number of
blocks.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from .protocol import Protocol
from .timing import Timing, latency_entry, make_batch, merge_timings, time_block, time_calls

CANDIDATE, BASELINE = "candidate", "baseline"
SIDE_KEYS = ("p50_ms", "mean_ms", "cpu_share", "others_cpu", "preemptions", "contended")
# Blocks per side in a round when each side runs exactly its protocol minimum: 20 blocks of a
# 0.5 s side are 25 ms each (10 calls of a 2.5 ms model), shorter than a neighbour's phases
# and a few scheduler slices long, while the one untimed re-warm call costs a tenth of the
# block. Even, so the X Y Y X pattern is whole (4 blocks) and balanced.
BLOCKS_PER_SIDE = 20
MIN_BLOCK_CALLS = 2  # timed calls per block, at least (else the re-warm call is half the work)
SIZING_CALLS = 5  # timed calls after the warm-up whose median sizes a side's blocks


def round_order(index: int) -> tuple[str, str]:
    """C B for even rounds, B C for odd ones (the host's numbering, so chunks keep alternating)."""
    return (CANDIDATE, BASELINE) if index % 2 == 0 else (BASELINE, CANDIDATE)


def block_sides(first: str, count: int) -> list[str]:
    """The side of each of `count` blocks: X Y Y X X Y Y X ... with X = `first`."""
    second = BASELINE if first == CANDIDATE else CANDIDATE
    return [(first, second)[((j + 1) // 2) % 2] for j in range(count)]


def block_calls(call_ms: float, protocol: Protocol) -> int:
    """Timed calls per block for a side whose calls take `call_ms`: its protocol minimum
    (min_iters calls, or min_seconds worth of them, whichever is more) spread over
    BLOCKS_PER_SIDE blocks, so each side's blocks last about min_seconds / BLOCKS_PER_SIDE
    whatever its speed (a slower side gets fewer calls per block, and both sides finish
    their minimum after about the same number of blocks)."""
    per_call_s = max(call_ms, 1e-6) / 1e3
    minimum = max(protocol.min_iters, protocol.min_seconds / per_call_s)
    return max(MIN_BLOCK_CALLS, math.ceil(minimum / BLOCKS_PER_SIDE))


def one_round(backends: dict[str, Any], batch: Any, sizes: dict[str, int], first: str,
              protocol: Protocol) -> dict[str, dict[str, Any]]:
    """Both sides of one round, their blocks interleaved; each side's entry in SIDE_KEYS."""
    blocks: dict[str, list[Timing]] = {CANDIDATE: [], BASELINE: []}
    order = block_sides(first, 4)
    j = 0
    while True:
        side = order[j % 4]
        backend = backends[side]
        blocks[side].append(time_block(lambda b=backend: b.timed_step(batch), sizes[side]))
        j += 1
        if j % 4 == 0:  # a whole X Y Y X group: both sides have the same number of blocks
            totals = {s: merge_timings(blocks[s]) for s in blocks}
            if all(protocol.enough(len(t.wall_ms), t.span_s) or t.span_s >= protocol.max_seconds
                   for t in totals.values()):
                break
    out: dict[str, dict[str, Any]] = {}
    for side, total in totals.items():
        total.truncated = not protocol.enough(len(total.wall_ms), total.span_s)  # stopped by max_seconds
        entry = latency_entry(backends[side], total, 1, protocol)
        out[side] = {k: entry.get(k) for k in SIDE_KEYS}
    return out


def pair_rounds(candidate: Any, baseline: Any, images: Any, protocol: Protocol, rounds: int,
                start: int = 0) -> list[dict[str, Any]]:
    """`rounds` paired timings of two loaded backends at batch size 1.

    Both are prepared and warmed with the protocol's warm-up once, and a few timed calls after
    it size each side's blocks (block_calls, by wall time, what a block lasts); then every
    round interleaves the two sides' blocks (one_round), without retries.
    """
    backends = {CANDIDATE: candidate, BASELINE: baseline}
    batch = make_batch(images, 1)
    sizing = replace(protocol, min_iters=SIZING_CALLS, min_seconds=0.0, contention_retries=0)
    sizes: dict[str, int] = {}
    for side, backend in backends.items():
        backend.prepare(batch)
        warm = time_calls(lambda b=backend: b.timed_step(batch), sizing)
        sizes[side] = block_calls(sorted(warm.wall_ms)[len(warm.wall_ms) // 2], protocol)
    out: list[dict[str, Any]] = []
    for i in range(start, start + rounds):
        first = round_order(i)[0]
        out.append({"index": i, "first": first, **one_round(backends, batch, sizes, first, protocol)})
    return out
