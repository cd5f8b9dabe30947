"""`pipeline run`: teacher → distill → export → optimize → deploy → gate → report, each stage cached."""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path
from typing import Any

from dskd import atomic
from dskd.errors import UserError
from pipeline import gates as gates_mod
from pipeline.artifact_result import REPORT_KEYS, ArtifactResult, results_from_stage
from pipeline.lock import run_lock
from pipeline.recipe import Recipe, check_inputs, key_label
from pipeline.report import SCHEMA_VERSION, baseline_artifacts, bundle_section, write_report
from pipeline.report_view import recommend
from pipeline.ship_stages import DEPLOY, EXPORT, OPTIMIZE
from pipeline.stage import STAGE_FILE, RunContext, Stage, run_stage, stable_hash
from pipeline.train_stages import DISTILL, TEACHER


def _gate_config(ctx: RunContext) -> dict[str, Any]:
    """Everything the gate rows depend on besides the deploy stage's key: thresholds, the
    unmeasured policy, the baseline's content and the version of the gate logic."""
    base = ctx.options.get("baseline_report")
    return {"gates": ctx.recipe.gates.__dict__, "allow_unmeasured": ctx.recipe.target.allow_unmeasured,
            "baseline": stable_hash(base) if base else None, "logic": gates_mod.GATE_LOGIC_VERSION}


def _baseline_record(ctx: RunContext) -> dict[str, Any] | None:
    """Which baseline this invocation gated against (None: no --baseline)."""
    base = ctx.options.get("baseline_report")
    if not base:
        return None
    return {"path": ctx.options.get("baseline_arg"), "sha256": stable_hash(base),
            "recipe": (base.get("recipe") or {}).get("name") if isinstance(base.get("recipe"), dict) else None}


# What report.json keeps of a deploy row (docs/report-schema.md): declared with the record,
# pipeline.artifact_result (kept here under its old name for readers of this module)
REPORT_ARTIFACT_KEYS = REPORT_KEYS


def report_artifact(a: ArtifactResult | dict[str, Any]) -> dict[str, Any]:
    """One report.json artifact row from a deploy result (or a deploy-stage row, read strictly)."""
    return (a if isinstance(a, ArtifactResult) else ArtifactResult.from_json(a, "deploy row")).to_report_row()


def deploy_results(ctx: RunContext) -> list[ArtifactResult]:
    """The deploy stage's rows as typed records: the one place the gate and report stages read
    that stage's JSON (a hand-edited or corrupt stage.json is one line naming the field)."""
    return results_from_stage(ctx.out("deploy"), str(ctx.folder("deploy") / STAGE_FILE))


def build_report(ctx: RunContext, rows: bool = True) -> dict[str, Any]:
    """The report dict; `artifacts` are report.json rows, or with `rows=False` the deploy
    stage's typed records themselves (the gate stage: the gates read them, nothing is written)."""
    r: Recipe = ctx.recipe
    from pipeline.artifact_result import checked_summary

    teacher, student = (checked_summary(ctx.out(n), str(ctx.folder(n) / STAGE_FILE), n) for n in ("teacher", "distill"))
    deploy = ctx.out("deploy")
    measured = checked_target_available(deploy, str(ctx.folder("deploy") / STAGE_FILE))
    from deploy_targets.registry import get_target

    tgt = get_target(r.target.name)
    results = deploy_results(ctx)
    artifacts: list[Any] = [a.to_report_row() for a in results] if rows else results
    return {
        "schema_version": SCHEMA_VERSION,
        "recipe": {"name": r.name, "source": r.source, "config": r.to_dict()},
        "target": {"name": tgt.name, "runtime": tgt.runtime, "device": r.target.device or None,
                   "measured": measured, "reason": deploy.get("reason", ""),
                   "environment": deploy.get("environment")},
        "teacher": {"model": teacher.get("model"), "top1": teacher.get("top1"), "params": teacher.get("params"),
                    "loaded_from": ctx.out("teacher").get("loaded_from")},
        "student": {"model": student["model"], "method": student["method"], "top1": student["top1"],
                    "params": student["params"], "macs": student["macs"], "train_seconds": student.get("train_seconds"),
                    "options": student.get("options"), "sha256": ctx.out("distill")["model_sha256"]},
        "artifacts": artifacts,
        "skipped_formats": ctx.out("optimize").get("skipped", []),
        "baseline": _baseline_record(ctx),
        "gates": [],
        "not_measured": None,
        "passed": False,
    }


