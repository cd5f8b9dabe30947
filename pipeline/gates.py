"""Gates: turn a report (and optionally a baseline report) into PASS / FAIL / NOT MEASURED rows.

Absolute gates look at each shipped artifact alone; relative gates compare it with the
PyTorch student (`max_top1_drop`) or with the same artifact kind in a baseline report
(`max_top1_regression`, `max_latency_regression`). A latency regression is judged on the
ratio measured interleaved in one job when the report has one (same machine, same
minute), and on the two reports' recorded numbers otherwise, which the row says; a top-1
regression on the images both reports say each artifact got right (McNemar) when both have
them, and on the two top-1 numbers otherwise, which the row says too.

An artifact whose numbers were not measured gets NOT MEASURED rows, which fail the run
unless the recipe allows unmeasured results; why, and the ways out, are said once for the
whole report (`not_measured_summary`), not on every row. When the target itself was not
measured, the accuracy gates still apply to the artifacts measured on this machine's CPU
(e.g. the Q/DQ INT8 ONNX beside a TensorRT target), so `--allow-unmeasured` waives the
device numbers, never the accuracy check. An artifact that failed its export parity check
is rejected: it gets one FAIL row of the `parity` gate (a finding about the model, exit 1).

The gates read typed records (pipeline.artifact_result.ArtifactResult): the deploy stage's
results in `pipeline run`, or report.json rows read as records (`pipeline gate`, a
`--baseline`, reports built by hand), with the same type checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.artifact_result import ArtifactResult, BaselineComparison, as_results
from pipeline.recipe import GateConfig

# Part of the gate stage's cache key: bump when the rows a report gets change meaning.
GATE_LOGIC_VERSION = 5

PASS, FAIL, NOT_MEASURED, INCONCLUSIVE = "PASS", "FAIL", "NOT MEASURED", "INCONCLUSIVE"
CPU_REFERENCE_NOTE = "measured on this machine's CPU (the target was not measured)"


@dataclass
class GateResult:
    """One gate on one artifact. `passed` is the verdict (kept for schema compatibility);
    `status` is the word people read: PASS, FAIL or NOT MEASURED (which passes only when
    unmeasured results are allowed)."""

    name: str
    artifact: str
    metric: str
    value: float | None
    threshold: float
    passed: bool
    note: str = ""
    status: str = ""
    decision: dict[str, Any] | None = None  # paired rules: estimate, interval, coverage, verdict

    def __post_init__(self) -> None:
        if not self.status:
            self.status = PASS if self.passed else FAIL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def artifact_label(a: ArtifactResult | Mapping[str, Any]) -> str:
    """`runtime/precision` of a record or of a report row."""
    return a.label if isinstance(a, ArtifactResult) else f"{a['runtime']}/{a['precision']}"


def _unmeasured(name: str, a: ArtifactResult, metric: str, threshold: float, allow: bool) -> GateResult:
    # The reason is in the report's single not-measured note, not repeated on every row.
    note = "not measured (allowed)" if allow else "not measured"
    return GateResult(name, a.label, metric, None, threshold, allow, note, NOT_MEASURED)


def _parity_row(a: ArtifactResult) -> GateResult | None:
    """The export-time parity check as a gate row: FAIL for a rejected artifact, PASS for a
    shipped one whose check passed; None when the report has no parity record."""
    parity = a.parity or {}
    value, threshold = a.parity_agreement_pct, a.parity_threshold_pct
    if a.rejected:
        why = a.rejected_reason or parity.get("failure") or "parity check failed"
        return GateResult("parity", a.label, "parity_agreement", value, threshold, False, f"rejected: {why}")
    if parity.get("passed") is True and a.shipped:
        return GateResult("parity", a.label, "parity_agreement", value, threshold, True,
                          f"export check vs PyTorch on {parity.get('images', '?')} images")
    return None


def evaluate_gates(report: dict[str, Any], gates: GateConfig, baseline: dict[str, Any] | None = None,
                   allow_unmeasured: bool = False) -> list[GateResult]:
    """Every gate row of `report` (its `artifacts`: ArtifactResult records or report rows)."""
    results: list[GateResult] = []
    pct = gates.latency_percentile
    artifacts = as_results(report.get("artifacts"))
    shipped = [a for a in artifacts if a.shipped and not a.rejected]
    base_by_key = {a.key: a for a in as_results((baseline or {}).get("artifacts"), "baseline report")}
    rounds_valid = rounds_match_baseline(report, baseline)

    if not shipped and not any(a.rejected for a in artifacts):
        results.append(GateResult("has_artifact", (report.get("target") or {}).get("name", "?"), "artifacts", 0, 1,
                                  False, "no artifact was built for the target"))
    for a in artifacts:
        row = _parity_row(a)
        if row is not None:
            results.append(row)
    for a in shipped:
        label = a.label
        lat = a.latency(pct)
        results += _accuracy_rows(a, report, gates, baseline, base_by_key, allow_unmeasured)
        if gates.max_latency_ms is not None:
            if lat is None:
                results.append(_unmeasured("max_latency_ms", a, f"latency_{pct}_ms", gates.max_latency_ms, allow_unmeasured))
            else:
                results.append(GateResult("max_latency_ms", label, f"latency_{pct}_ms", lat, gates.max_latency_ms,
                                          lat <= gates.max_latency_ms))
        if gates.max_size_mb is not None and a.size_bytes is None:  # a set gate never vanishes for a missing number
            # an engine not built because the device was not reached has no size yet: allowed like its other rows
            results.append(_unmeasured("max_size_mb", a, "size_mb", gates.max_size_mb,
                                       allow_unmeasured and not a.measured))
        elif gates.max_size_mb is not None and a.size_bytes is not None:
            mb = a.size_bytes / 1e6
            results.append(GateResult("max_size_mb", label, "size_mb", round(mb, 4), gates.max_size_mb, mb <= gates.max_size_mb))
        paired = paired_latency_row(a, gates) if baseline is not None and rounds_valid else None
        if paired is not None:
            results.append(paired)
        elif baseline is not None and gates.max_latency_regression is not None:
            judged = a if rounds_valid else a.replace(baseline_comparison=None)
            ratio, note = _latency_ratio(judged, base_by_key.get(a.key), pct)
            if not rounds_valid:
                note = f"{note}; {OTHER_BASELINE_NOTE}"
            inter = judged.baseline_comparison
            differs = (measurement_mismatch(report, baseline, a, base_by_key[a.key])
                       if ratio is not None and (inter is None or inter.ratio is None) else [])
            if differs:  # two reports' numbers taken under different conditions: no evidence either way
                policy = getattr(gates, "regression_inconclusive", "fail")
                results.append(GateResult(
                    "max_latency_regression", label, "latency_ratio", round(ratio, 4),
                    round(1.0 + gates.max_latency_regression, 4), policy == "pass",
                    f"not comparable: {'; '.join(differs)} (a ratio across them measures the setup, not the "
                    f"model); counted as {policy} (gates.regression_inconclusive). Measure the baseline the "
                    "same way, or gate in `pipeline run --baseline` (interleaved rounds)", INCONCLUSIVE))
            elif ratio is None:
                if lat is None:
                    results.append(_unmeasured("max_latency_regression", a, "latency_ratio",
                                               gates.max_latency_regression, allow_unmeasured))
                else:
                    results.append(GateResult("max_latency_regression", label, "latency_ratio", None,
                                              gates.max_latency_regression, False, note))
            else:
                limit = 1.0 + gates.max_latency_regression
                results.append(GateResult("max_latency_regression", label, "latency_ratio", round(ratio, 4),
                                          round(limit, 4), ratio <= limit, note))
    if any(not a.measured for a in shipped):
        # The target was not (fully) measured: what this machine's CPU measured still has to be accurate.
        for a in artifacts:
            if not a.shipped and not a.rejected and a.top1 is not None:
                rows = _accuracy_rows(a, report, gates, baseline, base_by_key, allow_unmeasured)
                for r in rows:
                    r.note = f"{r.note}; {CPU_REFERENCE_NOTE}" if r.note else CPU_REFERENCE_NOTE
                results += rows
    if getattr(gates, "require_max_clocks", False):  # Jetson: latency measured at full clocks only
        from deploy_targets.doctor import clocks_gate

        ok, note = clocks_gate(report)
        results.append(GateResult("require_max_clocks", (report.get("target") or {}).get("name", "?"),
                                  "at_max_clocks", None if ok is None else float(ok), 1.0, ok is not False, note))
    return results


def measurement_mismatch(report: Mapping[str, Any], baseline: Mapping[str, Any], a: ArtifactResult,
                         base: ArtifactResult) -> list[str]:
    """How the baseline's latency of this artifact was taken differently from the report's: target,
    threads, CPU model, smallest batch size. Only what both sides record is compared (older or
    hand-built reports lack some), so an empty list means "nothing known to differ"."""
    def smallest_batch(r: ArtifactResult) -> Any:
        sizes = [e.get("batch_size") for e in r.latency_by_batch or [] if isinstance(e, Mapping)]
        sizes = [b for b in sizes if isinstance(b, int)]
        return min(sizes) if sizes else None

    sides = {
        "target": ((report.get("target") or {}).get("name"), (baseline.get("target") or {}).get("name")),
        "threads": ((a.runtime_config or {}).get("threads"), (base.runtime_config or {}).get("threads")),
        "CPU": ((a.environment or {}).get("cpu_model"), (base.environment or {}).get("cpu_model")),
        "smallest batch": (smallest_batch(a), smallest_batch(base)),
    }
    return [f"{name} {theirs} in the baseline, {mine} here" for name, (mine, theirs) in sides.items()
            if mine is not None and theirs is not None and mine != theirs]


THRESHOLD_KEYS = ("min_top1", "max_latency_ms", "max_size_mb", "max_top1_drop", "max_top1_regression",
                  "max_latency_regression")
REGRESSION_KEYS = ("max_top1_regression", "max_latency_regression")


def unset_gates_problem(gates: GateConfig, baseline_given: bool) -> str | None:
    """Why these [gates] cannot give the verdict asked for, or None.

    A baseline with neither regression threshold set was ignored without a word (a 10x slower
    model PASSED `gate --baseline`); with no threshold at all only parity could fail."""
    if baseline_given and all(getattr(gates, k) is None for k in REGRESSION_KEYS):
        return ("--baseline: no regression gate is set (gates.max_latency_regression, gates.max_top1_regression), "
                "so the baseline would not be compared; set one, e.g. --set gates.max_latency_regression=0.05, "
                "or leave --baseline out")
    if all(getattr(gates, k) is None for k in THRESHOLD_KEYS):
        return ("no gate threshold is set ([gates]: " + ", ".join(THRESHOLD_KEYS) + "), so only a parity failure "
                "or a missing artifact could fail; set one, e.g. --set gates.min_top1=80")
    return None


OTHER_BASELINE_NOTE = ("this report's interleaved rounds were measured against another baseline, "
                       "so they are not used")


def rounds_match_baseline(report: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> bool:
    """Whether the report's interleaved A/B rounds were measured against `baseline`.

    `pipeline run` records which baseline it measured against (`report.baseline.sha256`);
    `pipeline gate REPORT --baseline OTHER` must not judge OTHER on rounds measured against
    the first one (a 10x slower candidate passed that way). Reports without the record
    (older, hand-built) keep their rounds.
    """
    if baseline is None:
        return False
    recorded = report.get("baseline")
    if not isinstance(recorded, Mapping) or not isinstance(recorded.get("sha256"), str):
        return True
    from pipeline.stage import stable_hash

    return recorded["sha256"] == stable_hash(baseline)


STOPPED = {"decided": "decided", "budget": "time budget spent (gates.regression_budget_s)",
           "max_rounds": "round limit reached", "rounds": "no tolerance to decide against"}


def paired_latency_row(a: ArtifactResult | Mapping[str, Any], gates: GateConfig) -> GateResult | None:
    """max_latency_regression judged on the interleaved rounds (median ratio and its interval);
    None when the report has no per-round record (then the two reports' numbers are used).

    `a` is a record, or a mapping with `runtime`, `precision` and `baseline_comparison` (what
    bench/latency_gate_power.py passes: the rule alone, on rounds it measured itself).
    """
    from pipeline import regression_stats as rs

    if isinstance(a, ArtifactResult):
        label, inter = a.label, a.baseline_comparison or BaselineComparison()
    else:
        comparison = a.get("baseline_comparison")
        label = artifact_label(a)
        inter = BaselineComparison.from_rounds(comparison) if comparison else BaselineComparison()
    cand, base = inter.candidate_p50_ms, inter.baseline_p50_ms
    if gates.max_latency_regression is None or not cand or not base or len(cand) != len(base):
        return None
    kept = inter.kept
    keep = kept if kept is not None and len(kept) == len(cand) else None
    policy = getattr(gates, "regression_inconclusive", "fail")
    limit = round(1.0 + gates.max_latency_regression, 4)
    if keep is not None and not any(keep):
        return GateResult("max_latency_regression", label, "latency_ratio", None, limit, policy == "pass",
                          f"every one of {len(cand)} interleaved rounds was CPU-contended: no evidence either way"
                          + (f"; rounds stopped: {STOPPED.get(inter.stopped, inter.stopped)}" if inter.stopped else "")
                          + f"; counted as {policy} (gates.regression_inconclusive)", INCONCLUSIVE)
    try:
        d = rs.paired_ratio_decision(cand, base, gates.max_latency_regression, keep=keep)
    except ValueError:
        return None
    status = {rs.PASS: PASS, rs.FAIL: FAIL}.get(d.verdict, INCONCLUSIVE)
    passed = status == PASS or (status == INCONCLUSIVE and policy == "pass")
    dropped = len(cand) - d.samples
    note = (f"median of {d.samples} interleaved rounds {d.estimate:.3f}, {100 * d.coverage:.1f} % interval "
            f"[{d.low:.3f}, {d.high:.3f}] vs limit {d.limit:.3f}"
            + (f"; {dropped} contended round(s) not used" if dropped else "")
            + (f"; rounds stopped: {STOPPED.get(inter.stopped, inter.stopped)}" if inter.stopped else "")
            + (f"; inconclusive, counted as {'pass' if passed else 'fail'} (gates.regression_inconclusive)"
               if status == INCONCLUSIVE else ""))
    return GateResult("max_latency_regression", label, "latency_ratio", round(d.estimate, 4),
                      round(d.limit, 4), passed, note, status, d.to_dict())


def _accuracy_rows(a: ArtifactResult, report: dict[str, Any], gates: GateConfig, baseline: dict[str, Any] | None,
                   base_by_key: dict[tuple[str, str, str], ArtifactResult], allow: bool) -> list[GateResult]:
    """min_top1, max_top1_drop and (with a baseline) max_top1_regression for one artifact."""
    out: list[GateResult] = []
    label = a.label
    top1 = a.top1
    student_top1 = (report.get("student") or {}).get("top1")
    if gates.min_top1 is not None:
        if top1 is None:
            out.append(_unmeasured("min_top1", a, "top1", gates.min_top1, allow))
        else:
            out.append(GateResult("min_top1", label, "top1", top1, gates.min_top1, top1 >= gates.min_top1))
    if gates.max_top1_drop is not None and student_top1 is None:  # the reference is missing: not a silent pass
        out.append(GateResult("max_top1_drop", label, "top1_drop", None, gates.max_top1_drop, False,
                              "the PyTorch student's top-1 is not in the report", NOT_MEASURED))
    elif gates.max_top1_drop is not None and student_top1 is not None:
        if top1 is None:
            out.append(_unmeasured("max_top1_drop", a, "top1_drop", gates.max_top1_drop, allow))
        else:
            drop = round(student_top1 - top1, 4)
            out.append(GateResult("max_top1_drop", label, "top1_drop", drop, gates.max_top1_drop,
                                  drop <= gates.max_top1_drop, f"vs PyTorch student {student_top1:.2f}"))
    if baseline is not None and gates.max_top1_regression is not None:
        base = base_by_key.get(a.key)
        if base is None or base.top1 is None:
            out.append(GateResult("max_top1_regression", label, "top1_regression", None,
                                  gates.max_top1_regression, False, "baseline has no such artifact" if base is None
                                  else "the baseline's top-1 of this artifact was not measured"))
        elif top1 is None:
            out.append(_unmeasured("max_top1_regression", a, "top1_regression", gates.max_top1_regression, allow))
        else:
            out.append(_top1_regression_row(a, base, gates))
    return out


def _top1_regression_row(a: ArtifactResult, base: ArtifactResult, gates: GateConfig) -> GateResult:
    """max_top1_regression: McNemar's pairing when both reports say which test images each
    artifact got right (same test set), else the plain difference of the two top-1s, with why."""
    from pipeline import regression_stats as rs
    from pipeline.per_image import read_record

    assert a.top1 is not None and base.top1 is not None  # _accuracy_rows gives NOT MEASURED rows otherwise
    label, tol = a.label, gates.max_top1_regression
    reg = round(base.top1 - a.top1, 4)
    mine, why_mine = read_record(a.per_image, a.top1)
    theirs, why_base = read_record(base.per_image, base.top1)
    why = ""
    if theirs is None:
        why = f"baseline: {why_base}" + (" (an older report?)" if base.per_image is None else "")
    elif mine is None:
        why = f"this run: {a.per_image_note or why_mine}"
    elif ((a.per_image or {}).get("test_set_sha256") != (base.per_image or {}).get("test_set_sha256")
          or len(mine) != len(theirs)):  # two top-1s of different images say nothing about a regression
        policy = getattr(gates, "regression_inconclusive", "fail")
        return GateResult("max_top1_regression", label, "top1_regression", reg, tol, policy == "pass",
                          f"baseline {base.top1:.2f}, not comparable: the baseline was measured on another test "
                          f"set; counted as {policy} (gates.regression_inconclusive). Gate against a baseline "
                          "measured on the same data", INCONCLUSIVE)
    if why:
        return GateResult("max_top1_regression", label, "top1_regression", reg, tol, reg <= tol,
                          f"baseline {base.top1:.2f}; plain threshold, not paired: {why}")
    d = rs.paired_top1_decision(theirs, mine, tol)
    status = {rs.PASS: PASS, rs.FAIL: FAIL}.get(d.verdict, INCONCLUSIVE)
    policy = getattr(gates, "regression_inconclusive", "fail")
    passed = status == PASS or (status == INCONCLUSIVE and policy == "pass")
    note = (f"baseline {base.top1:.2f}; paired on {d.samples} images, drop {d.estimate:.3g} points, "
            f"{100 * d.coverage:.0f} % interval [{d.low:.3g}, {d.high:.3g}] ({d.method})"
            + (f"; inconclusive, counted as {'pass' if passed else 'fail'} (gates.regression_inconclusive)"
               if status == INCONCLUSIVE else ""))
    return GateResult("max_top1_regression", label, "top1_regression", round(d.estimate, 4), tol, passed, note,
                      status, d.to_dict())


def not_measured_summary(report: dict[str, Any], allow_unmeasured: bool) -> dict[str, Any] | None:
    """One note for the whole report: which shipped artifacts were not measured, why, what that
    did to the verdict, and both ways out. None when everything shipped was measured."""
    missing = [a for a in as_results(report.get("artifacts")) if a.shipped and not a.rejected and not a.measured]
    if not missing:
        return None
    target = (report.get("target") or {}).get("name", "the target")
    by_reason: dict[str, list[str]] = {}
    for a in missing:
        reason = a.not_measured_reason or (report.get("target") or {}).get("reason") or "no reason recorded"
        by_reason.setdefault(reason, []).append(a.label)
    why = "; ".join(f"{', '.join(labels)}: {reason}" for reason, labels in by_reason.items())
    effect = ("their gates are NOT MEASURED and allowed (--allow-unmeasured), so they do not fail the run"
              if allow_unmeasured else "their gates are NOT MEASURED and fail the run")
    note = (f"NOT MEASURED on {target}: {why}. {effect}. To measure them, run with the device reachable "
            f"(--device user@host); to accept unmeasured results, pass --allow-unmeasured "
            f"(recipe: target.allow_unmeasured = true).")
    return {"artifacts": [a.label for a in missing],
            "reasons": {a.label: a.not_measured_reason for a in missing},
            "allowed": bool(allow_unmeasured), "note": note}


def _latency_ratio(a: ArtifactResult, base: ArtifactResult | None, pct: str) -> tuple[float | None, str]:
    inter = a.baseline_comparison
    if inter is not None and inter.ratio is not None:
        rounds = "?" if inter.rounds is None else inter.rounds
        return float(inter.ratio), f"interleaved A/B in one job ({rounds} rounds)"
    if base is None:
        return None, "baseline has no such artifact"
    cand = a.latency(pct)
    ref = base.latency(pct)
    if cand is None or ref is None or ref <= 0:
        return None, "baseline or candidate latency not measured"
    return cand / ref, "from the two reports' numbers (not interleaved: different runs may differ by machine noise)"


TABLE_COLUMNS = ["gate", "artifact", "metric", "value", "threshold", "status", "note"]


def status_word(g: dict[str, Any]) -> str:
    """PASS / FAIL / NOT MEASURED for a gate row (rows of reports older than `status`: from `passed`)."""
    status = g.get("status")
    return status if isinstance(status, str) and status else (PASS if g.get("passed") else FAIL)


def table_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """Gate rows (report.json dicts) as terminal table rows, with the status word, never True/False."""
    return [[g.get("name"), g.get("artifact", ""), g.get("metric"), g.get("value"), g.get("threshold"),
             status_word(g), g.get("note", "")] for g in rows]


def all_passed(results: list[GateResult]) -> bool:
    return all(r.passed for r in results)


def junit_xml(results: list[GateResult], suite: str = "pipeline-gates") -> str:
    """JUnit XML for CI systems that show test results: one test case per gate row."""
    from xml.sax.saxutils import escape, quoteattr

    failures = sum(not r.passed for r in results)
    skipped = sum(r.passed and r.status in (NOT_MEASURED, INCONCLUSIVE) for r in results)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<testsuite name={quoteattr(suite)} tests="{len(results)}" failures="{failures}" skipped="{skipped}">']
    for r in results:
        name = quoteattr(f"{r.name}[{r.artifact}]")
        lines.append(f'  <testcase classname={quoteattr(suite)} name={name}>')
        msg = f"{r.status}: {r.metric}={r.value} threshold={r.threshold} {r.note}".strip()
        if not r.passed:
            lines.append(f'    <failure message={quoteattr(msg)}>{escape(msg)}</failure>')
        elif r.status in (NOT_MEASURED, INCONCLUSIVE):  # allowed: shown as skipped, not as a pass
            lines.append(f'    <skipped message={quoteattr(msg)}/>')
        lines.append("  </testcase>")
    lines.append("</testsuite>")
    return "\n".join(lines) + "\n"
