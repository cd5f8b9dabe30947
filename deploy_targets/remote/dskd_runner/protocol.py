"""The runner's wire format: result format, exit codes and the timing protocol.

The host (deploy_targets.measure) and the device runner share this module: the host builds
a Protocol and sends it as ONE JSON document (`--protocol '{...}'`), the runner reads it
back with Protocol.from_json, and the result echoes it (`"protocol": {...}`). Its fields are
declared once, here; nothing else lists them.

Exit codes (the host turns them into one-line errors):
  0 ok, 2 bad arguments, 3 a Python module is missing, 4 bad input file,
  5 the runtime failed.  The last stderr line starts with ``runner-error:``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

RESULT_FORMAT = "dskd-measurement/1"
# 3: the timing protocol travels as one JSON document (--protocol), not one flag per field;
#    runtime "torch-tensorrt" (Torch-TensorRT ExportedProgram, .ep)
# 4: --pair-with: paired rounds of a candidate and its baseline in one process (pairing.py)
# 5: paired rounds interleave the two sides in short X Y Y X blocks inside each round (both
#    sides see the same machine state); same output keys, but per-round numbers are not
#    comparable with version 4's
RUNNER_VERSION = 5
ERROR_PREFIX = "runner-error:"

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_MISSING_MODULE = 3
EXIT_BAD_INPUT = 4
EXIT_RUNTIME_FAILURE = 5

RUNTIMES = ("onnxruntime", "openvino", "tensorrt", "torch-tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
# "latency": batch-size latencies only (one request, one stream, bound tensors);
# "throughput": also images/s at the largest batch size with several streams where the
# runtime has them (OpenVINO), one bound request otherwise.
HINTS = ("latency", "throughput")
THREADS_ALL = 0  # --threads 0: all physical cores this process may run on
# pip names for the modules a runtime needs, for the "install X" hint
RUNTIME_MODULES = {
    "onnxruntime": ("onnxruntime",),
    "openvino": ("openvino",),
    "tensorrt": ("tensorrt", "pycuda"),
    "torch-tensorrt": ("torch", "torch_tensorrt"),
}
# the runtimes that compute on the CPU: their timing is checked for CPU contention
CPU_RUNTIMES = ("onnxruntime", "openvino")


class RunnerError(Exception):
    """A failure with a dedicated exit code and a one-line message for the host."""

    def __init__(self, kind: str, message: str, exit_code: int, missing: tuple = ()):
        super().__init__(message)
        self.kind = kind
        self.exit_code = exit_code
        self.missing = missing


def one_line(exc: BaseException) -> str:
    """An exception as one short line (runtimes print multi-line C++ traces)."""
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


@dataclass(frozen=True)
class Protocol:
    """Timing protocol: time-based warm-up, then >= min_iters AND >= min_seconds.

    max_seconds bounds one batch size's timing so a very slow model cannot hang the run;
    a run cut by it is flagged `truncated`. cov_warn is the per-iteration coefficient of
    variation above which the result carries a noise warning.
    """

    warmup_seconds: float = 0.5
    min_iters: int = 50
    min_seconds: float = 2.0
    max_seconds: float = 120.0
    cov_warn: float = 0.2
    # CPU runtimes: a timing run is "contended" when the process got less than min_cpu_share
    # of a core, or other processes kept more than max_other_cpu cores busy meanwhile (on
    # SMT/VM siblings that slows us without taking our CPU time); it is repeated up to
    # contention_retries times and flagged if every attempt was contended.
    min_cpu_share: float = 0.9
    contention_retries: int = 2
    max_other_cpu: float = 0.2

    def enough(self, calls: int, seconds: float) -> bool:
        """The stop rule of one timing: at least min_iters calls and min_seconds of them (a
        timing that reaches max_seconds first is cut short: truncated)."""
        return calls >= self.min_iters and seconds >= self.min_seconds

    def validate(self) -> None:
        if self.warmup_seconds < 0 or self.min_seconds < 0:
            raise RunnerError("usage", "warmup/min seconds must be >= 0", EXIT_USAGE)
        if self.min_iters < 1:
            raise RunnerError("usage", "min-iters must be >= 1", EXIT_USAGE)
        if self.max_seconds <= 0:
            raise RunnerError("usage", "max-seconds must be > 0", EXIT_USAGE)
        if (
            self.contention_retries < 0
            or not 0 <= self.min_cpu_share <= 1
            or self.max_other_cpu < 0
        ):
            raise RunnerError(
                "usage",
                "contention-retries and max-other-cpu must be >= 0, min-cpu-share in [0, 1]",
                EXIT_USAGE,
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """The document sent to the runner (compact: it travels on a command line)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> Protocol:
        """A Protocol from a JSON object: unknown keys and wrong types are usage errors;
        a key left out keeps its default."""
        if not isinstance(data, dict):
            raise RunnerError("usage", "--protocol must be a JSON object", EXIT_USAGE)
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise RunnerError(
                "usage",
                f"--protocol: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}",
                EXIT_USAGE,
            )
        values: dict[str, Any] = {}
        for name, value in data.items():
            want = int if isinstance(getattr(cls, name), int) else float
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                want is int and not float(value).is_integer()
            ):
                raise RunnerError(
                    "usage", f"--protocol: {name} must be a number, got {value!r}", EXIT_USAGE
                )
            values[name] = want(value)
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> Protocol:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise RunnerError("usage", f"--protocol is not JSON: {exc}", EXIT_USAGE) from exc
        return cls.from_dict(data)
