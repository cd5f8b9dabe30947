"""Reports: `report.json` (machine-readable, versioned), `report.md`, `report.html` and PNG plots.

`report.json` schema (schema_version 1) — documented in docs/report-schema.md:
recipe, target, teacher {model, top1}, student {model, method, top1, params, macs},
artifacts [{format, precision, runtime, path, sha256, size_bytes, top1, agreement,
latency_ms {p50, p90, p99, mean, std, cov}, measured, not_measured_reason, shipped; optional
runtime_config {threads, streams, hint, ...}, throughput {images_per_s, ...}, preprocess {p50_ms, ...}}],
gates [{name, artifact, metric, value, threshold, passed, note}], passed; optional bundle
{path, dir, manifest, format, runtime, files, artifacts, recommended, recommended_file,
tool_versions} and baseline_artifacts [{format, precision, runtime, top1, latency_ms,
size_bytes, shipped}]. Rendering lives in report_view (what to say), report_html (the page)
and plots (the PNGs); report.md says the same as the page, in Markdown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dskd import atomic
from pipeline import report_view as rv

SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema_version", "recipe", "target", "teacher", "student", "artifacts", "gates", "passed")
ARTIFACT_KEYS = ("format", "precision", "runtime", "path", "sha256", "size_bytes", "top1", "latency_ms")
GATE_KEYS = ("name", "metric", "value", "threshold", "passed")


def validate_report(report: dict[str, Any]) -> list[str]:
    """Problems with a report's shape (empty list when valid); used by tests and `pipeline gate`."""
    problems = [f"missing key '{k}'" for k in REQUIRED_KEYS if k not in report]
    if report.get("schema_version") not in (None, SCHEMA_VERSION):
        problems.append(f"schema_version {report.get('schema_version')} is not {SCHEMA_VERSION}")
    for i, a in enumerate(report.get("artifacts") or []):
        problems += [f"artifacts[{i}] missing '{k}'" for k in ARTIFACT_KEYS if k not in a]
        lat = a.get("latency_ms")
        if lat is not None and not all(p in lat for p in ("p50", "p90", "p99")):
            problems.append(f"artifacts[{i}].latency_ms lacks p50/p90/p99")
    for i, g in enumerate(report.get("gates") or []):
        problems += [f"gates[{i}] missing '{k}'" for k in GATE_KEYS if k not in g]
    for k in ("model", "top1"):
        if k not in (report.get("teacher") or {}):
            problems.append(f"teacher missing '{k}'")
    for k in ("model", "method", "top1", "params", "macs"):
        if k not in (report.get("student") or {}):
            problems.append(f"student missing '{k}'")
    if not isinstance(report.get("passed"), bool):
        problems.append("'passed' must be true or false")
    return problems


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return rv.PASS if v else rv.FAIL
    if isinstance(v, float):
        v = v + 0.0  # -0.0 reads as a loss where there is none
        return f"{v:.{nd}f}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"
    return str(v)


def artifact_rows(report: dict[str, Any]) -> list[list[Any]]:
    """Terminal rows: format, precision, runtime, top-1, p50, its threads/streams/hint, size MB, gate word."""
    rows = []
    for v in rv.artifact_views(report):
        word = v.status() or ("reference" if not v.shipped else "—")
        rows.append([v.format, v.precision, v.runtime, v.top1, v.latency.get("p50"), v.config or None,
                     round(v.size_mb, 3) if v.size_mb is not None else None, word])
    return rows


ARTIFACT_COLUMNS = ["format", "precision", "runtime", "top1 %", "p50 ms", "threads/streams/hint", "size MB", "gates"]
GATE_COLUMNS = ["gate", "artifact", "metric", "value", "threshold", "status", "note"]


def gate_rows(report: dict[str, Any]) -> list[list[Any]]:
    """Gate rows as table rows, with the status word (PASS / FAIL / NOT MEASURED), never True/False."""
    return [[g["name"], g.get("artifact", ""), g["metric"], g["value"], g["threshold"], rv.gate_status(g),
             g.get("note", "")] for g in report.get("gates", [])]


