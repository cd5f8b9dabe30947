"""report.html: one self-contained page (inline CSS, plots as data: URIs) read top to bottom.

Order: verdict, what shipped (bundle, recommended artifact, files with sha256, how to run it),
artifacts with per-cell gate results, gates (a note shared by rows is printed once), plots,
measurement environment. Every value goes through `html.escape`; code is <code>, emphasis is
<strong>: nothing is Markdown, so nothing shows as `**` or backticks in a browser.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from pipeline import report_view as rv

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1180px;margin:24px auto;
 padding:0 20px;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.25em;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin:0 0 14px}
.verdict{border-radius:8px;padding:12px 16px;margin:10px 0 14px}
.verdict.pass{background:#e8f5e9;border:2px solid #2e7d32}.verdict.fail{background:#ffebee;border:2px solid #c62828}
.verdict .head{font-size:1.35em;font-weight:700}.verdict.pass .head{color:#1b5e20}.verdict.fail .head{color:#b71c1c}
.verdict ul{margin:6px 0 0 0;padding-left:20px}
.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0}
.facts dt{color:#555}.facts dd{margin:0}
table{border-collapse:collapse;margin:8px 0;font-size:.93em}
td,th{border:1px solid #d0d0d0;padding:5px 9px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.b{display:inline-block;font-size:.78em;font-weight:700;border-radius:4px;padding:0 5px;margin-left:4px;white-space:nowrap}
.PASS{background:#e8f5e9;color:#1b5e20}.FAIL{background:#ffebee;color:#b71c1c}
.NOT-MEASURED{background:#fff3e0;color:#8a4b00}
.rule{display:block;font-size:.78em;color:#555;margin-top:3px;text-align:left}.rule .b{margin:0 3px 0 0}
.v{white-space:nowrap}.ref{color:#888}.muted{color:#777}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em}
code{background:#f3f3f3;padding:0 3px;border-radius:3px}
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:8px 12px;border-radius:6px;overflow-x:auto}
.sha{font-size:.8em;word-break:break-all}
.rec{background:#e8f5e9;border:1px solid #2e7d32;border-radius:6px;padding:8px 12px;margin:6px 0 10px}
.rec.none{background:#fff3e0;border-color:#e0a040}
figure{margin:14px 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}
ol.notes{font-size:.9em;color:#333}
.cols{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
"""


