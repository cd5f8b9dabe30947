"""max_top1_regression judged by McNemar's pairing on the same test images (issue 18, item 4).

A report keeps, per measured artifact, which test images it classified correctly (`per_image`);
with a baseline that has the same record the gate decides on the images where the two models
disagree, with an exact interval, and falls back to the plain top-1 difference (saying why)
when the baseline is an older report, another test set, or a record that does not match its top-1.
Constructed reports for the rule; one tiny real run (digits, 1 epoch) for the record and the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.gates import evaluate_gates
from pipeline.per_image import fingerprint, read_record, record
from pipeline.recipe import load_recipe
from pipeline.regression_stats import decode_correct, encode_correct, paired_top1_decision

N = 10_000
X = np.zeros((4, 1, 2, 2), dtype=np.uint8)  # the "test set" both records were measured on
Y = np.arange(4)


def _artifact(correct: np.ndarray, **extra) -> dict:
    top1 = round(100.0 * correct.mean(), 4)
    rec = {"encoding": "packbits-base64", "n": int(correct.size), "correct": encode_correct(correct.tolist()),
           "test_set_sha256": fingerprint(X, Y)}
    return {"format": "onnx", "precision": "fp32", "runtime": "onnxruntime", "shipped": True, "measured": True,
            "top1": top1, "latency_ms": {"p50": 1.0}, "size_bytes": 1000, "per_image": rec, **extra}


def _pair(losses: int, gains: int, wrong_both: int = 800) -> tuple[np.ndarray, np.ndarray]:
    """Baseline and candidate correctness on N images: `losses` only the baseline got right,
    `gains` only the candidate, `wrong_both` neither."""
    base = np.ones(N, dtype=bool)
    cand = np.ones(N, dtype=bool)
    cand[:losses] = False
    base[losses:losses + gains] = False
    both = slice(losses + gains, losses + gains + wrong_both)
    base[both] = cand[both] = False
    return base, cand


def _row(base_art: dict, cand_art: dict, tol: float = 0.5, policy: str = "fail"):
    gates = load_recipe("digits-smoke", {"gates.max_top1_regression": tol,
                                         "gates.regression_inconclusive": policy}).gates
    report = {"artifacts": [cand_art], "student": {"top1": None}, "target": {"name": "cpu"}}
    rows = evaluate_gates(report, gates, {"artifacts": [base_art]})
    return next(r for r in rows if r.name == "max_top1_regression")


@pytest.mark.parametrize("losses, gains, tol, policy, status, passed", [
    (60, 30, 0.5, "fail", "PASS", True),            # 0.3 points lost, little churn: surely within 0.5
    (160, 30, 0.5, "fail", "FAIL", False),          # 1.3 points lost, little churn: surely beyond 0.5
    (1530, 1500, 0.5, "fail", "INCONCLUSIVE", False),  # 0.3 points amid heavy churn: no evidence either way
    (1530, 1500, 0.5, "pass", "INCONCLUSIVE", True),
    (60, 30, 0.0, "fail", "FAIL", False),           # any drop: 0.3 points is evidence of one (p ~ 0.002)
])
def test_paired_rule_decides_on_the_discordant_images(losses, gains, tol, policy, status, passed):
    base, cand = _pair(losses, gains)
    row = _row(_artifact(base), _artifact(cand), tol, policy)
    assert (row.status, row.passed) == (status, passed), row.note
    expected = paired_top1_decision(base.tolist(), cand.tolist(), tol)
    assert row.decision == expected.to_dict()
    assert row.value == pytest.approx(100.0 * (losses - gains) / N)
    assert row.decision["low"] <= row.value <= row.decision["high"]
    assert f"{losses} lost, {gains} gained" in row.note and "paired on 10000 images" in row.note
    assert ("regression_inconclusive" in row.note) == (status == "INCONCLUSIVE")


def test_the_plain_threshold_alone_would_have_judged_otherwise():
    """The point of pairing: 0.3 points amid heavy churn passes a 0.5 threshold on the numbers
    alone, but is not evidence of being within it; with little churn it is."""
    base, cand = _pair(1530, 1500)
    plain = _row(_artifact(base, per_image=None), _artifact(cand))
    assert plain.status == "PASS" and "plain threshold" in plain.note
    assert _row(_artifact(base), _artifact(cand)).status == "INCONCLUSIVE"


def test_falls_back_to_the_plain_threshold_and_says_why():
    base, cand = _pair(160, 30)
    cases = {
        "an older report": _artifact(base, per_image=None),
        "does not match top-1": _artifact(base, top1=99.9),
        "unreadable": _artifact(base, per_image={**_artifact(base)["per_image"], "correct": "!!"}),
        "unknown form": _artifact(base, per_image={"encoding": "zip", "n": 3, "correct": ""}),
    }
    for why, base_art in cases.items():
        row = _row(base_art, _artifact(cand))
        assert row.decision is None and "plain threshold, not paired" in row.note and why in row.note, (why, row.note)
        assert row.value == pytest.approx(round(base_art["top1"] - _artifact(cand)["top1"], 4))
        assert row.passed == (row.value <= 0.5)
    # another test set: the two top-1s are of different images, so no verdict either way (was: the plain
    # difference, which passed a candidate measured on 100 easy images against a baseline on 1,000)
    other = _artifact(base, per_image={**_artifact(base)["per_image"], "test_set_sha256": "0" * 64})
    row = _row(other, _artifact(cand))
    assert row.status == "INCONCLUSIVE" and not row.passed and "another test set" in row.note, row.note
    mine = _artifact(cand, per_image=None, per_image_note="measured on pi@host: no per-image predictions")
    row = _row(_artifact(base), mine)
    assert row.decision is None and "measured on pi@host" in row.note


def test_record_and_read_back():
    correct = np.array([True, False, True, True])
    rec = record(correct, X, Y, "ab" * 32)
    assert rec["n"] == 4 and rec["predictions_sha256"] == "ab" * 32 and rec["test_set_sha256"] == fingerprint(X, Y)
    assert read_record(rec, 75.0) == ([True, False, True, True], "")
    assert read_record(rec, 50.0)[0] is None
    assert fingerprint(X, Y) != fingerprint(X, Y[::-1])
    assert decode_correct(rec["correct"], 4) == correct.tolist()


def test_old_and_new_reports_load_as_baselines(tmp_path: Path):
    from dskd.errors import UserError
    from pipeline.baseline import load_report

    base = _minimal_report()
    for name, art_extra in (("old", {}), ("new", {"per_image": _artifact(np.ones(4, bool))["per_image"]}),
                            ("null", {"per_image": None})):
        rep = json.loads(json.dumps(base))
        rep["artifacts"][0].update(art_extra)
        p = tmp_path / name / "report.json"
        p.parent.mkdir()
        p.write_text(json.dumps(rep))
        loaded, _ = load_report(str(p))
        assert loaded["artifacts"][0].get("per_image") == art_extra.get("per_image")
    rep = json.loads(json.dumps(base))
    rep["artifacts"][0]["per_image"] = "1010"
    p = tmp_path / "bad" / "report.json"
    p.parent.mkdir()
    p.write_text(json.dumps(rep))
    with pytest.raises(UserError, match=r"artifacts\[0\]\.per_image"):
        load_report(str(p))


def _minimal_report() -> dict:
    return {"schema_version": 1, "recipe": {"name": "r"}, "target": {"name": "cpu"},
            "teacher": {"model": "t", "top1": 90.0},
            "student": {"model": "s", "method": "kd", "top1": 90.0, "params": 1, "macs": 1},
            "artifacts": [{"format": "onnx", "precision": "fp32", "runtime": "onnxruntime", "path": "m.onnx",
                           "sha256": "0" * 64, "size_bytes": 1, "top1": 100.0,
                           "latency_ms": {"p50": 1.0, "p90": 1.0, "p99": 1.0}}],
            "gates": [], "passed": True}


# ------------------------------------------------------------------ a real tiny run
TINY = {
    "data.limit_per_class": 20,
    "teacher.model": "resnet8", "teacher.epochs": 1,
    "student.model": "resnet8", "student.epochs": 1, "student.method": "kd", "student.options": {},
    "export.formats": ["onnx"], "export.calib_size": 50,
    "target.min_iters": 10, "target.min_seconds": 0.05, "target.warmup_seconds": 0.01,
    "gates.min_top1": 0.0, "gates.max_top1_drop": 100.0,
}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    from pipeline.run import execute

    run_dir = tmp_path_factory.mktemp("accuracy") / "base"
    execute(load_recipe("digits-smoke", TINY), run_dir)
    return run_dir


def test_a_real_run_keeps_which_images_each_artifact_got_right(real_run: Path):
    report = json.loads((real_run / "report.json").read_text())
    eval_npz = next((real_run / "stages").glob("deploy-*/eval.npz"))
    with np.load(eval_npz) as ev:
        x, y = ev["x"], ev["y"]
    fp32 = next(a for a in report["artifacts"] if a["shipped"])
    rec = fp32["per_image"]
    assert rec["n"] == y.size and rec["test_set_sha256"] == fingerprint(x, y)
    bits, why = read_record(rec, fp32["top1"])
    assert why == "" and 100.0 * sum(bits) / len(bits) == pytest.approx(fp32["top1"], abs=1e-3)
    # the bits are the ONNX model's own answers on those images
    import onnxruntime as ort

    sess = ort.InferenceSession(str(real_run / fp32["path"]), providers=["CPUExecutionProvider"])
    with np.load(eval_npz) as ev:
        mean, std = ev["mean"].reshape(1, -1, 1, 1), ev["std"].reshape(1, -1, 1, 1)
    logits = sess.run(None, {sess.get_inputs()[0].name: ((x / 255.0 - mean) / std).astype(np.float32)})[0]
    assert bits == (logits.argmax(axis=1) == y).tolist()


def test_gate_command_pairs_a_real_run_with_its_baseline(real_run: Path, tmp_path: Path, capsys):
    """`pipeline gate REPORT --baseline BASE`: the same run as its own baseline is paired and
    passes with no discordant image; a baseline whose record says it got 3 more images right
    (top-1 edited to match) is a paired regression of 3 images; an old baseline without the
    record falls back to the plain difference, with the reason in the note."""
    from pipeline.cli import main

    report = json.loads((real_run / "report.json").read_text())
    fp32_i = next(i for i, a in enumerate(report["artifacts"]) if a["shipped"])
    fp32 = report["artifacts"][fp32_i]
    bits = decode_correct(fp32["per_image"]["correct"], fp32["per_image"]["n"])
    wrong = [i for i, b in enumerate(bits) if not b][:3]
    assert len(wrong) == 3, "the 1-epoch model got almost every image right: pick another seed"

    def gate(base: dict) -> tuple[int, dict]:
        path = tmp_path / f"b{len(list(tmp_path.iterdir()))}" / "report.json"
        path.parent.mkdir()
        path.write_text(json.dumps(base))
        junit = path.parent / "g.xml"
        capsys.readouterr()
        code = main(["gate", str(real_run / "report.json"), "--baseline", str(path), "--junit", str(junit),
                     "--set", "gates.max_top1_regression=0.0"])
        out = capsys.readouterr().out
        assert "max_top1_regression" in out
        return code, out

    code, out = gate(report)
    assert code == 0 and "paired on" in out and "0 lost, 0 gained" in out
    better = json.loads(json.dumps(report))
    b = better["artifacts"][fp32_i]
    improved = [bb or i in wrong for i, bb in enumerate(bits)]
    b["per_image"]["correct"] = encode_correct(improved)
    b["top1"] = round(100.0 * sum(improved) / len(improved), 4)
    code, out = gate(better)
    assert code == 1 and "3 lost, 0 gained" in out
    old = json.loads(json.dumps(report))
    for a in old["artifacts"]:
        a.pop("per_image", None)
    code, out = gate(old)
    assert code == 0 and "plain threshold, not paired" in out
