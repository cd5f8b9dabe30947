"""bench/distill_cifar10.py: resumable cells, the verdict's arithmetic, docs rendering (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("distill_cifar10", ROOT / "bench" / "distill_cifar10.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["distill_cifar10"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("distill_cifar10", None)


def cells(scores: dict[str, list[float]]) -> dict[str, dict]:
    return {f"{v}/seed{s}": {"variant": v, "seed": s, "top1": t, "train_seconds": 1.0}
            for v, tops in scores.items() for s, t in enumerate(tops)}


BASELINES = {"ce": [50.0, 51.0, 50.5], "kd": [52.0, 52.5, 51.5], "dkd": [54.0, 55.0, 54.5],
             "fitnet": [45.0, 46.0, 45.5], "lshfm": [58.0, 58.5, 57.5], "diffkd": [54.0, 53.5, 54.5]}


def test_verdict_needs_a_gap_larger_than_the_seed_spread(bench) -> None:
    budget = bench.Budget()
    met = bench.verdict({"cells": cells({**BASELINES, "dskd": [61.0, 61.5, 60.5]})}, budget)
    assert met[0].startswith("**Goal met**")
    assert all("→ above by more than the spread" in ln for ln in met if ln.startswith("- vs"))

    close = bench.verdict({"cells": cells({**BASELINES, "dskd": [58.2, 59.0, 57.4]})}, budget)
    assert close[0].startswith("**Goal not met**")
    (lshfm,) = [ln for ln in close if ln.startswith("- vs lshfm")]
    # mean gap +0.20 < larger std 0.80; paired per seed +0.20, +0.50, -0.10
    assert "+0.20 points (larger seed std 0.80; paired per seed +0.20, +0.50, -0.10, DSKD ahead on 2/3)" in lshfm
    assert "NOT above" in lshfm

    partial = bench.verdict({"cells": cells({**BASELINES, "dskd": [61.0]})}, budget)
    assert partial[0].startswith("**Goal not met**") and "fewer than 3 seeds for dskd" in partial[0]


def test_render_keeps_the_hand_written_notes_and_other_sections(bench, tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\n## Other\n\nkeep me\n\n{bench.SECTION}\n\nold table\n\n"
                    f"{bench.NOTES_START}\nmy notes\n{bench.NOTES_END}\n\n## Later\n\nkeep me too\n")
    data = {"budget": bench.Budget().key(), "cells": cells({**BASELINES, "dskd": [55.0, 55.5, 54.5]}),
            "teacher": {"top1": 74.0}, "machine": {}, "commands": ["python bench/distill_cifar10.py"]}
    bench.write_docs(bench.render(data, tmp_path / "r.json"), docs)
    text = docs.read_text()
    assert "keep me\n" in text and "keep me too" in text and "old table" not in text
    assert f"{bench.NOTES_START}\nmy notes\n{bench.NOTES_END}" in text
    assert "| DSKD (pooled LSH" in text and "55.00 ± 0.50 | 3 | 55.00, 55.50, 54.50" in text


def test_cells_are_saved_as_they_finish_and_skipped_when_rerun(bench, tmp_path: Path, capsys) -> None:
    torch.set_num_threads(1)
    results, work = tmp_path / "r.json", tmp_path / "work"
    args = ["--budget", "smoke", "--data", "digits", "--stage", "cells", "--only", "ce,dskd",
            "--results", str(results), "--work", str(work), "--no-docs"]
    assert bench.main(args) == 0
    first = json.loads(results.read_text())
    assert sorted(first["cells"]) == ["ce/seed0", "dskd/seed0"]
    dskd = first["cells"]["dskd/seed0"]
    assert dskd["options"]["detach_adapter_input"] is False and dskd["options"]["lsh_on"] == "pooled"
    assert 0 <= dskd["top1"] <= 100 and "holdout_top1" not in dskd
    assert first["teacher"]["top1"] > 0

    capsys.readouterr()
    assert bench.main(args) == 0  # everything done: nothing retrained, nothing rewritten
    out = capsys.readouterr().out
    assert "[bench] cell" not in out and "training teacher" not in out
    assert json.loads(results.read_text())["cells"] == first["cells"]

    # Another budget must not mix into this file: refused, naming the file and the fix.
    assert bench.main([*args, "--epochs", "2"]) == 2
    assert "made with a different budget; pass --results NEW.json or delete it" in capsys.readouterr().err
    assert json.loads(results.read_text())["cells"] == first["cells"]


def test_gpu_check_refuses_without_a_gpu():
    """bench/gpu_check.py is for a lent GPU; on a CPU machine it says so and exits 2."""

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    proc = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU visible" in proc.stderr
