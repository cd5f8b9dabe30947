"""The board state around every Jetson measurement, and the `gates.require_max_clocks` gate.

The same board probe the doctor runs is run before and after a measurement, so a latency
measured at low clocks or while throttling says so in its record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dskd.errors import UserError

from .doctor_board import parse_board
from .doctor_probe import board_script, run_script
from .registry import REACH_LOCAL_OR_SSH, Target, get_target, is_jetson
from .ssh import DeviceSpec, SshOptions, parse_device

STATE_TIMEOUT_S = 30.0
# Prefix of the board files and tools the board-state probe reads around every measurement:
# "" on a real device; tests point it at a FAKE Jetson file system (tests/fakes/jetson.py).
BOARD_ROOT = ""


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
        _rc, out, _err = run_script(board_script(root), spec, ssh, STATE_TIMEOUT_S, "reading the board state")
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
