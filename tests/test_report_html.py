"""report.html / report.md / plots a person reads: built from real `pipeline run` outputs (digits, one epoch).

One module-scoped run on the `cpu` target (gates set where a one-epoch student passes, so there is a
recommended artifact) and one on `jetson-orin` without a device (served from the first run's cached
stages), then every check parses what was written: the HTML with html.parser, the plots as
matplotlib figures, the bundle's infer.py by running the command the page prints.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from pipeline import plots, report_view
from pipeline.recipe import load_recipe
from pipeline.report import to_markdown, write_report
from pipeline.report_html import to_html
from pipeline.run import execute

pytestmark = pytest.mark.slow  # every test reads a real tiny run (two module runs, ~10-35 s)

CHROMIUM = Path("/usr/bin/chromium")
SECTIONS = ("What shipped", "Artifacts", "Gates", "Plots", "Measurement environment")
TINY = {"teacher.epochs": 1, "student.epochs": 1, "teacher.model": "resnet8", "student.method": "kd",
        "student.options": {}, "target.min_iters": 30, "target.min_seconds": 0.2,
        "target.warmup_seconds": 0.05,
        # where a one-epoch student lands, so the run passes and one artifact is recommended
        "gates.min_top1": 5.0, "gates.max_top1_drop": 50.0, "gates.max_latency_ms": 1000.0, "gates.max_size_mb": 5.0}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("report-html") / "cpu"
    execute(load_recipe("digits-smoke", TINY), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def jetson_run(cpu_run: Path, tmp_path_factory) -> Path:
    """The same student for jetson-orin with no device: TensorRT rows not measured, ONNX rows on this CPU."""
    run_dir = tmp_path_factory.mktemp("report-html-jetson") / "jetson"
    shutil.copytree(cpu_run, run_dir, ignore=shutil.ignore_patterns("*.lock", ".lock*"))
    execute(load_recipe("digits-smoke", {**TINY, "target.name": "jetson-orin"}), run_dir)
    return run_dir


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _curves(run_dir: Path) -> dict[str, Path]:
    return {"teacher": next(run_dir.glob("stages/teacher-*/metrics.jsonl")),
            "student": next(run_dir.glob("stages/distill-*/metrics.jsonl"))}


class _Page(HTMLParser):
    """Visible text (style excluded), headings in order, <code> texts and table cells."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.headings: list[str] = []
        self.codes: list[str] = []
        self.imgs = 0
        self._stack: list[str] = []
        self.verdict_at: int | None = None

    def handle_starttag(self, tag, attrs):
        self._stack.append(tag)
        cls = dict(attrs).get("class") or ""
        if tag == "div" and "verdict" in cls.split() and self.verdict_at is None:
            self.verdict_at = len(self.headings)
        if tag == "img":
            self.imgs += 1
            self._stack.pop()

    def handle_endtag(self, tag):
        while self._stack and self._stack.pop() != tag:
            pass

    def handle_data(self, data):
        if "style" in self._stack or "title" in self._stack:
            return
        self.text.append(data)
        if self._stack and self._stack[-1] in ("h1", "h2"):
            self.headings.append(data.strip())
        if "code" in self._stack:
            self.codes.append(data)


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    return p


def test_html_reads_as_a_page_not_markdown(cpu_run: Path):
    page = _parse((cpu_run / "report.html").read_text())
    text = "".join(page.text)
    for marker in ("**", "`", "]("):
        assert marker not in text, f"Markdown marker {marker!r} in the page text"
    assert page.headings[0].startswith("digits-smoke")
    assert page.verdict_at == 1, "the verdict comes right after the title, before any section"
    assert [h for h in page.headings[1:]] == list(SECTIONS)
    assert page.imgs >= 3  # plots are embedded (self-contained page)
    assert "True" not in text.split() and "False" not in text.split()


def test_what_shipped_comes_from_the_bundle_manifest(cpu_run: Path):
    report = _report(cpu_run)
    manifest = json.loads((cpu_run / report["bundle"]["manifest"]).read_text())
    page = _parse((cpu_run / "report.html").read_text())
    text = "".join(page.text)
    assert (cpu_run / report["bundle"]["path"]).is_file()
    assert report["bundle"]["path"] in page.codes
    for name, info in manifest["files"].items():
        assert name in page.codes and info["sha256"] in page.codes, name
    md = (cpu_run / "report.md").read_text()
    assert all(info["sha256"] in md for info in manifest["files"].values())
    # the recommendation is the fastest artifact (gated percentile) whose every gate row passed
    pct = report["recipe"]["config"]["gates"]["latency_percentile"]
    ok = [a for a in report["artifacts"] if a["shipped"] and a["measured"]
          and all(g["passed"] and g.get("status", "PASS") == "PASS"
                  for g in report["gates"] if g["artifact"] == f"{a['runtime']}/{a['precision']}")]
    assert report["passed"] and ok, "TINY gates are meant to pass"
    best = min(ok, key=lambda a: a["latency_ms"][pct])
    label = f"{best['runtime']}/{best['precision']}"
    assert report["bundle"]["recommended"] == label == manifest["recommended"]
    assert f"Recommended for cpu: {label}" in " ".join(text.split())
    assert f"**{label}**" in md


