"""Interruption: `kill -9` mid-stage, then `run` again.

Training resumes from the last epoch's `last.pt` and ends with the very weights of an
uninterrupted run (CPU, one thread, fixed seed); export and report leave no torn file where
a finished one is expected (every write is temp file + rename) and are redone on the next run.
The in-process variant (stop_after_epoch) is tests/test_trainer.py::test_resume_equals_uninterrupted.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from dskd.checkpoint import torch_load
from pipeline.report import validate_report
from tests.helpers.cli import cli, set_args, start_cli, wait_for
from tests.helpers.runs import TINY, assert_no_torn_files, assert_same_weights, copy_run, stage_dir

pytestmark = pytest.mark.slow  # kill -9 mid-stage, then a rerun (~7-23 s each)


def kill_when(proc: subprocess.Popen, condition, what: str, log: Path) -> None:
    wait_for(condition, proc, what, log)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def rerun(run_dir: Path) -> subprocess.CompletedProcess:
    proc = cli("run", "--out", str(run_dir), *set_args(TINY))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert validate_report(report) == [] and report["passed"]
    assert_no_torn_files(run_dir)
    return proc


def test_sigkill_during_training_resumes_to_the_uninterrupted_weights(base_run: Path, tmp_path: Path):
    run_dir, log = tmp_path / "run", tmp_path / "killed.log"
    proc = start_cli("run", "--out", str(run_dir), *set_args(TINY), log=log)

    def first_epoch_saved() -> bool:
        d = stage_dir(run_dir, "teacher")
        return d is not None and (d / "last.pt").exists()

    kill_when(proc, first_epoch_saved, "the teacher's first last.pt", log)
    teacher = stage_dir(run_dir, "teacher")
    epoch = torch_load(teacher / "last.pt")["epoch"]  # loads: the checkpoint is whole
    assert 1 <= epoch < TINY["teacher.epochs"], epoch  # killed in the middle of training
    assert not (teacher / "model.pt").exists() and not (teacher / "stage.json").exists()
    assert_no_torn_files(run_dir)

    again = rerun(run_dir)
    assert f"resuming from {teacher / 'last.pt'}" in again.stderr
    teacher_log = again.stderr.split("[teacher] running")[1].split("[distill]")[0]
    first_line = next(ln for ln in teacher_log.splitlines() if ln.startswith("[train] epoch"))
    assert first_line.startswith(f"[train] epoch {epoch + 1}/{TINY['teacher.epochs']}"), first_line
    for stage in ("teacher", "distill"):
        assert_same_weights(stage_dir(run_dir, stage) / "model.pt", stage_dir(base_run, stage) / "model.pt")
    epochs = [json.loads(ln)["epoch"] for ln in (teacher / "metrics.jsonl").read_text().splitlines()]
    assert epochs == sorted(set(epochs)) and epochs[-1] == TINY["teacher.epochs"]


def test_sigkill_during_export_leaves_no_torn_file_and_the_next_run_redoes_it(base_run: Path, tmp_path: Path):
    run_dir = copy_run(base_run, tmp_path / "run", drop=("export", "optimize", "deploy", "gate", "report"))
    log = tmp_path / "killed.log"
    proc = start_cli("run", "--out", str(run_dir), *set_args(TINY), log=log)

    def exporting() -> bool:  # the ONNX file is being written or verified in the staging folder
        d = stage_dir(run_dir, "export")
        return d is not None and any(p.is_file() for p in (d / "artifacts").glob(".export-staging-*/*"))

    kill_when(proc, exporting, "an export in progress", log)
    export = stage_dir(run_dir, "export")
    assert not (export / "stage.json").exists()
    assert not (export / "artifacts" / "manifest.json").exists()
    assert_no_torn_files(run_dir)

    again = rerun(run_dir)
    assert "[distill] cached" in again.stderr and "[export] running" in again.stderr
    manifest = json.loads((export / "artifacts" / "manifest.json").read_text())
    assert [a["format"] for a in manifest["artifacts"]] == ["onnx"]


def test_sigkill_during_report_leaves_no_torn_file_and_the_next_run_redoes_it(base_run: Path, tmp_path: Path):
    run_dir = copy_run(base_run, tmp_path / "run", drop=("report",))
    log = tmp_path / "killed.log"
    proc = start_cli("run", "--out", str(run_dir), *set_args(TINY), log=log)

    def writing_report() -> bool:  # plots begun; report.json/md/html and the bundle still to come
        return stage_dir(run_dir, "report") is not None and (run_dir / "plots").is_dir()

    kill_when(proc, writing_report, "the report stage writing its files", log)
    assert not (stage_dir(run_dir, "report") / "stage.json").exists()
    assert_no_torn_files(run_dir)

    again = rerun(run_dir)
    assert "[deploy] cached" in again.stderr and "[report] running" in again.stderr
    assert cli("verify", str(run_dir / "bundle" / "cpu.tar.gz")).returncode == 0
