"""A Jetson's board state from the probe's answer: L4T / JetPack, power mode, clocks, temperature.

Pure parsing (no I/O), so every rule (what "locked clocks" or "the maximum power mode" or
"throttling" means) is tested on text alone; the tools' output formats are NVIDIA's.
"""

from __future__ import annotations

import re
from typing import Any

from .doctor_probe import tagged
from .engine_build import parse_probe
from .remote.runner import parse_nv_tegra_release, parse_nvpmodel

THROTTLE_MARGIN_C = 5.0  # this close to a passive trip point counts as throttling risk
# NVIDIA's JetPack releases by L4T version, for boards without the nvidia-jetpack meta-package
JETPACK_BY_L4T = {"36.4.4": "6.2.1", "36.4.3": "6.2", "36.4.0": "6.1", "36.3.0": "6.0", "35.6.0": "5.1.4",
                  "35.5.0": "5.1.3", "35.4.1": "5.1.2", "35.3.1": "5.1.1", "35.2.1": "5.1", "35.1.0": "5.0.2"}

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
