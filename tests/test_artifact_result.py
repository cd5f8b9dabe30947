"""The typed artifact record (pipeline.artifact_result): JSON only at the stage boundary.

A real deploy row (a real ONNX Runtime measurement of the `tiny_fp32` model, its per-image
record, and interleaved rounds from the real round loop) survives the deploy stage's JSON and
gives the same report.json row, byte for byte, as the dict code it replaced (kept below as the
specification). A hand-edited or corrupt deploy stage.json is one line naming the file and the
field. The gates read the record's typed fields (records without `.get` go through them).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dskd.errors import UserError
from pipeline.artifact_result import (
    ArtifactResult,
    BaselineComparison,
    LatencyStats,
    results_from_stage,
)
from pipeline.gates import evaluate_gates, not_measured_summary, paired_latency_row
from pipeline.recipe import GateConfig, Recipe, TargetConfig, load_recipe
from pipeline.regression_stats import interleaved_rounds
from pipeline.run import deploy_results, report_artifact
from pipeline.ship_stages import _measure, _record, _with_per_image, deploy_complete, rejected_rows
from pipeline.stage import STAGE_FILE, RunContext, StageResult

QUICK = {"min_iters": 20, "min_seconds": 0.2, "warmup_seconds": 0.05}

# report.json's artifact row as pipeline/run.py built it from the deploy stage's dict before the
# record existed: the byte-compatibility contract of docs/report-schema.md.
LEGACY_KEYS = ("format", "precision", "runtime", "path", "sha256", "size_bytes", "top1", "agreement",
               "latency_ms", "shipped", "where", "warnings", "latency_note", "baseline_comparison",
               "latency_by_batch", "latency_samples_ms", "prepared", "engine_build", "runtime_config",
               "throughput", "preprocess", "per_image", "per_image_note")


def legacy_report_row(a: dict[str, Any]) -> dict[str, Any]:
    row = {k: a.get(k) for k in LEGACY_KEYS}
    row["measured"] = bool(a.get("measured"))
    if not row["measured"]:
        row["not_measured_reason"] = a.get("not_measured_reason")
    row["parity"] = a.get("parity")
    if a.get("rejected"):
        row["rejected"], row["rejected_reason"] = True, a.get("rejected_reason")
    return row


def _rounds() -> dict[str, Any]:
    """A real interleaved record (the gate's own round loop) with constructed p50s and CPU shares."""
    p50 = {"candidate": iter([1.00, 1.02, 0.99, 1.01, 1.00, 1.03, 1.01, 0.98]),
           "baseline": iter([1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.00])}
    tick = iter(range(1000))

    def one(side: str) -> tuple[float, bool, dict[str, Any]]:
        return next(p50[side]), False, {"cpu_share": 0.98, "others_cpu": 0.1, "attempts": 1}

    return interleaved_rounds(one, 0.10, 60.0, clock=lambda: float(next(tick)))


@pytest.fixture(scope="module")
def real_row(tiny_fp32: dict) -> ArtifactResult:
    """A deploy row as `_deploy_run` makes it, from a real measurement of a real ONNX model."""
    ctx = SimpleNamespace(recipe=Recipe(target=TargetConfig(name="cpu", **QUICK)), options={})
    m = _measure(ctx, tiny_fp32["onnx"], "cpu", "fp32", tiny_fp32["eval"], None, [1])
    start = ArtifactResult(format="onnx", precision="fp32", runtime="onnxruntime", path="stages/x/tiny.onnx",
                           sha256="ab" * 32, size_bytes=tiny_fp32["onnx"].stat().st_size, shipped=True,
                           measured=False, parity={"images": 64, "top1_agreement": 1.0, "passed": True,
                                                   "tolerance": {"min_top1_agreement": 0.99}})
    row = _with_per_image(_record(start, m), tiny_fp32["onnx"], m, tiny_fp32["eval"])
    comparison = {"ratio": 1.01, **_rounds()}
    return row.replace(baseline_comparison=BaselineComparison.from_rounds(comparison))


def _stage(tmp_path: Path, rows: list[Any], text: str | None = None) -> tuple[dict[str, Any], str]:
    """A deploy stage.json holding `rows` (or `text`), read back as the stage framework reads it."""
    path = tmp_path / STAGE_FILE
    path.write_text(text if text is not None else json.dumps({"outputs": {"artifacts": rows}}))
    return json.loads(path.read_text())["outputs"], str(path)


# ------------------------------------------------------------------ round trip, byte-compatible
def test_a_real_row_round_trips_through_the_stage_file(real_row: ArtifactResult, tmp_path: Path):
    assert real_row.measured and real_row.top1 is not None and real_row.latency_ms is not None
    assert real_row.per_image is not None and real_row.per_image["n"] > 0  # the per-image record was taken
    assert real_row.baseline_comparison is not None and real_row.baseline_comparison.sides
    outputs, source = _stage(tmp_path, [real_row.to_json()])
    (back,) = results_from_stage(outputs, source)
    assert back == real_row
    assert back.to_json() == real_row.to_json()
    assert json.dumps(back.to_report_row()) == json.dumps(real_row.to_report_row())


def test_report_row_is_the_one_the_dict_code_wrote(real_row: ArtifactResult):
    stage_row = json.loads(json.dumps(real_row.to_json()))
    want = legacy_report_row(stage_row)
    assert json.dumps(real_row.to_report_row()) == json.dumps(want)  # same keys, order and values
    assert json.dumps(report_artifact(stage_row)) == json.dumps(want)  # the old entry point, from a dict


def test_rows_of_every_kind_keep_their_report_row(tmp_path: Path):
    """Not measured, rejected, a TensorRT format not built here: each report row as before."""
    parity = {"images": 64, "top1_agreement": 0.5, "tolerance": {"min_top1_agreement": 0.9}, "passed": False}
    old_dicts = [
        {"format": "onnx", "precision": "fp32", "runtime": "onnxruntime", "path": "a.onnx", "sha256": "x",
         "size_bytes": 10, "parity": None, "shipped": True, "measured": False, "top1": None, "latency_ms": None,
         "not_measured_reason": "no device"},
        {"format": "onnx-int8", "precision": "int8", "runtime": "onnxruntime", "path": None, "sha256": None,
         "size_bytes": None, "shipped": True, "measured": False, "top1": None, "latency_ms": None,
         "agreement": 50.0, "not_measured_reason": "rejected by the export parity check: bad",
         "rejected": True, "rejected_reason": "bad", "parity": parity},
        {"format": "tensorrt-fp16", "precision": "fp16", "runtime": "tensorrt", "path": None, "sha256": None,
         "size_bytes": None, "shipped": True, "measured": False, "top1": None, "latency_ms": None,
         "not_measured_reason": "no device; not built here", "parity": None, "prepared": ["stages/o/kit.onnx"]},
        # an older deploy row: a comparison with only ratio and rounds, latency without mean/std/cov
        {"format": "openvino", "precision": "fp32", "runtime": "openvino", "path": "m.xml", "sha256": "y",
         "size_bytes": 12, "shipped": True, "measured": True, "top1": 90, "latency_ms": {"p99": 3, "p50": 1.0,
                                                                                       "p90": 2.5},
         "baseline_comparison": {"rounds": 3, "ratio": 1.1}, "where": "local"},
    ]
    outputs, source = _stage(tmp_path, old_dicts)
    for old, rec in zip(old_dicts, results_from_stage(outputs, source), strict=True):
        assert json.dumps(rec.to_report_row()) == json.dumps(legacy_report_row(old))


# ------------------------------------------------------------------ a corrupt stage file
def _corrupt(row: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    row = json.loads(json.dumps(row))
    *parents, last = dotted.split(".")
    node = row
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return row


@pytest.mark.parametrize("dotted, value, says", [
    ("top1", "88.1", "field 'outputs.artifacts[1].top1' must be a number or null, got a string"),
    ("measured", KeyError, "field 'outputs.artifacts[1].measured' is missing"),
    ("shipped", None, "field 'outputs.artifacts[1].shipped' must not be null"),
    ("size_bytes", 10.5, "field 'outputs.artifacts[1].size_bytes' must be a whole number, got 10.5"),
    ("latency_ms", [1.0], "field 'outputs.artifacts[1].latency_ms' must be an object or null, got a list"),
    ("latency_ms.p90", KeyError, "field 'outputs.artifacts[1].latency_ms.p90' is missing"),
    ("latency_ms.p50", True, "field 'outputs.artifacts[1].latency_ms.p50' must be a number or null, got true/false"),
    ("warnings", "high CoV", "field 'outputs.artifacts[1].warnings' must be a list or null, got a string"),
    ("baseline_comparison.kept", [1, 0], "field 'outputs.artifacts[1].baseline_comparison.kept[0]' must be true or false"),
    ("baseline_comparison.candidate_p50_ms", ["1.0"],
     "field 'outputs.artifacts[1].baseline_comparison.candidate_p50_ms[0]' must be a number, got a string"),
    ("per_image", "yes", "field 'outputs.artifacts[1].per_image' must be an object or null, got a string"),
])
def test_a_hand_edited_stage_file_is_one_line_naming_the_field(real_row: ArtifactResult, tmp_path: Path,
                                                                dotted: str, value: Any, says: str):
    good = real_row.to_json()
    outputs, source = _stage(tmp_path, [good, _corrupt(good, dotted, value)])
    with pytest.raises(UserError) as err:
        results_from_stage(outputs, source)
    msg = str(err.value)
    assert msg.startswith(f"{source}: {says}") and "--force deploy" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("where, bad", [("top1", "NaN"), ("latency_ms.p99", "Infinity"),
                                        ("latency_by_batch", '[{"batch_size": 1, "p50_ms": NaN}]')])
def test_nan_anywhere_in_a_row_is_refused(real_row: ArtifactResult, tmp_path: Path, where: str, bad: str):
    row = real_row.to_json()
    token = "__BAD__"
    text = json.dumps({"outputs": {"artifacts": [_corrupt(row, where, token)]}}).replace(f'"{token}"', bad)
    outputs, source = _stage(tmp_path, [], text)  # json.loads reads NaN/Infinity, as the stage framework does
    with pytest.raises(UserError, match=r"must be a finite number, got (nan|inf)") as err:
        results_from_stage(outputs, source)
    assert f"field 'outputs.artifacts[0].{where.split('.')[0]}" in str(err.value)


def test_outputs_without_a_list_of_rows(tmp_path: Path):
    outputs, source = _stage(tmp_path, [], '{"outputs": {"artifacts": {"a": 1}}}')
    with pytest.raises(UserError, match=r"field 'outputs.artifacts' must be a list, got an object"):
        results_from_stage(outputs, source)
    with pytest.raises(UserError, match=r"outputs.artifacts\[0\]' must be an object, got a number"):
        results_from_stage({"artifacts": [3]}, source)


def test_the_gate_and_report_stages_read_the_deploy_stage_through_the_record(real_row: ArtifactResult,
                                                                             tmp_path: Path):
    """`deploy_results` is what both stages call: it names the deploy stage's own stage.json."""
    folder = tmp_path / "stages" / "deploy-0123456789ab"
    outputs = {"artifacts": [_corrupt(real_row.to_json(), "top1", "ninety")], "target_available": True}
    ctx = RunContext(run_dir=tmp_path, recipe=None,
                     results={"deploy": StageResult("deploy", "k", folder, outputs, True, 0.0)})
    with pytest.raises(UserError, match=rf"^{folder / STAGE_FILE}: field 'outputs.artifacts\[0\].top1'"):
        deploy_results(ctx)
    ctx.results["deploy"].outputs = {"artifacts": [real_row.to_json()], "target_available": True}
    assert deploy_results(ctx) == [real_row]
    assert deploy_complete(ctx.out("deploy"))
    unmeasured = real_row.replace(measured=False, top1=None, latency_ms=None, not_measured_reason="device down")
    assert not deploy_complete({"artifacts": [unmeasured.to_json()], "target_available": True})


# ------------------------------------------------------------------ the gates read typed fields
def _report(*records: ArtifactResult) -> dict[str, Any]:
    return {"artifacts": list(records), "student": {"top1": 90.0}, "target": {"name": "cpu", "reason": ""}}


def test_gates_judge_the_records_fields(real_row: ArtifactResult):
    """Records have no `.get`: a gate that read a dict key would fail here. Each verdict moves
    with the typed field it judges."""
    gates = GateConfig(min_top1=50.0, max_top1_drop=100.0, max_latency_ms=1000.0, max_size_mb=5.0)
    good = real_row.replace(top1=80.0, latency_ms=LatencyStats(p50=1.0, p90=2.0, p99=3.0),
                            size_bytes=2_000_000, baseline_comparison=None)
    rows = {r.name: r for r in evaluate_gates(_report(good), gates)}
    assert {n: r.status for n, r in rows.items()} == {
        "parity": "PASS", "min_top1": "PASS", "max_top1_drop": "PASS", "max_latency_ms": "PASS", "max_size_mb": "PASS"}
    assert (rows["min_top1"].value, rows["max_latency_ms"].value, rows["max_size_mb"].value) == (80.0, 1.0, 2.0)
    bad = good.replace(top1=40.0, latency_ms=LatencyStats(p50=2000.0, p90=2000.0, p99=2000.0), size_bytes=6_000_000)
    rows = {r.name: r for r in evaluate_gates(_report(bad), gates)}
    assert [rows[n].status for n in ("min_top1", "max_latency_ms", "max_size_mb")] == ["FAIL"] * 3
    p99 = GateConfig(max_latency_ms=2.5, latency_percentile="p99")
    assert next(r for r in evaluate_gates(_report(good), p99) if r.name == "max_latency_ms").value == 3.0


def test_gates_give_the_same_rows_from_records_and_from_report_rows(real_row: ArtifactResult):
    """`pipeline run` gates the records; `pipeline gate REPORT` gates report.json's rows: same verdicts."""
    gates = load_recipe("digits-smoke", {"gates.max_latency_regression": 0.1, "gates.max_top1_regression": 1.0}).gates
    unmeasured = ArtifactResult(format="openvino", precision="int8", runtime="openvino", shipped=True,
                                measured=False, top1=None, not_measured_reason="no device")
    records = [real_row, unmeasured]
    rows = json.loads(json.dumps([r.to_report_row() for r in records]))
    baseline = {"artifacts": json.loads(json.dumps([real_row.replace(baseline_comparison=None).to_report_row()]))}
    typed = [r.to_dict() for r in evaluate_gates(_report(*records), gates, baseline)]
    from_rows = [r.to_dict() for r in evaluate_gates(dict(_report(), artifacts=rows), gates, baseline)]
    assert typed == from_rows
    names = {(r["name"], r["status"]) for r in typed}
    assert ("max_latency_regression", "PASS") in names and ("max_top1_regression", "PASS") in names
    assert ("min_top1", "NOT MEASURED") in names
    assert not_measured_summary(_report(*records), False) == not_measured_summary(dict(_report(), artifacts=rows),
                                                                                  False)


def test_a_renamed_report_key_is_not_silently_read_as_missing():
    """A row whose `top1` holds text (a renamed or hand-edited field) is refused, not gated as null."""
    row = {"format": "onnx", "precision": "fp32", "runtime": "onnxruntime", "top1": "high"}
    with pytest.raises(UserError, match=r"field 'artifacts\[0\].top1' must be a number or null, got a string"):
        evaluate_gates(dict(_report(), artifacts=[row]), GateConfig(min_top1=50.0))
    with pytest.raises(UserError, match=r"field 'artifacts\[0\].runtime' is missing"):
        evaluate_gates(dict(_report(), artifacts=[{"format": "onnx", "precision": "fp32"}]), GateConfig())


def test_a_report_read_back_has_every_artifact_field_typed(real_row: ArtifactResult, tmp_path: Path):
    """`pipeline gate REPORT` / `--baseline`: fields past the report schema's core are typed too."""
    from pipeline.baseline import load_report

    report = {"schema_version": 1, "recipe": {"name": "r"}, "target": {"name": "cpu"},
              "teacher": {"model": "t", "top1": 90.0},
              "student": {"model": "s", "method": "kd", "top1": 89.0, "params": 1, "macs": 1},
              "artifacts": [real_row.to_report_row()], "gates": [], "passed": True}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert load_report(str(path))[0] == report
    report["artifacts"][0]["baseline_comparison"]["kept"] = "all"
    path.write_text(json.dumps(report))
    with pytest.raises(UserError) as err:
        load_report(str(path))
    assert str(err.value) == (f"--baseline {path}: not a valid report: field 'artifacts[0].baseline_comparison.kept' "
                              "must be a list or null, got a string; pass a report.json written by `pipeline run`")


def test_paired_latency_row_still_takes_the_benchmarks_plain_mapping():
    """bench/latency_gate_power.py passes {runtime, precision, baseline_comparison} and reads
    status, passed and decision."""
    gates = GateConfig(max_latency_regression=0.1)
    rec = _rounds()
    row = paired_latency_row({"runtime": "onnxruntime", "precision": "fp32", "baseline_comparison": rec}, gates)
    assert row is not None and row.artifact == "onnxruntime/fp32"
    assert row.status == "PASS" and row.passed and row.decision is not None and row.decision["samples"] == rec["rounds"]
    typed = paired_latency_row(ArtifactResult(format="onnx", precision="fp32", runtime="onnxruntime",
                                              baseline_comparison=BaselineComparison.from_rounds(rec)), gates)
    assert typed == row


def test_rejected_rows_are_records(tmp_path: Path):
    """A parity-rejected export becomes a record that fails the parity gate with the check's numbers."""
    skipped = {"format": "onnx-int8", "reason": "agreement 0.5 < 0.9", "rejected": True,
               "parity": {"top1_agreement": 0.5, "passed": False, "tolerance": {"min_top1_agreement": 0.9}}}
    outs = {"export": {"skipped": []}, "optimize": {"skipped": [skipped]}}
    ctx = SimpleNamespace(recipe=load_recipe("digits-smoke", {}), log=lambda msg: None, out=outs.__getitem__)
    (rej,) = rejected_rows(ctx)
    assert isinstance(rej, ArtifactResult) and rej.rejected and rej.agreement == 50.0 and not rej.measured
    (row,) = [r for r in evaluate_gates(_report(rej), GateConfig()) if r.name == "parity"]
    assert (row.status, row.value, row.threshold) == ("FAIL", 50.0, 90.0)


@pytest.mark.slow
def test_pipeline_run_on_a_hand_edited_deploy_stage_is_exit_2_then_force_deploy_mends_it(tmp_path: Path, capsys):
    """The whole CLI: a cached deploy stage.json with a wrong type is one `error:` line naming the
    file and field (exit 2, no traceback), and the fix it names works."""
    from pipeline.cli import main
    from tests.helpers.cli import set_args
    from tests.helpers.runs import SMALL, stage_dir

    overrides = {**SMALL, "data.limit_per_class": 20, "export.formats": ["onnx"], "export.calib_size": 50,
                 "target.min_iters": 10, "target.min_seconds": 0.05, "target.warmup_seconds": 0.01}
    args = ["run", "--out", str(tmp_path / "run"), *set_args(overrides)]
    assert main(args) in (0, 1)
    folder = stage_dir(tmp_path / "run", "deploy")
    assert folder is not None
    stage = folder / STAGE_FILE
    doc = json.loads(stage.read_text())
    doc["outputs"]["artifacts"][0]["measured"] = "yes"
    stage.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {stage}: field 'outputs.artifacts[0].measured' must be true or false, got a string; "
        "re-run with `--force deploy` to measure again"]
    assert main([*args, "--force", "deploy"]) in (0, 1)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["artifacts"][0]["measured"] is True
