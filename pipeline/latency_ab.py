"""The interleaved A/B latency record behind `max_latency_regression`, made one way for everyone.

The deploy stage (`pipeline run --baseline`) and bench/latency_gate_power.py both call
`interleaved_ab`, so the bench measures the gate exactly as it runs. Wherever the runner can
hold both artifacts (deploy_targets.measure_pair.can_pair: ONNX Runtime, OpenVINO,
Torch-TensorRT and TensorRT engines timed by the runner's own backend, on this machine or on a
device over SSH) whole rounds are timed in one runner process
(deploy_targets.measure_pair.pair_session, regression_stats.paired_rounds); on a device both
artifacts are copied once and every chunk of rounds is one runner start. Where the pair cannot
share a process (measure_pair.pairing_blocker says why; an engine timed with trtexec is one)
each side gets its own runner run (regression_stats.interleaved_rounds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from deploy_targets.measure_pair import can_pair, pair_session
from deploy_targets.remote.dskd_runner.protocol import Protocol
from deploy_targets.ssh import SshOptions
from pipeline import regression_stats as rs

PAIRED, PER_SIDE = "paired in one runner process", "one runner run per side"


def round_protocol_of(protocol: Protocol) -> Protocol:
    """The recipe's protocol shortened for one side of a round (regression_stats.round_protocol)."""
    return replace(protocol, **rs.round_protocol(protocol.min_iters, protocol.min_seconds))


def interleaved_ab(cand: Path, base: Path, target: str, precision: str, protocol: Protocol,
                   tolerance: float | None, budget_s: float, *, device: str | None = None,
                   threads: int | str | None = None, timeout_s: float = 900.0,
                   ssh: SshOptions | None = None, remote_python: str = "python3",
                   remote_tmp: str | None = None,
                   measure_side: Callable[[Path], Any] | None = None) -> dict[str, Any]:
    """The rounds record (regression_stats' format) of `cand` against `base` on `target`.

    `protocol` is the recipe's; each side of a round uses its shortened form. `ssh`,
    `remote_python` and `remote_tmp` reach `device` as in deploy_targets.measure. `measure_side`
    (path -> deploy_targets Measurement) measures one side; it is required only where the pair
    cannot share one runner process (can_pair).
    """
    short = round_protocol_of(protocol)
    if can_pair(target, device, cand):
        with pair_session(cand, base, target, device=device, precision=precision, threads=threads,
                          protocol=short, ssh=ssh, remote_python=remote_python, remote_tmp=remote_tmp,
                          timeout_s=timeout_s) as chunk:
            return {"mode": PAIRED, **rs.paired_rounds(chunk, tolerance, budget_s)}
    if measure_side is None:
        raise ValueError(f"target {target}: {cand.name} cannot be paired in one runner process "
                         "here: pass measure_side")

    def one(side: str) -> tuple[float, bool, dict[str, Any]]:
        m = measure_side(cand if side == rs.CANDIDATE else base)
        return m.p50_ms, any(e.get("contended") for e in m.latency), rs.side_details(m)

    return {"mode": PER_SIDE, **rs.interleaved_rounds(one, tolerance, budget_s)}
