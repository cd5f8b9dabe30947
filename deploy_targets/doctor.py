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
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dskd.errors import UserError

from .engine_build import parse_probe, probe_script, tensorrt_version_from
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
from .remote.runner import parse_nv_tegra_release, parse_nvpmodel
from .ssh import DeviceSpec, SshClient, SshOptions, parse_device, run_bounded

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
PROBE_TIMEOUT_S = 120.0  # importing torch-tensorrt on a Jetson takes a while
STATE_TIMEOUT_S = 30.0
# Prefix of the board files and tools the board-state probe reads around every measurement:
# "" on a real device; tests point it at a FAKE Jetson file system (tests/fakes/jetson.py).
BOARD_ROOT = ""
MIN_FREE_MIB = 256  # runner + artifact + eval set, or an engine build kit with its engines
THROTTLE_MARGIN_C = 5.0  # this close to a passive trip point counts as throttling risk
# NVIDIA's JetPack releases by L4T version, for boards without the nvidia-jetpack meta-package
JETPACK_BY_L4T = {"36.4.4": "6.2.1", "36.4.3": "6.2", "36.4.0": "6.1", "36.3.0": "6.0", "35.6.0": "5.1.4",
                  "35.5.0": "5.1.3", "35.4.1": "5.1.2", "35.3.1": "5.1.1", "35.2.1": "5.1", "35.1.0": "5.0.2"}

# Imported with the device's python to say what is there (one line per module).
_PY_CODE = """import importlib, platform, sys
print("PYTHON=" + platform.python_version() + " " + sys.executable)
for name in sys.argv[1:]:
    try:
        mod = importlib.import_module(name)
        print("MOD=" + name + " ok " + str(getattr(mod, "__version__", "?")).split()[0])
    except ImportError as exc:
        print("MOD=" + name + " missing " + " ".join(str(exc).split())[:160])
    except Exception as exc:
        print("MOD=" + name + " broken " + type(exc).__name__ + ": " + " ".join(str(exc).split())[:160])
"""


@dataclass(frozen=True)
class Check:
    """One line of the doctor's answer."""

    name: str
    status: str  # PASS | WARN | FAIL | SKIP
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name:<15} {self.detail}"
        return f"{text} -> fix: {self.fix}" if self.fix and self.status in (FAIL, WARN) else text


@dataclass
class DoctorReport:
    target: str
    where: str  # "local" or user@host:port
    checks: list[Check] = field(default_factory=list)
    board: dict[str, Any] | None = None  # Jetson power/clock/thermal state, when probed

    @property
    def ok(self) -> bool:
        """A run can proceed: nothing FAILed."""
        return all(c.status != FAIL for c in self.checks)

    def add(self, name: str, status: str, detail: str, fix: str = "") -> None:
        self.checks.append(Check(name, status, " ".join(str(detail).split()), " ".join(fix.split())))

    def lines(self) -> list[str]:
        head = f"doctor: target {self.target} on {self.where}"
        verdict = "a run can proceed" if self.ok else "a run cannot proceed: fix the FAIL lines"
        return [head, *(c.line() for c in self.checks), f"{'OK' if self.ok else 'FAILED'}: {verdict}"]

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]


# --------------------------------------------------------------------------- the probe script
def _prefix_path(root: str) -> list[str]:
    """Look for commands under the root first (a fake Jetson in tests), then in sbin dirs too."""
    return [
        f"R={shlex.quote(root)}",
        'if [ -n "$R" ]; then PATH="$R/usr/local/bin:$R/usr/bin:$R/usr/sbin:$PATH"; fi',
        'PATH="$PATH:/usr/sbin:/sbin"; export PATH',
        'TO=""; if command -v timeout >/dev/null 2>&1; then TO="timeout -k 2 20"; fi',
    ]


