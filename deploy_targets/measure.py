"""Measure an artifact on a target: run the runner locally or on the device, return one record.

Locally the runner runs in a child process (the pipeline's own imports and threads
cannot disturb the timing, and a crash in a runtime cannot take the pipeline down);
remotely it runs with the device's python in a private temp folder that is always
removed. Both paths run the same file, so the numbers are comparable.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dskd.atomic import write_json
from dskd.errors import UserError

from . import remote
from .artifacts import (
    artifact_format,
    companion_files,
    detected_precision,
    onnx_input_chw,
    sha256_of,
)
from .errors import DeviceError
from .evalset import check_eval_npz
from .registry import REACH_LOCAL, REACH_SSH, Target, get_target, is_jetson, remote_python_command
from .remote.dskd_runner import protocol as wire
from .remote.dskd_runner.protocol import Protocol
from .runner_command import interpret_exit, runner_args
from .ssh import DeviceSpec, SshClient, SshOptions, parse_device, run_bounded

RESULT_NAME = "result.json"
ALL_CORES = "all"  # threads = "all": every physical core of the machine that measures
# The remote `timeout` kills the runner this long after TERM if it ignores it.
KILL_GRACE_S = 5
# Extra time the local ssh process gets beyond the remote timeout before it is killed.
SSH_MARGIN_S = 30


@dataclass
class Measurement:
    """One measurement record (JSON-serialisable with to_dict()); latency per batch size."""

    target: str
    runtime: str
    precision: str
    artifact: str
    artifact_format: str
    artifact_sha256: str
    where: str  # "local" or user@host:port
    threads: int
    batch_sizes: list[int]
    protocol: dict[str, Any]
    latency: list[dict[str, Any]]
    accuracy: dict[str, Any] | None
    environment: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    measured_at: str = ""
    format: str = wire.RESULT_FORMAT
    # threads, threads_policy, streams, hint, binding of the latency numbers, the mode hint
    # and throughput streams asked for: what a device needs to reproduce them
    runtime_config: dict[str, Any] = field(default_factory=dict)
    throughput: dict[str, Any] | None = None  # images/s in throughput mode (hint "throughput")
    preprocess: dict[str, Any] | None = None  # decode+resize+normalize of one image, timed alone

    def latency_at(self, batch_size: int = 1) -> dict[str, Any]:
        for entry in self.latency:
            if entry["batch_size"] == batch_size:
                return entry
        raise KeyError(f"no latency measured at batch size {batch_size}")

    @property
    def p50_ms(self) -> float:
        """Median latency at the smallest measured batch size (what the gate compares)."""
        return float(min(self.latency, key=lambda e: e["batch_size"])["p50_ms"])

    @property
    def top1(self) -> float | None:
        return None if self.accuracy is None else float(self.accuracy["top1"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


def threads_setting(value: int | str | None, target: Target) -> int:
    """The runner's --threads: None = the target's default (1 on cpu/intel-cpu, all cores on
    ssh-cpu, unused on GPUs); "all" or 0 = every physical core of the machine that measures
    (the runner resolves it there, wire.THREADS_ALL); n >= 1 = n. Bad values: one line."""
    if value is None:
        value = target.threads
        if value is None:  # a GPU target: threads unused
            return 1
    shown = value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == ALL_CORES:
            return wire.THREADS_ALL
        value = int(text) if text.isdigit() else -1
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(
            f"--threads {shown}: must be a thread count >= 1, or \"{ALL_CORES}\" (or 0) for all physical cores"
        )
    return int(value)


def runtime_for(target: Target, fmt: str) -> str:
    """The runtime that opens `fmt` on `target`: a Torch-TensorRT program (.ep) on a TensorRT
    target runs through torch_tensorrt.load, everything else with the target's runtime."""
    return "torch-tensorrt" if fmt == "torch-trt-ep" else target.runtime


def resolve_where(target: Target, device: str | DeviceSpec | None) -> DeviceSpec | None:
    """None = run locally; a DeviceSpec = over SSH. Mismatches are one-line UserErrors."""
    if target.reach == REACH_LOCAL:
        if device is not None:
            raise UserError(
                f"--device: target {target.name} runs on this machine; drop --device "
                "(ssh-cpu measures a remote CPU)"
            )
        return None
    if device is None:
        if target.reach == REACH_SSH:
            raise UserError(
                f"--device: target {target.name} needs a device: pass --device user@host[:port]"
            )
        if not is_jetson():
            raise UserError(
                f"--device: target {target.name} runs on a Jetson; this machine is not one: "
                "pass --device user@jetson"
            )
        return None
    return parse_device(device) if isinstance(device, str) else device