def _gate_run(ctx: RunContext, folder: Path) -> dict[str, Any]:
    report = build_report(ctx, rows=False)
    results = gates_mod.evaluate_gates(report, ctx.recipe.gates, ctx.options.get("baseline_report"),
                                       ctx.recipe.target.allow_unmeasured)
    rows = [g.to_dict() for g in results]
    atomic.write_text(folder / "gates.junit.xml", gates_mod.junit_xml(results))
    return {"gates": rows, "passed": gates_mod.all_passed(results), "junit": "gates.junit.xml",
            "not_measured": gates_mod.not_measured_summary(report, ctx.recipe.target.allow_unmeasured)}


def _report_config(ctx: RunContext) -> dict[str, Any]:
    # The report embeds the whole recipe and the baseline, so both are part of its folder's key;
    # the stage still runs on every invocation (cache=False): it writes OUT/report.*, OUT/gates.junit.xml
    # and OUT/bundle/, which must be this invocation's whatever an earlier run left there.
    return {"schema_version": SCHEMA_VERSION, "recipe": ctx.recipe.to_dict(), "baseline": _baseline_record(ctx)}


def _report_run(ctx: RunContext, folder: Path) -> dict[str, Any]:
    from pipeline.bundle import write_bundle

    report = build_report(ctx)
    g = ctx.out("gate")
    report["gates"], report["passed"] = g["gates"], g["passed"]
    report["not_measured"] = g.get("not_measured")
    report["run"] = {"dir": str(ctx.run_dir), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "stages": {n: {"key": s.key[:12], "cached": s.cached, "seconds": round(s.seconds, 2)}
                                for n, s in ctx.results.items()}}
    curves = {"teacher": ctx.folder("teacher") / "metrics.jsonl", "student": ctx.folder("distill") / "metrics.jsonl"}
    recommended, _ = recommend(report)
    # The recommended artifact goes first: the bundle's infer.py runs the first one of its runtime.
    # write_bundle takes the shipped rows with every file they need (OpenVINO .bin, TensorRT kit).
    ordered = sorted(report["artifacts"], key=lambda a: f"{a['runtime']}/{a['precision']}" != recommended)
    tar = write_bundle(ctx.run_dir / "bundle" / report["target"]["name"], ordered, ctx.run_dir,
                       dict(_bundle_meta(ctx, report), recommended=recommended))
    # The report says what shipped, so it is written from the finished bundle's manifest.
    report["bundle"] = bundle_section(tar, ctx.run_dir, recommended)
    report["baseline_artifacts"] = baseline_artifacts(ctx.options.get("baseline_report"))
    files = write_report(report, ctx.run_dir, curves)
    atomic.write_text(ctx.run_dir / "gates.junit.xml", (ctx.folder("gate") / "gates.junit.xml").read_text())
    return {**files, "bundle": str(tar.relative_to(ctx.run_dir))}


def _bundle_meta(ctx: RunContext, report: dict[str, Any]) -> dict[str, Any]:
    from dskd.checkpoint import load_model_file
    from export.versions import tool_versions

    _, meta = load_model_file(ctx.folder("distill") / "model.pt")
    return {"target": report["target"]["name"], "runtime": report["target"]["runtime"],
            "labels": list(meta["class_names"]),
            "preprocessing": {"input_size": meta["input_size"], "in_chans": meta["in_chans"], "mean": meta["mean"],
                              "std": meta["std"], "layout": "NCHW", "input": "input", "output": "logits",
                              "scale": "x/255 then (x - mean) / std"},
            "student": report["student"], "gates": report["gates"], "passed": report["passed"],
            "tool_versions": tool_versions()}


