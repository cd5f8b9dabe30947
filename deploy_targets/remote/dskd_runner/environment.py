"""What a number was measured on, and the CPU settings it was measured with.

Machine probing (CPU model, cores, governor, load, Jetson release and power mode, GPU),
the thread count that "all physical cores" resolves to, and CPU pinning. Every probe is
best-effort and bounded: a missing file or tool leaves its field out, never fails a run.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
from typing import Any

from ._numpy import np
from .protocol import EXIT_USAGE, THREADS_ALL, RunnerError

JETSON_RELEASE_FILE = "/etc/nv_tegra_release"
GPU_RUNTIMES = ("tensorrt", "torch-tensorrt")


def read_text(path: str, limit: int = 4096) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


def probe_command(args: list[str], timeout: float = 10.0) -> str | None:
    """stdout of a short probe command, or None if absent/failing (never hangs)."""
    if shutil.which(args[0]) is None:
        return None
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def cpu_model() -> str:
    info = read_text("/proc/cpuinfo", 1 << 16) or ""
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", info, re.MULTILINE)
        if m and m.group(1).strip():
            return m.group(1).strip()
    model = read_text("/proc/device-tree/model")
    if model:
        return model.strip("\x00\n ")
    return platform.processor() or platform.machine()


def parse_nv_tegra_release(text: str) -> dict[str, str]:
    """'# R36 (release), REVISION: 4.3, ...' -> {'l4t': '36.4.3', ...}."""
    out: dict[str, str] = {"raw": text.strip().splitlines()[0] if text.strip() else ""}
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if m:
        out["l4t"] = f"{m.group(1)}.{m.group(2)}"
    board = re.search(r"BOARD:\s*([^,\s]+)", text)
    if board:
        out["board"] = board.group(1)
    return out


def parse_nvpmodel(text: str) -> dict[str, Any]:
    """`nvpmodel -q` prints 'NV Power Mode: MAXN' then the mode id on its own line."""
    out: dict[str, Any] = {}
    m = re.search(r"NV Power Mode:\s*(\S+)", text)
    if m:
        out["name"] = m.group(1)
        rest = text[m.end() :].split()
        if rest and rest[0].isdigit():
            out["id"] = int(rest[0])
    return out


def jetson_info(release_file: str = JETSON_RELEASE_FILE) -> dict[str, Any] | None:
    """JetPack/L4T version and power mode; None when not on a Jetson."""
    text = read_text(release_file)
    if text is None:
        return None
    info: dict[str, Any] = parse_nv_tegra_release(text)
    jetpack = probe_command(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"])
    info["jetpack"] = jetpack.split("+")[0] if jetpack else None
    model = read_text("/proc/device-tree/model")
    if model:
        info["model"] = model.strip("\x00\n ")
    nvp = probe_command(["nvpmodel", "-q"])
    info["power_mode"] = parse_nvpmodel(nvp) if nvp else None
    return info


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cpus:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        package, core = read_text(base + "physical_package_id"), read_text(base + "core_id")
        if package is None or core is None:
            cores.add(("cpu", str(cpu)))  # no topology information: count the CPU itself
        else:
            cores.add((package.strip(), core.strip()))
    return max(1, len(cores))


def resolve_threads(threads: int) -> tuple[int, str]:
    """(threads to use, policy): 0 means all physical cores available to this process."""
    if threads == THREADS_ALL:
        return physical_cores(), "all physical cores"
    return threads, "explicit"


def pin_cpus(cpus: tuple[int, ...]) -> None:
    """Pin this process (and the runtime threads it starts later) to the given CPUs."""
    if not hasattr(os, "sched_setaffinity"):
        raise RunnerError("usage", "--cpu-affinity needs Linux (sched_setaffinity)", EXIT_USAGE)
    try:
        os.sched_setaffinity(0, set(cpus))
    except (OSError, ValueError) as exc:
        raise RunnerError(
            "usage",
            f"--cpu-affinity {','.join(map(str, cpus))}: {exc}; this machine has CPUs 0..{(os.cpu_count() or 1) - 1}",
            EXIT_USAGE,
        ) from exc


def environment(backend: Any, threads: int) -> dict[str, Any]:
    """What the number was measured on: enough to tell two machines or setups apart."""
    env: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "physical_cores": physical_cores(),
        "threads": threads,
        "runtime": backend.name,
        "runtime_version": backend.version,
    }
    if hasattr(os, "sched_getaffinity"):
        env["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        env["load_avg_1m"] = round(os.getloadavg()[0], 2)
    governor = read_text("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    if governor:
        env["cpu_governor"] = governor.strip()
    env.update(backend.describe())
    if backend.name in GPU_RUNTIMES:
        smi = probe_command(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
        if smi:
            name, _, driver = smi.splitlines()[0].partition(",")
            env["gpu"], env["driver_version"] = name.strip(), driver.strip()
    jetson = jetson_info()
    if jetson is not None:
        env["jetson"] = jetson
    return env
