"""Red-team findings on the trust paths (gates, baselines, stage files, formats, bundles), each
reproduced as a test that failed before its fix. Nothing here trains: reports, baselines and
bundles are built by hand from real files (a real tiny ONNX where a runtime must load one).

Exit codes: 0 pass, 1 a gate / verification failed, 2 bad input (one `error:` line).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dskd.errors import UserError
from pipeline.artifact_result import ArtifactResult, checked_summary
from pipeline.bundle_verify import BUNDLE_FORMAT, MANIFEST
from pipeline.cli_baseline import baseline_file_notes
from pipeline.gates import FAIL, OTHER_BASELINE_NOTE, PASS, evaluate_gates
from pipeline.recipe import GateConfig
from pipeline.stage import stable_hash
from tests.helpers.cli import run_main

REPO = Path(__file__).resolve().parents[1]
ONNX_BYTES = b"pretend onnx model bytes"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _report(p50: float = 1.0, path: str | None = "stages/x/model.onnx", sha: str | None = None) -> dict:
    """The smallest report `pipeline gate` / `--baseline` accept (docs/report-schema.md)."""
    return {
        "schema_version": 1,
        "recipe": {"name": "r", "config": {"gates": {"min_top1": 50.0, "max_top1_regression": 1.0,
                                                     "max_latency_regression": 0.05}}},
        "target": {"name": "cpu", "runtime": "onnxruntime", "measured": True, "reason": ""},
        "teacher": {"model": "resnet8", "top1": 90.0},
        "student": {"model": "resnet8", "method": "kd", "top1": 88.0, "params": 1000, "macs": 2000},
        "artifacts": [{"format": "onnx", "precision": "fp32", "runtime": "onnxruntime", "path": path,
                       "sha256": sha or _sha(ONNX_BYTES), "size_bytes": len(ONNX_BYTES), "top1": 88.0,
                       "shipped": True, "measured": True, "latency_ms": {"p50": p50, "p90": p50, "p99": p50}}],
        "gates": [],
        "passed": True,
    }


def _candidate_against(baseline: dict) -> dict:
    """A report whose latency was measured interleaved against `baseline` (12 rounds, ratio 1.0)."""
    rep = _report()
    rep["baseline"] = {"path": "base", "sha256": stable_hash(baseline), "recipe": "r"}
    rep["artifacts"][0]["baseline_comparison"] = {
        "ratio": 1.0, "rounds": 12, "candidate_p50_ms": [1.0] * 12, "baseline_p50_ms": [1.0] * 12,
        "kept": [True] * 12, "stopped": "decided"}
    return rep


def _latency_row(rows: list) -> object:
    (row,) = [r for r in rows if r.name == "max_latency_regression"]
    return row


# ---------------------------------------------------------------- gate REPORT --baseline OTHER
def test_gate_against_another_baseline_does_not_reuse_this_reports_rounds():
    """Before: `pipeline gate cand --baseline OTHER` judged OTHER on the rounds measured against
    the run's own baseline: a candidate 10x slower than OTHER passed (PASS, exit 0)."""
    measured_against = _report(p50=1.0)
    other = _report(p50=0.1)  # 10x faster than the candidate
    cand = _candidate_against(measured_against)
    gates = GateConfig(max_latency_regression=0.05)
    same = _latency_row(evaluate_gates(cand, gates, measured_against))
    assert same.status == PASS and "interleaved rounds" in same.note
    row = _latency_row(evaluate_gates(cand, gates, other))
    assert row.status == FAIL and not row.passed and row.value == pytest.approx(10.0)
    assert OTHER_BASELINE_NOTE in row.note


def test_gate_cli_on_another_baseline_exits_1_and_without_one_says_so(tmp_path: Path, capsys):
    base, other = tmp_path / "base.json", tmp_path / "other.json"
    base.write_text(json.dumps(_report(p50=1.0)))
    other.write_text(json.dumps(_report(p50=0.1, path=None)))
    cand = tmp_path / "cand.json"
    cand.write_text(json.dumps(_candidate_against(json.loads(base.read_text()))))
    assert run_main(["gate", str(cand), "--baseline", str(base)], capsys)[0] == 0
    code, out, err = run_main(["gate", str(cand), "--baseline", str(other)], capsys)
    assert code == 1 and OTHER_BASELINE_NOTE in out and err == ""
    code, out, _ = run_main(["gate", str(cand)], capsys)  # no baseline: regression rows cannot be judged
    assert code == 0 and "was gated against the baseline base" in out and "apply only with --baseline" in out


