"""Reports and baselines are schema-checked on load (docs/report-schema.md is the contract).

A bad `--baseline` (or `gate REPORT`) exits 2 with one line naming the file and the field,
before any training (`run`) or gate row (`gate`); nothing here trains.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pipeline.baseline import load_report, report_problems
from pipeline.cli import main


def valid_report() -> dict:
    """The smallest report the schema accepts (what `pipeline run` writes has more fields)."""
    return {
        "schema_version": 1,
        "recipe": {"name": "r", "source": "r.toml", "config": {"gates": {"min_top1": 50.0, "max_top1_regression": 1.0}}},
        "target": {"name": "cpu", "runtime": "onnxruntime", "measured": True, "reason": ""},
        "teacher": {"model": "resnet8", "top1": 90.0},
        "student": {"model": "resnet8", "method": "kd", "top1": 88.0, "params": 1000, "macs": 2000},
        "artifacts": [{"format": "onnx", "precision": "fp32", "runtime": "onnxruntime", "path": "stages/x/model.onnx",
                       "sha256": "ab", "size_bytes": 100, "top1": 88.0, "shipped": True, "measured": True,
                       "latency_ms": {"p50": 1.0, "p90": 1.2, "p99": 1.5}}],
        "gates": [{"name": "min_top1", "artifact": "onnxruntime/fp32", "metric": "top1", "value": 88.0,
                   "threshold": 50.0, "passed": True}],
        "passed": True,
    }


def _with(path: str, value) -> dict:
    rep = copy.deepcopy(valid_report())
    node = rep
    parts = path.replace("[0]", ".0").split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node[p]
    last = parts[-1]
    if value is KeyError:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return rep


# (file content, what the one error line must say)
BAD_BASELINES = {
    "json string": ('"report"', "not a report (the file holds a string, not an object)"),
    "json list": ("[1, 2]", "not a report (the file holds a list, not an object)"),
    "json number": ("3", "not a report (the file holds a number, not an object)"),
    "json null": ("null", "not a report (the file holds null, not an object)"),
    "not json": ('{"artifacts": [', "not valid JSON"),
    "NaN": (json.dumps(valid_report()).replace('"top1": 88.0', '"top1": NaN', 1), "NaN is not a JSON number"),
    "unrelated object": ('{"hello": 1}', "field 'schema_version' is missing"),
    "empty artifact": ('{"schema_version": 1, "artifacts": [{}]}', "field 'recipe' is missing"),
    "artifact without format": (json.dumps(_with("artifacts[0].format", KeyError)), "field 'artifacts[0].format' is missing"),
    "artifacts not a list": (json.dumps(_with("artifacts", {"a": 1})), "field 'artifacts' must be a list, got an object"),
    "artifact not an object": (json.dumps(_with("artifacts", [1])), "field 'artifacts[0]' must be an object, got a number"),
    "top1 a string": (json.dumps(_with("artifacts[0].top1", "88")), "field 'artifacts[0].top1' must be a number or null, got a string"),
    "latency a list": (json.dumps(_with("artifacts[0].latency_ms", [1])), "field 'artifacts[0].latency_ms' must be an object"),
    "p50 a bool": (json.dumps(_with("artifacts[0].latency_ms.p50", True)), "field 'artifacts[0].latency_ms.p50' must be a number or null, got true/false"),
    "path escapes": (json.dumps(_with("artifacts[0].path", "../../etc/passwd")), "field 'artifacts[0].path' must be a path inside the report's folder"),
    "absolute path": (json.dumps(_with("artifacts[0].path", "/etc/passwd")), "field 'artifacts[0].path' must be a path inside the report's folder"),
    "passed a string": (json.dumps(_with("passed", "yes")), "field 'passed' must be true or false, got a string"),
    "student a list": (json.dumps(_with("student", [])), "field 'student' must be an object, got a list"),
    "schema version 2": (json.dumps(_with("schema_version", 2)), "report schema_version 2 is not 1"),
}


def test_the_valid_report_is_valid():
    assert report_problems(valid_report()) == []


@pytest.mark.parametrize("case", list(BAD_BASELINES))
def test_bad_baseline_exits_2_naming_the_field_before_any_stage(case, tmp_path: Path, capsys):
    content, expected = BAD_BASELINES[case]
    base = tmp_path / "base" / "report.json"
    base.parent.mkdir()
    base.write_text(content)
    out = tmp_path / "run"
    for args in (["run", "--out", str(out), "--baseline", str(base)],
                 ["run", "--out", str(out), "--baseline", str(base.parent)]):  # the run folder works too
        capsys.readouterr()
        code = main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: --baseline {base}: ") and expected in err[0], err[0]
        assert not out.exists()  # before the lock, the teacher, anything
    good = tmp_path / "good.json"
    good.write_text(json.dumps(valid_report()))
    for args, prefix in ((["gate", str(good), "--baseline", str(base)], f"error: --baseline {base}: "),
                         (["gate", str(base)], f"error: {base}: ")):
        capsys.readouterr()
        code = main(args)
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(prefix) and expected in err[0], err
        assert "gate" not in captured.out  # no gate table was printed


def test_gate_on_valid_reports_still_works(tmp_path: Path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(valid_report()))
    worse = tmp_path / "worse.json"
    worse.write_text(json.dumps(_with("artifacts[0].top1", 80.0)))
    assert main(["gate", str(good), "--baseline", str(good)]) == 0
    assert main(["gate", str(worse), "--baseline", str(good)]) == 1  # an 8-point regression is a failed gate


def test_missing_or_special_baseline_paths(tmp_path: Path):
    import os

    from dskd.errors import UserError

    with pytest.raises(UserError, match="no report.json there"):
        load_report(str(tmp_path / "nope"))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="fifo.json: a FIFO, not a report.json"):  # never opened (it would block)
        load_report(str(fifo))
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    with pytest.raises(UserError, match="loop_a: a symlink loop, not a report.json"):
        load_report(str(tmp_path / "loop_a"))
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match="dangling: a dangling symlink, not a report.json"):
        load_report(str(tmp_path / "dangling"))
    assert load_report(None) == (None, None)
