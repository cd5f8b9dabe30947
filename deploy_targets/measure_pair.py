"""Paired A/B latency rounds of two artifacts in one local runner process (runner --pair-with).

The host side of dskd_runner/pairing.py: the same checks as `measure` (format, precision,
threads, input), one runner run that times `rounds` alternating rounds of candidate and
baseline, and the rounds as the runner recorded them. Local targets only for now: a device
target still gets one runner run per side (pipeline.regression_stats.interleaved_rounds),
because the two artifacts often share a file name and the device's upload folder is flat.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dskd.errors import UserError

from .artifacts import artifact_format, sha256_of
from .errors import DeviceError
from .measure import (
    _check_input_fits,
    _check_precision,
    _run_local,
    resolve_where,
    runtime_for,
    threads_setting,
)
from .registry import Target, get_target
from .remote.dskd_runner.protocol import Protocol
from .ssh import DeviceSpec


def can_pair(target: str | Target, device: str | DeviceSpec | None = None) -> bool:
    """Whether `target` measures here (pairing in one local process is possible); a target that
    cannot run here at all is not pairable (its one-per-side path gives the proper error)."""
    tgt = target if isinstance(target, Target) else get_target(target)
    try:
        return resolve_where(tgt, device) is None
    except UserError:
        return False


def measure_pair(candidate: str | Path, baseline: str | Path, target: str | Target, *, rounds: int,
                 start: int = 0, precision: str | None = None, threads: int | str | None = None,
                 protocol: Protocol | None = None, eval_set: str | Path | None = None,
                 input_shape: tuple[int, ...] | None = None, timeout_s: float = 900.0) -> list[dict[str, Any]]:
    """`rounds` paired rounds (round i: candidate first when i is even), numbered from `start`.

    Each round is {"index", "first", "candidate": {...}, "baseline": {...}} with each side's
    p50_ms, mean_ms, cpu_share, others_cpu, preemptions and contended flag.
    """
    tgt = target if isinstance(target, Target) else get_target(target)
    if not can_pair(tgt):
        raise UserError(f"target {tgt.name} measures on a device: paired rounds run only on local targets")
    if rounds < 1 or start < 0:
        raise UserError(f"paired rounds {rounds} from {start}: need at least 1 round from index >= 0")
    cand, base = Path(candidate), Path(baseline)
    fmt = artifact_format(cand)
    if artifact_format(base) != fmt:
        raise UserError(f"baseline {base.name} is {artifact_format(base)}, candidate {cand.name} is {fmt}: "
                        "compare artifacts of one format")
    precision = _check_precision(tgt, fmt, cand, precision)
    _check_input_fits(cand, fmt, None, input_shape)
    common = dict(runtime=runtime_for(tgt, fmt), precision=precision, threads=threads_setting(threads, tgt),
                  batch_sizes=[1], protocol=protocol or Protocol(), input_shape=input_shape,
                  timeout_s=timeout_s, cpu_affinity=tgt.cpu_affinity, hint="latency", streams=0,
                  pair_with=str(base.resolve()), pair_rounds=rounds, pair_start=start)
    result = _run_local(cand, eval_set, None, common, timeout_s)
    pair = result.get("pair") or {}
    if result.get("artifact_sha256") != sha256_of(cand) or pair.get("baseline_sha256") != sha256_of(base):
        raise DeviceError("local", "an artifact changed while it was measured (sha256 differs): rerun")
    got = pair.get("rounds")
    if not isinstance(got, list) or len(got) != rounds:
        raise DeviceError("local", f"the runner returned {len(got) if isinstance(got, list) else 'no'} "
                                   f"paired rounds, {rounds} asked: rerun")
    return got