@pytest.mark.parametrize("policy", ["pass", "fail"])
def test_an_inconclusive_gate_is_never_summarised_as_plainly_passed_or_failed(policy):
    """Before: the verdict read "PASSED: all 1 gates passed" when only the policy passed an
    INCONCLUSIVE row, and "max_latency_regression failed" when the policy failed one."""
    from pipeline.report_view import verdict

    rep = _candidate_against(_report())
    rep["artifacts"][0]["baseline_comparison"]["kept"] = [False] * 12  # every round contended
    rep["artifacts"][0]["baseline_comparison"]["stopped"] = "budget"
    rows = evaluate_gates(rep, GateConfig(max_latency_regression=0.05, regression_inconclusive=policy), _report())
    row = _latency_row(rows)
    assert row.status == "INCONCLUSIVE" and row.passed is (policy == "pass")
    assert "rounds stopped: time budget spent" in row.note and f"counted as {policy}" in row.note
    rep["gates"], rep["passed"] = [r.to_dict() for r in rows], all(r.passed for r in rows)
    v = verdict(rep)
    if policy == "pass":
        assert v.passed and "1 inconclusive, counted as pass by gates.regression_inconclusive" in v.headline
    else:
        assert not v.passed and any("max_latency_regression INCONCLUSIVE" in d and "counted as fail" in d
                                    for d in v.details), v.details


# ---------------------------------------------------------------- run --baseline: its files
def _baseline_run(tmp_path: Path) -> tuple[Path, Path]:
    """A baseline run folder with report.json and its (real, hashed) artifact file."""
    folder = tmp_path / "base"
    art = folder / "stages" / "x" / "model.onnx"
    art.parent.mkdir(parents=True)
    art.write_bytes(ONNX_BYTES)
    (folder / "report.json").write_text(json.dumps(_report()))
    return folder, art


def _corrupt(art: Path) -> None:
    art.write_bytes(ONNX_BYTES[:5])


def _other_format(art: Path) -> None:
    art.write_bytes(b"an int8 model instead")


def _fifo(art: Path) -> None:
    art.unlink()
    os.mkfifo(art)


def _loop(art: Path) -> None:
    art.unlink()
    art.symlink_to(art.name)


def _folder(art: Path) -> None:
    art.unlink()
    art.mkdir()


BAD_BASELINE_FILES = {"corrupt": (_corrupt, "is not the file its report records"),
                      "other format": (_other_format, "is not the file its report records"),
                      "FIFO": (_fifo, "is a FIFO, not the artifact file"),
                      "symlink loop": (_loop, "cannot read it (Too many levels of symbolic links)"),
                      "folder": (_folder, "is a folder, not the artifact file")}


