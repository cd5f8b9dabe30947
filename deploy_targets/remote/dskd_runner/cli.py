"""The runner's command line and the run itself: load, time every batch size, evaluate.

`python runner.py --artifact A --runtime R --protocol '{...}' --out result.json` writes one
JSON result (format protocol.RESULT_FORMAT) atomically; failures exit with protocol's codes
and one `runner-error:` line on stderr that the host turns into a one-line error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from .backends import load_backend, require_modules
from .environment import environment, pin_cpus, resolve_threads
from .evaluation import evaluate, latency_images, load_eval
from .pairing import pair_rounds
from .preprocess import preprocess_record, read_image
from .protocol import (
    ERROR_PREFIX,
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_RUNTIME_FAILURE,
    EXIT_USAGE,
    HINTS,
    PRECISIONS,
    RESULT_FORMAT,
    RUNNER_VERSION,
    RUNTIMES,
    Protocol,
    RunnerError,
    one_line,
)
from .timing import measure_latency, measure_throughput
from .trtexec_timing import trtexec_latency


@dataclass
class RunConfig:
    artifact: str
    runtime: str
    precision: str
    threads: int
    batch_sizes: tuple[int, ...]
    protocol: Protocol = field(default_factory=Protocol)
    eval_path: str | None = None
    eval_batch_size: int = 64
    input_shape: tuple[int, ...] | None = None
    trtexec: str | None = None
    slowdown: float = 0.0
    timeout: float = 600.0
    cpu_affinity: tuple[int, ...] | None = None
    hint: str = "latency"
    streams: int = 0  # throughput mode's streams; 0 = the runtime's choice for the hint
    image_path: str | None = None  # an encoded image for the pre-processing timing
    pair_with: str | None = None  # a baseline artifact: time paired rounds (pairing.py) instead
    pair_rounds: int = 0
    pair_start: int = 0


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _warnings_for(entry: dict[str, Any], bs: int, protocol: Protocol) -> list[str]:
    out = []
    if entry["cov_warning"]:
        out.append(
            f"batch {bs}: latency CoV {entry['cov']:.2f} > {protocol.cov_warn:.2f}: "
            "the machine is noisy; close other load or raise --min-seconds"
        )
    if entry.get("contended"):
        out.append(
            f"batch {bs}: CPU contention in all {entry['attempts']} attempts (runner got "
            f"{entry['cpu_share']:.0%} of a core, other processes used "
            f"{entry['others_cpu'] or 0:.2f} cores): the latency is inflated; "
            "rerun on an idle machine"
        )
    if entry["truncated"]:
        out.append(f"batch {bs}: stopped at max {protocol.max_seconds:g} s before min-iters")
    return out


def _check(cfg: RunConfig) -> None:
    if cfg.runtime not in RUNTIMES:
        raise RunnerError(
            "usage", f"unknown runtime {cfg.runtime!r}: choose {', '.join(RUNTIMES)}", EXIT_USAGE
        )
    cfg.protocol.validate()
    require_modules(cfg.runtime)
    if cfg.cpu_affinity:
        pin_cpus(cfg.cpu_affinity)
    if not os.path.isfile(cfg.artifact):
        raise RunnerError("bad-input", f"artifact {cfg.artifact} does not exist", EXIT_BAD_INPUT)
    if cfg.hint not in HINTS:
        raise RunnerError("usage", f"--hint {cfg.hint!r}: choose {', '.join(HINTS)}", EXIT_USAGE)
    if cfg.streams < 0:
        raise RunnerError("usage", "--streams must be >= 0 (0: the runtime's choice)", EXIT_USAGE)
    if cfg.pair_with is not None and (cfg.pair_rounds < 1 or cfg.pair_start < 0):
        raise RunnerError("usage", "--pair-with needs --pair-rounds >= 1 and --pair-start >= 0", EXIT_USAGE)
    if cfg.pair_with is not None and cfg.trtexec and cfg.runtime == "tensorrt":
        # paired rounds time the runner's own backends; trtexec would time neither side
        raise RunnerError("usage", "--pair-with cannot be combined with --trtexec (trtexec runs one engine "
                          "per process): drop one of them", EXIT_USAGE)
    if cfg.pair_with is not None and not os.path.isfile(cfg.pair_with):
        raise RunnerError("bad-input", f"--pair-with {cfg.pair_with}: no such file", EXIT_BAD_INPUT)


def run(cfg: RunConfig) -> dict[str, Any]:
    """Load, measure every batch size, evaluate accuracy; return the result record."""
    _check(cfg)
    if cfg.pair_with is not None:
        return run_pair(cfg)
    ev = load_eval(cfg.eval_path) if cfg.eval_path else None
    image = read_image(cfg.image_path) if cfg.image_path else None
    threads, threads_policy = resolve_threads(cfg.threads)
    backend = load_backend(cfg.runtime, cfg.artifact, cfg.precision, threads)
    try:
        images = latency_images(backend, ev, cfg.input_shape)
        warnings: list[str] = []
        latency = []
        for bs in cfg.batch_sizes:
            if backend.max_batch and bs > backend.max_batch:
                raise RunnerError(
                    "bad-input",
                    f"batch size {bs} exceeds the engine's max batch {backend.max_batch}",
                    EXIT_BAD_INPUT,
                )
            if cfg.trtexec and cfg.runtime == "tensorrt":
                shape = (bs, *images.shape[1:])
                entry = trtexec_latency(
                    cfg.trtexec, cfg.artifact, backend.input_name, shape, cfg.protocol, cfg.timeout
                )
            else:
                entry = measure_latency(backend, images, bs, cfg.protocol, cfg.slowdown)
            warnings += _warnings_for(entry, bs, cfg.protocol)
            latency.append(entry)
        throughput = None
        if cfg.hint == "throughput":
            if cfg.streams > 1 and cfg.runtime != "openvino":
                warnings.append(
                    f"--streams {cfg.streams}: {cfg.runtime} has no parallel streams here; "
                    "throughput measured with one bound request"
                )
            throughput = measure_throughput(
                backend, images, max(cfg.batch_sizes), cfg.streams, cfg.protocol
            )
        preprocess = preprocess_record(image, cfg.image_path, ev, images.shape[1:], cfg.protocol)
        if preprocess is not None:
            for entry in latency:
                per_image = entry["p50_ms"] / entry["batch_size"]
                entry["end_to_end_per_image_ms"] = round(preprocess["p50_ms"] + per_image, 6)
        accuracy = evaluate(backend, ev, cfg.eval_batch_size) if ev is not None else None
        env = environment(backend, threads)
        runtime_config = dict(backend.run_config(), threads_policy=threads_policy)
        if backend.threads is None:
            runtime_config["threads_policy"] = "not applicable (GPU)"
        runtime_config.update(mode_hint=cfg.hint, throughput_streams=cfg.streams)
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    if cfg.slowdown:
        warnings.append(f"debug slowdown {cfg.slowdown:g} active: latency is artificially inflated")
    return _result(cfg, threads, runtime_config, env, latency, accuracy=accuracy, throughput=throughput,
                   preprocess=preprocess, warnings=warnings)


def _result(cfg: RunConfig, threads: int, runtime_config: dict[str, Any], env: dict[str, Any],
            latency: list[dict[str, Any]], **parts: Any) -> dict[str, Any]:
    """The result record (format RESULT_FORMAT) of one run; `parts` fill or add its optional keys
    (accuracy, throughput, preprocess, warnings; `pair` for a paired run)."""
    return {
        "format": RESULT_FORMAT,
        "runner_version": RUNNER_VERSION,
        "runtime": cfg.runtime,
        "precision": cfg.precision,
        "artifact": os.path.basename(cfg.artifact),
        "artifact_sha256": file_sha256(cfg.artifact),
        "threads": threads,
        "runtime_config": runtime_config,
        "protocol": cfg.protocol.to_dict(),
        "latency": latency,
        "throughput": parts.pop("throughput", None),
        "preprocess": parts.pop("preprocess", None),
        "accuracy": parts.pop("accuracy", None),
        "environment": env,
        "warnings": parts.pop("warnings", []),
        **parts,
    }


def run_pair(cfg: RunConfig) -> dict[str, Any]:
    """Paired rounds of the artifact (candidate) and --pair-with (baseline), batch size 1.

    The record is the usual one with `pair` added; `latency` holds the candidate's last round
    (no accuracy, throughput or pre-processing: a pair run only compares latency)."""
    threads, threads_policy = resolve_threads(cfg.threads)
    cand = load_backend(cfg.runtime, cfg.artifact, cfg.precision, threads)
    base = None
    try:
        base = load_backend(cfg.runtime, cfg.pair_with or "", cfg.precision, threads)
        ev = load_eval(cfg.eval_path) if cfg.eval_path else None
        images = latency_images(cand, ev, cfg.input_shape)
        rounds = pair_rounds(cand, base, images, cfg.protocol, cfg.pair_rounds, cfg.pair_start)
        env = environment(cand, threads)
        runtime_config = dict(cand.run_config(), threads_policy=threads_policy)
    finally:
        for backend in (cand, base):
            close = getattr(backend, "close", None)
            if close is not None:
                close()
    last = dict(rounds[-1]["candidate"], batch_size=1)
    pair = {"baseline_artifact": os.path.basename(cfg.pair_with or ""),
            "baseline_sha256": file_sha256(cfg.pair_with or ""), "rounds": rounds}
    return _result(cfg, threads, runtime_config, env, [last], pair=pair)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _cpu_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected CPU numbers such as 0,1, got {text!r}") from exc
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected CPU numbers such as 0,1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Measure an artifact's latency and accuracy.")
    p.add_argument("--artifact", required=True)
    p.add_argument("--runtime", required=True, choices=RUNTIMES)
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument(
        "--eval", dest="eval_path", default=None, help=".npz with x, y, mean, std[, ref_pred]"
    )
    p.add_argument("--threads", type=int, default=1, help="runtime threads; 0 = all physical cores")
    p.add_argument("--hint", default="latency", choices=HINTS,
                   help="throughput: also images/s at the largest batch size with --streams")
    p.add_argument("--streams", type=int, default=0, help="throughput mode's streams (0: runtime's choice)")
    p.add_argument("--image", dest="image_path", default=None,
                   help="an encoded image (JPEG/PNG) whose decode+resize+normalize is timed")
    p.add_argument("--batch-sizes", type=_int_list, default=(1,))
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument(
        "--cpu-affinity", type=_cpu_list, default=None, help="pin to these CPUs, e.g. 2,3"
    )
    p.add_argument("--input-shape", type=_int_list, default=None, help="C,H,W when no --eval")
    p.add_argument("--protocol", default="{}",
                   help="the timing protocol as one JSON object (keys of protocol.Protocol; "
                        "a key left out keeps its default)")
    p.add_argument("--trtexec", default=None, help="time TensorRT engines with this trtexec binary")
    p.add_argument("--timeout", type=float, default=600.0, help="bound for child tools (trtexec)")
    p.add_argument("--pair-with", default=None,
                   help="a baseline artifact: time paired rounds of both (batch 1) instead")
    p.add_argument("--pair-rounds", type=int, default=6, help="paired rounds to time with --pair-with")
    p.add_argument("--pair-start", type=int, default=0,
                   help="index of the first round (even: candidate first), so chunks keep alternating")
    p.add_argument("--out", required=True, help="where to write the JSON result")
    p.add_argument("--debug-slowdown", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def write_json_atomic(path: str, obj: Any) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".result.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """RunConfig from parsed arguments; a bad --protocol document is a usage error."""
    if args.threads < 0 or args.eval_batch_size < 1:
        raise RunnerError(
            "usage", "--threads must be >= 0 (0: all physical cores), --eval-batch-size >= 1", EXIT_USAGE
        )
    return RunConfig(
        artifact=args.artifact,
        runtime=args.runtime,
        precision=args.precision,
        threads=args.threads,
        batch_sizes=args.batch_sizes,
        protocol=Protocol.from_json(args.protocol),
        eval_path=args.eval_path,
        eval_batch_size=args.eval_batch_size,
        input_shape=args.input_shape,
        trtexec=args.trtexec,
        slowdown=args.debug_slowdown,
        timeout=args.timeout,
        cpu_affinity=args.cpu_affinity,
        hint=args.hint,
        streams=args.streams,
        image_path=args.image_path,
        pair_with=args.pair_with,
        pair_rounds=args.pair_rounds,
        pair_start=args.pair_start,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(config_from_args(args))
        write_json_atomic(args.out, result)
    except RunnerError as exc:
        sys.stderr.write(f"{ERROR_PREFIX} {exc.kind}: {exc}\n")
        return exc.exit_code
    except Exception as exc:  # one line for the host, whatever went wrong
        sys.stderr.write(f"{ERROR_PREFIX} runtime: {type(exc).__name__}: {one_line(exc)}\n")
        return EXIT_RUNTIME_FAILURE
    return EXIT_OK
