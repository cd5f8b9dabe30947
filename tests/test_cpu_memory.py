"""Issue 15: a CPU training process keeps freed heap memory, so per-step temporaries fault in no pages.

Each check runs in a fresh interpreter: malloc settings are per process and pytest's own process has
its own allocation history.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A step-like churn: maps held, each replaced by a new one of the same size (as every op of the DDIM
# chain does), then all freed.
CHURN = """
import resource, sys, torch
sys.path.insert(0, {root!r})
if {keep}:
    from dskd.methods.cpu_memory import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()  # set once, then a no-op that still says True
def churn():
    held = [torch.empty(2 << 20, dtype=torch.float32).fill_(1) for _ in range(6)]
    held = [h + 1 for h in held]
    del held
churn(); churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt thresholds are glibc's")


def faults(keep: bool, env: dict[str, str] | None = None) -> int:
    out = subprocess.run([sys.executable, "-c", CHURN.format(root=str(ROOT), keep=keep)], capture_output=True,
                         text=True, check=True, env=env, timeout=120)
    return int(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_kept_memory_stops_the_page_faults_of_repeated_temporaries() -> None:
    default, kept = faults(False), faults(True)
    # measured here: 45k-70k faults (≈ 200 MB of fresh pages) against 0-6k (0 in most runs; the rest
    # depends on where address-space randomisation put the heap)
    assert default > 20_000  # glibc's self-tuned thresholds hand this memory back to the kernel ...
    assert kept * 4 < default  # ... and with the thresholds fixed it is mostly reused


def test_user_malloc_settings_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from dskd.methods import cpu_memory

    for name in cpu_memory.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576")
    assert cpu_memory._apply() is False  # decided before any mallopt call: nothing changed
