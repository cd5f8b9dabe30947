"""Errors of the measuring step that the user fixes (one line, CLI exit 2)."""

from __future__ import annotations

from dskd.errors import UserError


class DeviceError(UserError):
    """The device could not be used: unreachable, refused, missing runtime, timed out, full.

    The message names the host and the fix; it is always one line.
    """

    def __init__(self, where: str, message: str):
        self.where = where
        super().__init__(" ".join(f"{where}: {message}".split()))
