"""Paired A/B latency rounds of two artifacts in one runner process (runner --pair-with).

The host side of dskd_runner/pairing.py, on this machine or on a device over SSH: the same
checks as `measure` (format, precision, threads, input), one runner run per chunk that times
`count` alternating rounds of candidate and baseline, and the rounds as the runner recorded them,
after checking that the two files it loaded are byte for byte the two given here (sha256).

On a device both artifacts go into the private temp folder of deploy_targets.measure
(`remote_workdir`): the candidate and its companions in the folder, the baseline and its
companions (an IR's .bin, ONNX external data) in the sub-folder `baseline/`, because the two
usually share file names (a baseline run's model.onnx against this run's model.onnx). They are
copied once per `pair_session`; every chunk then costs one runner start, not two per round.

Which runtimes pair (PAIRING_RUNTIMES): the runner's pairing loads two backends of one runtime
side by side and times them alternately in short blocks (pairing.py). ONNX Runtime and OpenVINO
sessions live side by side; Torch-TensorRT programs and TensorRT engines run on the device's
one primary CUDA context, and every call of a TensorRtBackend makes that context current on entry
and releases it on exit (backend_tensorrt.py), so each side runs in the context its engine and
buffers belong to whichever backend was made last, and closing one leaves the other intact.
An engine timed with trtexec (`trtexec=`, --trtexec) does not pair: trtexec is a separate
process per run, not a backend the runner can alternate with another, so `pairing_blocker`
refuses it with that reason and such engines keep one run per side
(pipeline.regression_stats.interleaved_rounds).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dskd.errors import UserError

from .artifacts import artifact_format, companion_files, sha256_of
from .errors import DeviceError
from .measure import (
    RESULT_NAME,
    _check_input_fits,
    _check_precision,
    _run_local,
    remote_workdir,
    resolve_where,
    runtime_for,
    threads_setting,
)
from .registry import Target, get_target
from .remote.dskd_runner.protocol import Protocol
from .runner_command import runner_args
from .ssh import DeviceSpec, SshOptions

BASELINE_DIR = "baseline"  # the baseline's sub-folder of the device's temp folder
# runtimes whose runner backends can live side by side in one process (module docstring)
PAIRING_RUNTIMES = ("onnxruntime", "openvino", "tensorrt", "torch-tensorrt")
RoundsFn = Callable[[int, int], list[dict[str, Any]]]


def pairing_blocker(target: str | Target, device: str | DeviceSpec | None = None,
                    artifact: str | Path | None = None, trtexec: str | None = None) -> str | None:
    """Why `artifact` (or the target's own format) cannot be paired in one runner process on
    `target` (here or on `device`), or None when it can. `trtexec`: the engine would be timed
    with that trtexec (measure's `trtexec`), which never pairs. A target that cannot run at
    all, or an unreadable artifact, is reported too: its one-per-side path then gives the
    proper error."""
    tgt = target if isinstance(target, Target) else get_target(target)
    try:
        resolve_where(tgt, device)
        runtime = runtime_for(tgt, artifact_format(artifact)) if artifact is not None else tgt.runtime
    except UserError as exc:
        return str(exc)
    if runtime == "tensorrt" and trtexec:
        return ("a TensorRT engine timed with trtexec (--trtexec) runs in a separate trtexec process "
                "per run, which cannot alternate with the other side: one runner run per side, or "
                "drop --trtexec to pair the engines in the runner's TensorRT backend")
    if runtime not in PAIRING_RUNTIMES:
        return f"{runtime} cannot hold two artifacts in one runner process: one runner run per side"
    return None


def can_pair(target: str | Target, device: str | DeviceSpec | None = None,
             artifact: str | Path | None = None, trtexec: str | None = None) -> bool:
    """Whether candidate and baseline can be timed in one runner process (pairing_blocker)."""
    return pairing_blocker(target, device, artifact, trtexec) is None


def measure_pair(candidate: str | Path, baseline: str | Path, target: str | Target, *, rounds: int,
                 start: int = 0, **session: Any) -> list[dict[str, Any]]:
    """`rounds` paired rounds (round i: candidate first when i is even), numbered from `start`.

    Each round is {"index", "first", "candidate": {...}, "baseline": {...}} with each side's
    p50_ms, mean_ms, cpu_share, others_cpu, preemptions and contended flag. `session`: the
    keywords of `pair_session` (device, precision, threads, protocol, ssh, remote_tmp, ...).
    """
    _check_counts(rounds, start)
    with pair_session(candidate, baseline, target, **session) as timed:
        return timed(rounds, start)


@contextlib.contextmanager
def pair_session(candidate: str | Path, baseline: str | Path, target: str | Target, *,
                 device: str | DeviceSpec | None = None, precision: str | None = None,
                 threads: int | str | None = None, protocol: Protocol | None = None,
                 eval_set: str | Path | None = None, input_shape: tuple[int, ...] | None = None,
                 ssh: SshOptions | None = None, remote_python: str = "python3",
                 remote_tmp: str | None = None, timeout_s: float = 900.0,
                 trtexec: str | None = None) -> Iterator[RoundsFn]:
    """A `rounds(count, start)` function (regression_stats.paired_rounds' RoundsFn) timing the
    pair in one runner run per call; on a device the files are copied once, on entry, and the
    temp folder is removed on exit, whatever happened. `trtexec` is taken only to refuse it for
    engines (pairing_blocker): paired rounds are always timed by the runner's own backends."""
    tgt = target if isinstance(target, Target) else get_target(target)
    cand, base = Path(candidate), Path(baseline)
    why = pairing_blocker(tgt, device, cand, trtexec)
    if why is not None:
        raise UserError(f"target {tgt.name}: paired rounds impossible: {why}")
    fmt = artifact_format(cand)
    if artifact_format(base) != fmt:
        raise UserError(f"baseline {base.name} is {artifact_format(base)}, candidate {cand.name} is {fmt}: "
                        "compare artifacts of one format")
    precision = _check_precision(tgt, fmt, cand, precision)
    _check_input_fits(cand, fmt, None, input_shape)
    if timeout_s <= 0:
        raise UserError(f"timeout {timeout_s}: must be > 0 seconds")
    spec = resolve_where(tgt, device)
    common = dict(runtime=runtime_for(tgt, fmt), precision=precision, threads=threads_setting(threads, tgt),
                  batch_sizes=[1], protocol=protocol or Protocol(), input_shape=input_shape,
                  timeout_s=timeout_s, cpu_affinity=tgt.cpu_affinity, hint="latency", streams=0)
    if spec is None:
        def local(count: int, start: int) -> list[dict[str, Any]]:
            _check_counts(count, start)
            result = _run_local(cand, eval_set, None, dict(common, pair_with=str(base.resolve()),
                                                           pair_rounds=count, pair_start=start), timeout_s)
            return _checked_rounds(result, cand, base, count, "local")

        yield local
        return
    uploads = {"": [*companion_files(cand, fmt), *([Path(eval_set)] if eval_set else [])],
               BASELINE_DIR: companion_files(base, fmt)}
    with remote_workdir(spec, ssh, uploads, remote_python, remote_tmp) as dev:
        def remote(count: int, start: int) -> list[dict[str, Any]]:
            _check_counts(count, start)
            args = runner_args(artifact=f"./{cand.name}", out=RESULT_NAME,
                               eval_path=f"./{Path(eval_set).name}" if eval_set else None,
                               pair_with=f"./{BASELINE_DIR}/{base.name}", pair_rounds=count,
                               pair_start=start, **common)
            return _checked_rounds(dev.run_runner(args, timeout_s), cand, base, count, dev.where)

        yield remote


def _check_counts(rounds: int, start: int) -> None:
    if rounds < 1 or start < 0:
        raise UserError(f"paired rounds {rounds} from {start}: need at least 1 round from index >= 0")


def _checked_rounds(result: dict[str, Any], cand: Path, base: Path, count: int, where: str) -> list[dict[str, Any]]:
    """The runner's rounds, once both files it timed are shown to be the two given (sha256 of
    the files here now: a copy corrupted on the way, or a file changed while measured, fails)."""
    pair = result.get("pair") or {}
    for side, path, got in (("candidate", cand, result.get("artifact_sha256")),
                            ("baseline", base, pair.get("baseline_sha256"))):
        if got != sha256_of(path):
            raise DeviceError(where, f"the {side} the runner timed is not {path} (sha256 differs: corrupted "
                                     "in the copy, or changed while measured): rerun")
    got = pair.get("rounds")
    if not isinstance(got, list) or len(got) != count:
        raise DeviceError(where, f"the runner returned {len(got) if isinstance(got, list) else 'no'} "
                                 f"paired rounds, {count} asked: rerun")
    return got
