"""DDP: killing one rank of a 2-process run ends the whole job quickly with a clear error.

torchrun's agent watches its workers and stops the others when one dies; the pipeline then
reports one line and exits 2, keeping the last epoch's checkpoint for a resume. A rank that
hangs instead of dying is bounded by the process-group timeout (TrainConfig.ddp_timeout_s).
That 1- and 2-process runs reach comparable accuracy is
tests/test_trainer.py::test_ddp_two_processes_on_cpu.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from dskd.checkpoint import torch_load
from tests.reliability.conftest import TINY, set_args, stage_dir, start_cli, wait_for


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


def test_killing_one_rank_ends_the_job_with_a_clear_error(tmp_path: Path):
    run_dir, log = tmp_path / "run", tmp_path / "ddp.log"
    proc = start_cli("run", "--out", str(run_dir), *set_args({**TINY, "teacher.nproc": 2, "teacher.epochs": 30}),
                     log=log)

    def training() -> bool:
        d = stage_dir(run_dir, "teacher")
        return d is not None and (d / "last.pt").exists() and 1 in ranks_under(proc.pid)

    wait_for(training, proc, "an epoch of 2-process training", log)
    ranks = ranks_under(proc.pid)
    victim = ranks[1]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    code = proc.wait(timeout=120)
    assert time.monotonic() - killed_at < 60  # ended, not hung on the dead peer
    out = log.read_text()
    assert code == 2, out[-3000:]
    assert f"Signal 9 (SIGKILL) received by PID {victim}" in out  # torchrun names the dead rank
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: distributed training under torchrun failed (exit 1)"), last
    assert "Re-run to resume from" in last
    assert not [pid for pid in ranks.values() if Path(f"/proc/{pid}").exists()]  # no rank left running
    teacher = stage_dir(run_dir, "teacher")
    assert torch_load(teacher / "last.pt")["epoch"] >= 1 and not (teacher / "model.pt").exists()
