"""Resource limits: a full disk while writing a checkpoint is one line and keeps the previous one.

Two real ways to run out of space: a small tmpfs filled up (ENOSPC; needs root for mount,
skipped otherwise) and a file-size limit (RLIMIT_FSIZE -> EFBIG; works for any user). Peak
memory of CIFAR-10 training is measured by bench/peak_memory.py (docs/reliability.md).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dskd.checkpoint import torch_load
from dskd.errors import UserError
from dskd.trainer import TrainConfig, train
from tests.helpers.cli import REPO, child_env

pytestmark = pytest.mark.slow  # real training under a full disk / RLIMIT_FSIZE (~6-10 s each)

ARGS = dict(model="resnet8", data="digits", epochs=3, input_size=16, in_chans=1, device="cpu")
CLI_ARGS = ["--model=resnet8", "--data=digits", "--epochs=3", "--input-size=16", "--in-chans=1", "--device=cpu"]


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}); the RLIMIT_FSIZE test covers it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_full_disk_during_checkpoint_keeps_the_previous_one(small_disk: Path):
    out = small_disk / "train"
    train(TrainConfig(**ARGS), out, stop_after_epoch=1)
    before = (out / "last.pt").read_bytes()
    st = os.statvfs(small_disk)
    filler = small_disk / "filler"
    with open(filler, "wb") as fh:  # leave room for half a checkpoint
        fh.write(b"\0" * (st.f_bavail * st.f_frsize - len(before) // 2))
    with pytest.raises(UserError) as err:
        train(TrainConfig(**ARGS), out, resume=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{out / 'last.pt'}: cannot write the checkpoint (No space left on device)"), msg
    assert (out / "last.pt").read_bytes() == before and torch_load(out / "last.pt")["epoch"] == 1
    assert leftovers(out) == [] and not (out / "model.pt").exists()
    filler.unlink()  # space freed: the same command resumes and finishes
    summary = train(TrainConfig(**ARGS), out, resume=True)
    assert summary["epochs"] == 3 and (out / "model.pt").exists()


def test_file_size_limit_during_checkpoint_keeps_the_previous_one(tmp_path: Path):
    out = tmp_path / "train"
    train(TrainConfig(**ARGS), out, stop_after_epoch=1)
    before = (out / "last.pt").read_bytes()
    limit = len(before) // 2

    def cap_file_size() -> None:  # in the child only
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", *CLI_ARGS, f"--out={out}", "--resume"],
                          cwd=REPO, env=child_env(PYTHONDONTWRITEBYTECODE="1"), capture_output=True, text=True,
                          timeout=300, preexec_fn=cap_file_size)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {out / 'last.pt'}: cannot write the checkpoint (File too large)"), last
    assert "Traceback" not in proc.stderr
    assert (out / "last.pt").read_bytes() == before and torch_load(out / "last.pt")["epoch"] == 1
    assert leftovers(out) == []
