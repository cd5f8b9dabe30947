"""The host side of the runner's wire: its command line and its exit codes.

deploy_targets.measure builds the runner's arguments here (the timing protocol as one JSON
document, declared once in the runner's protocol module) and turns the runner's (or the
remote shell's) exit status into one actionable error.
"""

from __future__ import annotations

from dskd.errors import UserError

from .errors import DeviceError
from .remote.dskd_runner import protocol as wire
from .remote.dskd_runner.protocol import Protocol


def runner_args(
    *,
    artifact: str,
    runtime: str,
    precision: str,
    threads: int,
    batch_sizes: list[int],
    protocol: Protocol,
    out: str,
    eval_path: str | None = None,
    eval_batch_size: int = 64,
    input_shape: tuple[int, ...] | None = None,
    trtexec: str | None = None,
    timeout_s: float = 900.0,
    cpu_affinity: tuple[int, ...] | None = None,
    hint: str = "latency",
    streams: int = 0,
    image_path: str | None = None,
    pair_with: str | None = None,
    pair_rounds: int = 0,
    pair_start: int = 0,
) -> list[str]:
    """The runner's command-line arguments (after `python runner.py`)."""
    args = [
        "--artifact", artifact, "--runtime", runtime, "--precision", precision,
        "--threads", str(threads), "--batch-sizes", ",".join(map(str, batch_sizes)),
        "--protocol", protocol.to_json(),  # one JSON document: Protocol declares its fields
        "--eval-batch-size", str(int(eval_batch_size)),
        "--timeout", repr(float(timeout_s)),
        "--hint", hint, "--streams", str(int(streams)),
        "--out", out,
    ]  # fmt: skip
    if eval_path:
        args += ["--eval", eval_path]
    if input_shape:
        args += ["--input-shape", ",".join(map(str, input_shape))]
    if trtexec:
        args += ["--trtexec", trtexec]
    if cpu_affinity:
        args += ["--cpu-affinity", ",".join(map(str, cpu_affinity))]
    if image_path:
        args += ["--image", image_path]
    if pair_with:
        args += ["--pair-with", pair_with, "--pair-rounds", str(int(pair_rounds)),
                 "--pair-start", str(int(pair_start))]
    return args


def interpret_exit(
    where: str, returncode: int, stderr: str, python: str, timeout_s: float
) -> UserError:
    """The runner's (or the remote shell's) exit status as one actionable error."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    runner_line = next((ln for ln in reversed(lines) if ln.startswith(wire.ERROR_PREFIX)), None)
    detail = (
        runner_line[len(wire.ERROR_PREFIX) :].strip()
        if runner_line
        else (lines[-1] if lines else "")
    )
    detail = detail.split(": ", 1)[1] if runner_line and ": " in detail else detail
    if "no space left" in stderr.lower():
        return DeviceError(
            where, "disk full: free space in the temp folder or choose another with remote_tmp (recipe target.remote_tmp)"
        )
    if returncode == wire.EXIT_MISSING_MODULE:
        return DeviceError(where, f"missing runtime: {detail}")
    if returncode < 0:
        return DeviceError(
            where,
            f"the runner was killed by signal {-returncode} (out of memory?): "
            "lower --batch-sizes or the eval batch size, or free memory",
        )
    if returncode in (124, 137):  # coreutils `timeout`: TERM sent / KILL needed
        return DeviceError(
            where,
            f"measurement did not finish within {timeout_s:.0f} s and was stopped: "
            "raise the timeout or lower --min-seconds/--batch-sizes",
        )
    if returncode in (126, 127):
        return DeviceError(
            where,
            f"python {python!r} not found or not executable: install python3 there "
            "or set the device's python",
        )
    if returncode == wire.EXIT_RUNTIME_FAILURE:
        return DeviceError(where, f"the runtime failed: {detail}")
    if returncode in (wire.EXIT_BAD_INPUT, wire.EXIT_USAGE):
        return UserError(f"{where}: {detail}")
    return DeviceError(where, f"runner exited with status {returncode}: {detail or 'no message'}")