def test_the_printed_command_runs_the_bundle(cpu_run: Path, tmp_path: Path):
    """The first command of 'What shipped' classifies a real test image from the run folder."""
    from PIL import Image

    from dskd.data import load_data

    report = _report(cpu_run)
    cmd = report_view.shipped(report).commands[0]
    assert cmd.startswith("python ") and "infer.py" in cmd
    data = load_data("digits", input_size=16, in_chans=1, progress=False)
    img = tmp_path / "digit.png"
    Image.fromarray(data.test_x[0, 0].numpy()).save(img)
    args = cmd.split()
    args = [sys.executable] + [str(img) if a == "IMAGE.png" else a for a in args[1:] if a not in ("[IMAGE.png", "...]")]
    proc = subprocess.run(args, cwd=cpu_run, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert str(img) in proc.stdout and any(lab in proc.stdout.split() for lab in data.class_names), proc.stdout


def test_artifact_cells_carry_percentiles_and_gate_results(cpu_run: Path):
    report = _report(cpu_run)
    page = (cpu_run / "report.html").read_text()
    for p in ("p50 ms", "p90 ms", "p99 ms"):
        assert f"<th>{p}</th>" in page
    views = report_view.artifact_views(report)
    for v in views:
        assert v.cells.get("top1") and v.cells.get("latency") and v.cells.get("size"), v.label
        assert all(g.status in ("PASS", "FAIL", "NOT MEASURED") for g in v.gates)
    md = (cpu_run / "report.md").read_text()
    assert "| p50 ms | p90 ms | p99 ms |" in md and "**PASS** (top-1 ≥ 5 %)" in md


def test_unmeasured_target_is_said_once_and_never_claims_cpu_numbers(jetson_run: Path):
    report = _report(jetson_run)
    assert report["target"]["name"] == "jetson-orin" and not report["target"]["measured"]
    page = _parse((jetson_run / "report.html").read_text())
    text = " ".join("".join(page.text).split())
    assert "NOT MEASURED" in text and "True" not in text.split()
    reason = report["target"]["reason"]
    assert text.count(reason) == 1, "the reason is said once, not in every gate row"
    assert report_view.recommend(report)[0] is None  # nothing was judged on the device
    for fig_fn in (plots.accuracy_vs_latency_figure, plots.latency_distribution_figure):
        fig = fig_fn(report)
        title = fig.axes[0].get_title()
        assert "jetson-orin not measured" in title and "CPU" in title, title
        assert "measured on jetson-orin" not in title
    assert "not measured" in (jetson_run / "report.md").read_text()


def test_accuracy_plot_draws_the_gates_and_shades_the_passing_region(cpu_run: Path):
    report = _report(cpu_run)
    ax = plots.accuracy_vs_latency_figure(report).axes[0]
    assert ax.get_title().startswith("accuracy vs latency\nmeasured on cpu")
    vertical = [ln for ln in ax.get_lines() if len(set(ln.get_xdata())) == 1 and set(ln.get_xdata()) == {1000.0}]
    horizontal = [ln for ln in ax.get_lines() if len(set(ln.get_ydata())) == 1 and set(ln.get_ydata()) == {5.0}]
    assert vertical and horizontal, "max_latency_ms and min_top1 drawn as lines"
    shaded = [c for c in ax.collections if "passes" in str(c.get_label())]
    assert shaded, "passing region shaded"
    (x0, y0), (x1, y1) = shaded[0].get_paths()[0].get_extents().get_points()
    student = report["student"]["top1"]
    assert x1 == pytest.approx(min(1000.0, ax.get_xlim()[1])) and y0 == pytest.approx(max(5.0, student - 50.0))


def test_histograms_share_bins_and_count_what_is_clipped(cpu_run: Path):
    report = copy.deepcopy(_report(cpu_run))
    arts = [a for a in report["artifacts"] if a.get("latency_samples_ms")]
    assert len(arts) >= 2
    arts[0]["latency_samples_ms"] = list(arts[0]["latency_samples_ms"]) + [8.0]  # one stall
    ax = plots.latency_distribution_figure(report).axes[0]
    lo, hi = ax.get_xlim()
    assert hi < 8.0, "one outlier does not stretch the axis"
    edges = [np.unique(np.round(p.get_path().vertices[:, 0], 9)) for p in ax.patches]
    assert len(edges) == len(arts)
    grid = np.linspace(lo, hi, 60)
    for e in edges:  # every histogram's edges lie on the one shared grid
        assert np.all(np.min(np.abs(e[:, None] - grid[None, :]), axis=1) < 1e-6 * max(1.0, hi))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("not shown" in t for t in legend) and "clipped" in ax.get_title()


def test_training_curves_are_drawn_at_page_width(cpu_run: Path):
    fig = plots.training_curves_figure(_curves(cpu_run))
    width_px = fig.get_size_inches()[0] * plots.DPI
    assert 900 <= width_px <= 1180, "shown at its own size in a 1180 px page, not shrunk"
    assert all(len(ax.get_lines()) >= 2 for ax in fig.axes)


def test_baseline_comparison_plot_when_a_baseline_is_given(cpu_run: Path, tmp_path: Path):
    from pipeline.report import baseline_artifacts

    report = copy.deepcopy(_report(cpu_run))
    report["baseline_artifacts"] = baseline_artifacts(_report(cpu_run))
    out = tmp_path / "run"
    (out / "plots").mkdir(parents=True)
    files = write_report(report, out, _curves(cpu_run))
    assert "baseline_comparison" in files["plots"]
    assert (out / files["plots"]["baseline_comparison"]).stat().st_size > 10_000
    assert "This run against the --baseline report." in (out / "report.html").read_text()
    assert "baseline_comparison" not in write_report(_report(cpu_run), tmp_path / "nobase", _curves(cpu_run))["plots"]


def test_user_text_is_escaped_and_markdown_cells_stay_whole(cpu_run: Path):
    report = copy.deepcopy(_report(cpu_run))
    report["recipe"]["name"] = "<b>mine</b> **bold** `x`"
    report["gates"][0]["note"] = "a | b <i>"
    page = to_html(report, {})
    assert "<b>mine</b>" not in page and "&lt;b&gt;mine&lt;/b&gt;" in page and "<i>" not in page
    md = to_markdown(report, {})
    row = next(ln for ln in md.splitlines() if "a \\| b" in ln)
    assert row.count(" | ") == 5  # six cells: the note's pipe is escaped, not a new column


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed (/usr/bin/chromium)")
def test_page_renders_in_headless_chromium(cpu_run: Path, tmp_path: Path):
    """One real render; the screenshot stays in pytest's temp folder, never in the repository."""
    from PIL import Image

    shot = tmp_path / "x.png"
    proc = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000",
                           f"--screenshot={shot}", (cpu_run / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2000, 1280)
    top = img[:400]
    assert (top.reshape(-1, 3) < 100).all(axis=1).mean() > 0.002, "the title and verdict are drawn"
    green = (top[..., 1] > 200) & (top[..., 0] < 240) & (top[..., 2] < 240)
    assert green.mean() > 0.01, "the PASSED verdict box is drawn near the top"


def test_run_records_threads_preprocessing_and_bundle_config(cpu_run: Path):
    """Issue 20 through a real `pipeline run`: every measured row says how its latency was taken."""
    report = _report(cpu_run)
    measured = [a for a in report["artifacts"] if a["measured"]]
    want = report["recipe"]["config"]["target"]["threads"]  # digits-smoke sets it (not the target's default)
    assert measured and want > 1
    for a in measured:
        assert a["runtime_config"]["threads"] == want and a["runtime_config"]["threads_policy"] == "explicit"
        assert a["preprocess"]["p50_ms"] > 0 and a["throughput"] is None  # the recipe's default: latency hint
        assert a["latency_by_batch"][0]["end_to_end_per_image_ms"] > a["latency_ms"]["p50"]
    for name in ("report.md", "report.html"):
        text = (cpu_run / name).read_text()
        assert f"{want} threads, 1 stream, latency hint" in text and "pre-proc p50 ms" in text, name
    manifest = json.loads((cpu_run / report["bundle"]["manifest"]).read_text())
    shipped = {rv_label(a): a["runtime_config"] for a in measured if a["shipped"]}
    assert {f"{e['runtime']}/{e['precision']}": e.get("runtime_config") for e in manifest["artifacts"]
            if e["measured"]} == shipped


def rv_label(a: dict) -> str:
    return f"{a['runtime']}/{a['precision']}"