def esc(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def num(v: Any, nd: int = 2) -> str:
    """A number as shown in tables (em dash when absent)."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "—"
        v = v + 0.0  # -0.0 reads as a loss where there is none
        return f"{v:.{nd}f}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def badge(status: str) -> str:
    if not status:
        return ""
    return f"<span class='b {esc(status.replace(' ', '-'))}'>{esc(status)}</span>"


def _cell(value: str, gates: list[rv.GateView]) -> str:
    """A table cell with the gates that judged it, one line each: status word and the rule in words."""
    marks = "".join(f"<span class='rule'>{badge(g.status)} {esc(g.rule)}</span>" for g in gates)
    return f"<td class='num'><span class='v'>{esc(value)}</span>{marks}</td>"


def _verdict(report: dict[str, Any]) -> str:
    v = rv.verdict(report)
    items = "".join(f"<li>{esc(d)}</li>" for d in v.details)
    return (f"<div class='verdict {'pass' if v.passed else 'fail'}'><div class='head'>{esc(v.headline)}</div>"
            + (f"<ul>{items}</ul>" if items else "") + "</div>")


def _facts(report: dict[str, Any]) -> str:
    t, s, tgt = report.get("teacher") or {}, report.get("student") or {}, report.get("target") or {}
    rows = [("Student", f"<code>{esc(s.get('model'))}</code> distilled with <strong>{esc(s.get('method'))}</strong>: "
                        f"top-1 {esc(num(s.get('top1')))} % in PyTorch, {esc(num(s.get('params')))} parameters, "
                        f"{esc(num(s.get('macs')))} MACs"),
            ("Teacher", f"<code>{esc(t.get('model'))}</code>: top-1 {esc(num(t.get('top1')))} %"
                        + (f" (loaded from <code>{esc(t['loaded_from'])}</code>)" if t.get("loaded_from") else "")),
            ("Target", f"<code>{esc(tgt.get('name'))}</code> ({esc(tgt.get('runtime', '?'))})"
                       + (f" on <code>{esc(tgt['device'])}</code>" if tgt.get("device") else "")
                       + ("" if tgt.get("measured", True) else " <span class='b NOT-MEASURED'>NOT MEASURED</span>"))]
    return "<dl class='facts'>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _shipped(report: dict[str, Any]) -> str:
    sh = rv.shipped(report)
    out = ["<h2 id='shipped'>What shipped</h2>"]
    if sh.recommended:
        out.append(f"<div class='rec'>Recommended for <code>{esc(report['target'].get('name'))}</code>: "
                   f"<strong>{esc(sh.recommended)}</strong> ({esc(sh.why)})")
    else:
        out.append(f"<div class='rec none'>{esc(sh.why[:1].upper() + sh.why[1:])}")
    if sh.bundle:
        rec_file = (sh.bundle.get("recommended_file") or "")
        out.append((f"; its file in the bundle: <code>{esc(rec_file)}</code>" if rec_file else "") + ".</div>")
        out.append(f"<p>Bundle <code>{esc(sh.bundle.get('path'))}</code> (unpacked: <code>{esc(sh.bundle.get('dir'))}"
                   f"/</code>), relative to the run folder"
                   + (f" <code>{esc((report.get('run') or {}).get('dir'))}</code>" if (report.get("run") or {}).get("dir") else "")
                   + ". Check it with <code>python -m pipeline verify " + esc(sh.bundle.get("path")) + "</code>.</p>")
        rows = "".join(f"<tr><td><code>{esc(n)}</code>{' <strong>(recommended)</strong>' if n == rec_file else ''}</td>"
                       f"<td class='num'>{esc(_size(b))}</td><td class='sha'><code>{esc(h)}</code></td></tr>"
                       for n, b, h in sh.files)
        out.append(f"<table><tr><th>file</th><th>size</th><th>sha256</th></tr>{rows}</table>")
        if sh.commands:
            out.append("<p>Run it (needs numpy, Pillow and the runtime) from the run folder, or on the device "
                       "after copying the <code>.tar.gz</code> there:</p>")
            out.append("<pre><code>" + esc("\n".join(sh.commands)) + "</code></pre>")
        if sh.bundle.get("runtime") == "tensorrt" or "build_trtexec.sh" in (sh.bundle.get("files") or {}):
            out.append("<p>TensorRT engines are device-specific: on the device, <code>infer.py</code> builds "
                       "the engine first with the bundle's <code>build_trtexec.sh</code>.</p>")
        if "README.txt" in (sh.bundle.get("files") or {}):
            out.append("<p>The bundle's <code>README.txt</code> says the same for whoever receives it.</p>")
    else:
        out.append(".</div><p class='muted'>No deploy bundle was recorded in this report.</p>")
    return "".join(out)


def _size(b: int | None) -> str:
    if b is None:
        return "—"
    return f"{b / 1e6:.3f} MB" if b >= 100_000 else f"{b / 1e3:.1f} kB"


def _artifacts(report: dict[str, Any]) -> str:
    pct = rv.latency_percentile(report)
    views = rv.artifact_views(report)
    tput = rv.has_throughput(views)
    head = ("<tr><th>artifact</th><th>top-1 %</th><th>agreement %</th>"
            + "".join(f"<th>{p} ms</th>" for p in rv.PERCENTILES)
            + "".join(f"<th>{esc(c)}</th>" for c in (*rv.CONFIG_COLUMNS, *(["images/s"] if tput else [])))
            + "<th>size</th><th>measured on</th><th>gates</th></tr>")
    rows = []
    for v in views:
        lat = "".join(_cell(num(v.latency[p], 3), v.cells.get("latency", []) if p == pct else [])
                      for p in rv.PERCENTILES)
        lat += (f"<td>{esc(v.config or '—')}</td><td class='num'>{esc(num(v.preprocess_ms, 3))}</td>"
                f"<td class='num'>{esc(num(v.end_to_end_ms, 3))}</td>")
        if tput:
            lat += (f"<td class='num'>{esc(num(v.images_per_s, 1))}"
                    + (f"<span class='rule'>{esc(v.throughput_detail)}</span>" if v.throughput_detail else "") + "</td>")
        where = esc(v.where) if v.where else f"<span class='muted'>not measured{': ' + esc(v.reason) if v.reason and not v.gates else ''}</span>"
        word = v.status() or ("reference" if not v.shipped else "")
        gate_cell = badge(word) if word in (rv.PASS, rv.FAIL, rv.NOT_MEASURED) else f"<span class='muted'>{esc(word)}</span>"
        rows.append(f"<tr><td><strong>{esc(v.label)}</strong><br><code>{esc(v.format)}</code></td>"
                    + _cell(num(v.top1), v.cells.get("top1", []))
                    + f"<td class='num'>{esc(num(v.agreement))}</td>" + lat
                    + _cell(f"{v.size_mb:.3f} MB" if v.size_mb is not None else "—", v.cells.get("size", []))
                    + f"<td>{where}</td><td>{gate_cell}</td></tr>")
    return (f"<h2 id='artifacts'>Artifacts</h2><p class='muted'>Latency is per batch-1 call, inference only "
            f"(inputs bound once), with the threads/streams/hint it was measured with; pre-processing (decode, "
            f"resize, normalize of one image) is timed separately. The latency gates judge {esc(pct)}. Reference artifacts are not shipped to the target: they check that quantization "
            f"kept the model intact.</p><table>{head}{''.join(rows)}</table>")


def _gates(report: dict[str, Any]) -> str:
    views, notes = rv.gate_views(report)
    if not views:
        return "<h2 id='gates'>Gates</h2><p>No gates configured.</p>"
    rows = "".join(
        f"<tr><td><code>{esc(g.name)}</code></td><td>{esc(g.artifact)}</td><td>{esc(g.rule)}</td>"
        f"<td class='num'>{esc(num(g.value, 3))}</td><td>{badge(g.status)}"
        + (" <span class='muted'>(allowed)</span>" if g.status == rv.NOT_MEASURED and not g.failed else "")
        + f"</td><td>{esc(g.note)}{f' <span class=ref>see note {g.note_ref}</span>' if g.note_ref else ''}</td></tr>"
        for g in views)
    note_html = ("<ol class='notes'>" + "".join(f"<li value='{n.number}'>{esc(n.text)}</li>" for n in notes)
                 + "</ol>") if notes else ""
    return (f"<h2 id='gates'>Gates</h2><table><tr><th>gate</th><th>artifact</th><th>rule</th><th>value</th>"
            f"<th>status</th><th>note</th></tr>{rows}</table>{note_html}")


CAPTIONS = {
    "accuracy_vs_latency": "Top-1 against latency; the shaded region passes the accuracy and latency gates.",
    "latency_distribution": "Per-call latency on shared bins; dashed lines mark each artifact's median.",
    "training_curves": "Training loss and top-1 per epoch (PyTorch).",
    "baseline_comparison": "This run against the --baseline report.",
}


def _plots(plot_files: dict[str, Path]) -> str:
    figs = []
    for name, p in plot_files.items():
        if not p.exists():
            continue
        data = base64.b64encode(p.read_bytes()).decode()
        figs.append(f"<figure><img alt='{esc(name)}' src='data:image/png;base64,{data}'>"
                    f"<figcaption>{esc(CAPTIONS.get(name, name))}</figcaption></figure>")
    return "<h2 id='plots'>Plots</h2>" + ("".join(figs) or "<p class='muted'>No plots.</p>")


ENV_LABELS = [("cpu_model", "CPU"), ("cpu_count", "CPU cores"), ("threads", "runtime threads"),
              ("cpu_affinity", "CPUs allowed"), ("cpu_governor", "CPU governor"), ("load_avg_1m", "load average (1 min)"),
              ("gpu", "GPU"), ("driver_version", "GPU driver"), ("runtime", "runtime"),
              ("runtime_version", "runtime version"), ("providers", "execution providers"),
              ("os", "OS"), ("machine", "architecture"), ("python", "Python"), ("numpy", "numpy"),
              ("hostname", "host"), ("reached_over", "reached over")]


def env_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The measurement environment as (label, value) pairs, known keys first in a readable order."""
    env = dict((report.get("target") or {}).get("environment") or {})
    rows = []
    for key, lab in ENV_LABELS:
        if key in env:
            rows.append((lab, _env_value(env.pop(key))))
    jetson = env.pop("jetson", None)
    rows += [(k.replace("_", " "), _env_value(v)) for k, v in env.items()]
    if isinstance(jetson, dict):
        rows += [(f"Jetson {k.replace('_', ' ')}", _env_value(v)) for k, v in jetson.items() if k != "raw"]
    return rows


def tool_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """Versions of the tools that exported the artifacts (from the bundle manifest)."""
    tools = (report.get("bundle") or {}).get("tool_versions") or {}
    return [(k, str(v)) for k, v in tools.items()]


def _env_value(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k} {x}" for k, x in v.items())
    return str(v)


def env_heading(report: dict[str, Any]) -> str:
    """Whose machine the environment describes: the target, or this machine when it was not reached."""
    tgt = report.get("target") or {}
    if tgt.get("measured", True):
        return f"The numbers for {tgt.get('name', 'the target')} were measured on:"
    return (f"{tgt.get('name', 'The target')} was not measured; the CPU reference numbers were measured on "
            "this machine:")


def _environment(report: dict[str, Any]) -> str:
    rows, tools = env_rows(report), tool_rows(report)
    warn = [(v.label, w) for v in rv.artifact_views(report) for w in v.warnings]

    def kv(title: str, items: list[tuple[str, str]]) -> str:
        return (f"<table><tr><th colspan='2'>{esc(title)}</th></tr>"
                + "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in items) + "</table>")

    body = ("<div class='cols'>" + (kv("measured on", rows) if rows else "<p class='muted'>No environment was recorded.</p>")
            + (kv("exported with", tools) if tools else "") + "</div>")
    warn_html = ("<p><strong>Measurement warnings</strong></p><ul>"
                 + "".join(f"<li>{esc(n)}: {esc(w)}</li>" for n, w in warn) + "</ul>") if warn else ""
    return f"<h2 id='environment'>Measurement environment</h2><p>{esc(env_heading(report))}</p>{body}{warn_html}"


def to_html(report: dict[str, Any], plot_files: dict[str, Path]) -> str:
    """The whole page; `plot_files` are embedded, so the file can be mailed or attached alone."""
    name = (report.get("recipe") or {}).get("name", "run")
    tgt = (report.get("target") or {}).get("name", "?")
    run = report.get("run") or {}
    source = (report.get("recipe") or {}).get("source") or name
    sub = " · ".join(esc(x) for x in (f"recipe {Path(str(source)).name}",
                                       f"finished {run['finished_at']}" if run.get("finished_at") else None) if x)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{esc(name)} → {esc(tgt)}: {'PASSED' if report.get('passed') else 'FAILED'}</title>"
            f"<style>{CSS}</style></head><body>"
            f"<h1>{esc(name)} → {esc(tgt)}</h1><p class='sub'>{sub}</p>"
            + _verdict(report) + _facts(report) + _shipped(report) + _artifacts(report) + _gates(report)
            + _plots(plot_files) + _environment(report)
            + "<p class='muted'>Machine-readable: <code>report.json</code>, <code>gates.junit.xml</code>; "
              "for pull requests: <code>report.md</code>.</p></body></html>\n")