def board_script(root: str = "") -> str:
    """bash: L4T release, JetPack, power mode, clock state and temperatures, as tagged lines."""
    return "\n".join([
        *_prefix_path(root),
        'if [ -r "$R/etc/nv_tegra_release" ]; then echo "TEGRA=$(head -n1 "$R/etc/nv_tegra_release")"; fi',
        "echo \"JETPACK=$(dpkg-query -W -f='${Version}' nvidia-jetpack 2>/dev/null || true)\"",
        "echo \"BOARD_MODEL=$(tr -d '\\000' <\"$R/proc/device-tree/model\" 2>/dev/null || true)\"",
        'if command -v nvpmodel >/dev/null 2>&1; then',
        '  $TO nvpmodel -q 2>&1 | sed "s/^/NVP|/"; echo "NVP_RC=${PIPESTATUS[0]}"',
        "fi",
        'grep -h "POWER_MODEL" "$R/etc/nvpmodel.conf" 2>/dev/null | sed "s/^/NVPCONF|/"',
        'if command -v jetson_clocks >/dev/null 2>&1; then',
        '  $TO jetson_clocks --show 2>&1 | sed "s/^/CLK|/"; echo "CLK_RC=${PIPESTATUS[0]}"',
        "fi",
        'for c in "$R"/sys/devices/system/cpu/cpu[0-9]*/cpufreq; do',
        '  [ -r "$c/scaling_max_freq" ] || continue',
        '  n="$(basename "$(dirname "$c")")"',
        '  echo "CPUFREQ|$n|$(cat "$c/scaling_min_freq" 2>/dev/null)|$(cat "$c/scaling_max_freq" 2>/dev/null)'
        '|$(cat "$c/cpuinfo_max_freq" 2>/dev/null)|$(cat "$c/scaling_cur_freq" 2>/dev/null)"',
        "done",
        'for d in "$R"/sys/class/devfreq/*; do',
        '  [ -r "$d/cur_freq" ] || continue',
        '  top="$(tr " " "\\n" <"$d/available_frequencies" 2>/dev/null | sort -n | tail -n1)"',
        '  echo "DEVFREQ|$(basename "$d")|$(cat "$d/min_freq" 2>/dev/null)|$(cat "$d/max_freq" 2>/dev/null)'
        '|$top|$(cat "$d/cur_freq" 2>/dev/null)"',
        "done",
        'for z in "$R"/sys/devices/virtual/thermal/thermal_zone*; do',
        '  [ -r "$z/temp" ] || continue',
        '  passive=""',
        '  for t in "$z"/trip_point_*_type; do',
        '    [ -r "$t" ] && [ "$(cat "$t")" = passive ] || continue',
        '    v="$(cat "${t%_type}_temp" 2>/dev/null)"',
        '    if [ -z "$passive" ] || [ "$v" -lt "$passive" ] 2>/dev/null; then passive="$v"; fi',
        "  done",
        '  echo "TZ|$(cat "$z/type" 2>/dev/null)|$(cat "$z/temp" 2>/dev/null)|$passive"',
        "done",
        "",
    ])


def doctor_script(modules: tuple[str, ...], python: str, root: str = "",
                  trtexec: str | None = None, tensorrt: bool = False) -> str:
    """bash: everything the doctor asks of a machine (python, modules, trtexec, CUDA, board)."""
    py = remote_python_command(python)
    lines = [
        *_prefix_path(root),
        'echo "HOST=$(uname -n 2>/dev/null)"',
        'TOPY=""; if [ -n "$TO" ]; then TOPY="timeout -k 2 90"; fi',
        f"$TOPY {py} -c {shlex.quote(_PY_CODE)} {' '.join(shlex.quote(m) for m in modules)} 2>&1 "
        '| sed "s/^/PY|/"; echo "PY_RC=${PIPESTATUS[0]}"',
    ]
    if tensorrt:
        # engine_build's own trtexec probe (TRTEXEC=, BANNER=, PYTRT=, DPKG=, GPU=) in a subshell
        lines += ["(", probe_script(trtexec, python), ")"]
        lines += [
            'v="$(sed -n \'s/.*"version" *: *"\\([0-9.]*\\)".*/\\1/p\' "$R/usr/local/cuda/version.json" '
            "2>/dev/null | head -n1)\"",
            'if [ -z "$v" ]; then v="$(sed -n \'s/^CUDA Version \\([0-9.]*\\).*/\\1/p\' '
            '"$R/usr/local/cuda/version.txt" 2>/dev/null | head -n1)"; fi',
            'if [ -z "$v" ] && command -v nvcc >/dev/null 2>&1; then '
            'v="$(nvcc --version 2>/dev/null | sed -n \'s/.*release \\([0-9.]*\\).*/\\1/p\')"; fi',
            'echo "CUDA=$v"',
        ]
    return "\n".join([*lines, board_script(root)])