def _check_precision(target: Target, fmt: str, path: Path, precision: str | None) -> str:
    if fmt not in target.accepts:
        wanted = ", ".join(dict.fromkeys(target.accepts))
        export = ", ".join(dict.fromkeys(v for _, v in target.export_formats))
        raise UserError(
            f"artifact {path}: target {target.name} needs {wanted}, got {fmt}: "
            f"export with --formats {export}"
        )
    found = detected_precision(path, fmt)
    if precision is not None:
        precision = precision.lower()
        if precision not in target.precisions:
            raise UserError(
                f"--precision {precision}: target {target.name} ships "
                f"{', '.join(target.precisions)}"
            )
        if found is not None and found != precision:
            raise UserError(
                f"--precision {precision}: artifact {path.name} is {found}; "
                f"pass --precision {found} or the {precision} artifact"
            )
        return precision
    precision = found or target.precisions[0]
    if precision not in target.precisions:
        raise UserError(
            f"artifact {path}: {precision} is not shipped on {target.name} "
            f"({', '.join(target.precisions)})"
        )
    return precision


def _check_input_fits(
    path: Path, fmt: str, eval_chw: tuple[int, ...] | None, input_shape: tuple[int, ...] | None
) -> None:
    """Refuse an ONNX file that is no model, or whose input does not fit the images, up front."""
    from export.formats import kind_spec

    if kind_spec(fmt).runtime != "onnxruntime":
        return
    model_chw = onnx_input_chw(path)
    for given, what in ((eval_chw, "the eval set's images are"), (input_shape, "--input-shape is")):
        if model_chw is None or not given:
            continue
        given = tuple(int(g) for g in given)
        if len(given) != 3 or any(
            m is not None and m != g for m, g in zip(model_chw, given, strict=True)
        ):
            want = "×".join("?" if m is None else str(m) for m in model_chw)
            raise UserError(
                f"artifact {path}: takes C×H×W {want} but {what} {'×'.join(map(str, given))}: "
                "use the eval set (input size, channels) the model was trained for, or the matching artifact"
            )


def _batch_sizes(values: Any) -> list[int]:
    """1, "1,8", (1, 8) -> [1, 8]; anything else is a one-line UserError."""
    if isinstance(values, str):
        values = [v for v in values.replace(" ", "").split(",") if v]
    elif isinstance(values, int):
        values = [values]
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"--batch-sizes {values!r}: expected positive integers such as 1,8"
        ) from exc
    if not out or any(v < 1 for v in out):
        raise UserError(f"--batch-sizes {values!r}: expected positive integers such as 1,8")
    return list(dict.fromkeys(out))


