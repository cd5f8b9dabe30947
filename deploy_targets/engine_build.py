"""Build TensorRT engines where they will run: on this Jetson / GPU box, or on a device over SSH.

An engine only runs on the GPU model and TensorRT version that built it, so the export
step ships a "build kit" (ONNX files + build_trtexec.sh) and the engine is built here, on
the target. Over SSH the kit goes to a private temp folder that is always removed; the
engine comes back with a JSON beside it that records the TensorRT version and GPU name.
Every step has a timeout; every failure is one DeviceError line naming the host and fix.

Engines are also kept in a cache ON THE DEVICE (`~/.cache/dskd/engines/<key>/`), keyed by
what determines them: the kit's sources (ONNX files and build script, by sha256), the
precision, the builder, the TensorRT version and the device model. A re-run with the same
inputs copies the cached engine instead of rebuilding (minutes on a Jetson); anything else
that changes (a retrained model, a JetPack upgrade, another board) is a different key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dskd.atomic import write_json, write_text
from dskd.errors import UserError

from .artifacts import sha256_of
from .errors import DeviceError
from .registry import remote_python_command
from .ssh import CommandResult, DeviceSpec, SshClient, SshOptions, parse_device, run_bounded

BUILD_SCRIPT = "build_trtexec.sh"
PRECISIONS = ("fp16", "int8")
DEFAULT_BUILD_TIMEOUT_S = 1800.0
PROBE_TIMEOUT_S = 90.0
KILL_GRACE_S = 5
SSH_MARGIN_S = 30
# Where JetPack and NVIDIA's .deb/.tar packages put trtexec (it is rarely on PATH).
TRTEXEC_CANDIDATES = ("/usr/src/tensorrt/bin/trtexec", "/usr/local/tensorrt/bin/trtexec",
                      "/opt/tensorrt/bin/trtexec")
INFO_FORMAT = "dskd-engine-build/1"
_MARK = "@@dskd "  # prefix of the lines our wrapper prints (kept out of the build log)
_TRT_FIX = "install TensorRT / JetPack there or pass the trtexec path"
# The device's engine cache (a bash expression, expanded there); tests point it elsewhere.
ENGINE_CACHE_EXPR = '"${XDG_CACHE_HOME:-$HOME/.cache}/dskd/engines"'
BUILDER = "onnx"  # engines from the kit's ONNX through trtexec (build_trtexec.sh)


@dataclass(frozen=True)
class EngineBuild:
    """One engine built on the target, now on this machine, with what built it."""

    precision: str
    local_engine_path: Path
    info_path: Path  # <engine>.json: TensorRT version, GPU, host, checksums
    log_path: Path
    log: str  # trtexec's output
    tensorrt_version: str
    gpu_name: str
    build_seconds: float
    where: str  # "local" or user@host:port
    sha256: str
    cached: bool = False  # True: copied from the device's engine cache, not rebuilt
    cache_key: str = ""


@dataclass(frozen=True)
class _Probe:
    trtexec: str
    tensorrt_version: str
    gpu_name: str
    host: str
    model: str = ""  # /proc/device-tree/model (Jetson board), "" elsewhere


def engine_file(precision: str) -> str:
    """Name build_trtexec.sh gives the engine of `precision`."""
    return f"model.{precision}.engine"


def build_engines(kit_files: Sequence[str | Path], precisions: Sequence[str],
                  device: str | DeviceSpec | None, *, out_dir: str | Path,
                  ssh: SshOptions | None = None, remote_python: str = "python3",
                  timeout_s: float = DEFAULT_BUILD_TIMEOUT_S, trtexec: str | None = None,
                  trt_version: str | None = None, remote_tmp: str | None = None,
                  cache: bool = True, cache_dir: str | None = None, builder: str = BUILDER,
                  ) -> dict[str, EngineBuild]:
    """Build the engines of `precisions` from the kit on `device` (None: on this machine).

    `kit_files` are the kit's files (build_trtexec.sh among them); `trtexec` is its path on
    the target (default: PATH, then the usual install folders); `trt_version` overrides
    the detected version. Engines land in `out_dir` as model.<precision>.engine with
    <engine>.json and model.<precision>.build.log beside them. The first failure raises
    DeviceError (one line) after cleaning up on the target; engines finished before it stay.
    With `cache`, engines are reused from / stored in the device's engine cache (`cache_dir`
    there, default ~/.cache/dskd/engines), keyed by `engine_cache_key`. `builder` "torch-tensorrt"
    runs the kit's build_torch_trt.py (export.torch_trt) with the device's python instead of
    build_trtexec.sh; trtexec is then optional.
    """
    from export import torch_trt
    from export.tensorrt_cmd import command_line

    builder = torch_trt.check_builder(builder, "engine builder")
    onnx = builder == BUILDER
    kit = _check_kit(kit_files, BUILD_SCRIPT if onnx else torch_trt.BUILD_SCRIPT)
    wanted = _check_precisions(precisions)
    if timeout_s <= 0:
        raise UserError(f"engine build timeout {timeout_s}: must be > 0 seconds")
    version = _explicit_version(trt_version)
    remote_python_command(remote_python)  # validated before anything reaches the device
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = parse_device(device) if isinstance(device, str) else device
    with _session(spec, ssh, remote_tmp) as sess:
        probe = _probe(sess, trtexec, remote_python, version, need_trtexec=onnx)
        sess.upload(kit)
        root = (shlex.quote(cache_dir) if cache_dir else ENGINE_CACHE_EXPR) if cache else None
        run = None if onnx else (lambda p: command_line(torch_trt.build_command(remote_python, p)))
        return {p: _build_one(sess, probe, p, out, timeout_s, kit, root, builder,
                              run(p) if run else None) for p in wanted}


# --------------------------------------------------------------------------- inputs
def _check_kit(kit_files: Sequence[str | Path], script: str = BUILD_SCRIPT) -> list[Path]:
    kit = [Path(p) for p in kit_files]
    missing = [str(p) for p in kit if not p.is_file()]
    if missing:
        raise UserError(f"TensorRT build kit file {missing[0]} is missing: re-run the optimize stage")
    names = [p.name for p in kit]
    if script not in names:
        raise UserError(f"TensorRT build kit lacks {script}: re-run the optimize stage")
    if len(set(names)) != len(names):
        raise UserError(f"TensorRT build kit files share a name ({', '.join(names)}): "
                        "pass one folder's files")
    return kit


def _check_precisions(precisions: Sequence[str]) -> list[str]:
    wanted = list(dict.fromkeys(str(p).lower() for p in precisions))
    bad = [p for p in wanted if p not in PRECISIONS]
    if bad or not wanted:
        raise UserError(f"engine precision {bad[0] if bad else 'none'!r}: choose from "
                        f"{', '.join(PRECISIONS)}")
    return wanted


# --------------------------------------------------------------------------- where it runs
class _Session:
    """A private folder on the target plus 'run a bash command there' and file transfer."""

    where: str
    workdir: str

    def run(self, command: str, timeout_s: float, what: str) -> CommandResult:
        raise NotImplementedError

    def upload(self, files: list[Path]) -> None:
        raise NotImplementedError

    def fetch(self, name: str, local: Path) -> None:
        raise NotImplementedError


class _LocalSession(_Session):
    def __init__(self, workdir: str):
        self.where, self.workdir = "local", workdir

    def run(self, command: str, timeout_s: float, what: str) -> CommandResult:
        try:
            res = run_bounded(["bash", "-c", command], timeout_s)
        except UserError as exc:  # run_bounded's "not installed" speaks of OpenSSH
            raise DeviceError("local", "bash is not installed: install bash") from exc
        if res.timed_out:
            raise DeviceError("local", f"{what} did not finish within {timeout_s:.0f} s and was "
                              "stopped: raise the timeout")
        return res

    def upload(self, files: list[Path]) -> None:
        for f in files:
            shutil.copy2(f, Path(self.workdir) / f.name)

    def fetch(self, name: str, local: Path) -> None:
        shutil.copy2(Path(self.workdir) / name, local)


class _SshSession(_Session):
    def __init__(self, client: SshClient, workdir: str, free_kib: int | None):
        self.client, self.workdir, self.free_kib = client, workdir, free_kib
        self.where = str(client.device)

    def run(self, command: str, timeout_s: float, what: str) -> CommandResult:
        return self.client.run(f"bash -c {shlex.quote(command)}", timeout_s=timeout_s, what=what)

    def upload(self, files: list[Path]) -> None:
        need_kib = 3 * sum(f.stat().st_size for f in files) // 1024 + 64 * 1024
        if self.free_kib is not None and self.free_kib < need_kib:
            raise DeviceError(self.where, f"disk full: {self.workdir} has {self.free_kib // 1024} MiB "
                              f"free, the engine build needs about {need_kib // 1024} MiB: free space "
                              "or choose another temp folder (recipe target.remote_tmp)")
        self.client.upload(files, self.workdir, timeout_s=60 + need_kib / 1024 * 2)

    def fetch(self, name: str, local: Path) -> None:
        self.client.download(f"{self.workdir}/{name}", local, timeout_s=120)


@contextlib.contextmanager
def _session(spec: DeviceSpec | None, ssh: SshOptions | None,
             remote_tmp: str | None) -> Iterator[_Session]:
    if spec is None:
        with tempfile.TemporaryDirectory(prefix="dskd-trt-build-") as tmp:
            yield _LocalSession(tmp)
        return
    client = SshClient(spec, ssh)
    with client.workdir(remote_tmp) as (workdir, free_kib):
        yield _SshSession(client, workdir, free_kib)


# --------------------------------------------------------------------------- probe
def probe_script(trtexec: str | None, remote_python: str) -> str:
    """Find trtexec and say which TensorRT and GPU are there, as KEY=value lines."""
    python = remote_python_command(remote_python)
    candidates = " ".join(shlex.quote(c) for c in TRTEXEC_CANDIDATES)
    return "\n".join([
        f"T={shlex.quote(trtexec or '')}",
        'if [ -z "$T" ]; then',
        '  T="$(command -v trtexec 2>/dev/null || true)"',
        f"  for c in {candidates}; do",
        '    if [ -z "$T" ] && [ -x "$c" ]; then T="$c"; fi',
        "  done",
        "fi",
        'if [ -z "$T" ] || [ -d "$T" ] || [ ! -x "$T" ]; then echo "TRTEXEC_MISSING=$T"; T=""; '
        'else echo "TRTEXEC=$T"; fi',
        'TO=""; if command -v timeout >/dev/null 2>&1; then TO="timeout -k 5 45"; fi',
        # trtexec prints "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # ..." first
        'if [ -n "$T" ]; then echo "BANNER=$($TO "$T" --help 2>&1 | grep -m1 -o "TensorRT v[0-9]*" || true)"; fi',
        f"echo \"PYTRT=$($TO {python} -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null"
        " || true)\"",
        "echo \"DPKG=$(dpkg-query -W -f='${Version}' tensorrt 2>/dev/null || true)\"",
        'echo "GPU=$($TO nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)"',
        "echo \"MODEL=$(tr -d '\\000' </proc/device-tree/model 2>/dev/null || true)\"",
        'echo "HOST=$(uname -n 2>/dev/null || true)"',
        "",
    ])


def parse_probe(stdout: str) -> dict[str, str]:
    """KEY=value lines of the probe (later keys win, values stripped)."""
    out = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            out[key] = value.strip()
    return out


def tensorrt_version_from(found: dict[str, str]) -> str | None:
    """The version the trtexec binary reports, else the Python package's, else the .deb's."""
    from export.tensorrt_cmd import TrtVersion

    for key in ("BANNER", "PYTRT", "DPKG"):
        text = found.get(key, "")
        if not text:
            continue
        try:
            return str(TrtVersion.parse(text))
        except UserError:
            continue
    return None


def _probe(sess: _Session, trtexec: str | None, remote_python: str,
           trt_version: str | None, need_trtexec: bool = True) -> _Probe:
    res = sess.run(probe_script(trtexec, remote_python), PROBE_TIMEOUT_S, "looking for trtexec")
    if res.returncode in (126, 127) and "bash" in res.stderr:
        raise DeviceError(sess.where, "bash is not installed there: install bash")
    found = parse_probe(res.stdout)
    if res.returncode != 0 or not ({"TRTEXEC", "TRTEXEC_MISSING"} & found.keys()):
        detail = " ".join(res.stderr.split())[-200:] or f"exit status {res.returncode}"
        raise DeviceError(sess.where, f"looking for trtexec failed ({detail}): check that bash works there")
    if "TRTEXEC_MISSING" in found and need_trtexec:
        given = found["TRTEXEC_MISSING"]
        looked = f"{given} is not an executable file" if given else \
            f"trtexec not found (looked on PATH and in {', '.join(TRTEXEC_CANDIDATES)})"
        raise DeviceError(sess.where, f"{looked}: {_TRT_FIX}")
    version = trt_version or tensorrt_version_from(found)
    if version is None:
        what = found.get("TRTEXEC") or f"{remote_python}'s tensorrt"
        raise DeviceError(sess.where, f"cannot tell the TensorRT version of {what}: "
                          "pass the version (e.g. 10.3.0) explicitly, or install TensorRT's python package")
    gpu = found.get("GPU") or found.get("MODEL") or "unknown"
    return _Probe(found.get("TRTEXEC", ""), version, gpu, found.get("HOST", ""), found.get("MODEL", ""))


def _explicit_version(text: str | None) -> str | None:
    from export.tensorrt_cmd import TrtVersion

    if not text:
        return None
    try:
        return str(TrtVersion.parse(text))
    except UserError as exc:
        raise UserError(f"TensorRT version {text!r} not understood: give e.g. 10.3.0") from exc


# --------------------------------------------------------------------------- build
def engine_cache_key(sources: dict[str, str], precision: str, builder: str, tensorrt_version: str,
                     device_model: str) -> str:
    """What determines an engine: its sources' sha256 (ONNX / checkpoint and the build script),
    the precision, the builder, the TensorRT version and the device model."""
    payload = json.dumps({"sources": dict(sorted(sources.items())), "precision": precision,
                          "builder": builder, "tensorrt": str(tensorrt_version),
                          "device": " ".join(str(device_model).split())}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _cache_lookup(engine: str, cache: str) -> list[str]:
    """bash: copy a cached engine (checksum intact) into the work folder and stop."""
    return [
        f"C={cache}",
        f'if [ -f "$C/{engine}" ] && [ -f "$C/{engine}.sha256" ] && '
        f'[ "$(sha256sum "$C/{engine}" | cut -d\' \' -f1)" = "$(cat "$C/{engine}.sha256")" ]; then',
        f'  cp "$C/{engine}" {engine} || exit 3',
        f'  cp "$C/{engine}.json" {engine}.json 2>/dev/null || true',
        f'  echo "{_MARK}CACHED=$C"',
        f'  echo "{_MARK}ENGINE_SHA256=$(cat "$C/{engine}.sha256")"',
        "  exit 0",
        "fi",
    ]


def _cache_store(engine: str) -> list[str]:
    """bash: keep a fresh engine in the cache (temp names, then rename: never a half file)."""
    return [
        f'  if mkdir -p "$C" 2>/dev/null && cp {engine} "$C/.{engine}.$$" 2>/dev/null; then',
        f'    cp {engine}.json "$C/{engine}.json" 2>/dev/null || true',
        f'    sha256sum {engine} | cut -d\' \' -f1 >"$C/.{engine}.sha256.$$"',
        f'    mv -f "$C/.{engine}.$$" "$C/{engine}" && mv -f "$C/.{engine}.sha256.$$" "$C/{engine}.sha256"',
        f'    echo "{_MARK}STORED=$C"',
        "  fi",
    ]


def build_command(workdir: str, precision: str, trtexec: str, version: str, limit_s: int,
                  cache: str | None = None, command: str | None = None) -> str:
    """bash: reuse the cached engine (`cache`: its folder, a bash word) or run the kit's script for
    one precision under `timeout` and cache the result; then print the engine's sha256.
    `command` replaces the kit's build_trtexec.sh (the torch-tensorrt builder's script)."""
    engine = engine_file(precision)
    env = f"TRTEXEC={shlex.quote(trtexec)} TRT_VERSION={shlex.quote(version)}"
    run = command or f"{env} bash {BUILD_SCRIPT} {precision}"
    return "\n".join([
        f"cd {shlex.quote(workdir)} || exit 3",
        *(_cache_lookup(engine, cache) if cache else []),
        "if command -v timeout >/dev/null 2>&1; then",
        f"  {env} timeout -k {KILL_GRACE_S} {int(limit_s)} {command or f'bash {BUILD_SCRIPT} {precision}'} 2>&1",
        f"else {run} 2>&1; fi",
        "rc=$?",
        f'if [ "$rc" = 0 ] && [ -f {engine} ]; then',
        f"  echo \"{_MARK}ENGINE_SHA256=$(sha256sum {engine} | cut -d' ' -f1)\"",
        *(_cache_store(engine) if cache else []),
        "fi",
        'exit "$rc"',
        "",
    ])


def _build_one(sess: _Session, probe: _Probe, precision: str, out: Path, timeout_s: float,
               kit: list[Path], cache_root: str | None = None, builder: str = BUILDER,
               command: str | None = None) -> EngineBuild:
    limit = max(1, int(round(timeout_s)))
    what = f"the TensorRT {precision} engine build"
    engine = out / engine_file(precision)
    for stale in (engine, engine.with_name(engine.name + ".json")):  # never mistaken for this build's
        stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    sources = {p.name: sha256_of(p) for p in kit}
    key = engine_cache_key(sources, precision, builder, probe.tensorrt_version,
                           f"{probe.gpu_name} | {probe.model}")
    cache = f"{cache_root}/{key}" if cache_root else None
    res = sess.run(build_command(sess.workdir, precision, probe.trtexec, probe.tensorrt_version, limit, cache,
                                 command),
                   limit + KILL_GRACE_S + SSH_MARGIN_S, what)
    seconds = time.perf_counter() - t0
    marks = parse_probe("\n".join(ln[len(_MARK):] for ln in res.stdout.splitlines()
                                  if ln.startswith(_MARK)))
    log = "\n".join(ln for ln in (*res.stdout.splitlines(), *res.stderr.splitlines())
                    if not ln.startswith(_MARK))
    if "CACHED" in marks:
        log = f"engine reused from the device's engine cache {marks['CACHED']} (key {key}): not rebuilt"
    log_path = out / f"model.{precision}.build.log"
    write_text(log_path, log + "\n")
    if res.returncode != 0:
        raise DeviceError(sess.where, build_failure(res.returncode, log, precision, limit, log_path))
    remote_sha = marks.get("ENGINE_SHA256")
    if not remote_sha:
        raise DeviceError(sess.where, f"{what} exited 0 but wrote no {engine_file(precision)}: "
                          f"check {log_path} and the kit's {BUILD_SCRIPT}")
    info_path = engine.with_name(engine.name + ".json")
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=out) as tmp:
        local = Path(tmp) / engine.name
        sess.fetch(engine.name, local)
        if sha256_of(local) != remote_sha:
            raise DeviceError(sess.where, f"{engine.name} arrived corrupted (sha256 differs): retry")
        script_info = _fetch_script_info(sess, engine.name + ".json", Path(tmp) / "script.json")
        gpu = script_info.get("gpu_name") or ""
        gpu = gpu if gpu and gpu != "unknown" else probe.gpu_name
        write_json(info_path, {
            "format": INFO_FORMAT, "precision": precision, "tensorrt_version": probe.tensorrt_version,
            "gpu_name": gpu, "built_on": sess.where, "host": probe.host, "trtexec": probe.trtexec,
            "build_seconds": round(seconds, 3), "engine_sha256": remote_sha,
            "engine_size_bytes": local.stat().st_size,
            "built_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "kit": sources, "build_script_info": script_info,
            "cache": {"key": key, "hit": "CACHED" in marks, "stored": "STORED" in marks,
                      "folder": marks.get("CACHED") or marks.get("STORED"), "builder": builder,
                      "device_model": f"{probe.gpu_name} | {probe.model}"},
            "note": "engines only run on this GPU model with this TensorRT version"})
        os.replace(local, engine)  # the engine last: present means complete, its JSON beside it
    return EngineBuild(precision, engine, info_path, log_path, log, probe.tensorrt_version, gpu,
                       round(seconds, 3), sess.where, remote_sha, "CACHED" in marks, key)


def _fetch_script_info(sess: _Session, name: str, local: Path) -> dict[str, Any]:
    """What build_trtexec.sh recorded beside the engine (best effort: {} when absent)."""
    with contextlib.suppress(DeviceError, OSError, ValueError):
        sess.fetch(name, local)
        loaded = json.loads(local.read_text(encoding="utf-8"))
        return loaded if isinstance(loaded, dict) else {}
    return {}


def build_failure(returncode: int, log: str, precision: str, limit_s: int, log_path: Path) -> str:
    """trtexec / build script exit status + output as one actionable sentence (no host prefix)."""
    lines = [" ".join(ln.split()) for ln in log.splitlines() if ln.strip()]
    low = log.lower()
    what = f"TensorRT {precision} engine build"
    if returncode in (124, 137):
        return (f"{what} did not finish within {limit_s} s and was stopped: raise the timeout "
                "(target timeout_s), or build a smaller batch profile")
    if "no space left" in low:
        return f"{what}: disk full on the device: free space in its temp folder"
    if "did not match" in low or ("sha256sum" in low and "no such file" in low):
        return f"{what}: the kit arrived incomplete or corrupted (sha256 check failed): retry"
    if "modelopt" in low and ("no module named" in low or "not found" in low):
        return (f"{what}: this TensorRT needs an FP16 ONNX from ModelOpt AutoCast: "
                "pip install nvidia-modelopt on the device, or build int8 only")
    if "cannot tell the tensorrt version" in low:
        return f"{what}: cannot tell the TensorRT version: pass it explicitly (e.g. 10.3.0)"
    errors = [ln for ln in lines if re.search(r"\[E\]|error", ln, re.IGNORECASE)]
    detail = (errors[0] if errors else lines[-1] if lines else "no output")[:240]
    return (f"{what} failed (exit status {returncode}): {detail}: see {log_path}; an unsupported "
            "layer needs a newer TensorRT / JetPack or another opset")

