"""What a person reads in a report, derived once from a report dict for report.md, report.html and plots.

Why a separate module: the Markdown (PR comments, CI job summaries) and the HTML page must say the
same things — verdict, what shipped, per-cell gate results, where each number was measured — so
both render these plain values instead of one format being converted into the other. Nothing here
formats Markdown or HTML, and nothing reads files: the report dict is the only input. Its
artifact rows are read as typed records (pipeline.artifact_result.ArtifactResult.from_report), the
same ones the gates read; the helpers below take a record or a row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.artifact_result import ArtifactResult, as_result, as_results

PASS, FAIL, NOT_MEASURED, INCONCLUSIVE = "PASS", "FAIL", "NOT MEASURED", "INCONCLUSIVE"
PERCENTILES = ("p50", "p90", "p99")
# Columns beside the latency in report.md and report.html (the images/s column only in throughput runs)
CONFIG_COLUMNS = ("threads / streams / hint", "pre-proc p50 ms", "end-to-end ms/image")

# Which artifact-table cell each gate judges (gates not listed appear only in the gate table).
GATE_CELL = {"min_top1": "top1", "max_top1_drop": "top1", "max_top1_regression": "top1",
             "max_latency_ms": "latency", "max_latency_regression": "latency", "max_size_mb": "size"}
GATE_WORDING = {"min_top1": "top-1 ≥ {t:g} %", "max_top1_drop": "drop vs PyTorch ≤ {t:g} pts",
                "max_top1_regression": "drop vs baseline ≤ {t:g} pts", "max_latency_ms": "{pct} ≤ {t:g} ms",
                "max_latency_regression": "{pct} ≤ {t:g}× baseline", "max_size_mb": "size ≤ {t:g} MB",
                "has_artifact": "an artifact was built", "parity": "export parity agreement ≥ {t:g} %"}


def label(a: ArtifactResult | Mapping[str, Any]) -> str:
    """An artifact's name in gate rows and plots (the same string `pipeline.gates` uses)."""
    return a.label if isinstance(a, ArtifactResult) else f"{a['runtime']}/{a['precision']}"


def gate_status(g: dict[str, Any]) -> str:
    """PASS / FAIL / NOT MEASURED: the row's own `status` when it has one, else derived from `passed`.

    A row without a value whose note says "not measured" is NOT MEASURED whether or not the recipe
    allowed it (whether it failed the run is still `passed`).
    """
    status = g.get("status")
    if isinstance(status, str) and status.strip():
        return status.strip().upper().replace("_", " ")
    if g.get("value") is None and str(g.get("note", "")).lower().startswith("not measured"):
        return NOT_MEASURED
    return PASS if g.get("passed") else FAIL


def gate_failed(g: dict[str, Any]) -> bool:
    """Whether the row fails the run (an allowed NOT MEASURED row does not)."""
    return not g.get("passed", False)


def gate_rule(g: dict[str, Any], percentile: str) -> str:
    """'top-1 ≥ 80 %': the threshold in words, so a cell can say what it was judged against."""
    tpl = GATE_WORDING.get(g.get("name", ""))
    t = g.get("threshold")
    if tpl is None or not isinstance(t, (int, float)):
        return str(g.get("metric", "")) if t is None else f"{g.get('metric', '')} vs {t}"
    return tpl.format(t=t, pct=percentile)


def latency_percentile(report: dict[str, Any]) -> str:
    """The percentile the latency gates judge (the recipe's `gates.latency_percentile`)."""
    pct = (((report.get("recipe") or {}).get("config") or {}).get("gates") or {}).get("latency_percentile")
    return pct if pct in PERCENTILES else "p50"


