"""PNG plots for a report: accuracy vs latency with the gates drawn, latency histograms, training
curves and, with --baseline, a comparison with the baseline run.

Every title says where its numbers were measured: on a target that could not be reached the
points are this machine's CPU reference runs, and the plot must not pass them off as the target's.
Plots are drawn at the size the HTML page shows them (no shrinking), with matplotlib's Agg backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dskd import atomic
from pipeline import report_view as rv

WIDE, TALL, DPI = 10.5, 4.2, 100
PASS_COLOR, FAIL_COLOR, GATE_COLOR = "#2e7d32", "#c62828", "#555555"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 9.5})
    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _plt()
    with atomic.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def where_title(report: dict[str, Any], arts: list[dict[str, Any]]) -> str:
    """'measured on cpu (Intel Xeon, 2 threads, onnxruntime 1.32.0)' or, for an unreached target,
    'jetson-orin not measured: this machine's CPU (reference)'."""
    tgt = report.get("target") or {}
    name = tgt.get("name", "?")
    on_tgt = [a for a in arts if rv.on_target(a)]
    env = tgt.get("environment") or {}
    hw = env.get("gpu") or env.get("cpu_model")
    bits = [b for b in (hw, f"{env['threads']} threads" if env.get("threads") else None,
                        f"{env.get('runtime')} {env.get('runtime_version')}" if env.get("runtime") else None) if b]
    detail = f" ({', '.join(bits)})" if bits else ""
    if on_tgt and len(on_tgt) == len(arts):
        return f"measured on {name}{detail}"
    if on_tgt:
        return f"filled: measured on {name}{detail}; hollow: this machine's CPU (reference)"
    if not tgt.get("measured", True):
        return f"{name} not measured: this machine's CPU{detail} (reference only)"
    return f"this machine's CPU{detail} (reference, not {name})"


def _title(what: str, where: str, width: int = 58) -> str:
    """A plot title: what it shows, then where it was measured, wrapped to the plot's width."""
    import textwrap

    return "\n".join([what, *textwrap.wrap(where, width)])


def _legend_below(ax: Any) -> None:
    """The legend under the axes, where it never hides a point or a bar."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=9, ncol=1, frameon=False)


def accuracy_vs_latency_figure(report: dict[str, Any]) -> Any:
    """Top-1 against latency at the gated percentile, p50..p99 as a whisker, gates as lines and the
    region that passes both shaded."""
    plt = _plt()
    pct = rv.latency_percentile(report)
    th = rv.gate_thresholds(report)
    arts = [a for a in report.get("artifacts") or []
            if a.get("top1") is not None and (a.get("latency_ms") or {}).get(pct) is not None]
    fig, ax = plt.subplots(figsize=(WIDE * 0.62, TALL * 1.05))
    if not arts:
        ax.text(0.5, 0.5, "no artifact has both top-1 and latency measured", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        ax.set_title(_title("accuracy vs latency", where_title(report, report.get("artifacts") or [])), fontsize=10)
        return fig
    xs = [a["latency_ms"][pct] for a in arts]
    ys = [a["top1"] for a in arts]
    hi = [max(x, (a["latency_ms"].get("p99") or x)) for a, x in zip(arts, xs, strict=True)]
    max_lat = th.get("max_latency_ms")
    y_floor = th.get("min_top1")
    student = (report.get("student") or {}).get("top1")
    drop_floor = student - th["max_top1_drop"] if student is not None and "max_top1_drop" in th else None
    floors = [f for f in (y_floor, drop_floor) if f is not None]
    x_all = xs + hi + ([max_lat] if max_lat else [])
    log_x = max(x_all) / max(1e-9, min(x_all)) > 30
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (a, x, y) in enumerate(zip(arts, xs, ys, strict=True)):
        c = colors[i % len(colors)]
        filled = rv.on_target(a)
        lat = a["latency_ms"]
        lo_w, hi_w = lat.get("p50") or x, lat.get("p99") or x
        ax.plot([lo_w, hi_w], [y, y], color=c, lw=1.2, alpha=0.6)
        ax.scatter([x], [y], s=70, color=c if filled else "white", edgecolors=c, linewidths=2, zorder=3,
                   label=f"{rv.label(a)}{'' if filled else ' (CPU reference)'}")
    y_lo = min(ys + floors) - 2
    y_hi = max(ys + floors) + 2
    ax.set_ylim(y_lo, min(100.5, y_hi) if y_hi > y_lo + 1 else y_lo + 4)
    if log_x:
        ax.set_xscale("log")
        ax.set_xlim(min(x_all) / 1.6, max(x_all) * 1.6)
    else:
        ax.set_xlim(0, max(x_all) * 1.15)
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    pass_x1 = min(max_lat, x1) if max_lat else x1
    pass_y0 = max(floors) if floors else y0
    ax.fill_between([x0, pass_x1], pass_y0, y1, color=PASS_COLOR, alpha=0.10, lw=0,
                    label="passes the accuracy and latency gates")
    if max_lat:
        ax.axvline(max_lat, color=GATE_COLOR, ls="--", lw=1.2, label=f"gate max_latency_ms {max_lat:g} ({pct})")
    if y_floor is not None:
        ax.axhline(y_floor, color=GATE_COLOR, ls="-.", lw=1.2, label=f"gate min_top1 {y_floor:g} %")
    if drop_floor is not None:
        ax.axhline(drop_floor, color=GATE_COLOR, ls=":", lw=1.4,
                   label=f"gate max_top1_drop {th['max_top1_drop']:g} below the student's {student:.2f} %")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel(f"latency {pct}, batch 1 (ms{', log scale' if log_x else ''}); line: p50 to p99")
    ax.set_ylabel("top-1 on the test split (%)")
    ax.set_title(_title("accuracy vs latency", where_title(report, arts)), fontsize=10.5)
    ax.grid(alpha=0.3, which="both")
    _legend_below(ax)
    return fig


def _hist_range(samples: dict[str, list[float]]) -> tuple[float, float]:
    """Shared x range: from the fastest call to the pooled 99th percentile, but at most three times
    the slowest artifact's p90, so one stall does not squash every distribution into one bin."""
    import numpy as np

    pool = np.concatenate([np.asarray(s, dtype=float) for s in samples.values()])
    p90s = [float(np.percentile(s, 90)) for s in samples.values()]
    upper = min(float(np.percentile(pool, 99)), 3 * max(p90s))
    lower = float(pool.min())
    return lower, max(upper, lower * 1.01 + 1e-6)


