"""`pipeline doctor`: check a target (and its device) BEFORE any training, one line per check.

A user pointing the pipeline at a Jetson used to get the first feedback after training. The
doctor logs in once, runs one bash probe there (the same script runs locally for local
targets) and turns what it prints into PASS / WARN / FAIL / SKIP lines, each FAIL with its
fix: reachability and host key, Python and numpy, the runtime and its version, trtexec,
CUDA / JetPack / L4T, free space in the temp folder, and on a Jetson the power mode
(`nvpmodel -q`), whether clocks are locked (`jetson_clocks --show`, else sysfs) and the
temperature of every thermal zone. A run can proceed when no line says FAIL.

The same board probe runs before and after every Jetson measurement (`board_state`), so a
latency measured at low clocks or while throttling says so in its record.

`root` is a prefix for every file the probe reads and for its command search path (tests
point it at a fake Jetson file system; it is "" in production, where the real paths apply).

This module runs the doctor (`run_doctor`, `require_ready` for `run`) and re-exports the public
names of its parts, one job per module: doctor_report (the lines and the verdict),
doctor_probe (the bash probes, run here or over SSH), doctor_board (parsing a Jetson's board
state), doctor_board_state (the board state around measurements, the clocks gate; tests point
its BOARD_ROOT at a FAKE Jetson) and
doctor_checks (each check's PASS / WARN / FAIL wording and fix).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .doctor_board import (
    JETPACK_BY_L4T,
    THROTTLE_MARGIN_C,
    max_power_mode,
    parse_board,
    parse_jetson_clocks,
    parse_power_modes,
    parse_sysfs_clocks,
    parse_thermal,
)
from .doctor_board_state import STATE_TIMEOUT_S, attach_board_state, board_state, clocks_gate
from .doctor_checks import (
    MIN_FREE_MIB,
    disk_check,
    jetson_checks,
    python_checks,
    runtime_checks,
    tensorrt_checks,
    unreachable_checks,
)
from .doctor_probe import board_script, doctor_script, run_script, tagged
from .doctor_report import FAIL, PASS, SKIP, WARN, Check, DoctorReport
from .engine_build import parse_probe
from .errors import DeviceError
from .registry import (
    REACH_LOCAL,
    REACH_LOCAL_OR_SSH,
    RUNTIME_MODULES,
    Target,
    get_target,
    is_jetson,
    remote_python_command,
)
from .ssh import DeviceSpec, SshOptions

PROBE_TIMEOUT_S = 120.0  # importing torch-tensorrt on a Jetson takes a while


def _modules_for(tgt: Target, builder: str) -> tuple[str, ...]:
    mods = ("numpy", *RUNTIME_MODULES[tgt.runtime])
    if tgt.runtime == "tensorrt":
        mods += ("torch", "torch_tensorrt")
    return tuple(dict.fromkeys(mods))


def _where(tgt: Target, device: str | DeviceSpec | None, root: str) -> DeviceSpec | None:
    """None = check this machine. Mismatches are usage errors (exit 2), as in `run`/`bench`."""
    from .measure import resolve_where

    if device is None and tgt.reach == REACH_LOCAL_OR_SSH and root:
        if is_jetson(Path(root + "/etc/nv_tegra_release")):
            return None
    return resolve_where(tgt, device)


def run_doctor(target: str | Target, device: str | DeviceSpec | None = None, *,
               ssh: SshOptions | None = None, remote_python: str = "python3",
               remote_tmp: str | None = None, trtexec: str | None = None, builder: str = "onnx",
               require_max_clocks: bool = False, root: str = "",
               timeout_s: float = PROBE_TIMEOUT_S) -> DoctorReport:
    """Check everything a run on `target` (on `device`, over SSH) needs; never raises for a
    device problem (that is a FAIL line), only for bad usage (UserError)."""
    from export.torch_trt import check_builder

    tgt = target if isinstance(target, Target) else get_target(target)
    builder = check_builder(builder)
    spec = _where(tgt, device, root)
    python = remote_python if spec is not None else sys.executable
    remote_python_command(python)  # an empty python is bad usage
    rep = DoctorReport(tgt.name, str(spec) if spec else "local")
    trt = tgt.runtime == "tensorrt"
    script = doctor_script(_modules_for(tgt, builder), python, root, trtexec, tensorrt=trt)
    try:
        rc, out, err = run_script(script, spec, ssh, timeout_s, "the doctor's probe")
    except DeviceError as exc:
        unreachable_checks(rep, exc)
        return rep
    if spec is not None:
        rep.add("reachable", PASS, f"logged in to {spec} over SSH")
        rep.add("host key", PASS, "matches known_hosts (checked strictly, never accepted silently)")
    found = parse_probe(out)
    if rc != 0 and "PY_RC" not in found:
        detail = " ".join(err.split())[-200:] or f"exit status {rc}"
        rep.add("shell", FAIL, f"the probe failed ({detail})", "check that bash works there")
        return rep
    mods = python_checks(rep, out, found, python, spec)
    if mods is not None:
        runtime_checks(rep, tgt, mods, python, builder, found)
    if trt:
        tensorrt_checks(rep, found, mods or {}, builder, trtexec)
    board = parse_board(out)
    rep.board = board
    if tgt.reach == REACH_LOCAL_OR_SSH:
        jetson_checks(rep, board, require_max_clocks)
    disk_check(rep, spec, ssh, remote_tmp)
    return rep


# --------------------------------------------------------------------------- `run` integration
def require_ready(recipe: Any, log: Callable[[str], None] | None = None,
                  ssh: SshOptions | None = None) -> DoctorReport:
    """`run` with a device: the doctor's checks first; a FAIL raises one DeviceError line.

    `recipe` is read by attribute (target.*, export.trt_builder, gates.require_max_clocks) so
    this lower layer does not import the pipeline.
    """
    t = recipe.target
    rep = run_doctor(t.name, t.device or None, ssh=ssh, remote_python=t.python,
                     remote_tmp=t.remote_tmp or None, trtexec=t.trtexec or None,
                     builder=getattr(recipe.export, "trt_builder", "onnx"),
                     require_max_clocks=bool(getattr(recipe.gates, "require_max_clocks", False)))
    for line in rep.lines():
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(line)
    if not rep.ok:
        first = rep.failures()[0]
        more = len(rep.failures()) - 1
        raise DeviceError(rep.where, f"doctor: {first.name}: {first.detail}"
                          + (f": {first.fix}" if first.fix else "")
                          + (f" (and {more} more FAIL line{'s' if more > 1 else ''})" if more else "")
                          + f"; nothing was trained: fix it and rerun, or see `python -m pipeline doctor "
                          f"--target {t.name} --device {t.device}`")
    return rep


__all__ = ["FAIL", "JETPACK_BY_L4T", "MIN_FREE_MIB", "PASS", "PROBE_TIMEOUT_S", "REACH_LOCAL", "SKIP",
           "STATE_TIMEOUT_S", "THROTTLE_MARGIN_C", "WARN", "Check", "DoctorReport", "attach_board_state",
           "board_script", "board_state", "clocks_gate", "doctor_script", "max_power_mode", "parse_board",
           "parse_jetson_clocks", "parse_power_modes", "parse_sysfs_clocks", "parse_thermal", "require_ready",
           "run_doctor", "tagged"]