def _md_cell(v: Any) -> str:
    """A Markdown table cell: pipes and newlines would break the row."""
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_table(cols: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows])


def _md_marks(gates: list[rv.GateView]) -> str:
    return "".join(f" **{g.status}** ({g.rule})" for g in gates)


def to_markdown(report: dict[str, Any], plots: dict[str, str]) -> str:
    """report.md: the same content as report.html, as Markdown (PR comments, CI job summaries)."""
    from pipeline.report_html import env_heading, env_rows, tool_rows

    t, s = report["teacher"], report["student"]
    tgt = report["target"]
    v = rv.verdict(report)
    pct = rv.latency_percentile(report)
    lines = [f"# {report['recipe'].get('name', 'run')} → `{tgt['name']}`: {'PASSED' if report['passed'] else 'FAILED'}",
             "", f"**{v.headline}**", ""]
    lines += [f"- {d}" for d in v.details] + ([""] if v.details else [])
    lines += [f"- Student: `{s['model']}` ({s['method']}) top-1 {_fmt(s.get('top1'))} %, "
              f"{s.get('params', 0):,} params, {s.get('macs', 0):,} MACs",
              f"- Teacher: `{t['model']}` top-1 {_fmt(t.get('top1'))} %",
              f"- Target: `{tgt['name']}` ({tgt.get('runtime', '?')})"
              + ("" if tgt.get("measured", True) else " — **not measured**"), ""]
    sh = rv.shipped(report)
    lines += ["## What shipped", ""]
    lines.append(f"Recommended for `{tgt['name']}`: **{sh.recommended}** ({sh.why})." if sh.recommended
                 else f"{sh.why[0].upper()}{sh.why[1:]}.")
    if sh.bundle:
        lines += ["", f"Bundle `{sh.bundle.get('path')}` (unpacked: `{sh.bundle.get('dir')}/`), relative to the run "
                  "folder; check it with `python -m pipeline verify " + str(sh.bundle.get("path")) + "`.", ""]
        rec_file = sh.bundle.get("recommended_file")
        lines += _md_table(["file", "bytes", "sha256"],
                           [[f"`{n}`" + (" (recommended)" if n == rec_file else ""), f"{b:,}" if b is not None else "—",
                             f"`{h}`"] for n, b, h in sh.files])
        if sh.commands:
            lines += ["", "```bash", *sh.commands, "```"]
    lines += ["", "## Artifacts", "", f"Latency per batch-1 call, inference only (inputs bound once), with the "
              f"threads/streams/hint it was measured with; pre-processing (decode, resize, normalize of one image) "
              f"is timed separately. The latency gates judge {pct}.", ""]
    rows = []
    views = rv.artifact_views(report)
    tput = rv.has_throughput(views)
    for a in views:
        lat = [_fmt(a.latency[p], 3) + (_md_marks(a.cells.get("latency", [])) if p == pct else "") for p in rv.PERCENTILES]
        extra = [a.config or "—", _fmt(a.preprocess_ms, 3), _fmt(a.end_to_end_ms, 3)]
        if tput:
            extra.append(_fmt(a.images_per_s, 1) + (f" ({a.throughput_detail})" if a.throughput_detail else ""))
        rows.append([a.label, f"`{a.format}`", _fmt(a.top1) + _md_marks(a.cells.get("top1", [])), *lat, *extra,
                     (f"{a.size_mb:.3f}" if a.size_mb is not None else "—") + _md_marks(a.cells.get("size", [])),
                     a.where or "not measured", a.status() or ("reference" if not a.shipped else "—")])
    lines += _md_table(["artifact", "format", "top-1 %", "p50 ms", "p90 ms", "p99 ms", *rv.CONFIG_COLUMNS,
                        *(["images/s"] if tput else []), "size MB", "measured on", "gates"], rows)
    lines += ["", "## Gates", ""]
    views, notes = rv.gate_views(report)
    if views:
        lines += _md_table(["gate", "artifact", "rule", "value", "status", "note"],
                           [[f"`{g.name}`", g.artifact, g.rule, _fmt(g.value, 3),
                             f"**{g.status}**" + (" (allowed)" if g.status == rv.NOT_MEASURED and not g.failed else ""),
                             g.note + (f"see note {g.note_ref}" if g.note_ref else "")] for g in views])
        lines += [""] + [f"{n.number}. {n.text}" for n in notes] if notes else []
    else:
        lines.append("No gates configured.")
    if plots:
        lines += ["", "## Plots", "", "PNG files in `plots/` beside this file (report.html embeds them).", ""]
        lines += [f"![{name}]({path})" for name, path in plots.items()]
    env, tools = env_rows(report), tool_rows(report)
    if env or tools:
        lines += ["", "## Measurement environment", "", env_heading(report), ""]
        lines += _md_table(["measured on", ""], [[k, val] for k, val in env]) if env else []
        lines += ["", *_md_table(["exported with", "version"], [[k, val] for k, val in tools])] if tools else []
    warn = [(v.label, w) for v in rv.artifact_views(report) for w in v.warnings]
    if warn:
        lines += ["", "Measurement warnings:", ""] + [f"- {n}: {w}" for n, w in warn]
    return "\n".join(lines) + "\n"


