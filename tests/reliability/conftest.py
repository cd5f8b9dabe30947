"""Hooks and fixtures of the fault-injection suite: the `reliability` marker, a CPU hog, a tiny real run.

Every test here injects one fault (a kill, a bad file, a full disk, a dead device, ...) into
the real product and checks what the guarantee in docs/reliability.md says. Budgets are tiny
(digits at 16×16, one channel, a few epochs) so the whole suite runs in a few minutes on CPU.
The CLI drivers and file checks the tests use are plain helpers in tests/helpers/ (cli.py, runs.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cli import cli, set_args
from tests.helpers.runs import TINY

# ---------------------------------------------------------------- a CPU hog for "holds under load"
HOG_ENV = "DSKD_TEST_CPU_HOG"
# A busy loop that ends by itself when pytest goes away (its parent changes), even after a kill -9.
_HOG_LOOP = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(100000): pass\n"
_HOG: dict[str, object] = {}


def _hog_count() -> int:
    """DSKD_TEST_CPU_HOG=1: one busy loop per core; =N (N >= 2): N loops; unset or 0: none."""
    value = os.environ.get(HOG_ENV, "").strip()
    if value in ("", "0"):
        return 0
    if not value.isdigit():
        raise pytest.UsageError(f"{HOG_ENV}={value!r}: use 1 (a busy loop per core) or a number of loops")
    return (os.cpu_count() or 1) if int(value) == 1 else int(value)


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


@pytest.fixture(scope="session", autouse=True)
def cpu_hog() -> Iterator[list[subprocess.Popen]]:
    """With DSKD_TEST_CPU_HOG set, busy loops load every core for the whole session, so the suite
    proves its bounds hold on an oversubscribed machine; they are stopped when the session ends."""
    n = _hog_count()
    procs = [subprocess.Popen([sys.executable, "-c", _HOG_LOOP], stdin=subprocess.DEVNULL)
             for _ in range(n)]
    start = time.monotonic()
    try:
        yield procs
    finally:
        used = sum(_cpu_seconds(p.pid) for p in procs)
        for p in procs:
            p.kill()
            p.wait()
        if procs:
            _HOG.update(loops=n, cores=os.cpu_count(), wall_s=time.monotonic() - start, cpu_s=used)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _HOG:
        terminalreporter.write_line(
            f"CPU hog ({HOG_ENV}): {_HOG['loops']} busy loops on {_HOG['cores']} cores for "
            f"{_HOG['wall_s']:.0f} s, using {_HOG['cpu_s']:.0f} CPU-seconds")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.reliability)


@pytest.fixture(scope="session")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted TINY run through the CLI (the reference the fault tests compare with)."""
    run_dir = tmp_path_factory.mktemp("reliability") / "base"
    proc = cli("run", "--out", str(run_dir), *set_args(TINY))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return run_dir
