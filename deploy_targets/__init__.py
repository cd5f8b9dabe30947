"""Measure latency and accuracy where the model will run: locally or on a device over SSH.

Public API (the `pipeline targets` / `pipeline bench` commands sit on top of it):
  list_targets(), get_target(name), Target.availability(device=None, ...) -> (ok, reason)
  targets_table(...) -> rows, format_targets_table(...) -> str
  measure(artifact, target, eval_set=..., device=None, batch_sizes=(1,), ...) -> Measurement
  write_eval_npz(path, x, y, mean, std, ref_pred=None)
"""

from __future__ import annotations

from .artifacts import artifact_format
from .errors import DeviceError
from .evalset import check_eval_npz, write_eval_npz
from .measure import Measurement, measure
from .registry import (
    TARGETS,
    Target,
    format_targets_table,
    get_target,
    is_jetson,
    list_targets,
    targets_table,
)
from .remote.runner import Protocol
from .ssh import DeviceSpec, SshOptions, parse_device

__all__ = [
    "TARGETS",
    "DeviceError",
    "DeviceSpec",
    "Measurement",
    "Protocol",
    "SshOptions",
    "Target",
    "artifact_format",
    "check_eval_npz",
    "format_targets_table",
    "get_target",
    "is_jetson",
    "list_targets",
    "measure",
    "parse_device",
    "targets_table",
    "write_eval_npz",
]
