"""Driving the `pipeline` CLI from tests: in this process (fast, for early failures) or as a child."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a CLI child: one thread (bit-exact reruns), no progress bars."""
    return {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", **extra}


def set_args(overrides: dict[str, object]) -> list[str]:
    """Recipe overrides as `--set key=<json>` flags, the way a user passes them."""
    out: list[str] = []
    for key, value in overrides.items():
        out += ["--set", f"{key}={json.dumps(value)}"]
    return out


def cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` to completion."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_cli(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m pipeline ARGS` in the background (output to `log`), to be killed mid-way."""
    fh = open(log, "w")  # noqa: SIM115 - the child owns it; closed when the test's tmp dir goes
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env or child_env(),
                            stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The CLI in this process (exit code, stdout, stderr): fast for checks that fail early."""
    from pipeline.cli import main

    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str, log: Path,
             timeout: float = 300, interval: float = 0.005) -> None:
    """Poll until `condition()`; fail (with the child's log) if the child ends first or time runs out."""
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"child ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"no {what} within {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(interval)