def tagged(stdout: str, tag: str) -> list[str]:
    """The lines the probe printed as `TAG|...`, without the tag."""
    prefix = tag + "|"
    return [ln[len(prefix):] for ln in stdout.splitlines() if ln.startswith(prefix)]


# --------------------------------------------------------------------------- board state parsing
_FREQ = re.compile(r"MinFreq=(\d+)\s+MaxFreq=(\d+)\s+CurrentFreq=(\d+)")


def parse_jetson_clocks(lines: list[str]) -> dict[str, Any] | None:
    """`jetson_clocks --show`: locked means every CPU and the GPU run with MinFreq == MaxFreq."""
    units: dict[str, bool] = {}
    for ln in lines:
        m = _FREQ.search(ln)
        head = ln.split(":", 1)[0].split()[0] if ln.strip() else ""
        if m and (re.fullmatch(r"cpu\d+", head) or head == "GPU"):
            units[head] = int(m.group(1)) == int(m.group(2))
    if not units:
        return None
    unlocked = sorted(u for u, ok in units.items() if not ok)
    return {"locked": not unlocked, "source": "jetson_clocks --show", "unlocked": unlocked}


def parse_sysfs_clocks(cpu_lines: list[str], devfreq_lines: list[str]) -> dict[str, Any] | None:
    """cpufreq / devfreq: locked when the floor equals the ceiling equals the hardware maximum."""
    units: dict[str, bool] = {}
    for ln in cpu_lines:
        name, lo, hi, hw_max, _cur = (ln.split("|") + [""] * 5)[:5]
        if lo.isdigit() and hi.isdigit():
            units[name] = lo == hi and (not hw_max.isdigit() or hi == hw_max)
    for ln in devfreq_lines:
        name, lo, hi, top, _cur = (ln.split("|") + [""] * 5)[:5]
        if re.search(r"gpu|ga10b|gv11b|gp10b", name) and lo.isdigit() and hi.isdigit():
            units["GPU"] = lo == hi and (not top.isdigit() or hi == top)
    if not units:
        return None
    unlocked = sorted(u for u, ok in units.items() if not ok)
    return {"locked": not unlocked, "source": "sysfs cpufreq/devfreq", "unlocked": unlocked}


def parse_power_modes(conf_lines: list[str]) -> list[dict[str, Any]]:
    """`< POWER_MODEL ID=0 NAME=MAXN >` lines of /etc/nvpmodel.conf."""
    modes = []
    for ln in conf_lines:
        m = re.search(r"ID=(\d+)\s+NAME=([^\s>]+)", ln)
        if m:
            modes.append({"id": int(m.group(1)), "name": m.group(2)})
    return modes


