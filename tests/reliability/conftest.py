"""Shared pieces of the fault-injection suite: a tiny real run, CLI drivers, and file checks.

Every test here injects one fault (a kill, a bad file, a full disk, a dead device, ...) into
the real product and checks what the guarantee in docs/reliability.md says. Budgets are tiny
(digits at 16×16, one channel, a few epochs) so the whole suite runs in a few minutes on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Overrides of the shipped digits-smoke recipe: a real run of every stage in ~20 s. Gates are
# set where even this barely-trained student passes, so a failure means a fault, not accuracy.
TINY: dict[str, object] = {
    "data.input_size": 16, "data.in_chans": 1,
    "teacher.model": "resnet8", "teacher.epochs": 4,
    "student.model": "resnet8", "student.epochs": 2, "student.method": "kd", "student.options": {},
    "export.calib_size": 100,
    "target.min_iters": 20, "target.min_seconds": 0.1, "target.warmup_seconds": 0.02,
    "gates.min_top1": 0.0, "gates.max_top1_drop": 100.0, "gates.max_size_mb": 5.0,
    "gates.max_latency_ms": 1000.0,
}
RUN_OUTPUTS = ("report.json", "report.md", "report.html", "gates.junit.xml", "last_run.json", "plots", "bundle")


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


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """In-process training and evaluation on one thread: fast and steady on a shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a CLI child: one thread (bit-exact reruns), no progress bars."""
    return {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", **extra}


def set_args(overrides: dict[str, object]) -> list[str]:
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


def stage_dir(run_dir: Path, stage: str) -> Path | None:
    found = sorted((run_dir / "stages").glob(f"{stage}-*"))
    return found[0] if found else None


def copy_run(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    """A copy of a finished run folder without the stages in `drop` and the run's outputs,
    so the next `run` there starts at the first dropped stage (like a fresh run reaching it)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    for stage in drop:
        for folder in (dst / "stages").glob(f"{stage}-*"):
            shutil.rmtree(folder)
    if drop:
        for name in RUN_OUTPUTS:
            p = dst / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    return dst


def assert_no_torn_files(root: Path) -> int:
    """Every finished file (not hidden temp files) under `root` reads back whole; returns the count.

    Torn files are what a non-atomic write leaves when killed: each type is parsed to the end,
    and every manifest's sha256 list is checked against the files it names.
    """
    import onnx
    from PIL import Image

    from dskd.checkpoint import torch_load
    from export.manifest import read_manifest, verify_files
    from pipeline.bundle import verify_bundle

    checked = 0
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        name = p.name
        if name == "manifest.json" and p.parent.name == "artifacts":
            assert verify_files(p.parent, read_manifest(p.parent)) == [], p
        elif name == "manifest.json" and p.parent.parent.name == "bundle":
            assert verify_bundle(p.parent)["ok"], p
        if name.endswith(".json"):
            json.loads(p.read_text())
        elif name.endswith(".jsonl"):
            for line in p.read_text().splitlines():
                json.loads(line)
        elif name.endswith(".onnx"):
            onnx.checker.check_model(onnx.load(str(p)))
        elif name.endswith(".pt"):
            torch_load(p)
        elif name.endswith(".png"):
            with Image.open(p) as im:
                im.load()
        elif name.endswith(".tar.gz"):
            with tarfile.open(p, "r:gz") as tar:
                for member in tar:
                    if member.isfile():
                        tar.extractfile(member).read()  # type: ignore[union-attr]
        elif name.endswith(".xml"):
            import xml.etree.ElementTree as ET

            ET.parse(p)
        elif name.endswith(".html"):
            assert p.read_text().rstrip().endswith("</html>"), p
        elif name.endswith(".npz"):
            import numpy as np

            with np.load(p, allow_pickle=False) as data:
                for key in data.files:
                    data[key]
        checked += 1
    return checked


def assert_same_weights(a: Path, b: Path) -> None:
    import torch

    from dskd.checkpoint import load_model_file

    sa, _ = load_model_file(a)
    sb, _ = load_model_file(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs between {a} and {b}"


@pytest.fixture(scope="session")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted TINY run through the CLI (the reference the fault tests compare with)."""
    run_dir = tmp_path_factory.mktemp("reliability") / "base"
    proc = cli("run", "--out", str(run_dir), *set_args(TINY))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return run_dir
