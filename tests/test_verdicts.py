"""The verdict belongs to the invocation: exit code, printed table, report.json and gates.junit.xml
always reflect the recipe, gates, target and baseline of the command just run, whatever was cached.
Also: a parity failure is a failed `parity` gate in a complete report (exit 1), and an unmeasured
target is explained once, with PASS / FAIL / NOT MEASURED status words.

One tiny training (1 teacher epoch, 1 student epoch, 20 images per class) is shared by every test;
each test works on its own copy of that run folder, so only the stages it changes run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.recipe import load_recipe
from pipeline.report import validate_report
from pipeline.run import execute
from tests.helpers.cli import set_args
from tests.helpers.runs import copy_run

pytestmark = pytest.mark.slow  # every test copies one real tiny run (its set-up ~5-15 s) and reruns stages

# FP32-only formats keep the export checks numerical (a 1-epoch model quantizes unpredictably);
# "openvino" is built too so that switching to intel-cpu re-runs only deploy, gate and report.
TINY = {
    "data.limit_per_class": 20,
    "teacher.model": "resnet8", "teacher.epochs": 1,
    "student.model": "resnet8", "student.epochs": 1, "student.method": "kd", "student.options": {},
    "export.formats": ["onnx", "openvino"], "export.calib_size": 50,
    "target.min_iters": 10, "target.min_seconds": 0.05, "target.warmup_seconds": 0.01,
    "gates.min_top1": 0.0, "gates.max_top1_drop": 100.0, "gates.max_size_mb": 5.0, "gates.max_latency_ms": 1000.0,
}
STATUS_WORDS = {"PASS", "FAIL", "NOT MEASURED", "INCONCLUSIVE"}
UPSTREAM = ("teacher", "distill", "export", "optimize")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("verdicts") / "base"
    execute(load_recipe("digits-smoke", TINY), run_dir)
    return run_dir


def run_cli(capsys, run_dir: Path, overrides: dict, *flags: str) -> tuple[int, str]:
    """`python -m pipeline run` in this process (the same main() as the console script)."""
    capsys.readouterr()
    code = main(["run", "--out", str(run_dir), *flags, *set_args(overrides)])
    out = capsys.readouterr()
    return code, out.out


def written(run_dir: Path) -> tuple[dict, str, dict]:
    report = json.loads((run_dir / "report.json").read_text())
    assert validate_report(report) == []
    return report, (run_dir / "gates.junit.xml").read_text(), json.loads((run_dir / "last_run.json").read_text())


def junit_counts(junit: str) -> tuple[int, int]:
    m = re.search(r'tests="(\d+)" failures="(\d+)"', junit)
    assert m, junit
    return int(m.group(1)), int(m.group(2))


def assert_verdict_matches(code: int, report: dict, junit: str, last: dict, out: str) -> None:
    """Exit code, report.json, gates.junit.xml, last_run.json and the printed verdict agree."""
    failed = [g for g in report["gates"] if not g["passed"]]
    assert code == (0 if report["passed"] else 1)
    assert report["passed"] == (not failed)
    assert junit_counts(junit) == (len(report["gates"]), len(failed))
    assert last["exit_code"] == code and last["passed"] == report["passed"]
    assert {g["status"] for g in report["gates"]} <= STATUS_WORDS
    assert ("PASSED" if code == 0 else "FAILED") in out
    assert ("failed gates" in out) == bool(failed)
    assert not re.search(r"\b(True|False)\b", out), out


def test_stricter_gate_then_plain_run_exits_0_1_0(base: Path, tmp_path: Path, capsys):
    run_dir = copy_run(base, tmp_path / "run")
    codes = []
    for extra in ({}, {"gates.min_top1": 99.0}, {}):
        overrides = {**TINY, **extra}
        code, out = run_cli(capsys, run_dir, overrides)
        report, junit, last = written(run_dir)
        assert_verdict_matches(code, report, junit, last, out)
        threshold = overrides["gates.min_top1"]
        assert report["recipe"]["config"]["gates"]["min_top1"] == threshold
        rows = [g for g in report["gates"] if g["name"] == "min_top1"]
        assert rows and all(g["threshold"] == threshold for g in rows)
        assert ("threshold=99.0" in junit) == (threshold == 99.0)
        assert all(last["stages"][s]["cached"] for s in (*UPSTREAM, "deploy"))  # nothing retrained or re-measured
        codes.append(code)
    assert codes == [0, 1, 0]


def test_target_switch_reports_each_runs_target(base: Path, tmp_path: Path, capsys):
    run_dir = copy_run(base, tmp_path / "run")
    labels = {"cpu": "onnxruntime/fp32", "intel-cpu": "openvino/fp32"}
    for target in ("cpu", "intel-cpu", "cpu"):
        code, out = run_cli(capsys, run_dir, TINY, "--target", target)
        report, junit, last = written(run_dir)
        assert_verdict_matches(code, report, junit, last, out)
        assert code == 0
        assert report["target"]["name"] == target and report["recipe"]["config"]["target"]["name"] == target
        shipped = {f"{a['runtime']}/{a['precision']}" for a in report["artifacts"] if a["shipped"]}
        assert shipped == {labels[target]}
        assert {g["artifact"] for g in report["gates"]} == {labels[target]}
        other = next(label for t, label in labels.items() if t != target)
        assert f"[{labels[target]}]" in junit and f"[{other}]" not in junit
        assert all(last["stages"][s]["cached"] for s in UPSTREAM)
        assert f"-> {target}:" in out


def test_baseline_changes_are_this_runs_baseline(base: Path, tmp_path: Path, capsys):
    run_dir = copy_run(base, tmp_path / "run")
    gates = {**TINY, "gates.max_top1_regression": 1.0}
    code, out = run_cli(capsys, run_dir, gates)
    first, junit, last = written(run_dir)
    assert_verdict_matches(code, first, junit, last, out)
    assert code == 0 and first["baseline"] is None
    assert not any(g["name"] == "max_top1_regression" for g in first["gates"])
    # Two baselines: the same numbers (no regression) and one whose artifacts were much better.
    same = tmp_path / "same" / "report.json"
    same.parent.mkdir()
    same.write_text(json.dumps(first))
    better = json.loads(json.dumps(first))
    for a in better["artifacts"]:
        assert a["top1"] is None or a["top1"] < 95.0  # room to be "much better"
        if a["top1"] is not None:
            a["top1"] = min(100.0, a["top1"] + 50.0)
    worse_than = tmp_path / "better" / "report.json"
    worse_than.parent.mkdir()
    worse_than.write_text(json.dumps(better))

    codes, failed = [], []
    for baseline in (same, worse_than, None):
        flags = ("--baseline", str(baseline)) if baseline else ()
        code, out = run_cli(capsys, run_dir, gates, *flags)
        report, junit, last = written(run_dir)
        assert_verdict_matches(code, report, junit, last, out)
        reg = [g for g in report["gates"] if g["name"] == "max_top1_regression"]
        if baseline is None:
            assert report["baseline"] is None and not reg
        else:
            assert report["baseline"]["path"] == str(baseline) and reg
            assert all(g["threshold"] == 1.0 for g in reg)
        codes.append(code)
        failed.append([(g["name"], g["artifact"], g["value"], g["note"]) for g in report["gates"] if not g["passed"]])
    assert codes == [0, 1, 0], failed
    fp32 = next(a for a in first["artifacts"] if a["shipped"])
    assert f"baseline {min(100.0, fp32['top1'] + 50.0):.2f}" not in json.dumps(report)  # the last run had none


def test_parity_failure_is_a_failed_gate_in_a_complete_report(base: Path, tmp_path: Path, capsys, monkeypatch):
    """A real export check with a bound the INT8 model cannot meet (its logits move by far more
    than 1e-9): the INT8 ONNX is rejected with its measured agreement, the FP32 one is still
    measured and shipped, and the run exits 1 with every report file written."""
    from export import parity

    monkeypatch.setitem(parity.DEFAULT_TOLERANCES, "int8",
                        parity.Tolerance(max_rel_diff=1e-9, min_top1_agreement=0.0))
    run_dir = copy_run(base, tmp_path / "run")
    code, out = run_cli(capsys, run_dir, {**TINY, "export.formats": []})
    report, junit, last = written(run_dir)
    assert_verdict_matches(code, report, junit, last, out)
    assert code == 1
    int8 = next(a for a in report["artifacts"] if a["precision"] == "int8")
    fp32 = next(a for a in report["artifacts"] if a["precision"] == "fp32")
    assert int8["rejected"] is True and int8["path"] is None and int8["measured"] is False
    assert "parity check failed" in int8["rejected_reason"] and "1e-09" in int8["rejected_reason"]
    assert int8["parity"]["passed"] is False
    assert int8["agreement"] == pytest.approx(100.0 * int8["parity"]["top1_agreement"], abs=1e-3)
    assert fp32["measured"] is True and fp32["top1"] is not None and fp32["latency_ms"]["p50"] > 0
    by = {(g["name"], g["artifact"]): g for g in report["gates"]}
    assert by[("parity", "onnxruntime/int8")]["status"] == "FAIL"
    assert by[("parity", "onnxruntime/int8")]["value"] == int8["agreement"]
    assert by[("parity", "onnxruntime/fp32")]["status"] == "PASS"
    assert {n for n, art in by if art == "onnxruntime/int8"} == {"parity"}  # no NOT MEASURED noise
    assert {g["name"] for g in report["gates"] if not g["passed"]} == {"parity"}
    assert "parity" in out and "onnxruntime/int8" in out
    bundle = json.loads((run_dir / "bundle" / "cpu" / "manifest.json").read_text())
    assert not any("int8" in f for f in bundle["files"])  # a rejected artifact never ships
    assert (run_dir / "report.md").is_file() and (run_dir / "report.html").is_file()


def test_unmeasured_target_is_explained_once(base: Path, tmp_path: Path, capsys, monkeypatch):
    """jetson-orin without a device: one note with the reason and both ways out; NOT MEASURED rows;
    the accuracy gates of the artifacts measured on this CPU still apply with --allow-unmeasured."""
    from export import parity

    # The 1-epoch student quantizes unpredictably; this test is about the missing device.
    monkeypatch.setitem(parity.DEFAULT_TOLERANCES, "int8",
                        parity.Tolerance(max_rel_diff=None, min_top1_agreement=0.0, max_batch1_rel_diff=1.0))
    run_dir = copy_run(base, tmp_path / "run")
    jetson = {**TINY, "export.formats": []}
    runs = [({}, ()), ({}, ("--allow-unmeasured",)), ({"gates.min_top1": 99.0}, ("--allow-unmeasured",))]
    codes = []
    for extra, flags in runs:
        code, out = run_cli(capsys, run_dir, {**jetson, **extra}, "--target", "jetson-orin", *flags)
        report, junit, last = written(run_dir)
        assert_verdict_matches(code, report, junit, last, out)
        allowed = bool(flags)
        note = report["not_measured"]
        assert set(note["artifacts"]) == {"tensorrt/fp16", "tensorrt/int8"} and note["allowed"] is allowed
        assert "--device user@host" in note["note"] and "--allow-unmeasured" in note["note"]
        reason = report["target"]["reason"]
        assert reason and reason in note["note"]
        assert out.count(note["note"]) == 1 and out.count(reason) == 1  # said once, not per row
        unmeasured = [g for g in report["gates"] if g["status"] == "NOT MEASURED"]
        assert unmeasured and all(g["passed"] is allowed for g in unmeasured)
        assert all(reason not in g["note"] for g in report["gates"])
        table_rows = [ln for ln in out.splitlines() if "max_latency_ms" in ln and "NOT MEASURED" in ln]
        assert bool(table_rows) == (not allowed)  # rows of the failed-gates table
        cpu_rows = [g for g in report["gates"] if g["artifact"].startswith("onnxruntime/") and g["name"] == "min_top1"]
        assert {g["artifact"] for g in cpu_rows} == {"onnxruntime/fp32", "onnxruntime/int8"}
        assert all("measured on this machine's CPU" in g["note"] for g in cpu_rows)
        assert all(g["threshold"] == report["recipe"]["config"]["gates"]["min_top1"] for g in cpu_rows)
        if allowed:
            assert f'skipped="{len(unmeasured)}"' in junit
        assert last["stages"]["deploy"]["cached"] is False  # "not measured" is never served from cache
        codes.append(code)
    assert codes == [1, 0, 1]  # the last: --allow-unmeasured waives device numbers, not accuracy


def test_gate_command_prints_status_words(base: Path, capsys):
    capsys.readouterr()
    code = main(["gate", str(base / "report.json"), "--set", "gates.max_size_mb=0.0001"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out and "PASS" in out and not re.search(r"\b(True|False)\b", out)


def test_interleaved_baseline_is_judged_by_the_paired_rule(base: Path, tmp_path: Path, capsys):
    """--baseline of a run whose artifacts exist: the deploy stage measures both alternately, one
    ratio per round, and the gate reports the median ratio with its interval (issue 18)."""
    run_dir = copy_run(base, tmp_path / "run")
    code, out = run_cli(capsys, run_dir, {**TINY, "gates.max_latency_regression": 0.99}, "--baseline", str(base))
    report, junit, last = written(run_dir)
    assert_verdict_matches(code, report, junit, last, out)
    fp32 = next(a for a in report["artifacts"] if a["shipped"])
    inter = fp32["baseline_comparison"]
    assert inter["rounds"] >= 6 and len(inter["candidate_p50_ms"]) == len(inter["kept"]) == inter["rounds"]
    row = next(g for g in report["gates"] if g["name"] == "max_latency_regression")
    d = row["decision"] or {}
    if sum(inter["kept"]):
        assert d["low"] <= row["value"] <= d["high"] and "interval" in row["note"]
    if sum(inter["kept"]) >= 6:
        # the same ONNX file on both sides: far inside a 1.99x limit, so the rule must say PASS
        assert d["samples"] == sum(inter["kept"]) and d["coverage"] >= 0.95
        assert row["status"] == "PASS" and code == 0
    else:  # the runner saw contention in too many rounds (a busy machine): the rule must not guess
        assert row["status"] == "INCONCLUSIVE" and "contended" in row["note"] and code == 1


def test_an_artifact_the_local_runtime_cannot_run_fails_whatever_allow_unmeasured_says(base: Path, tmp_path: Path,
                                                                                       capsys):
    """A truncated ONNX on the local cpu target was "not measured", which --allow-unmeasured waived:
    PASSED, exit 0, and the bundle shipped the broken file. On this machine there is no device to
    blame, so it is rejected: a FAIL row, left out of the bundle."""
    run_dir = copy_run(base, tmp_path / "run")
    onnx = next((run_dir / "stages").glob("export-*/artifacts/model.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:1000])
    code, out = run_cli(capsys, run_dir, TINY, "--force", "deploy", "--allow-unmeasured")
    report, junit, last = written(run_dir)
    assert_verdict_matches(code, report, junit, last, out)
    assert code == 1
    row = next(a for a in report["artifacts"] if a["runtime"] == "onnxruntime" and a["precision"] == "fp32")
    assert row["rejected"] and "cannot run it on this machine" in row["rejected_reason"]
    manifest = json.loads((run_dir / "bundle" / "cpu" / "manifest.json").read_text())
    assert all(a["path"] != "model.onnx" for a in manifest["artifacts"])


def test_the_bundle_ships_only_what_was_measured(base: Path, tmp_path: Path, capsys):
    """An artifact replaced after its (cached) measurement shipped in the bundle while the report kept
    the measured file's sha256: refused, one line, and a re-export mends it."""
    run_dir = copy_run(base, tmp_path / "run")
    onnx = next((run_dir / "stages").glob("export-*/artifacts/model.onnx"))
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 1
    onnx.write_bytes(bytes(data))
    code, _ = run_cli(capsys, run_dir, TINY)
    assert code == 2
    assert run_cli(capsys, run_dir, TINY, "--force", "export")[0] == 0


def test_a_run_that_stops_with_an_error_leaves_no_earlier_verdict_in_place(base: Path, tmp_path: Path, capsys,
                                                                           monkeypatch):
    """A run ending in an error (here the deploy stage) left the previous run's report.json,
    gates.junit.xml, last_run.json (exit_code 0) and bundle in place, and CI publishing them showed PASS.
    They move to previous/, and last_run.json says there is no verdict."""
    from dskd.errors import UserError
    from pipeline import ship_stages

    run_dir = copy_run(base, tmp_path / "run")
    assert run_cli(capsys, run_dir, TINY)[0] == 0

    def boom(ctx, folder):  # noqa: ANN001
        raise UserError("local: the runtime failed")

    monkeypatch.setattr(ship_stages.DEPLOY, "run", boom)
    code, _ = run_cli(capsys, run_dir, TINY, "--force", "deploy")
    assert code == 2
    for name in ("report.json", "gates.junit.xml", "bundle"):
        assert not (run_dir / name).exists() and (run_dir / "previous" / name).exists(), name
    last = json.loads((run_dir / "last_run.json").read_text())
    assert last["exit_code"] is None and last["passed"] is None
    assert json.loads((run_dir / "previous" / "last_run.json").read_text())["exit_code"] == 0