def measure(
    artifact: str | Path,
    target: str | Target,
    *,
    eval_set: str | Path | None = None,
    device: str | DeviceSpec | None = None,
    precision: str | None = None,
    batch_sizes: Any = (1,),
    threads: int | str | None = None,
    protocol: Protocol | None = None,
    eval_batch_size: int = 64,
    input_shape: tuple[int, ...] | None = None,
    ssh: SshOptions | None = None,
    remote_python: str = "python3",
    remote_tmp: str | None = None,
    trtexec: str | None = None,
    timeout_s: float = 900.0,
    cpu_affinity: tuple[int, ...] | None = None,
    hint: str | None = None,
    streams: int | None = None,
    image: str | Path | None = None,
) -> Measurement:
    """Measure latency (per batch size) and, with an eval set, accuracy of `artifact` on `target`.

    Runs locally or on `device` (user@host[:port]) as the target says; bad input and
    device problems raise one-line UserError/DeviceError naming the fix. `threads` and
    `cpu_affinity` default to the target's; `ssh`, `remote_python` (the device's python,
    flags allowed) and `remote_tmp` (base of the private temp folder) apply to devices.
    `threads` "all" (or 0) means all physical cores of the machine that measures, resolved
    there and recorded as the count (Measurement.threads, runtime_config.threads_policy). `hint` "throughput"
    adds images/s at the largest batch size with `streams` streams (0: the runtime's
    choice); both default to the target's. `image` (JPEG/PNG) is the image whose
    decode+resize+normalize is timed (default: the eval set's first image as a PNG).
    """
    tgt = target if isinstance(target, Target) else get_target(target)
    path = Path(artifact)
    fmt = artifact_format(path)
    precision = _check_precision(tgt, fmt, path, precision)
    sizes = _batch_sizes(batch_sizes)
    protocol = protocol or Protocol()
    threads = threads_setting(threads, tgt)
    if eval_batch_size < 1:
        raise UserError(f"eval batch size {eval_batch_size}: must be >= 1")
    hint = (tgt.hint if hint is None else str(hint)).lower()
    if hint not in wire.HINTS:
        raise UserError(f"hint {hint!r}: choose {' or '.join(wire.HINTS)}")
    streams = int(tgt.streams if streams is None else streams)
    if streams < 0:
        raise UserError(f"streams {streams}: must be >= 0 (0: the runtime's choice)")
    if image is not None and not Path(image).is_file():
        raise UserError(f"image {image} does not exist: pass a JPEG or PNG file")
    eval_chw = check_eval_npz(eval_set)["chw"] if eval_set is not None else None
    _check_input_fits(path, fmt, eval_chw, input_shape)
    if timeout_s <= 0:
        raise UserError(f"timeout {timeout_s}: must be > 0 seconds")
    spec = resolve_where(tgt, device)
    sha = sha256_of(path)
    runtime = runtime_for(tgt, fmt)
    common = dict(
        runtime=runtime,
        precision=precision,
        threads=threads,
        batch_sizes=sizes,
        protocol=protocol,
        eval_batch_size=eval_batch_size,
        input_shape=input_shape,
        trtexec=trtexec,
        timeout_s=timeout_s,
        cpu_affinity=cpu_affinity if cpu_affinity is not None else tgt.cpu_affinity,
        hint=hint,
        streams=streams,
    )
    from .doctor import attach_board_state, board_state  # Jetson: power mode, clocks, temperature

    board_before = board_state(tgt, spec, ssh=ssh)
    if spec is None:
        result = _run_local(path, eval_set, image, common, timeout_s)
        where = "local"
    else:
        files = companion_files(path, fmt)
        result = _run_remote(
            spec, ssh, files, eval_set, image, common, remote_python, remote_tmp, timeout_s
        )
        where = str(spec)
    if result.get("artifact_sha256") != sha:
        raise DeviceError(
            where, f"artifact {path.name} arrived corrupted (sha256 differs): retry the copy"
        )
    if spec is not None:
        result["environment"]["reached_over"] = "ssh"
    attach_board_state(result, board_before, board_state(tgt, spec, ssh=ssh))
    return Measurement(
        target=tgt.name, runtime=runtime, precision=precision, artifact=str(path),
        artifact_format=fmt, artifact_sha256=sha, where=where, threads=int(result.get("threads") or threads), batch_sizes=sizes,
        protocol=result["protocol"], latency=result["latency"], accuracy=result["accuracy"],
        environment=result["environment"], warnings=list(result.get("warnings", [])),
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        runtime_config=dict(result.get("runtime_config") or {}), throughput=result.get("throughput"),
        preprocess=result.get("preprocess"),
    )  # fmt: skip