def gate_thresholds(report: dict[str, Any]) -> dict[str, float]:
    """The recipe's gate thresholds that are set (for drawing them on plots)."""
    gates = ((report.get("recipe") or {}).get("config") or {}).get("gates") or {}
    return {k: float(v) for k, v in gates.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def measured_where(report: dict[str, Any], a: ArtifactResult | dict[str, Any]) -> str:
    """Where an artifact's numbers come from, in words ('' when it was not measured)."""
    a = as_result(a)
    if not a.measured or a.latency_ms is None and a.top1 is None:
        return ""
    target = (report.get("target") or {}).get("name", "?")
    if a.latency_note or not a.shipped:
        return "this machine's CPU (reference)"
    return target if a.where in (None, "", "local") else f"{target} ({a.where})"


def on_target(a: ArtifactResult | dict[str, Any]) -> bool:
    """Numbers measured on the target itself (not a CPU reference run beside it)."""
    a = as_result(a)
    return a.measured and a.shipped and not a.latency_note


@dataclass
class Note:
    """A note shared by several gate rows, printed once and referenced by number."""

    number: int
    text: str


@dataclass
class GateView:
    """One gate row as shown: status word, rule in words, value, and a reference to its note."""

    name: str
    artifact: str
    metric: str
    value: Any
    threshold: Any
    status: str
    failed: bool
    rule: str
    note: str = ""
    note_ref: int | None = None


@dataclass
class ArtifactView:
    """One artifact row: its numbers and, per cell, the gates that judged that cell."""

    label: str
    format: str
    precision: str
    runtime: str
    shipped: bool
    top1: float | None
    latency: dict[str, float | None]
    size_mb: float | None
    where: str
    reason: str
    cells: dict[str, list[GateView]] = field(default_factory=dict)
    gates: list[GateView] = field(default_factory=list)
    config: str = ""  # threads/streams/hint of the latency numbers (run_config_text)
    preprocess_ms: float | None = None  # decode+resize+normalize of one image, p50
    end_to_end_ms: float | None = None  # pre-processing + inference per image, at the reported batch size
    images_per_s: float | None = None  # throughput mode only
    throughput_detail: str = ""  # batch size and streams of images_per_s
    agreement: float | None = None  # % of images predicted as the PyTorch student does
    warnings: list[str] = field(default_factory=list)  # the measurement protocol's (e.g. high CoV)

    def status(self) -> str:
        """Overall word for the row: FAIL beats NOT MEASURED beats PASS; '' for reference artifacts."""
        if not self.gates:
            return "" if not self.shipped else (NOT_MEASURED if self.reason else "")
        words = {g.status for g in self.gates}
        if any(g.failed and g.status != NOT_MEASURED for g in self.gates):
            return FAIL
        if NOT_MEASURED in words:
            return NOT_MEASURED
        return PASS


def gate_views(report: dict[str, Any]) -> tuple[list[GateView], list[Note]]:
    """Gate rows with long notes that repeat across rows replaced by one numbered note.

    A long note on several rows (e.g. 'measured on this machine's CPU ...' on every CPU reference
    row) is said once below the table; short notes ('vs PyTorch student 91.2') stay in the row.
    """
    pct = latency_percentile(report)
    notes: dict[str, Note] = {}
    texts = [str(g.get("note") or "") for g in report.get("gates") or []]
    views = []
    for g, text in zip(report.get("gates") or [], texts, strict=True):
        v = GateView(g.get("name", "?"), g.get("artifact", ""), g.get("metric", ""), g.get("value"),
                     g.get("threshold"), gate_status(g), gate_failed(g), gate_rule(g, pct), text)
        if len(text) > 50 and texts.count(text) > 1:
            if text not in notes:
                notes[text] = Note(len(notes) + 1, text)
            v.note_ref, v.note = notes[text].number, ""
        views.append(v)
    return views, list(notes.values())


def artifact_views(report: dict[str, Any]) -> list[ArtifactView]:
    """Every artifact with its gate rows attached to the cells they judge."""
    gviews, _ = gate_views(report)
    out = []
    for a in as_results(report.get("artifacts") or None):
        v = ArtifactView(a.label, a.format, a.precision, a.runtime, a.shipped, a.top1,
                         {p: a.latency(p) for p in PERCENTILES},
                         a.size_bytes / 1e6 if a.size_bytes is not None else None, measured_where(report, a),
                         (a.not_measured_reason or "") if not a.measured else "")
        v.config = run_config_text(a.runtime_config)
        v.preprocess_ms, v.end_to_end_ms = preprocess_numbers(a)
        v.images_per_s, v.throughput_detail = throughput_numbers(a.throughput)
        v.agreement, v.warnings = a.agreement, list(a.warnings or [])
        # Reference artifacts get gate rows too when the target was not measured (their accuracy
        # is judged on this machine's CPU); otherwise they have none.
        v.gates = [g for g in gviews if g.artifact == v.label]
        for g in v.gates:
            v.cells.setdefault(GATE_CELL.get(g.name, "other"), []).append(g)
        out.append(v)
    return out


def run_config_text(cfg: dict[str, Any] | None) -> str:
    """'2 threads (all physical cores), 1 stream, latency hint': how a latency was taken.

    Shown beside every latency because the thread count alone moves a CPU latency by 1.5-1.7x
    (docs/benchmarks.md, "Latency fidelity"); '' when the measurement did not record it.
    """
    if not cfg:
        return ""
    threads = cfg.get("threads")
    if threads is None:
        parts = ["GPU"]
    else:
        policy = cfg.get("threads_policy")
        parts = [f"{threads} thread{'' if threads == 1 else 's'}"
                 + (f" ({policy})" if policy and policy != "explicit" else "")]
    streams = cfg.get("streams")
    if streams is not None:
        parts.append(f"{streams} stream{'' if streams == 1 else 's'}")
    if cfg.get("hint"):
        parts.append(f"{cfg['hint']} hint")
    return ", ".join(parts)


def preprocess_numbers(a: ArtifactResult | dict[str, Any]) -> tuple[float | None, float | None]:
    """(pre-processing p50 ms, end-to-end ms per image) of an artifact row; None where not measured.

    End-to-end is the runner's own sum (pre-processing p50 + inference p50 / batch size) at the
    smallest measured batch size, the one `latency_ms` reports.
    """
    a = as_result(a)
    pre = (a.preprocess or {}).get("p50_ms")
    rows = [e for e in a.latency_by_batch or [] if isinstance(e.get("batch_size"), int)]
    first = min(rows, key=lambda e: e["batch_size"]) if rows else {}
    return pre, first.get("end_to_end_per_image_ms")


def throughput_numbers(tp: dict[str, Any] | None) -> tuple[float | None, str]:
    """(images/s, 'batch 8, 4 streams') of a throughput-mode measurement; (None, '') without one."""
    if not tp or tp.get("images_per_s") is None:
        return None, ""
    detail = [f"batch {tp['batch_size']}"] if tp.get("batch_size") is not None else []
    if tp.get("streams") is not None:
        detail.append(f"{tp['streams']} stream{'' if tp['streams'] == 1 else 's'}")
    return tp["images_per_s"], ", ".join(detail)


def has_throughput(views: list[ArtifactView]) -> bool:
    """Whether the tables get an images/s column (only a throughput-mode run has numbers for it)."""
    return any(v.images_per_s is not None for v in views)


@dataclass
class Verdict:
    """The first thing a reader sees: passed or not, and in one sentence why."""

    passed: bool
    headline: str
    details: list[str]


def verdict(report: dict[str, Any]) -> Verdict:
    """PASSED/FAILED with the failing gates named, and the unmeasured target said once."""
    gviews, _ = gate_views(report)
    tgt = report.get("target") or {}
    failed = [g for g in gviews if g.failed]
    details = []
    note = (report.get("not_measured") or {}).get("note")
    if note:  # the gate stage's single note: which artifacts, why, and the ways out
        details.append(str(note))
    elif not tgt.get("measured", True):
        details.append(f"{tgt.get('name', 'the target')} was not measured: {tgt.get('reason') or 'no reason recorded'}")
    unmeasured = [g for g in failed if g.status == NOT_MEASURED]
    judged = [g for g in failed if g.status != NOT_MEASURED]
    for g in judged:
        if g.status == INCONCLUSIVE:  # not "failed": the evidence did not decide, the policy did
            details.append(f"{g.artifact}: {g.name} INCONCLUSIVE ({_short(g.value)} against {g.rule}), "
                           "counted as fail (gates.regression_inconclusive)")
        else:
            details.append(f"{g.artifact}: {g.name} failed ({_short(g.value)} against {g.rule})")
    if unmeasured and not note:
        arts = sorted({g.artifact for g in unmeasured})
        details.append(f"{len(unmeasured)} gate(s) failed because {', '.join(arts)} could not be measured "
                       "(--allow-unmeasured accepts that)")
    n = len(gviews)
    if report.get("passed"):
        headline = f"PASSED: all {n} gates passed" if n else "PASSED: no gates configured"
        allowed = [g for g in gviews if g.status == NOT_MEASURED]
        if allowed:
            headline += f" ({len(allowed)} not measured, allowed)"
        undecided = [g for g in gviews if g.status == INCONCLUSIVE]
        if undecided:  # "all passed" must not hide gates that only the policy passed
            headline += f" ({len(undecided)} inconclusive, counted as pass by gates.regression_inconclusive)"
    else:
        headline = f"FAILED: {len(failed)} of {n} gates failed"
    return Verdict(bool(report.get("passed")), headline, details)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "no value" if v is None else str(v)


@dataclass
class Shipped:
    """The bundle and the artifact in it this report recommends for the target."""

    bundle: dict[str, Any] | None
    recommended: str | None
    why: str
    files: list[tuple[str, int | None, str]]
    commands: list[str]


def recommend(report: dict[str, Any]) -> tuple[str | None, str]:
    """The fastest shipped artifact (at the gated percentile) whose every gate row is PASS.

    Returns (label or None, reason in words). An artifact whose gates passed only because an
    unmeasured target was allowed is not recommended: nothing says it is fast or accurate there.
    """
    pct = latency_percentile(report)
    views = [v for v in artifact_views(report) if v.shipped]
    ok = [v for v in views if v.gates and all(g.status == PASS for g in v.gates) and on_target_view(v)]
    timed = [v for v in ok if v.latency.get(pct) is not None]
    if timed:
        best = min(timed, key=lambda v: v.latency[pct])
        others = len(ok) - 1
        why = (f"fastest at {pct} ({best.latency[pct]:.4g} ms) of {len(ok)} artifacts that pass every gate"
               if others else "the only artifact that passes every gate")
        return best.label, why
    if ok:
        return ok[0].label, "passes every gate (no latency was measured to rank by)"
    target = (report.get("target") or {}).get("name", "the target")
    if not (report.get("target") or {}).get("measured", True):
        return None, f"nothing is recommended: {target} was not measured, so no artifact was judged there"
    if not views:
        return None, "nothing is recommended: no artifact was built for the target"
    return None, "nothing is recommended: no shipped artifact passes every gate"


def on_target_view(v: ArtifactView) -> bool:
    """An artifact row whose numbers were measured on the target (not a CPU reference)."""
    return bool(v.where) and "reference" not in v.where


def shipped(report: dict[str, Any]) -> Shipped:
    """What the bundle holds and how to run it, from `report['bundle']` (written from the manifest)."""
    b = report.get("bundle")
    rec, why = recommend(report)
    if not b:
        return Shipped(None, rec, why, [], [])
    files = [(name, info.get("size_bytes"), info.get("sha256", "")) for name, info in sorted((b.get("files") or {}).items())]
    folder = b.get("dir", "")
    name = folder.rstrip("/").split("/")[-1] if folder else ""
    commands = []
    if "infer.py" in (b.get("files") or {}):
        pick = f" --artifact {b['recommended_file']}" if b.get("recommended_file") else ""
        commands.append(f"python {folder}/infer.py{pick} IMAGE.png [IMAGE.png ...]")
        if b.get("path"):
            commands.append(f"tar xzf {b['path'].split('/')[-1]} && python {name}/infer.py{pick} IMAGE.png")
    return Shipped(b, rec, why, files, commands)