def latency_distribution_figure(report: dict[str, Any]) -> Any:
    """Per-call latency histograms on shared bins, clipped at a high percentile (clipped calls counted)."""
    import numpy as np

    plt = _plt()
    arts = [a for a in report.get("artifacts") or [] if a.get("latency_samples_ms")]
    fig, ax = plt.subplots(figsize=(WIDE * 0.62, TALL * 1.05))
    if not arts:
        ax.text(0.5, 0.5, "no latency samples (nothing was measured)", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        ax.set_title(_title("latency distribution", where_title(report, report.get("artifacts") or [])), fontsize=10)
        return fig
    samples = {rv.label(a): a["latency_samples_ms"] for a in arts}
    lo, hi = _hist_range(samples)
    bins = np.linspace(lo, hi, 60)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    total_clipped = 0
    for i, a in enumerate(arts):
        s = np.asarray(a["latency_samples_ms"], dtype=float)
        c = colors[i % len(colors)]
        clipped = int((s > hi).sum())
        total_clipped += clipped
        name = rv.label(a) + ("" if rv.on_target(a) else " (CPU reference)")
        extra = f", {clipped} of {len(s)} calls > {hi:.3g} ms not shown" if clipped else f", {len(s)} calls"
        ax.hist(s[s <= hi], bins=bins, histtype="stepfilled", alpha=0.35, color=c, edgecolor=c, lw=1.2,
                label=f"{name}: p50 {np.median(s):.3g} ms{extra}")
        ax.axvline(float(np.median(s)), color=c, ls="--", lw=1)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("latency per batch-1 call (ms)")
    ax.set_ylabel("calls")
    clip_note = f"; x axis clipped at {hi:.3g} ms" if total_clipped else ""
    ax.set_title(_title(f"latency distribution (shared bins{clip_note})", where_title(report, arts)), fontsize=10.5)
    ax.grid(alpha=0.3)
    _legend_below(ax)
    return fig


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows (an empty list when the file is missing, e.g. a loaded teacher)."""
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _total_loss(row: dict[str, Any]) -> float | None:
    """The row's total loss: its own total when it logs one, else the sum of its loss_* terms."""
    for key in ("loss", "loss_total"):
        if isinstance(row.get(key), (int, float)):
            return float(row[key])
    terms = [v for k, v in row.items() if k.startswith("loss_") and isinstance(v, (int, float))]
    return float(sum(terms)) if terms else None


def training_curves_figure(curves: dict[str, Path]) -> Any:
    """Loss and accuracy per epoch for the teacher and the student, legible at the page's width."""
    plt = _plt()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(WIDE, TALL))
    colors = {"teacher": "#1f77b4", "student": "#d62728"}
    drawn = False
    for name, p in curves.items():
        rows = read_metrics(p)
        if not rows:
            continue
        drawn = True
        c = colors.get(name)
        ep = [r["epoch"] for r in rows]
        marker = "o" if len(rows) <= 30 else None
        ax_loss.plot(ep, [_total_loss(r) for r in rows], color=c, marker=marker, label=name)
        acc_key = next((k for k in rows[-1] if k.endswith("_top1")), None)
        if acc_key:
            split = acc_key[:-5]
            ax_acc.plot(ep, [r.get(acc_key) for r in rows], color=c, marker=marker, label=f"{name}, {split} split")
        ax_acc.plot(ep, [r.get("train_acc") for r in rows], color=c, ls="--", alpha=0.7,
                    label=f"{name}, training batches")
    ax_loss.set_title("training loss (sum of the method's terms)")
    ax_acc.set_title("top-1 accuracy (%) in PyTorch")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(loc="best")
        ax.xaxis.get_major_locator().set_params(integer=True)
        lo, hi = ax.get_xlim()
        if hi - lo < 2:  # one or two epochs: keep the ticks whole numbers
            ax.set_xlim(lo - 0.5, hi + 0.5)
    if not drawn:
        ax_loss.text(0.5, 0.5, "no training log (teacher loaded from a checkpoint?)", ha="center",
                     transform=ax_loss.transAxes)
    fig.tight_layout()
    return fig


