"""The interleaved A/B latency record behind `max_latency_regression`, made one way for everyone.

The deploy stage (`pipeline run --baseline`) and bench/latency_gate_power.py both call
`interleaved_ab`, so the bench measures the gate exactly as it runs. Local targets time whole
rounds in one runner process (deploy_targets.measure_pair, regression_stats.paired_rounds);
device targets get one runner run per side (regression_stats.interleaved_rounds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from deploy_targets.measure_pair import can_pair, measure_pair
from deploy_targets.remote.dskd_runner.protocol import Protocol
from pipeline import regression_stats as rs


def round_protocol_of(protocol: Protocol) -> Protocol:
    """The recipe's protocol shortened for one side of a round (regression_stats.round_protocol)."""
    return replace(protocol, **rs.round_protocol(protocol.min_iters, protocol.min_seconds))


def interleaved_ab(cand: Path, base: Path, target: str, precision: str, protocol: Protocol,
                   tolerance: float | None, budget_s: float, *, device: str | None = None,
                   threads: int | str | None = None, timeout_s: float = 900.0,
                   measure_side: Callable[[Path], Any] | None = None) -> dict[str, Any]:
    """The rounds record (regression_stats' format) of `cand` against `base` on `target`.

    `protocol` is the recipe's; each side of a round uses its shortened form. `measure_side`
    (path -> deploy_targets Measurement) measures one side on a device target; it is required
    only where the target cannot pair here.
    """
    short = round_protocol_of(protocol)
    if can_pair(target, device):
        def chunk(count: int, start: int) -> list[dict[str, Any]]:
            return measure_pair(cand, base, target, rounds=count, start=start, precision=precision,
                                threads=threads, protocol=short, timeout_s=timeout_s)

        return {"mode": "paired in one runner process", **rs.paired_rounds(chunk, tolerance, budget_s)}
    if measure_side is None:
        raise ValueError(f"target {target} measures on a device: pass measure_side")

    def one(side: str) -> tuple[float, bool, dict[str, Any]]:
        m = measure_side(cand if side == rs.CANDIDATE else base)
        return m.p50_ms, any(e.get("contended") for e in m.latency), rs.side_details(m)

    return {"mode": "one runner run per side", **rs.interleaved_rounds(one, tolerance, budget_s)}