def to_html(report: dict[str, Any], plot_files: dict[str, Path]) -> str:
    """report.html (see pipeline.report_html)."""
    from pipeline.report_html import to_html as render

    return render(report, plot_files)


def make_plots(report: dict[str, Any], out_dir: Path, curves: dict[str, Path]) -> dict[str, Path]:
    """The report's PNG plots (see pipeline.plots)."""
    from pipeline.plots import make_plots as draw

    return draw(report, out_dir, curves)


def bundle_section(tar_path: Path, run_dir: Path, recommended: str | None) -> dict[str, Any]:
    """`report['bundle']`, read from the bundle's manifest.json: what a person needs to ship it."""
    bundle_dir = tar_path.with_name(tar_path.name.removesuffix(".tar.gz"))
    manifest = atomic.read_json(bundle_dir / "manifest.json")
    rec_file = next((e["path"] for e in manifest.get("artifacts", []) if recommended and
                     f"{e.get('runtime')}/{e.get('precision')}" == recommended), None)
    return {"path": tar_path.relative_to(run_dir).as_posix(), "dir": bundle_dir.relative_to(run_dir).as_posix(),
            "manifest": (bundle_dir / "manifest.json").relative_to(run_dir).as_posix(),
            "format": manifest.get("format"), "runtime": manifest.get("runtime"), "files": manifest.get("files", {}),
            "artifacts": manifest.get("artifacts", []), "recommended": recommended,
            "recommended_file": rec_file, "tool_versions": manifest.get("tool_versions", {})}


def baseline_artifacts(base: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """`report['baseline_artifacts']`: the --baseline report's artifact numbers, so the comparison
    plot and page need no other file (None without --baseline)."""
    if not base:
        return None
    keep = ("format", "precision", "runtime", "top1", "latency_ms", "size_bytes", "shipped")
    return [{k: a.get(k) for k in keep} for a in base.get("artifacts") or []]


def write_report(report: dict[str, Any], run_dir: Path, curves: dict[str, Path]) -> dict[str, str]:
    plots = make_plots(report, run_dir / "plots", curves)
    rel = {k: str(p.relative_to(run_dir)) for k, p in plots.items()}
    atomic.write_json(run_dir / "report.json", report)
    atomic.write_text(run_dir / "report.md", to_markdown(report, rel))
    atomic.write_text(run_dir / "report.html", to_html(report, plots))
    return {"report_json": "report.json", "report_md": "report.md", "report_html": "report.html", "plots": rel}
