"""Files copied to the device: the runner and its trtexec helpers (stdlib + numpy + runtime)."""

from __future__ import annotations

from pathlib import Path

REMOTE_DIR = Path(__file__).resolve().parent
RUNNER_PATH = REMOTE_DIR / "runner.py"
TRTEXEC_TOOLS_PATH = REMOTE_DIR / "trtexec_tools.py"
# Everything the device needs besides the artifact and the eval set.
REMOTE_FILES = (RUNNER_PATH, TRTEXEC_TOOLS_PATH)
