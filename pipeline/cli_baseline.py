"""`run --baseline`: the baseline's artifact files checked before the first stage runs.

The deploy stage re-measures each baseline artifact interleaved with the new one. Before this
check a baseline whose file had been changed, replaced by another format, made a FIFO or a
symlink loop was found only after training (a FIFO as "does not exist"; a loop silently as
missing), and a changed file could even reuse cached rounds keyed on the unchanged report.
Now: a file that is not the one its report records is bad input (exit 2, one line naming it);
a missing one is said once, since the gate then falls back to the two reports' numbers.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

from dskd.errors import UserError
from dskd.hashing import file_sha256
from pipeline.file_kind import describe_mode

_FIX = "restore the baseline run's files or point --baseline at a run folder that still has them"


def baseline_file_notes(report: dict[str, Any] | None, folder: Path | None, flag: str = "--baseline") -> list[str]:
    """Check every baseline artifact file the deploy stage would re-measure.

    Raises UserError for a file that exists but is not a readable regular file, or whose sha256
    differs from the one its report records. Returns one note per missing file (those are
    gated on the two reports' recorded numbers instead).
    """
    if not report or folder is None:
        return []
    notes: list[str] = []
    for row in report.get("artifacts") or []:
        rel = row.get("path")
        if not rel:
            continue
        p = folder / rel
        label = f"{row.get('runtime')}/{row.get('precision')}"
        try:
            st = os.stat(p)  # follows links: a loop is ELOOP, a dangling link ENOENT
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                notes.append(f"note: {flag} {label}: {p} is missing, so its latency is not re-measured "
                             f"interleaved; max_latency_regression uses the two reports' numbers")
                continue
            raise UserError(f"{flag} {label}: {p}: cannot read it ({exc.strerror or exc}); {_FIX}") from None
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{flag} {label}: {p} is {describe_mode(st.st_mode)}, not the artifact file; {_FIX}")
        want = row.get("sha256")
        if isinstance(want, str) and want:
            try:
                got = file_sha256(p)
            except OSError as exc:
                raise UserError(f"{flag} {label}: {p}: cannot read it ({exc.strerror or exc}); {_FIX}") from None
            if got != want:
                raise UserError(f"{flag} {label}: {p} is not the file its report records (sha256 {got[:12]}, "
                                f"report says {want[:12]}): changed or replaced since that run; {_FIX}")
    return notes