def max_power_mode(modes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """MAXN_SUPER > MAXN > the most watts ('25W'); None when the names say nothing."""
    def rank(mode: dict[str, Any]) -> float:
        name = str(mode["name"]).upper()
        if name.startswith("MAXN"):
            return 1e6 + (1 if "SUPER" in name else 0)
        m = re.match(r"(\d+)W", name)
        return float(m.group(1)) if m else -1.0
    ranked = sorted(modes, key=rank, reverse=True)
    return ranked[0] if ranked and rank(ranked[0]) >= 0 else None


def parse_thermal(lines: list[str]) -> dict[str, Any] | None:
    """TZ|type|millidegrees|passive trip: the hottest zone and whether any is throttling."""
    zones = []
    for ln in lines:
        kind, temp, passive = (ln.split("|") + ["", "", ""])[:3]
        if not temp.strip().lstrip("-").isdigit():
            continue
        t = int(temp) / 1000.0
        if t <= -40 or t >= 200:  # disabled sensors report -256 °C or garbage
            continue
        trip = int(passive) / 1000.0 if passive.strip().isdigit() else None
        zones.append({"zone": kind or "?", "temp_c": round(t, 1), "passive_c": trip})
    if not zones:
        return None
    hottest = max(zones, key=lambda z: z["temp_c"])
    hot = [z["zone"] for z in zones if z["passive_c"] and z["temp_c"] >= z["passive_c"] - THROTTLE_MARGIN_C]
    return {"max_temp_c": hottest["temp_c"], "hottest_zone": hottest["zone"], "throttling": bool(hot),
            "throttling_zones": hot, "zones": zones}


def parse_board(stdout: str) -> dict[str, Any] | None:
    """The board section of a probe as one record; None when the machine is not a Jetson."""
    found = parse_probe(stdout)
    if not found.get("TEGRA"):
        return None
    board: dict[str, Any] = {"l4t": parse_nv_tegra_release(found["TEGRA"])}
    board["jetpack"] = found.get("JETPACK", "").split("+")[0] or None
    l4t = board["l4t"].get("l4t", "")
    if board["jetpack"] is None and (l4t if l4t.count(".") == 2 else f"{l4t}.0") in JETPACK_BY_L4T:
        board["jetpack"] = JETPACK_BY_L4T[l4t if l4t.count(".") == 2 else f"{l4t}.0"] + " (from the L4T version)"
    board["model"] = found.get("BOARD_MODEL") or None
    nvp = tagged(stdout, "NVP")
    power = parse_nvpmodel("\n".join(nvp)) if found.get("NVP_RC") == "0" else {}
    modes = parse_power_modes(tagged(stdout, "NVPCONF"))
    top = max_power_mode(modes)
    board["power_mode"] = power or None
    board["max_power_mode"] = top
    name = str((power or {}).get("name", "")).upper()
    if not power:
        board["power_mode_is_max"] = None
    elif top is not None:
        board["power_mode_is_max"] = name == str(top["name"]).upper()
    else:  # no nvpmodel.conf to compare with: only a MAXN name says "maximum"
        board["power_mode_is_max"] = True if name.startswith("MAXN") else None
    clocks = parse_jetson_clocks(tagged(stdout, "CLK")) if found.get("CLK_RC") == "0" else None
    board["clocks"] = clocks or parse_sysfs_clocks(tagged(stdout, "CPUFREQ"), tagged(stdout, "DEVFREQ"))
    board["thermal"] = parse_thermal(tagged(stdout, "TZ"))
    locked = (board["clocks"] or {}).get("locked")
    board["at_max_clocks"] = None if locked is None or board["power_mode_is_max"] is None else \
        bool(locked and board["power_mode_is_max"])
    return board


# --------------------------------------------------------------------------- where it runs
def _run_script(script: str, spec: DeviceSpec | None, ssh: SshOptions | None, timeout_s: float,
                what: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of bash `script` here or on the device; ssh failures raise."""
    if spec is None:
        if shutil.which("bash") is None:
            raise DeviceError("local", "bash is not installed: install bash")
        res = run_bounded(["bash", "-c", script], timeout_s)
    else:
        res = SshClient(spec, ssh).run(f"bash -c {shlex.quote(script)}", timeout_s=timeout_s, what=what)
    if res.timed_out:
        raise DeviceError(str(spec or "local"), f"{what} did not finish within {timeout_s:.0f} s: "
                          "check the device's load, then retry")
    return res.returncode, res.stdout, res.stderr


def board_state(target: str | Target, device: str | DeviceSpec | None = None, *,
                ssh: SshOptions | None = None, root: str | None = None) -> dict[str, Any] | None:
    """Power mode, clock state and temperatures of a Jetson target now (None for other targets).

    Best effort: a probe that fails returns {"error": ...} instead of raising, since it only
    annotates a measurement. `root` defaults to BOARD_ROOT.
    """
    root = BOARD_ROOT if root is None else root
    tgt = target if isinstance(target, Target) else get_target(target)
    if tgt.reach != REACH_LOCAL_OR_SSH:
        return None
    spec = parse_device(device) if isinstance(device, str) else device
    if spec is None and not is_jetson(Path(root + "/etc/nv_tegra_release") if root else None):
        return None
    try:
        _rc, out, _err = _run_script(board_script(root), spec, ssh, STATE_TIMEOUT_S, "reading the board state")
    except UserError as exc:
        return {"error": str(exc)}
    board = parse_board(out)
    return board if board is not None else {"error": "not a Jetson (no /etc/nv_tegra_release)"}


def _state_summary(board: dict[str, Any] | None) -> dict[str, Any] | None:
    if not board or "error" in board:
        return board
    thermal = board.get("thermal") or {}
    return {"power_mode": (board.get("power_mode") or {}).get("name"),
            "power_mode_is_max": board.get("power_mode_is_max"),
            "clocks_locked": (board.get("clocks") or {}).get("locked"),
            "at_max_clocks": board.get("at_max_clocks"),
            "max_temp_c": thermal.get("max_temp_c"), "throttling": thermal.get("throttling")}


def attach_board_state(result: dict[str, Any], before: dict[str, Any] | None,
                       after: dict[str, Any] | None) -> None:
    """Record the board state around a measurement in its environment, and flag a board that
    was not at its maximum clocks or was throttling (the latency then understates the board)."""
    if before is None and after is None:
        return
    env = result.setdefault("environment", {})
    env["board_state"] = {"before": _state_summary(before), "after": _state_summary(after)}
    states = [s for s in (before, after) if s and "error" not in s]
    warnings = result.setdefault("warnings", [])
    if any(s.get("at_max_clocks") is False for s in states):
        env["board_state"]["at_max_clocks"] = False
        warnings.append("board not at maximum clocks during the measurement (power mode not max or "
                        "clocks not locked): latency is pessimistic; run sudo nvpmodel -m <max> and "
                        "sudo jetson_clocks first")
    elif states and all(s.get("at_max_clocks") for s in states):
        env["board_state"]["at_max_clocks"] = True
    else:
        env["board_state"]["at_max_clocks"] = None
    if any((s.get("thermal") or {}).get("throttling") for s in states):
        env["board_state"]["throttling"] = True
        warnings.append("the board was at or near its thermal throttling point: latency may be "
                        "inflated; improve cooling or let it cool down")


def clocks_gate(report: dict[str, Any]) -> tuple[bool | None, str]:
    """(passed, note) for gates.require_max_clocks: None when the target is not a Jetson."""
    env = (report.get("target") or {}).get("environment") or {}
    state = env.get("board_state")
    if not state:
        return None, "no board state recorded (not a Jetson target, or not measured)"
    at_max = state.get("at_max_clocks")
    if at_max is True:
        return True, "power mode max and clocks locked before and after the measurement"
    if at_max is False:
        return False, "measured below maximum clocks: sudo nvpmodel -m <max> && sudo jetson_clocks"
    return False, "clock state unknown (nvpmodel / jetson_clocks unreadable on the device)"


# --------------------------------------------------------------------------- the doctor
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
        rc, out, err = _run_script(script, spec, ssh, timeout_s, "the doctor's probe")
    except DeviceError as exc:
        _unreachable(rep, exc)
        return rep
    if spec is not None:
        rep.add("reachable", PASS, f"logged in to {spec} over SSH")
        rep.add("host key", PASS, "matches known_hosts (checked strictly, never accepted silently)")
    found = parse_probe(out)
    if rc != 0 and "PY_RC" not in found:
        detail = " ".join(err.split())[-200:] or f"exit status {rc}"
        rep.add("shell", FAIL, f"the probe failed ({detail})", "check that bash works there")
        return rep
    mods = _python_checks(rep, out, found, python, spec)
    if mods is not None:
        _runtime_checks(rep, tgt, mods, python, builder, found)
    if trt:
        _tensorrt_checks(rep, found, mods or {}, builder, trtexec)
    board = parse_board(out)
    rep.board = board
    if tgt.reach == REACH_LOCAL_OR_SSH:
        _jetson_checks(rep, board, require_max_clocks)
    _disk_check(rep, spec, ssh, remote_tmp)
    return rep


def _unreachable(rep: DoctorReport, exc: DeviceError) -> None:
    msg = str(exc)
    reason = msg.split(": ", 1)[1] if ": " in msg else msg
    if rep.where == "local":
        rep.add("shell", FAIL, reason, "install bash")
        return
    detail, _, fix = reason.partition(": ")
    if "host key" in reason:
        rep.add("reachable", PASS, "the device answers on its SSH port")
        rep.add("host key", FAIL, detail, fix)
    elif "login refused" in reason:
        rep.add("reachable", PASS, "the device answers on its SSH port")
        rep.add("host key", PASS, "matches known_hosts")
        rep.add("login", FAIL, detail, fix)
    else:
        rep.add("reachable", FAIL, detail, fix or "check the address, port and network")
        rep.add("host key", SKIP, "not checked: no connection")
    for name in ("python", "runtime", "temp folder"):
        rep.add(name, SKIP, "not checked: no login")


def _python_checks(rep: DoctorReport, out: str, found: dict[str, str], python: str,
                   spec: DeviceSpec | None) -> dict[str, tuple[str, str]] | None:
    py_lines = tagged(out, "PY")
    rc = found.get("PY_RC", "")
    if rc in ("126", "127"):
        rep.add("python", FAIL, f"{python!r} not found or not executable",
                "install python3 there or set the device's python (recipe target.python / --python)")
        return None
    info = parse_probe("\n".join(py_lines))
    if "PYTHON" not in info:
        tail = " ".join(" ".join(py_lines).split())[-200:] or f"exit status {rc}"
        rep.add("python", FAIL, f"{python!r} failed ({tail})", "check the python there")
        return None
    version, _, exe = info["PYTHON"].partition(" ")
    ok = tuple(int(p) for p in re.findall(r"\d+", version)[:2]) >= (3, 8)
    rep.add("python", PASS if ok else FAIL, f"Python {version} ({exe})",
            "" if ok else "the runner needs Python >= 3.8: install a newer python3")
    mods: dict[str, tuple[str, str]] = {}
    for ln in py_lines:
        if ln.startswith("MOD="):
            name, state, *rest = ln[4:].split(" ", 2)
            mods[name] = (state, rest[0] if rest else "")
    return mods


def _module_line(rep: DoctorReport, name: str, mods: dict[str, tuple[str, str]], python: str,
                 required: bool, why: str = "") -> None:
    state, text = mods.get(name, ("missing", "not probed"))
    pip = {"torch_tensorrt": "torch-tensorrt"}.get(name, name)
    label = pip
    if state == "ok":
        rep.add(label, PASS, f"{pip} {text.split('-')[0]}")  # openvino: 2026.4.1-22982-<hash>-...
    elif state == "broken":
        rep.add(label, FAIL if required else WARN, f"{pip} is installed but fails to import ({text})",
                "reinstall it for this python / check its CUDA libraries")
    elif required:
        fix = ("install TensorRT with JetPack (apt install nvidia-jetpack) or its wheel"
               if name == "tensorrt" else f"{python} -m pip install {pip}")
        rep.add(label, FAIL, f"{pip} not importable by {python}", fix)
    else:
        rep.add(label, SKIP, f"{pip} not installed{why}")


def _runtime_checks(rep: DoctorReport, tgt: Target, mods: dict[str, tuple[str, str]], python: str,
                    builder: str, found: dict[str, str]) -> None:
    _module_line(rep, "numpy", mods, python, True)
    for name in RUNTIME_MODULES[tgt.runtime]:
        _module_line(rep, name, mods, python, True)
    if tgt.runtime != "tensorrt":
        return
    need = builder == "torch-tensorrt"
    why = "" if need else " (only needed with export.trt_builder = \"torch-tensorrt\")"
    _module_line(rep, "torch", mods, python, need, why)
    _module_line(rep, "torch_tensorrt", mods, python, need, why)


def _tensorrt_checks(rep: DoctorReport, found: dict[str, str], mods: dict[str, tuple[str, str]],
                     builder: str, trtexec: str | None) -> None:
    from export.tensorrt_cmd import TrtVersion
    from export.torch_trt import check_versions

    from .engine_build import TRTEXEC_CANDIDATES

    trtexec_version = None
    if "TRTEXEC" in found:
        try:
            trtexec_version = str(TrtVersion.parse(found["BANNER"])) if found.get("BANNER") else None
        except UserError:
            trtexec_version = None
        rep.add("trtexec", PASS, f"{found['TRTEXEC']} (TensorRT {trtexec_version or 'version unknown'})")
    else:
        given = found.get("TRTEXEC_MISSING", "")
        looked = f"{given} is not an executable file" if given else \
            f"not found on PATH or in {', '.join(TRTEXEC_CANDIDATES)}"
        rep.add("trtexec", FAIL if builder == "onnx" else WARN, looked,
                "install TensorRT / JetPack there or set recipe target.trtexec to its path")
    py_trt = mods.get("tensorrt", ("missing", ""))
    py_version = py_trt[1] if py_trt[0] == "ok" else None
    version = tensorrt_version_from(found)
    if trtexec_version and py_version:
        try:
            a, b = TrtVersion.parse(py_version), TrtVersion.parse(trtexec_version)
            same = (a.major, a.minor) == (b.major, b.minor)
        except UserError:
            same = False
        if same:
            rep.add("TensorRT", PASS, f"trtexec and python's tensorrt agree ({trtexec_version})")
        else:
            rep.add("TensorRT", FAIL, f"trtexec is TensorRT {trtexec_version} but python's tensorrt is "
                    f"{py_version}: an engine built by one does not load in the other",
                    "install matching versions (JetPack's), or point target.trtexec at the matching trtexec")
    elif version:
        rep.add("TensorRT", PASS, f"TensorRT {version}")
    cuda = found.get("CUDA", "")
    gpu = found.get("GPU", "")
    rep.add("CUDA", PASS if cuda else WARN, f"CUDA {cuda}" + (f", GPU {gpu}" if gpu else "") if cuda
            else "CUDA version not found (/usr/local/cuda/version.json, nvcc)",
            "" if cuda else "install the CUDA toolkit (JetPack) if engine builds fail")
    tt = mods.get("torch_tensorrt", ("missing", ""))
    if tt[0] == "ok":
        th = mods.get("torch", ("missing", ""))
        verdict = check_versions(th[1] if th[0] == "ok" else None, tt[1], py_version or version,
                                 tegra="TEGRA" in found)
        status = verdict.status if builder == "torch-tensorrt" or verdict.ok else WARN
        rep.add("torch↔TRT", status, verdict.warning or verdict.detail,
                "" if status == PASS else "install the torch / torch-tensorrt / TensorRT trio of one release")


def _jetson_checks(rep: DoctorReport, board: dict[str, Any] | None, require_max_clocks: bool) -> None:
    if board is None:
        rep.add("L4T/JetPack", WARN, "no /etc/nv_tegra_release: this is not a Jetson (L4T)",
                "point --device at the Jetson; for a discrete GPU the engine path is the same")
        for name in ("power mode", "clocks", "temperature"):
            rep.add(name, SKIP, "not a Jetson")
        return
    l4t = board["l4t"]
    rep.add("L4T/JetPack", PASS, f"L4T {l4t.get('l4t', l4t.get('raw', '?'))}, JetPack "
            f"{board.get('jetpack') or 'unknown (nvidia-jetpack not installed)'}"
            + (f", {board['model']}" if board.get("model") else ""))
    power, top = board.get("power_mode"), board.get("max_power_mode")
    max_fix = f"sudo nvpmodel -m {top['id']} ({top['name']})" if top else "sudo nvpmodel -m 0"
    if not power:
        rep.add("power mode", WARN, "nvpmodel -q gave no power mode", "install nvpmodel (JetPack) or run it by hand")
    elif board.get("power_mode_is_max") is False:
        rep.add("power mode", FAIL if require_max_clocks else WARN,
                f"{power.get('name')} (id {power.get('id', '?')}): not the maximum mode; latency will be "
                "slower than the board can do", max_fix)
    else:
        rep.add("power mode", PASS, f"{power.get('name')} (id {power.get('id', '?')})")
    clocks = board.get("clocks")
    if clocks is None:
        rep.add("clocks", FAIL if require_max_clocks else WARN, "clock state unknown (jetson_clocks --show "
                "needs root; cpufreq/devfreq not readable)", "sudo jetson_clocks, then check by hand")
    elif not clocks["locked"]:
        rep.add("clocks", FAIL if require_max_clocks else WARN,
                f"not locked ({', '.join(clocks['unlocked'][:4])}{' ...' if len(clocks['unlocked']) > 4 else ''}"
                f" scale with load; {clocks['source']}): latency varies run to run", "sudo jetson_clocks")
    else:
        rep.add("clocks", PASS, f"locked at maximum ({clocks['source']})")
    thermal = board.get("thermal")
    if thermal is None:
        rep.add("temperature", WARN, "no thermal zone readable", "check /sys/devices/virtual/thermal")
    elif thermal["throttling"]:
        rep.add("temperature", WARN, f"{thermal['max_temp_c']:.1f} °C in {thermal['hottest_zone']}: at or near "
                f"its throttling point ({', '.join(thermal['throttling_zones'])})",
                "improve cooling (fan: sudo jetson_clocks --fan) or let it cool down")
    else:
        rep.add("temperature", PASS, f"max {thermal['max_temp_c']:.1f} °C ({thermal['hottest_zone']}), "
                "not throttling")


def _disk_check(rep: DoctorReport, spec: DeviceSpec | None, ssh: SshOptions | None,
                remote_tmp: str | None) -> None:
    """Create (and remove) the private temp folder a run uses and check its free space."""
    fix = "free space there or choose another folder (recipe target.remote_tmp)"
    if spec is None:
        folder = remote_tmp or tempfile.gettempdir()
        try:
            free_kib = shutil.disk_usage(folder).free // 1024
        except OSError as exc:
            rep.add("temp folder", FAIL, f"{folder}: {exc.strerror or exc}", fix)
            return
        if not os.access(folder, os.W_OK):
            rep.add("temp folder", FAIL, f"{folder} is not writable", fix)
            return
        where = folder
    else:
        client = SshClient(spec, ssh)
        try:
            with client.workdir(remote_tmp) as (where, free):
                free_kib = free
        except DeviceError as exc:
            msg = str(exc).split(": ", 1)[-1]
            rep.add("temp folder", FAIL, msg.partition(": ")[0], msg.partition(": ")[2] or fix)
            return
        where = remote_tmp or "$TMPDIR or /tmp"
    if free_kib is None:
        rep.add("temp folder", WARN, f"{where}: free space unknown (df failed)", "check df there")
    elif free_kib // 1024 < MIN_FREE_MIB:
        rep.add("temp folder", FAIL, f"{where}: {free_kib // 1024} MiB free, a run needs about {MIN_FREE_MIB} MiB", fix)
    else:
        rep.add("temp folder", PASS, f"{where}: {free_kib // 1024} MiB free, writable")


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


__all__ = ["Check", "DoctorReport", "REACH_LOCAL", "attach_board_state", "board_script", "board_state",
           "clocks_gate", "doctor_script", "parse_board", "require_ready", "run_doctor"]