def _read_result(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DeviceError(
            where, f"the runner's result is missing or unreadable ({exc}): rerun"
        ) from exc
    if data.get("format") != wire.RESULT_FORMAT:
        raise DeviceError(
            where,
            f"the runner wrote format {data.get('format')!r}, expected {wire.RESULT_FORMAT}",
        )
    return data


def _run_local(
    artifact: Path,
    eval_set: str | Path | None,
    image: str | Path | None,
    common: dict[str, Any],
    timeout_s: float,
) -> dict:
    with tempfile.TemporaryDirectory(prefix="dskd-bench-") as tmp:
        out = Path(tmp) / RESULT_NAME
        args = runner_args(
            artifact=str(artifact.resolve()),
            out=str(out),
            eval_path=str(Path(eval_set).resolve()) if eval_set else None,
            image_path=str(Path(image).resolve()) if image else None,
            **common,
        )
        staged = remote.stage_runner(tmp)  # the same two files a device gets
        res = run_bounded([sys.executable, str(staged[0]), *args], timeout_s)
        if res.timed_out:
            raise interpret_exit("local", 124, res.stderr, sys.executable, timeout_s)
        if res.returncode != 0:
            raise interpret_exit("local", res.returncode, res.stderr, sys.executable, timeout_s)
        return _read_result(out, "local")


def _run_remote(
    spec: DeviceSpec,
    ssh: SshOptions | None,
    files: list[Path],
    eval_set: str | Path | None,
    image: str | Path | None,
    common: dict[str, Any],
    remote_python: str,
    remote_tmp: str | None,
    timeout_s: float,
) -> dict:
    extras = [Path(p) for p in (eval_set, image) if p]
    with remote_workdir(spec, ssh, {"": [*files, *extras]}, remote_python, remote_tmp) as device:
        args = runner_args(
            artifact=f"./{files[0].name}",  # ./: a name starting with '-' stays a file name
            out=RESULT_NAME,
            eval_path=f"./{Path(eval_set).name}" if eval_set else None,
            image_path=f"./{Path(image).name}" if image else None,
            **common,
        )
        return device.run_runner(args, timeout_s)


@dataclass
class RemoteWorkdir:
    """The device's private temp folder with the runner and the uploads in it: the runner can
    be run there several times (a paired A/B's chunks) without copying anything again."""

    client: SshClient
    workdir: str
    remote_python: str  # as the user gave it (for the errors)

    @property
    def where(self) -> str:
        return str(self.client.device)

    def run_runner(self, args: list[str], timeout_s: float) -> dict:
        """`python runner.py ARGS` in the folder under the device's `timeout` (its own kill
        after TERM, and the ssh process's bound beyond that); the result it wrote, read here.
        A result left by an earlier run is removed first, so it is never read twice."""
        python = remote_python_command(self.remote_python)
        run = f"{python} runner.py {' '.join(shlex.quote(a) for a in args)}"
        limit = int(timeout_s) + 1
        cmd = (
            f"cd {shlex.quote(self.workdir)} && rm -f {RESULT_NAME} && "
            f"if command -v timeout >/dev/null 2>&1; "
            f"then exec timeout -k {KILL_GRACE_S} {limit} {run}; else exec {run}; fi"
        )
        res = self.client.run(cmd, timeout_s=limit + KILL_GRACE_S + SSH_MARGIN_S, what="the measurement")
        if res.returncode != 0:
            raise interpret_exit(self.where, res.returncode, res.stderr, self.remote_python, timeout_s)
        with tempfile.TemporaryDirectory(prefix="dskd-bench-") as tmp:
            local = Path(tmp) / RESULT_NAME
            self.client.download(f"{self.workdir}/{RESULT_NAME}", local, timeout_s=60)
            return _read_result(local, self.where)


@contextlib.contextmanager
def remote_workdir(
    spec: DeviceSpec,
    ssh: SshOptions | None,
    uploads: dict[str, list[Path]],
    remote_python: str,
    remote_tmp: str | None,
) -> Iterator[RemoteWorkdir]:
    """A private temp folder on the device holding the runner and `uploads` ({sub-folder: files},
    "" = the folder itself), checked for room first, always removed afterwards.

    Names must differ within a folder only: a paired A/B puts the baseline in a sub-folder, so
    it may share its file names (model.onnx, model.xml + model.bin) with the candidate.
    """
    remote_python_command(remote_python)  # an empty python: one line, before any login
    with tempfile.TemporaryDirectory(prefix="dskd-runner-") as stage:  # runner.py + dskd_runner.zip
        folders = {"": [*uploads.get("", []), *remote.stage_runner(stage)],
                   **{k: list(v) for k, v in uploads.items() if k}}
        for paths in folders.values():
            names = [p.name for p in paths]
            if len(set(names)) != len(names):
                raise UserError(
                    f"files to copy share a name ({', '.join(names)}): rename the artifact or eval set"
                )
        client = SshClient(spec, ssh)
        where = str(spec)
        need_kib = sum(p.stat().st_size for paths in folders.values() for p in paths) // 1024 + 1024
        with client.workdir(remote_tmp, subdirs=[k for k in folders if k]) as (workdir, free_kib):
            if free_kib is not None and free_kib < need_kib:
                raise DeviceError(
                    where,
                    f"disk full: {workdir} has {free_kib // 1024} MiB free, needs "
                    f"{need_kib // 1024 + 1} MiB: free space or choose another folder with remote_tmp (recipe target.remote_tmp)",
                )
            for sub, paths in folders.items():
                size_kib = sum(p.stat().st_size for p in paths) // 1024
                client.upload(paths, f"{workdir}/{sub}" if sub else workdir,
                              timeout_s=60 + size_kib / 1024 * 2)  # >= 0.5 MiB/s
            yield RemoteWorkdir(client, workdir, remote_python)
