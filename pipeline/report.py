"""Reports: `report.json` (machine-readable, versioned), `report.md`, `report.html` and PNG plots.

`report.json` schema (schema_version 1) — documented in docs/report-schema.md:
recipe, target, teacher {model, top1}, student {model, method, top1, params, macs},
artifacts [{format, precision, runtime, path, sha256, size_bytes, top1, agreement,
latency_ms {p50, p90, p99, mean, std, cov}, measured, not_measured_reason, shipped}],
gates [{name, artifact, metric, value, threshold, passed, note}], passed.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from dskd import atomic

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
        return "pass" if v else "FAIL"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"
    return str(v)


def artifact_rows(report: dict[str, Any]) -> list[list[Any]]:
    gate_status: dict[str, bool] = {}
    for g in report.get("gates", []):
        gate_status[g["artifact"]] = gate_status.get(g["artifact"], True) and g["passed"]
    rows = []
    for a in report.get("artifacts", []):
        label = f"{a['runtime']}/{a['precision']}"
        lat = a.get("latency_ms") or {}
        status = gate_status.get(label)
        rows.append([a["format"], a["precision"], a["runtime"], a.get("top1"), lat.get("p50"),
                     round(a["size_bytes"] / 1e6, 3) if a.get("size_bytes") is not None else None,
                     "not measured" if not a.get("measured", True) else ("—" if status is None else ("pass" if status else "FAIL"))])
    return rows


ARTIFACT_COLUMNS = ["format", "precision", "runtime", "top1 %", "p50 ms", "size MB", "gates"]
GATE_COLUMNS = ["gate", "artifact", "metric", "value", "threshold", "status", "note"]


def gate_rows(report: dict[str, Any]) -> list[list[Any]]:
    return [[g["name"], g.get("artifact", ""), g["metric"], g["value"], g["threshold"], g["passed"], g.get("note", "")]
            for g in report.get("gates", [])]


def to_markdown(report: dict[str, Any], plots: dict[str, str]) -> str:
    t, s = report["teacher"], report["student"]
    tgt = report["target"]
    lines = [f"# {report['recipe'].get('name', 'run')} → `{tgt['name']}`: {'PASSED' if report['passed'] else 'FAILED'}", ""]
    lines += [f"- Teacher: `{t['model']}` top-1 {_fmt(t.get('top1'))} %",
              f"- Student: `{s['model']}` ({s['method']}) top-1 {_fmt(s.get('top1'))} %, "
              f"{s.get('params', 0):,} params, {s.get('macs', 0):,} MACs",
              f"- Target: `{tgt['name']}` ({tgt.get('runtime', '?')})"
              + ("" if tgt.get("measured", True) else f" — **not measured**: {tgt.get('reason', '')}"), ""]
    lines += ["## Artifacts", "", "| " + " | ".join(ARTIFACT_COLUMNS) + " |", "|" + "---|" * len(ARTIFACT_COLUMNS)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in artifact_rows(report)]
    lines += ["", "## Gates", ""]
    if report.get("gates"):
        lines += ["| " + " | ".join(GATE_COLUMNS) + " |", "|" + "---|" * len(GATE_COLUMNS)]
        lines += ["| " + " | ".join(_fmt(c, 3) for c in r) + " |" for r in gate_rows(report)]
    else:
        lines.append("No gates configured.")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()]
    env = tgt.get("environment")
    if env:
        lines += ["", "## Measurement environment", "", "```json", json.dumps(env, indent=2), "```"]
    return "\n".join(lines) + "\n"


def to_html(report: dict[str, Any], plot_files: dict[str, Path]) -> str:
    def table(cols: list[str], rows: list[list[Any]]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(
            f"<td class='{'fail' if _fmt(c) == 'FAIL' else ''}'>{html.escape(_fmt(c, 3))}</td>" for c in r) + "</tr>"
            for r in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    md_head = to_markdown(report, {}).split("## Artifacts")[0]
    summary = "".join(f"<li>{html.escape(ln[2:])}</li>" for ln in md_head.splitlines() if ln.startswith("- "))
    imgs = "".join(
        f"<figure><img alt='{html.escape(n)}' src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
        f"<figcaption>{html.escape(n)}</figcaption></figure>" for n, p in plot_files.items() if p.exists())
    status = "PASSED" if report["passed"] else "FAILED"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(report['recipe'].get('name', 'run'))} report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}.fail{{color:#b00;font-weight:bold}}
.status{{font-size:1.4em;color:{'#070' if report['passed'] else '#b00'}}}figure{{display:inline-block;margin:8px}}img{{max-width:520px}}</style>
</head><body><h1>{html.escape(report['recipe'].get('name', 'run'))} → {html.escape(report['target']['name'])}</h1>
<p class="status">{status}</p><ul>{summary}</ul><h2>Artifacts</h2>{table(ARTIFACT_COLUMNS, artifact_rows(report))}
<h2>Gates</h2>{table(GATE_COLUMNS, gate_rows(report))}<h2>Plots</h2>{imgs}</body></html>
"""


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def make_plots(report: dict[str, Any], out_dir: Path, curves: dict[str, Path]) -> dict[str, Path]:
    """Accuracy vs latency, latency distribution and training curves, as PNGs in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    arts = [a for a in report["artifacts"] if a.get("top1") is not None]

    fig, ax = plt.subplots(figsize=(6, 4))
    measured = [a for a in arts if (a.get("latency_ms") or {}).get("p50") is not None]
    for a in measured:
        ax.scatter(a["latency_ms"]["p50"], a["top1"], s=40)
        ax.annotate(f"{a['runtime']}/{a['precision']}", (a["latency_ms"]["p50"], a["top1"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    if not measured:
        ax.text(0.5, 0.5, "latency not measured on this target", ha="center", transform=ax.transAxes)
    ax.set_xlabel("latency p50 (ms, batch 1)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"accuracy vs latency on {report['target']['name']}")
    ax.grid(alpha=0.3)
    files["accuracy_vs_latency"] = _save(fig, out_dir / "accuracy_vs_latency.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    any_samples = False
    for a in report["artifacts"]:
        samples = a.get("latency_samples_ms")
        if samples:
            any_samples = True
            ax.hist(samples, bins=40, alpha=0.5, label=f"{a['runtime']}/{a['precision']}")
    if any_samples:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no latency samples", ha="center", transform=ax.transAxes)
    ax.set_xlabel("latency per batch-1 call (ms)")
    ax.set_ylabel("count")
    ax.set_title("latency distribution")
    files["latency_distribution"] = _save(fig, out_dir / "latency_distribution.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, path in curves.items():
        rows = _read_metrics(path)
        if not rows:
            continue
        ep = [r["epoch"] for r in rows]
        loss_keys = [k for k in rows[0] if k.startswith("loss_")]
        total = [sum(r[k] for k in loss_keys) for r in rows]
        axes[0].plot(ep, total, label=name)
        acc_key = next((k for k in rows[-1] if k.endswith("_top1")), None)
        if acc_key:
            axes[1].plot(ep, [r.get(acc_key) for r in rows], label=f"{name} ({acc_key})")
        axes[1].plot(ep, [r.get("train_acc") for r in rows], linestyle="--", label=f"{name} (train)")
    axes[0].set_title("training loss (sum of terms)")
    axes[1].set_title("accuracy (%)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    files["training_curves"] = _save(fig, out_dir / "training_curves.png")
    return files


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], run_dir: Path, curves: dict[str, Path]) -> dict[str, str]:
    plots = make_plots(report, run_dir / "plots", curves)
    rel = {k: str(p.relative_to(run_dir)) for k, p in plots.items()}
    atomic.write_json(run_dir / "report.json", report)
    atomic.write_text(run_dir / "report.md", to_markdown(report, rel))
    atomic.write_text(run_dir / "report.html", to_html(report, plots))
    return {"report_json": "report.json", "report_md": "report.md", "report_html": "report.html", "plots": rel}
