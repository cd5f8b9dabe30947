"""DDP: killing one rank of a 2-process run ends the whole job quickly with a clear error.

torchrun's agent watches its workers and stops the others when one dies; the pipeline then
reports one line and exits 2, keeping the last epoch's checkpoint for a resume. A rank that
hangs instead of dying is ended by the process-group timeout (recipe `ddp_timeout_s`).
That 1- and 2-process runs reach comparable accuracy is
tests/test_trainer.py::test_ddp_two_processes_on_cpu.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dskd.checkpoint import torch_load
from tests.helpers.cli import set_args, start_cli, wait_for
from tests.helpers.runs import TINY, stage_dir

pytestmark = pytest.mark.slow  # two-process DDP jobs, one waits out the DDP timeout (~55 s)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def ranks_under(root: int) -> dict[int, int]:
    """{rank: pid} of torchrun workers descending from process `root`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        env = _environ(pid)
        if "TORCHELASTIC_RUN_ID" not in env or "RANK" not in env:
            continue
        parent = _parent(pid)
        while parent not in (None, 0, 1, root):
            parent = _parent(parent)
        if parent == root:
            found[int(env["RANK"])] = pid
    return found


def start_two_rank_teacher(tmp_path: Path, **overrides: object) -> tuple[subprocess.Popen, Path, Path, dict[int, int]]:
    """`pipeline run` with a 2-process teacher, returned once an epoch is checkpointed and both ranks run."""
    run_dir, log = tmp_path / "run", tmp_path / "ddp.log"
    proc = start_cli("run", "--out", str(run_dir),
                     *set_args({**TINY, "teacher.nproc": 2, "teacher.epochs": 30, **overrides}), log=log)

    def training() -> bool:
        d = stage_dir(run_dir, "teacher")
        return d is not None and (d / "last.pt").exists() and 1 in ranks_under(proc.pid)

    wait_for(training, proc, "an epoch of 2-process training", log)
    return proc, run_dir, log, ranks_under(proc.pid)


def test_killing_one_rank_ends_the_job_with_a_clear_error(tmp_path: Path):
    proc, run_dir, log, ranks = start_two_rank_teacher(tmp_path)
    victim = ranks[1]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    code = proc.wait(timeout=300)
    # ended, not hung on the dead peer: seconds alone; generous so a 2x oversubscribed machine passes
    assert time.monotonic() - killed_at < 240
    out = log.read_text()
    assert code == 2, out[-3000:]
    assert f"Signal 9 (SIGKILL) received by PID {victim}" in out  # torchrun names the dead rank
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: distributed training under torchrun failed (exit 1)"), last
    assert "Re-run to resume from" in last
    assert not [pid for pid in ranks.values() if Path(f"/proc/{pid}").exists()]  # no rank left running
    teacher = stage_dir(run_dir, "teacher")
    assert torch_load(teacher / "last.pt")["epoch"] >= 1 and not (teacher / "model.pt").exists()


def test_a_hung_rank_ends_the_job_after_the_ddp_timeout(tmp_path: Path):
    """SIGSTOP (alive, silent) instead of SIGKILL: torchrun sees no death, so only the
    process-group timeout (`teacher.ddp_timeout_s`) can end the job; it must, with exit 2."""
    timeout_s = 10.0
    proc, run_dir, log, ranks = start_two_rank_teacher(tmp_path, **{"teacher.ddp_timeout_s": timeout_s})
    victim = ranks[1]
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        code = proc.wait(timeout=180)
    finally:
        for pid in ranks.values():  # never leave a stopped process behind, pass or fail
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
    waited = time.monotonic() - stopped_at
    out = log.read_text()
    assert code == 2, out[-3000:]
    assert waited >= timeout_s * 0.5, f"ended after {waited:.0f} s: not the timeout that ended it?\n{out[-2000:]}"
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: distributed training under torchrun failed"), last
    teacher = stage_dir(run_dir, "teacher")
    assert torch_load(teacher / "last.pt")["epoch"] >= 1 and not (teacher / "model.pt").exists()
