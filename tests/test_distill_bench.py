"""bench/distill_cifar10.py: resumable cells, the verdict's arithmetic, docs rendering (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import math
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


def cells(bench, scores: dict[str, list[float]]) -> dict[str, dict]:
    """Finished cells as the bench records them; options are those of the untuned picks."""
    main, refs, ablation = bench.variants({})
    options = {v.name: v.options for v in main + refs + ablation}
    from dskd.methods.registry import resolve_method_options

    return {f"{v}/seed{s}": {"variant": v, "method": v.split("_")[0], "seed": s, "top1": t, "train_seconds": 1.0,
                             "changes": options[v], "options": resolve_method_options(v.split("_")[0], options[v])}
            for v, tops in scores.items() for s, t in enumerate(tops)}


def test_a_record_trained_under_other_method_defaults_is_stale(bench) -> None:
    """Same `changes`, but the method's defaults moved since (issue 15: DSKD's steps): not current."""
    from dskd.methods.registry import resolve_method_options

    now = resolve_method_options("dskd", {})
    rec = {"method": "dskd", "changes": {}, "options": dict(now)}
    assert bench.is_current(rec, "dskd", {})
    assert not bench.is_current({**rec, "options": {**now, "steps": now["steps"] + 2}}, "dskd", {})
    assert not bench.is_current({"method": "dskd", "changes": {}}, "dskd", {})  # no resolved options stored
    assert not bench.is_current({**rec, "changes": {"w_lsh": 0.0}}, "dskd", {})
    assert not bench.is_current(None, "dskd", {})
    stale = cells(bench, {"dskd": [61.0, 62.0]})
    stale["dskd/seed1"]["options"] = {**now, "steps": now["steps"] + 2}
    main, _, _ = bench.variants({})
    shown, _ = bench.row_cells({"cells": stale}, next(v for v in main if v.name == "dskd"), main)
    assert [c["seed"] for c in shown] == [0]  # the stale seed is not in the table


BASELINES = {"ce": [50.0, 51.0, 50.5], "kd": [52.0, 52.5, 51.5], "dkd": [54.0, 55.0, 54.5],
             "fitnet": [45.0, 46.0, 45.5], "lshfm": [58.0, 58.5, 57.5], "diffkd": [54.0, 53.5, 54.5]}


def test_verdict_needs_a_gap_larger_than_the_seed_spread_and_the_branch_gain(bench) -> None:
    budget = bench.Budget()
    met = bench.verdict({"cells": cells(bench, {**BASELINES, "dskd": [61.0, 61.5, 60.5],
                                                "dskd_nofeat": [59.0, 59.5, 59.0]})}, budget, {})
    assert met[0].startswith("**Goal met**")
    assert all("→ above by more than the spread" in ln for ln in met if ln.startswith("- vs"))
    assert any("dskd − dskd_nofeat): +1.83 points → meets" in ln for ln in met)

    close = bench.verdict({"cells": cells(bench, {**BASELINES, "dskd": [58.2, 59.0, 57.4],
                                                  "dskd_nofeat": [58.0, 58.0, 58.0]})}, budget, {})
    assert close[0].startswith("**Goal not met**") and "adds < 1.5 points" in close[0]
    (lshfm,) = [ln for ln in close if ln.startswith("- vs lshfm")]
    # mean gap +0.20 < larger std 0.80; paired per seed +0.20, +0.50, -0.10
    assert "+0.20 points (larger seed std 0.80; paired per seed +0.20, +0.50, -0.10, DSKD ahead on 2/3)" in lshfm
    assert "NOT above" in lshfm

    partial = bench.verdict({"cells": cells(bench, {**BASELINES, "dskd": [61.0]})}, budget, {})
    assert partial[0].startswith("**Goal not met**") and "fewer than 3 seeds for dskd, dskd_nofeat" in partial[0]


def test_verdict_compares_with_the_better_of_tuned_and_reference_rows(bench) -> None:
    from dskd.methods.registry import resolve_method_options

    v1 = bench.GRID["lshfm"][2][1]
    tuning = {"lshfm_v1/seed0": {"method": "lshfm", "changes": v1, "holdout_top1": 60.0,
                                 "options": resolve_method_options("lshfm", v1)},
              "lshfm_ref/seed0": {"method": "lshfm", "changes": {}, "holdout_top1": 50.0,
                                  "options": resolve_method_options("lshfm", {})}}
    main, refs, _ = bench.variants(tuning)
    lshfm = next(v for v in main if v.name == "lshfm")
    assert lshfm.options == bench.GRID["lshfm"][2][1]
    data = {"cells": cells(bench, {**BASELINES, "dskd": [61.0, 61.5, 60.5], "dskd_nofeat": [50.0] * 3})}
    for s, t in enumerate([57.0, 57.5, 56.5]):  # the tuned pick is worse than the reference row here
        data["cells"][f"lshfm/seed{s}"] = {"variant": "lshfm", "method": "lshfm", "seed": s, "top1": t,
                                           "train_seconds": 1.0, "changes": lshfm.options,
                                           "options": resolve_method_options("lshfm", lshfm.options)}
    for s, t in enumerate([60.9, 61.0, 61.1]):
        data["cells"][f"lshfm_ref/seed{s}"] = {"variant": "lshfm_ref", "method": "lshfm", "seed": s, "top1": t,
                                               "train_seconds": 1.0, "changes": {},
                                               "options": resolve_method_options("lshfm", {})}
    lines = bench.verdict(data, bench.Budget(), tuning)
    (row,) = [ln for ln in lines if ln.startswith("- vs lshfm")]
    assert "best row: `lshfm_ref`" in row and "NOT above" in row
    # A cell made with other options (a stale definition) does not count.
    data["cells"]["dskd/seed0"]["changes"] = {"t0": 400}
    assert "fewer than 3 seeds for dskd" in bench.verdict(data, bench.Budget(), tuning)[0]


def test_pick_rule_and_equal_tuning_budget(bench) -> None:
    plan = bench.tuning_plan()
    for method in bench.METHOD_ORDER:
        assert 1 <= len([r for r in plan if r[1] == method]) <= bench.CONFIGS_PER_METHOD
    assert {len(bench.GRID[m]) for m in bench.METHOD_ORDER if m != "ce"} == {bench.CONFIGS_PER_METHOD}
    for method, ref in bench.REFERENCE_ROWS.items():  # the reference default is each grid's first entry
        assert bench.GRID[method][0] == (ref, {}, bench.GRID[method][0][2])

    def rec(method: str, i: int, score: float) -> tuple[str, dict]:
        from dskd.methods.registry import resolve_method_options

        name, changes, _ = bench.GRID[method][i]
        return f"{name}/seed{bench.TUNING_SEED}", {"method": method, "changes": changes, "holdout_top1": score,
                                                   "options": resolve_method_options(method, changes)}

    tuning = dict([rec("kd", 0, 50.0), rec("kd", 1, 52.0), rec("kd", 2, 52.0), rec("dkd", 0, 40.0)])
    p = bench.picks(tuning)
    assert p["kd"]["config"] == bench.GRID["kd"][1][0] and p["kd"]["complete"]  # tie: the one listed first
    assert p["dkd"]["tuned"] and not p["dkd"]["complete"]
    assert p["fitnet"] == {"config": "fitnet_ref", "changes": {}, "tuned": False, "complete": False}
    # A record whose configuration has since changed is not a score for it.
    key, stale = rec("kd", 1, 99.0)
    tuning[key] = {**stale, "changes": {"tau": 8.0}}
    assert bench.picks(tuning)["kd"]["config"] == bench.GRID["kd"][2][0]
    # Reference rows that equal the pick are not trained twice; the nofeat ablation follows DSKD's pick.
    names = [v.name for v, s in bench.cell_order((0,), {})]
    assert "lshfm_ref" not in names and "fitnet_ref" not in names and names[-1] == "dskd_nofeat"
    _, _, (nofeat,) = bench.variants({})
    assert nofeat.options == {**bench.GRID["dskd"][0][1], **bench.NOFEAT}


def test_render_keeps_the_hand_written_notes_and_other_sections(bench, tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\n## Other\n\nkeep me\n\n{bench.SECTION}\n\nold table\n\n"
                    f"{bench.NOTES_START}\nmy notes\n{bench.NOTES_END}\n\n## Later\n\nkeep me too\n")
    data = {"budget": bench.Budget().key(), "cells": cells(bench, {**BASELINES, "dskd": [55.0, 55.5, 54.5]}),
            "teacher": {"top1": 74.0}, "machine": {}, "commands": ["python bench/distill_cifar10.py"]}
    cross = {**data, "budget": bench.BUDGETS["cross"].key(), "commands": ["python bench/distill_cifar10.py --budget cross"]}
    bench.write_docs(bench.render(data, tmp_path / "r.json", cross, tmp_path / "c.json"), docs)
    text = docs.read_text()
    assert "keep me\n" in text and "keep me too" in text and "old table" not in text
    assert f"{bench.NOTES_START}\nmy notes\n{bench.NOTES_END}" in text
    assert "| DSKD, tuned: dskd_v2 (untuned) | `{}` | 55.00 ± 0.50 | 3 | 55.00, 55.50, 54.50" in text
    assert "`resnet20` → `mobilenetv2`" in text and "--budget cross`" in text
    assert "(= tuned pick, same cells as `lshfm`) | `{}` | 58.00 ± 0.50" in text


@pytest.mark.slow
def test_cells_are_saved_as_they_finish_and_skipped_when_rerun(bench, tmp_path: Path, capsys) -> None:
    torch.set_num_threads(1)
    results, work = tmp_path / "r.json", tmp_path / "work"
    args = ["--budget", "smoke", "--data", "digits", "--stage", "cells", "--only", "ce,dskd",
            "--results", str(results), "--work", str(work), "--no-docs"]
    assert bench.main(args) == 0
    first = json.loads(results.read_text())
    assert sorted(first["cells"]) == ["ce/seed0", "dskd/seed0"]
    dskd = first["cells"]["dskd/seed0"]
    assert dskd["changes"] == bench.GRID["dskd"][0][1] and dskd["method"] == "dskd"
    assert 0 <= dskd["top1"] <= 100 and "holdout_top1" not in dskd
    assert first["teacher"]["top1"] > 0
    (stage,) = first["stages"]  # the command and the load average at its start and end
    assert stage["stage"] == "cells" and "--only ce,dskd" in stage["command"] and len(stage["load_avg_1m"]) == 2

    capsys.readouterr()
    assert bench.main(args) == 0  # everything done: nothing retrained, nothing rewritten
    out = capsys.readouterr().out
    assert "[bench] cell" not in out and "training teacher" not in out
    assert json.loads(results.read_text())["cells"] == first["cells"]

    # A cross-family budget takes its picks from a same-family file and never tunes itself.
    assert bench.main(["--budget", "smoke_cross", "--data", "digits", "--stage", "tune", "--results",
                       str(tmp_path / "c.json"), "--picks-from", str(results), "--work", str(work)]) == 2
    assert "reuses the picks of" in capsys.readouterr().err
    assert bench.main(["--budget", "smoke_cross", "--data", "digits", "--stage", "cells", "--results",
                       str(tmp_path / "c.json"), "--picks-from", str(tmp_path / "none.json"), "--work", str(work)]) == 2
    assert "none.json: no tuning results to take the picks from" in capsys.readouterr().err

    # Another budget must not mix into this file: refused, naming the file and the fix.
    assert bench.main([*args, "--epochs", "2"]) == 2
    assert "made with a different budget; pass --results NEW.json or delete it" in capsys.readouterr().err
    assert json.loads(results.read_text())["cells"] == first["cells"]


@pytest.mark.slow
def test_gpu_check_refuses_without_a_gpu():
    """bench/gpu_check.py is for a lent GPU; on a CPU machine it says so and exits 2."""

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    proc = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU visible" in proc.stderr

# Cross-family distillation (issue #14): the bench's lightweight-student learning rate. Root cause
# of the cross pair's collapse (resnet20 → mobilenetv2): at the same-family lr (0.1) the MobileNetV2
# student's last ReLU map died within the first epoch whenever a method added about a CE's worth of
# gradient, adapter or not (plain CE + KD at weights 1 + 1 died the same way). The reference recipes
# train depthwise students at 1/5 of the lr; these tests keep the bench on that rule.


def test_lightweight_students_train_at_a_fifth_of_the_same_family_lr(bench) -> None:
    checked = 0
    for name, budget in bench.BUDGETS.items():
        if budget.student not in bench.LIGHT_STUDENTS:
            continue
        checked += 1
        shared = bench.BUDGETS[bench.SHARES_WITH[name]]  # the budget whose teacher and picks it reuses
        assert shared.student not in bench.LIGHT_STUDENTS, name
        assert math.isclose(budget.students_lr, bench.LIGHT_STUDENT_LR_FACTOR * shared.students_lr), name
        # Only the students' lr differs: the shared teacher (found by its exact config) is still this
        # budget's teacher, and every other setting a cell depends on is the shared budget's.
        assert bench.teacher_config(budget, "digits") == bench.teacher_config(shared, "digits"), name
        same = ("weight_decay", "schedule", "holdout", "augmentation")
        assert all(getattr(budget, k) == getattr(shared, k) for k in same), name
    assert checked >= 2  # cross and smoke_cross


def test_cross_cells_train_at_the_students_lr_and_old_keys_stay_valid(bench) -> None:
    b = bench.BUDGETS["cross"]
    cfg = bench.student_config(b, "digits", "dskd", {}, 0, "teacher.pt")
    assert cfg.model == "mobilenetv2" and math.isclose(cfg.lr, 0.02)
    assert b.key()["student_lr"] == 0.02 and bench.Budget.from_key(b.key()) == b
    # Budgets without a student lr keep the key their results files were written with.
    assert "student_lr" not in bench.BUDGETS["default"].key()
    assert bench.BUDGETS["default"].students_lr == bench.BUDGETS["default"].lr


def test_a_half_trained_cell_folder_is_resumed_only_under_the_same_resolved_options(bench, tmp_path) -> None:
    """The trainer's resume compares `changes`; a folder half-trained under other method defaults
    (issue 15: DSKD's defaults moved) must start over, and one without any marker too."""
    from dskd.methods.registry import resolve_method_options

    v = bench.Variant("dskd", "dskd", {}, "DSKD")
    out = tmp_path / "cell"
    out.mkdir()
    (out / "last.pt").write_bytes(b"checkpoint")
    assert not bench.cell_folder_current(out, v)  # no marker, no summary: unknown options
    now = resolve_method_options("dskd", {})
    marker = out / bench.CELL_MARKER
    marker.write_text(json.dumps({"method": "dskd", "changes": {}, "options": now}))
    assert bench.cell_folder_current(out, v)
    marker.write_text(json.dumps({"method": "dskd", "changes": {}, "options": {**now, "steps": now["steps"] + 2}}))
    assert not bench.cell_folder_current(out, v)
    marker.write_text("{not json")
    assert not bench.cell_folder_current(out, v)