def baseline_comparison_figure(report: dict[str, Any]) -> Any | None:
    """This run against the --baseline report, per shipped artifact: top-1 and latency side by side.

    Latency uses the interleaved A/B medians measured in this job when there are any (the number
    the regression gate judges), else the two reports' recorded numbers, and the panel says which.
    """
    import numpy as np

    base = report.get("baseline_artifacts")
    if not base:
        return None
    plt = _plt()
    pct = rv.latency_percentile(report)
    th = rv.gate_thresholds(report)
    by_key = {(b["format"], b["precision"], b["runtime"]): b for b in base}
    pairs = [(a, by_key.get((a["format"], a["precision"], a["runtime"])))
             for a in report.get("artifacts") or [] if a.get("shipped", True)]
    pairs = [(a, b) for a, b in pairs if b is not None]
    fig, (ax_acc, ax_lat) = plt.subplots(1, 2, figsize=(WIDE, TALL))
    if not pairs:
        for ax in (ax_acc, ax_lat):
            ax.text(0.5, 0.5, "the baseline has none of this run's artifacts", ha="center", transform=ax.transAxes)
            ax.set_axis_off()
        return fig
    names = [rv.label(a) for a, _ in pairs]
    x = np.arange(len(pairs))
    w = 0.38
    top_b = [b.get("top1") or 0 for _, b in pairs]
    top_c = [a.get("top1") or 0 for a, _ in pairs]
    ax_acc.bar(x - w / 2, top_b, w, color="#9e9e9e", label="baseline")
    ax_acc.bar(x + w / 2, top_c, w, color="#1f77b4", label="this run")
    if "max_top1_regression" in th:
        for i, tb in enumerate(top_b):
            ax_acc.plot([i - w, i + w], [tb - th["max_top1_regression"]] * 2, color=GATE_COLOR, ls="--", lw=1.2)
    lo = min(top_b + top_c) - 3
    ax_acc.set_ylim(max(0, lo), min(100, max(top_b + top_c) + 2))
    ax_acc.set_title("top-1 (%)" + ("\ndashed: lowest that passes max_top1_regression"
                                    if "max_top1_regression" in th else ""), fontsize=10)
    inter = all((a.get("baseline_comparison") or {}).get("baseline_p50_ms") for a, _ in pairs)
    if inter:
        lat_b = [float(np.median(a["baseline_comparison"]["baseline_p50_ms"])) for a, _ in pairs]
        lat_c = [float(np.median(a["baseline_comparison"]["candidate_p50_ms"])) for a, _ in pairs]
        how = "median p50 interleaved A/B in this job"
    else:
        lat_b = [(b.get("latency_ms") or {}).get(pct) or 0 for _, b in pairs]
        lat_c = [(a.get("latency_ms") or {}).get(pct) or 0 for a, _ in pairs]
        how = f"{pct} from the two reports (two runs)"
    ax_lat.bar(x - w / 2, lat_b, w, color="#9e9e9e", label="baseline")
    ax_lat.bar(x + w / 2, lat_c, w, color="#ff7f0e", label="this run")
    ax_lat.set_ylim(0, max(lat_b + lat_c + [1e-9]) * 1.18)  # room for the value labels
    if "max_latency_regression" in th:
        for i, lb in enumerate(lat_b):
            ax_lat.plot([i - w, i + w], [lb * (1 + th["max_latency_regression"])] * 2, color=GATE_COLOR, ls="--", lw=1.2)
    ax_lat.set_title(f"latency (ms), {how}" + ("\ndashed: highest that passes max_latency_regression"
                                                if "max_latency_regression" in th else ""), fontsize=10)
    for ax in (ax_acc, ax_lat):
        ax.set_xticks(x, names)
        ax.grid(alpha=0.3, axis="y")
        for bars in ax.containers:
            ax.bar_label(bars, fmt="%.3g", fontsize=8.5, padding=2)
        _legend_below(ax)
    fig.suptitle(_title("this run vs baseline", where_title(report, [a for a, _ in pairs]), 110), fontsize=10.5)
    fig.tight_layout()
    return fig


def _write(fig: Any | None, path: Path) -> Path | None:
    return None if fig is None else _save(fig, path)


def make_plots(report: dict[str, Any], out_dir: Path, curves: dict[str, Path]) -> dict[str, Path]:
    """Every plot the report shows, as PNGs in `out_dir`; keys name them in report.md/html."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"accuracy_vs_latency": accuracy_vs_latency_figure(report),
               "latency_distribution": latency_distribution_figure(report),
               "training_curves": training_curves_figure(curves),
               "baseline_comparison": baseline_comparison_figure(report)}
    files = {name: _write(fig, out_dir / f"{name}.png") for name, fig in figures.items()}
    return {name: p for name, p in files.items() if p is not None}

