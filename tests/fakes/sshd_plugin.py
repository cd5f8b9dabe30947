"""The `sshd` fixture shared by the device tests: a REAL OpenSSH server on 127.0.0.1 per module.

A pytest plugin module (load it with `pytest_plugins = ["tests.fakes.sshd_plugin"]`), kept apart
from tests/fakes/device.py so that pytest imports it first and rewrites its asserts.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests._sshd import Sshd, sshd_missing_reason, sshd_server


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A real sshd on 127.0.0.1 for the whole test module (skipped where sshd is absent)."""
    if sshd_missing_reason():
        pytest.skip(str(sshd_missing_reason()))
    with sshd_server(tmp_path_factory.mktemp("sshd")) as server:
        yield server
