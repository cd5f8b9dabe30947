"""What a person sees in the terminal while a model trains: with a TTY (a progress bar, no library
warnings) and without one (CI logs: a line every N seconds inside an epoch, not minutes of silence).

Each test trains digits for one epoch in a subprocess, so the TTY case gets a real pseudo-terminal.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each trains one epoch in a real child process (~6-8 s)

REPO = Path(__file__).resolve().parents[1]
TRAIN = ("import sys\nfrom dskd.trainer import TrainConfig, train\n"
         "train(TrainConfig(model='resnet8', data='digits', epochs=1, input_size=16, in_chans=1, batch_size=64), sys.argv[1])\n")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "DSKD_PROGRESS_EVERY_S")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def test_without_a_terminal_training_prints_progress_lines(tmp_path: Path):
    """Piped output (CI): with DSKD_PROGRESS_EVERY_S=0 every step prints, then the epoch line."""
    proc = subprocess.run([sys.executable, "-W", "always", "-c", TRAIN, str(tmp_path / "out")], cwd=REPO,
                          env=_env(DSKD_PROGRESS_EVERY_S="0"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [ln for ln in proc.stderr.splitlines() if ln.startswith("[train] epoch 1/1 step ")]
    assert len(steps) >= 2 and "loss=" in steps[0] and "images/s=" in steps[0], proc.stderr[-2000:]
    assert any(ln.startswith("[train] epoch 1/1 lr=") for ln in proc.stderr.splitlines())
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]


def test_in_a_terminal_training_shows_a_bar_and_no_warnings(tmp_path: Path):
    """A real pseudo-terminal: tqdm draws its bar (the path that once warned about float(loss))."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, "-W", "always", "-c", TRAIN, str(tmp_path / "out")], cwd=REPO,
                            env=_env(TERM="xterm"), stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=600) == 0
    out = b"".join(chunks).decode("utf-8", "replace")
    assert "epoch 1/1" in out and ("it/s" in out or "s/it" in out), out[-2000:]
    assert "Warning" not in out, out[-3000:]
    assert "[train] epoch 1/1 step" not in out  # the plain lines are for logs, the bar is for terminals


def test_a_bad_progress_interval_is_one_line_exit_2(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--model", "resnet8", "--epochs", "1",
                           "--input-size", "16", "--in-chans", "1", "--out", str(tmp_path / "o")], cwd=REPO,
                          env=_env(DSKD_PROGRESS_EVERY_S="often"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: DSKD_PROGRESS_EVERY_S='often'") and "Traceback" not in proc.stderr
