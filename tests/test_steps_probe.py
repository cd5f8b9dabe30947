"""bench/dskd_steps_probe.py (issue 15 evidence): bad flags are one `error:` line and exit 2, nothing run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("flag", "value"), [("--ks", "1,x"), ("--ks", "0,5"), ("--seeds", "a")])
def test_bad_flag_is_one_error_line_and_exit_2(tmp_path: Path, flag: str, value: str) -> None:
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "dskd_steps_probe.py"), flag, value, "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: {flag} {value!r}") and "Traceback" not in proc.stderr
    assert not out.exists()