GATE = Stage("gate", ("deploy",), _gate_config, _gate_run, "check the gates")
REPORT = Stage("report", ("gate",), _report_config, _report_run, "report.json/md/html, plots, deploy bundle",
               cache=False)
STAGES: list[Stage] = [TEACHER, DISTILL, EXPORT, OPTIMIZE, DEPLOY, GATE, REPORT]
STAGE_NAMES = [s.name for s in STAGES]


def _downstream(name: str) -> set[str]:
    out = {name}
    changed = True
    while changed:
        changed = False
        for s in STAGES:
            if s.name not in out and any(d in out for d in s.deps):
                out.add(s.name)
                changed = True
    return out


def load_baseline(path: str | None) -> tuple[dict[str, Any] | None, Path | None]:
    """The --baseline report, schema-checked (pipeline/baseline.py), before any stage runs."""
    from pipeline.baseline import load_report

    return load_report(path, "--baseline")


def checked_target_available(deploy: dict[str, Any], where: str) -> bool:
    """The deploy stage's `target_available`, strictly a JSON boolean: a hand-edited "no" read
    with bool() would make the report say the target was measured."""
    value = deploy.get("target_available")
    if not isinstance(value, bool):
        shown = json.dumps(value) if isinstance(value, (str, int, float)) or value is None else type(value).__name__
        raise UserError(f"{where}: field 'outputs.target_available' must be true or false, got {shown}; "
                        "re-run with `--force deploy`")
    return value


def formats_not_shipped(recipe: Recipe) -> list[str]:
    """Notes for listed export formats the target's runtime cannot run: they are built (a user may
    list a second target's format so that switching targets re-runs only deploy), but left out of
    the report and the bundle, which deserves a word rather than silence. Not a note: what the
    target's runtime (or one it also reads) opens, the FP32 ONNX the export stage always builds,
    and what a shipped or listed format is built from (the QDQ INT8 ONNX of a TensorRT INT8 engine)."""
    from deploy_targets.registry import get_target
    from export.formats import FORMATS, resolve_formats

    if not recipe.export.formats:
        return []
    try:
        tgt = get_target(recipe.target.name)
        listed = [s.name for s in resolve_formats(recipe.export.formats, flag="")]
    except UserError:  # check_recipe names the key and exits 2
        return []
    sources = {"onnx"} | {src for n in (*tgt.ships, *listed) for src in FORMATS[n].built_from}
    runs = ", ".join(n for n, f in FORMATS.items() if f.kind in tgt.accepts)
    return [f"note: {key_label(recipe, 'export.formats')}: {n} ({FORMATS[n].runtime}) is built but not "
            f"measured, gated or bundled: target {tgt.name} runs {runs}"
            for n in listed if FORMATS[n].kind not in tgt.accepts and n not in sources]


