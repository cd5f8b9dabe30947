"""Export failures that are the user's to fix (one line, CLI exit 2), kept apart from bugs."""

from __future__ import annotations

from dskd.errors import UserError


class ExportError(UserError):
    """An export ran but its artifact failed verification (checker, parity, accuracy).

    A subclass of UserError so the CLI prints one line and exits 2: the fix is a
    different option (opset, tolerance, calibration data), not a code change.
    """
