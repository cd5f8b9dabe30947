"""Gates: turn a report (and optionally a baseline report) into pass/fail rows.

Absolute gates look at each shipped artifact alone; relative gates compare it with the
PyTorch student (`max_top1_drop`) or with the same artifact kind in a baseline report
(`max_top1_regression`, `max_latency_regression`). A latency regression is judged on the
ratio measured interleaved in one job when the report has one (same machine, same
minute), and on the two reports' recorded numbers otherwise, which the row says.
An artifact whose latency was not measured fails latency gates unless the recipe allows it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipeline.recipe import GateConfig


@dataclass
class GateResult:
    name: str
    artifact: str
    metric: str
    value: float | None
    threshold: float
    passed: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def artifact_label(a: dict[str, Any]) -> str:
    return f"{a['runtime']}/{a['precision']}"


def _key(a: dict[str, Any]) -> tuple[str, str, str]:
    return a["format"], a["precision"], a["runtime"]


def _unmeasured(name: str, a: dict[str, Any], metric: str, threshold: float, allow: bool) -> GateResult:
    reason = a.get("not_measured_reason") or "not measured"
    if allow:
        return GateResult(name, artifact_label(a), metric, None, threshold, True, f"not measured (allowed): {reason}")
    return GateResult(name, artifact_label(a), metric, None, threshold, False, f"not measured: {reason}")


def evaluate_gates(report: dict[str, Any], gates: GateConfig, baseline: dict[str, Any] | None = None,
                   allow_unmeasured: bool = False) -> list[GateResult]:
    results: list[GateResult] = []
    pct = gates.latency_percentile
    shipped = [a for a in report.get("artifacts", []) if a.get("shipped", True)]
    student_top1 = (report.get("student") or {}).get("top1")
    base_by_key = {_key(a): a for a in (baseline or {}).get("artifacts", [])}

    if not shipped:
        results.append(GateResult("has_artifact", (report.get("target") or {}).get("name", "?"), "artifacts", 0, 1,
                                  False, "no artifact was built for the target"))
    for a in shipped:
        label = artifact_label(a)
        top1 = a.get("top1")
        lat = (a.get("latency_ms") or {}).get(pct)
        if gates.min_top1 is not None:
            if top1 is None:
                results.append(_unmeasured("min_top1", a, "top1", gates.min_top1, allow_unmeasured))
            else:
                results.append(GateResult("min_top1", label, "top1", top1, gates.min_top1, top1 >= gates.min_top1))
        if gates.max_latency_ms is not None:
            if lat is None:
                results.append(_unmeasured("max_latency_ms", a, f"latency_{pct}_ms", gates.max_latency_ms, allow_unmeasured))
            else:
                results.append(GateResult("max_latency_ms", label, f"latency_{pct}_ms", lat, gates.max_latency_ms,
                                          lat <= gates.max_latency_ms))
        if gates.max_size_mb is not None and a.get("size_bytes") is not None:
            mb = a["size_bytes"] / 1e6
            results.append(GateResult("max_size_mb", label, "size_mb", round(mb, 4), gates.max_size_mb, mb <= gates.max_size_mb))
        if gates.max_top1_drop is not None and student_top1 is not None:
            if top1 is None:
                results.append(_unmeasured("max_top1_drop", a, "top1_drop", gates.max_top1_drop, allow_unmeasured))
            else:
                drop = round(student_top1 - top1, 4)
                results.append(GateResult("max_top1_drop", label, "top1_drop", drop, gates.max_top1_drop,
                                          drop <= gates.max_top1_drop, f"vs PyTorch student {student_top1:.2f}"))
        if baseline is None:
            continue
        base = base_by_key.get(_key(a))
        if gates.max_top1_regression is not None:
            if base is None or base.get("top1") is None:
                results.append(GateResult("max_top1_regression", label, "top1_regression", None,
                                          gates.max_top1_regression, False, "baseline has no such artifact"))
            elif top1 is None:
                results.append(_unmeasured("max_top1_regression", a, "top1_regression", gates.max_top1_regression, allow_unmeasured))
            else:
                reg = round(base["top1"] - top1, 4)
                results.append(GateResult("max_top1_regression", label, "top1_regression", reg, gates.max_top1_regression,
                                          reg <= gates.max_top1_regression, f"baseline {base['top1']:.2f}"))
        if gates.max_latency_regression is not None:
            ratio, note = _latency_ratio(a, base, pct)
            if ratio is None:
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
    return results


def _latency_ratio(a: dict[str, Any], base: dict[str, Any] | None, pct: str) -> tuple[float | None, str]:
    inter = a.get("baseline_comparison")
    if inter and inter.get("ratio") is not None:
        return float(inter["ratio"]), f"interleaved A/B in one job ({inter.get('rounds', '?')} rounds)"
    if base is None:
        return None, "baseline has no such artifact"
    cand = (a.get("latency_ms") or {}).get(pct)
    ref = (base.get("latency_ms") or {}).get(pct)
    if cand is None or ref is None or ref <= 0:
        return None, "baseline or candidate latency not measured"
    return cand / ref, "from the two reports' numbers (not interleaved: different runs may differ by machine noise)"


def all_passed(results: list[GateResult]) -> bool:
    return all(r.passed for r in results)


def junit_xml(results: list[GateResult], suite: str = "pipeline-gates") -> str:
    """JUnit XML for CI systems that show test results: one test case per gate row."""
    from xml.sax.saxutils import escape, quoteattr

    failures = sum(not r.passed for r in results)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<testsuite name={quoteattr(suite)} tests="{len(results)}" failures="{failures}">']
    for r in results:
        name = quoteattr(f"{r.name}[{r.artifact}]")
        lines.append(f'  <testcase classname={quoteattr(suite)} name={name}>')
        if not r.passed:
            msg = f"{r.metric}={r.value} threshold={r.threshold} {r.note}".strip()
            lines.append(f'    <failure message={quoteattr(msg)}>{escape(msg)}</failure>')
        lines.append("  </testcase>")
    lines.append("</testsuite>")
    return "\n".join(lines) + "\n"