def check_recipe(recipe: Recipe) -> None:
    """Names the recipe knows only by value (target, formats, models, methods, options) are
    checked here, before the lock and any training, so a typo costs seconds, not a teacher run."""
    from deploy_targets.registry import get_target
    from dskd.methods import resolve_method_options
    from dskd.models import list_models
    from export.api import check_int8_head
    from export.formats import resolve_formats

    def named(key: str, check: Any) -> None:
        try:
            check()
        except UserError as exc:  # named as the user gave it: the file, --set or a flag
            raise UserError(f"{key_label(recipe, key)}: {exc}") from None

    named("target.name", lambda: get_target(recipe.target.name))
    check_inputs(recipe)  # data.spec and teacher.checkpoint exist and load (pipeline/recipe.py)
    if recipe.export.formats:
        named("export.formats", lambda: resolve_formats(recipe.export.formats, flag=""))
    named("export.int8_head", lambda: check_int8_head(recipe.export.int8_head))
    for name in ("teacher", "student"):
        section = getattr(recipe, name)
        if name == "teacher" and section.checkpoint:
            continue
        if section.model not in list_models():
            near = difflib.get_close_matches(section.model, list_models(), n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise UserError(f"{key_label(recipe, name + '.model')}: unknown model '{section.model}': {hint}"
                            f"choose from {', '.join(list_models())}")
        method = "ce" if name == "teacher" else section.method  # the teacher stage always trains with CE
        named(f"{name}.method", lambda m=method: resolve_method_options(m, {}))
        if isinstance(section.options, dict):  # one option at a time, so `--set student.options.t0=-5` names --set
            for key, value in section.options.items():
                named(f"{name}.options.{key}", lambda m=method, k=key, v=value: resolve_method_options(m, {k: v}))
        named(f"{name}.options", lambda m=method, o=section.options: resolve_method_options(m, o))


# What one invocation's verdict consists of: written by the report stage and at the end of `execute`.
VERDICT_FILES = ("report.json", "report.md", "report.html", "gates.junit.xml", "last_run.json", "bundle", "plots")
PREVIOUS_DIR = "previous"


def _set_aside_previous_verdict(run_dir: Path) -> None:
    """Move the last invocation's report, junit, last_run.json, bundle and plots to RUN/previous/.

    Why: a run that stops with an error (a device error, a bad baseline found at deploy, Ctrl-C)
    writes none of them, and a CI step publishing them "always" then showed the previous run's
    PASS; a plot of an earlier `--baseline` run also outlived a run without one. Until this run
    finishes, last_run.json says it has not (exit_code null). Nothing is deleted: the previous
    verdict stays readable in RUN/previous/ until the next run.
    """
    import shutil

    prev = run_dir / PREVIOUS_DIR
    present = [n for n in VERDICT_FILES if (run_dir / n).exists() or (run_dir / n).is_symlink()]
    if present:
        shutil.rmtree(prev, ignore_errors=True)
        prev.mkdir(parents=True, exist_ok=True)
        for name in present:
            (run_dir / name).replace(prev / name)
    atomic.write_json(run_dir / "last_run.json", {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished_at": None, "passed": None, "exit_code": None,
        "note": f"in progress, or stopped with an error: no verdict; the last finished run's files are in {PREVIOUS_DIR}/"})


def execute(recipe: Recipe, run_dir: Path, force: list[str] | None = None, baseline: str | None = None) -> dict[str, Any]:
    """Run (or resume) every stage; returns the report dict."""
    unknown = [f for f in (force or []) if f not in STAGE_NAMES and f != "all"]
    if unknown:
        raise UserError(f"--force {unknown[0]}: not a stage; choose from {', '.join(STAGE_NAMES)} or all")
    forced: set[str] = set()
    for f in force or []:
        forced |= set(STAGE_NAMES) if f == "all" else _downstream(f)
    check_recipe(recipe)
    from pipeline.preflight import preflight

    preflight(recipe, run_dir, forced)  # a remote device: the doctor's checks, before any training
    base_report, base_dir = load_baseline(baseline)
    with run_lock(run_dir):
        ctx = RunContext(run_dir=run_dir, recipe=recipe,
                         options={"baseline_report": base_report, "baseline_dir": base_dir, "baseline_arg": baseline,
                                  "remeasure_nonce": time.time() if "deploy" in forced else None})
        _set_aside_previous_verdict(run_dir)
        atomic.write_json(run_dir / "recipe.json", recipe.to_dict())
        for stage in STAGES:
            run_stage(stage, ctx, force=stage.name in forced)
        report = json.loads((run_dir / "report.json").read_text())
        atomic.write_json(run_dir / "last_run.json", {
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "passed": report["passed"], "exit_code": 0 if report["passed"] else 1,
            "failed_gates": [f"{g['name']}[{g['artifact']}]" for g in report["gates"] if not g["passed"]],
            "stages": {n: {"folder": str(s.folder.relative_to(run_dir)), "cached": s.cached,
                           "seconds": round(s.seconds, 2)} for n, s in ctx.results.items()}})
        return report
