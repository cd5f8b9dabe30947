"""Concurrency: a second `run` on a run folder in use stops at once (exit 2, one line naming the
holder) and touches nothing; the first finishes normally. The lock is an flock, so a killed
holder never leaves a stale lock (the kernel drops it): the kill-and-rerun tests in
test_interruption.py rerun on the folders of killed runs.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from pipeline.report import validate_report
from tests.helpers.cli import cli, set_args, start_cli, wait_for
from tests.helpers.runs import TINY, assert_no_torn_files, copy_run

pytestmark = pytest.mark.slow  # two full CLI runs on the base run (~20 s quiet)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and p.name != ".lock"}


def test_second_run_on_the_same_folder_is_refused_and_the_first_finishes(base_run: Path, tmp_path: Path):
    run_dir = copy_run(base_run, tmp_path / "run", drop=("gate", "report"))
    log = tmp_path / "first.log"
    first = start_cli("run", "--out", str(run_dir), *set_args(TINY), log=log)
    lock = run_dir / ".lock"
    wait_for(lambda: lock.exists() and lock.read_text().strip() == f"pid {first.pid}", first, "the lock", log)
    os.kill(first.pid, signal.SIGSTOP)  # hold the first run inside its lock, deterministically
    try:
        before = snapshot(run_dir)
        second = cli("run", "--out", str(run_dir), *set_args({**TINY, "gates.max_size_mb": 1.0}), timeout=120)
        assert snapshot(run_dir) == before  # the refused run wrote nothing
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip() == (f"error: {run_dir}: another `pipeline run` (pid {first.pid}) is using this "
                                     f"run folder; wait for it or pass a different --out")
    assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert validate_report(report) == [] and report["passed"]
    assert report["recipe"]["config"]["gates"]["max_size_mb"] == TINY["gates.max_size_mb"]  # the first run's
    assert_no_torn_files(run_dir)
