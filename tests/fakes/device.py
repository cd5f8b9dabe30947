"""Set-up shared by the device tests (tests/test_doctor.py, tests/test_engine_build.py).

The device is REAL where it can be: an OpenSSH server on 127.0.0.1 (tests/_sshd.py), bash and
the device's python. What it lacks (TensorRT, torch-tensorrt, a Jetson) comes from the FAKES in
this package, reached through the device python's PYTHONPATH (`fake_python`) or the paths given
to the code under test. A test module gets the `sshd` fixture (tests/fakes/sshd_plugin.py) with
`pytest_plugins = ["tests.fakes.sshd_plugin"]`.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from tests._sshd import sshd_missing_reason

needs_sshd = pytest.mark.skipif(sshd_missing_reason() is not None, reason=str(sshd_missing_reason()))


def fake_python(*libs: Path) -> str:
    """The 'device python' command: this interpreter with FAKE packages from `libs` importable."""
    path = ":".join(str(p) for p in libs)
    return f"env PYTHONPATH={shlex.quote(path)} {sys.executable}" if libs else sys.executable
