"""The doctor's check lines: what the probe found, judged, each FAIL or WARN with its fix.

One function per concern (connection, python, runtime modules, TensorRT, Jetson board,
temp folder), each appending lines to a DoctorReport; `doctor.run_doctor` decides which run.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Any

from dskd.errors import UserError

from .doctor_probe import tagged
from .doctor_report import FAIL, PASS, SKIP, WARN, DoctorReport
from .engine_build import parse_probe, tensorrt_version_from
from .errors import DeviceError
from .registry import RUNTIME_MODULES, Target
from .ssh import DeviceSpec, SshClient, SshOptions

MIN_FREE_MIB = 256  # runner + artifact + eval set, or an engine build kit with its engines


def unreachable_checks(rep: DoctorReport, exc: DeviceError) -> None:
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


def python_checks(rep: DoctorReport, out: str, found: dict[str, str], python: str,
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


def module_line(rep: DoctorReport, name: str, mods: dict[str, tuple[str, str]], python: str,
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


def runtime_checks(rep: DoctorReport, tgt: Target, mods: dict[str, tuple[str, str]], python: str,
                    builder: str, found: dict[str, str]) -> None:
    module_line(rep, "numpy", mods, python, True)
    for name in RUNTIME_MODULES[tgt.runtime]:
        module_line(rep, name, mods, python, True)
    if tgt.runtime != "tensorrt":
        return
    need = builder == "torch-tensorrt"
    why = "" if need else " (only needed with export.trt_builder = \"torch-tensorrt\")"
    module_line(rep, "torch", mods, python, need, why)
    module_line(rep, "torch_tensorrt", mods, python, need, why)


def tensorrt_checks(rep: DoctorReport, found: dict[str, str], mods: dict[str, tuple[str, str]],
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


def jetson_checks(rep: DoctorReport, board: dict[str, Any] | None, require_max_clocks: bool) -> None:
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


def disk_check(rep: DoctorReport, spec: DeviceSpec | None, ssh: SshOptions | None,
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