@pytest.mark.parametrize("case", list(BAD_BASELINE_FILES))
def test_run_refuses_a_baseline_whose_file_is_not_the_recorded_one_before_any_stage(case, tmp_path: Path, capsys):
    """Before: found after training, at the deploy stage (a FIFO as "does not exist"), or never (a
    symlink loop read as missing; a changed file reused the rounds cached for the unchanged report)."""
    folder, art = _baseline_run(tmp_path)
    tamper, expected = BAD_BASELINE_FILES[case]
    tamper(art)
    out_dir = tmp_path / "out"
    code, out, err = run_main(["run", "--out", str(out_dir), "--baseline", str(folder)], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: --baseline onnxruntime/fp32: ") and str(art) in lines[0]
    assert expected in lines[0], lines[0]
    assert not out_dir.exists()  # nothing ran, no folder made


def test_baseline_files_intact_pass_and_a_missing_one_is_said_once(tmp_path: Path):
    from pipeline.baseline import load_report

    folder, art = _baseline_run(tmp_path)
    assert baseline_file_notes(*load_report(str(folder))) == []
    dangling = folder / "stages" / "x" / "model.onnx"
    art.unlink()
    dangling.symlink_to("gone.onnx")  # a dangling link reads as missing, like no file
    (note,) = baseline_file_notes(*load_report(str(folder)))
    assert str(art) in note and "is missing" in note and "two reports' numbers" in note


def test_a_baseline_with_a_negative_latency_is_bad_input(tmp_path: Path, capsys):
    """Before: a baseline p50 of -1 ms gave a negative latency ratio: max_latency_regression PASS."""
    bad = _report(p50=1.0)
    bad["artifacts"][0]["latency_ms"]["p50"] = -1.0
    path = tmp_path / "report.json"
    path.write_text(json.dumps(bad))
    code, _, err = run_main(["gate", str(tmp_path / "cand.json"), "--baseline", str(path)], capsys)
    assert code == 2  # the candidate file is missing: still one line; now the real check:
    cand = tmp_path / "cand.json"
    cand.write_text(json.dumps(_report()))
    code, _, err = run_main(["gate", str(cand), "--baseline", str(path)], capsys)
    (line,) = err.splitlines()
    assert code == 2 and line.startswith(f"error: --baseline {path}: ")
    assert "field 'artifacts[0].latency_ms.p50' must be greater than 0, got -1.0" in line


# ---------------------------------------------------------------- typed stage results
def _deploy_row() -> dict:
    return ArtifactResult(format="onnx", precision="fp32", runtime="onnxruntime", path="a/model.onnx",
                          sha256="ab", size_bytes=100, top1=88.0,
                          latency_ms=_latency({"p50": 1.0, "p90": 1.1, "p99": 1.2})).to_json()


def _latency(d: dict):
    from pipeline.artifact_result import LatencyStats

    return LatencyStats(**d)


OUT_OF_RANGE = [  # (field path in the row, value, what the message says)
    (("latency_ms", "p50"), -1.0, "must be greater than 0, got -1.0"),
    (("latency_ms", "p99"), 0, "must be greater than 0, got 0"),
    (("latency_ms", "std"), -0.5, "must be at least 0, got -0.5"),
    (("top1",), 150.0, "must be between 0 and 100, got 150.0"),
    (("top1",), -3, "must be between 0 and 100, got -3"),
    (("agreement",), 100.5, "must be between 0 and 100, got 100.5"),
    (("size_bytes",), -5, "must be at least 0, got -5"),
    (("baseline_comparison", "candidate_p50_ms"), [1.0, -2.0], "must be greater than 0, got -2.0"),
    (("baseline_comparison", "ratio"), 0.0, "must be greater than 0, got 0.0"),
]


@pytest.mark.parametrize(("where", "value", "expected"), OUT_OF_RANGE,
                         ids=[".".join(w) + f"={v}" for w, v, _ in OUT_OF_RANGE])
def test_hand_edited_deploy_row_out_of_range_is_one_line_naming_the_field(where, value, expected):
    """Before: a p50 of -1 ms, a top-1 of 150 % or a size of -5 bytes passed every gate (exit 0)."""
    row = _deploy_row()
    row["baseline_comparison"] = {"ratio": 1.0, "candidate_p50_ms": [1.0, 1.0], "baseline_p50_ms": [1.0, 1.0]}
    node = row
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    with pytest.raises(UserError) as err:
        ArtifactResult.from_json(row, "OUT/stages/deploy-x/stage.json", "outputs.artifacts[0]")
    msg = str(err.value)
    field = "outputs.artifacts[0]." + ".".join(where) + ("[1]" if isinstance(value, list) else "")
    assert msg.startswith(f"OUT/stages/deploy-x/stage.json: field '{field}' {expected}"), msg
    assert "\n" not in msg and "--force deploy" in msg


def test_a_valid_deploy_row_reads_back_unchanged():
    row = _deploy_row()
    assert ArtifactResult.from_json(row).to_json() == row


@pytest.mark.parametrize(("summary", "expected"), [
    ({"top1": "x"}, "field 'outputs.summary.top1' must be a number or null, got a string"),
    ({"top1": -50.0}, "field 'outputs.summary.top1' must be between 0 and 100, got -50.0"),
    ({"top1": float("nan")}, "field 'outputs.summary.top1' must be a finite number, got nan"),
    ({"top1": 90.0, "params": -1}, "field 'outputs.summary.params' must be at least 0, got -1"),
    ({"top1": 90.0, "params": True}, "field 'outputs.summary.params' must be a whole number or null, got true/false"),
    ([], "field 'outputs.summary' must be an object, got a list"),
])
def test_hand_edited_training_summary_is_one_line_naming_the_field(summary, expected):
    """Before: the student's top-1 as a string was a traceback in the report stage (exit 1), and
    -50 made every max_top1_drop row PASS."""
    with pytest.raises(UserError) as err:
        checked_summary({"summary": summary}, "OUT/stages/distill-x/stage.json", "distill")
    assert str(err.value) == f"OUT/stages/distill-x/stage.json: {expected}; re-run with `--force distill` to train again"


def test_a_valid_training_summary_passes():
    s = {"model": "resnet8", "method": "ce", "top1": 91.5, "params": 78000, "macs": 1000}
    assert checked_summary({"summary": s}, "f", "distill") is s


# ---------------------------------------------------------------- export.formats / --formats
@pytest.mark.parametrize(("value", "expected"), [
    ('["bogus"]', "unknown format 'bogus'"),
    ('["-onnx"]', "unknown format '-onnx': did you mean 'onnx'?"),
    ('[""]', "no format given"),
    ('[" , "]', "no format given"),
])
def test_bad_export_formats_from_set_names_set_not_a_flag(value, expected, tmp_path: Path, capsys):
    """Before: `--set export.formats=["bogus"]` blamed the recipe file and a `--formats` flag the
    user never typed: `digits-smoke.toml: key 'export.formats': --formats: unknown format`."""
    code, _, err = run_main(["run", "--out", str(tmp_path / "o"), "--set", f"export.formats={value}"], capsys)
    (line,) = err.splitlines()
    assert code == 2 and line.startswith(f"error: --set: key 'export.formats': {expected}"), line
    assert "--formats" not in line and not (tmp_path / "o").exists()


def test_export_formats_flag_errors_still_name_the_flag():
    from export.formats import resolve_formats

    for bad in ("", ",", "bogus", "-onnx", "onnx;onnx-int8"):
        with pytest.raises(UserError, match=r"^--formats: "):
            resolve_formats(bad)
    assert [s.name for s in resolve_formats(" ONNX ,onnx,, onnx")] == ["onnx"]  # case, spaces, duplicates


# ---------------------------------------------------------------- bundles that cannot run
def _bundle(root: Path, files: dict[str, bytes], artifacts: list[dict]) -> Path:
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    manifest = {"format": BUNDLE_FORMAT, "target": "intel-cpu", "runtime": "openvino", "labels": ["a", "b"],
                "preprocessing": {"input_size": 8, "in_chans": 1, "mean": [0.5], "std": [0.25]},
                "artifacts": artifacts,
                "files": {n: {"sha256": _sha(d), "size_bytes": len(d)} for n, d in files.items()}}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


IR = {"format": "openvino", "precision": "fp32", "runtime": "openvino", "path": "model.fp32.xml",
      "files": ["model.fp32.xml", "model.fp32.bin"]}


def _verify(path: Path, capsys) -> tuple[int, str]:
    code, out, _ = run_main(["verify", str(path)], capsys)
    return code, out


def test_verify_intact_ir_bundle_passes(tmp_path: Path, capsys):
    files = {"infer.py": b"x", "model.fp32.xml": b"<xml/>", "model.fp32.bin": b"w"}
    code, out = _verify(_bundle(tmp_path / "b", files, [IR]), capsys)
    assert code == 0 and out.startswith("OK: 3 files checked"), out


@pytest.mark.parametrize("case", ["no infer.py", "no artifact", "IR without its .bin", "another runtime"])
def test_verify_fails_a_consistent_bundle_that_cannot_run(case, tmp_path: Path, capsys):
    """Before: each of these verified OK (exit 0) because every listed file matched; the bundle
    could not run (no infer.py; nothing to run; OpenVINO failing on the missing weights)."""
    files = {"infer.py": b"x", "model.fp32.xml": b"<xml/>", "model.fp32.bin": b"w"}
    arts = [dict(IR)]
    if case == "no infer.py":
        del files["infer.py"]
        expected = "problem: infer.py: not in the manifest; every bundle `pipeline run` writes has it"
    elif case == "no artifact":
        arts, files = [], {"infer.py": b"x"}
        expected = "problem: artifacts: none listed; infer.py has nothing to run"
    elif case == "another runtime":  # infer.py runs only the manifest runtime's artifacts
        arts[0]["runtime"] = "onnxruntime"
        expected = "problem: artifacts: none runs on the bundle's runtime 'openvino'"
    else:
        del files["model.fp32.bin"]
        arts[0]["files"] = ["model.fp32.xml"]
        expected = ("problem: artifacts[0] (openvino): model.fp32.bin is not in the manifest, and the runtime "
                    "needs it beside model.fp32.xml")
    code, out = _verify(_bundle(tmp_path / "b", files, arts), capsys)
    assert code == 1 and expected in out, out


def test_infer_on_an_ir_without_its_bin_is_one_error_line(tmp_path: Path, tiny_fp32: dict):
    """Before: a traceback from OpenVINO's read_model (exit 1). Runs the real infer.py and the
    real OpenVINO on a real IR converted from the tiny ONNX."""
    pytest.importorskip("openvino")
    import numpy as np
    import openvino as ov
    from PIL import Image

    b = tmp_path / "b"
    b.mkdir()
    ov.save_model(ov.convert_model(str(tiny_fp32["onnx"])), str(b / "model.fp32.xml"))
    (b / "model.fp32.bin").unlink()
    (b / "infer.py").write_bytes((REPO / "pipeline" / "bundle_infer.py").read_bytes())
    manifest = {"format": BUNDLE_FORMAT, "runtime": "openvino", "labels": list("abcde"),
                "preprocessing": {"input_size": 16, "in_chans": 3, "mean": [0.5] * 3, "std": [0.25] * 3},
                "artifacts": [IR], "files": {}}
    (b / MANIFEST).write_text(json.dumps({"format": BUNDLE_FORMAT, "labels": list("abcde"),
                                          "preprocessing": {"input_size": 16, "in_chans": 3, "mean": [0.5] * 3,
                                                            "std": [0.25] * 3},
                                          "artifacts": [IR], "files": {}}))
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    def infer() -> list[str]:
        proc = subprocess.run([sys.executable, str(b / "infer.py"), str(img)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
        assert "pipeline verify" in lines[0]
        return lines

    # a manifest without its `runtime`: before, a KeyError traceback (exit 1)
    assert infer()[0].startswith(f"error: {b / MANIFEST}: not a manifest this infer.py can read (KeyError: ")
    outside = copy.deepcopy(manifest)  # an edited path leading out of the bundle: refused, not loaded
    outside["artifacts"][0]["path"] = "../b/model.fp32.xml"
    (b / MANIFEST).write_text(json.dumps(outside))
    assert infer()[0].startswith("error: manifest.json: artifact path '../b/model.fp32.xml' is not a file name")
    (b / MANIFEST).write_text(json.dumps(manifest))
    # infer.py checks the files it loads against manifest.json first (tests/test_bundle_infer_trust.py):
    # this manifest records none of them, so it stops there, before OpenVINO reads the IR
    assert infer()[0].startswith("error: model.fp32.xml: manifest.json `files` records no sha256 and size")


def test_report_fixture_is_unchanged_by_the_tests():
    """The module's base report builder returns a fresh dict each time (tests mutate theirs)."""
    assert _report() == copy.deepcopy(_report())


def test_a_listed_format_the_target_cannot_run_is_said_not_silently_dropped():
    """Before: `--set export.formats=["openvino","onnx"]` on target cpu built the IR, then left it
    out of the report and the bundle without a word. Listing a second target's format stays
    allowed (switching targets then re-runs only deploy), but now a note says so."""
    from pipeline.recipe import load_recipe
    from pipeline.run import formats_not_shipped

    def notes(formats: list[str], target: str) -> list[str]:
        rec = load_recipe(None, {"export.formats": formats, "target.name": target},
                          {"export.formats": "--set"})
        return formats_not_shipped(rec)

    (line,) = notes(["openvino", "onnx"], "cpu")
    assert line.startswith("note: --set: key 'export.formats': openvino (openvino) is built but not measured")
    assert "target cpu runs onnx, onnx-int8" in line
    assert notes(["onnx", "onnx-int8"], "cpu") == [] and notes(["openvino", "onnx"], "intel-cpu") == []
    assert notes(["tensorrt-int8", "onnx-int8"], "jetson-orin") == []  # the engine's QDQ source
    assert notes(["bogus"], "cpu") == []  # check_recipe reports that one, naming the key


@pytest.mark.parametrize(("value", "shown"), [("no", '"no"'), (0, "0"), (None, "null"), ([], "list")])
def test_hand_edited_target_available_must_be_a_boolean(value, shown):
    """Before: `"target_available": "no"` was read with bool() and the report said "measured"."""
    from pipeline.run import checked_target_available

    with pytest.raises(UserError) as err:
        checked_target_available({"target_available": value}, "OUT/stages/deploy-x/stage.json")
    assert str(err.value) == ("OUT/stages/deploy-x/stage.json: field 'outputs.target_available' must be true "
                              f"or false, got {shown}; re-run with `--force deploy`")
    assert checked_target_available({"target_available": False}, "f") is False
