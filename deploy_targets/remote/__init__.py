"""What is copied to the device: runner.py and the dskd_runner package as one zip file.

The runner package (dskd_runner/) is split into small modules for people; for the device it
is ONE self-contained unit: stage_runner() zips the package folder as a whole (stdlib
zipfile, fixed timestamps, so the bytes depend only on the sources) beside runner.py, the
entry script, which imports the package from the zip. Local measurements run the same two
staged files, so both paths execute identical bytes.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

REMOTE_DIR = Path(__file__).resolve().parent
RUNNER_PATH = REMOTE_DIR / "runner.py"
PACKAGE_DIR = REMOTE_DIR / "dskd_runner"
PACKAGE_ZIP_NAME = "dskd_runner.zip"
# Every source file the device runs (all must parse as Python 3.8: JetPack 5 ships it).
REMOTE_FILES = (RUNNER_PATH, *sorted(PACKAGE_DIR.glob("*.py")))
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)


def package_zip_bytes() -> bytes:
    """The dskd_runner package as zip bytes (sources only, deterministic)."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(PACKAGE_DIR.glob("*.py")):
            info = zipfile.ZipInfo(f"{PACKAGE_DIR.name}/{path.name}", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())
    return buf.getvalue()


def stage_runner(folder: str | Path) -> list[Path]:
    """Write runner.py and dskd_runner.zip into `folder`; return their paths (runner.py first)."""
    folder = Path(folder)
    runner = folder / RUNNER_PATH.name
    runner.write_bytes(RUNNER_PATH.read_bytes())
    package = folder / PACKAGE_ZIP_NAME
    package.write_bytes(package_zip_bytes())
    return [runner, package]
