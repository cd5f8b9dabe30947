"""Export, optimize and deploy stages: from the student's model.pt to measured artifacts on the target."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from dskd.checkpoint import file_sha256
from export.parity import tolerances_for
from pipeline.artifact_result import (
    ArtifactResult,
    BaselineComparison,
    LatencyStats,
    as_result,
    as_results,
    results_from_stage,
)
from pipeline.recipe import PROTOCOL_KEYS
from pipeline.stage import STAGE_FILE, RunContext, Stage, stable_hash

CPU_REFERENCE_TARGET = "cpu"


def load_bundle(ctx: RunContext):
    """The recipe's data, from the decode cache (seconds) after the first stage decoded it."""
    from dskd.data import load_data
    from pipeline.train_stages import data_limits

    d = ctx.recipe.data
    if "bundle" not in ctx.options:
        ctx.options["bundle"] = load_data(d.spec, input_size=d.input_size, in_chans=d.in_chans,
                                          cache_dir=d.cache_dir or None, limit_per_class=d.limit_per_class or None,
                                          skip_bad=d.skip_bad, progress=False, limits=data_limits(d))
    return ctx.options["bundle"]


def _student_pt(ctx: RunContext) -> Path:
    return ctx.folder("distill") / ctx.out("distill")["model_pt"]


def _target(ctx: RunContext):
    from deploy_targets.registry import get_target

    return get_target(ctx.recipe.target.name)


def _export_options(ctx: RunContext) -> dict[str, Any]:
    e = ctx.recipe.export
    return {"opset": e.opset, "calib_size": e.calib_size, "simplify": e.simplify,
            "ov_int8_head": e.int8_head, "tolerances": tolerances_for(e.parity_tolerance),
            # torch-tensorrt: no ONNX-built engine here even where TensorRT is installed (the default keeps its keys)
            **({"trt_build_here": False} if e.trt_builder != "onnx" else {})}


def _artifacts_from_manifest(manifest: Any, folder: Path, stage_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for a in manifest.artifacts:
        rows.append({"format": a.format, "precision": a.precision, "runtime": a.runtime,
                     "path": str((folder / a.path).relative_to(stage_dir)), "sha256": a.sha256,
                     "size_bytes": a.size_bytes, "parity": a.parity})
    skipped = [{"format": s.format, "reason": s.reason, "parity": s.parity,
                "prepared": [str((folder / f.path).relative_to(stage_dir)) for f in s.prepared],
                **({"rejected": True} if (s.details or {}).get("rejected") else {})}
               for s in manifest.skipped]
    return rows, skipped


# A parity failure inside `pipeline run` is a finding about the model, not bad input: the artifact is
# rejected (listed with its numbers, failing the `parity` gate) and the other formats are still built.
ON_PARITY_FAILURE = "reject"


# ---------------------------------------------------------------- export: ONNX FP32, verified
def _export_config(ctx: RunContext) -> dict[str, Any]:
    return {"options": _export_options(ctx)}


def _export_run(ctx: RunContext, folder: Path) -> dict[str, Any]:
    from export.api import export_all

    manifest = export_all(_student_pt(ctx), folder / "artifacts", formats=["onnx"], calib=load_bundle(ctx),
                          on_parity_failure=ON_PARITY_FAILURE, **_export_options(ctx))
    rows, skipped = _artifacts_from_manifest(manifest, folder / "artifacts", folder)
    for s in skipped:
        ctx.log(f"  {s['format']}: {'REJECTED' if s.get('rejected') else 'not built here'} ({s['reason']})")
    return {"artifacts": rows, "skipped": skipped, "manifest": "artifacts/manifest.json"}


# ---------------------------------------------------------------- optimize: the target's formats
def target_formats(ctx: RunContext) -> list[str]:
    """Export formats the target ships, plus those they are built from (export.formats `built_from`:
    the QDQ INT8 ONNX a TensorRT INT8 engine is built from on the device, checked on CPU here)."""
    from export.formats import FORMATS, resolve_formats

    if ctx.recipe.export.formats:  # the export stage builds the FP32 ONNX: listing it again would duplicate it
        return [s.name for s in resolve_formats(ctx.recipe.export.formats) if s.name != "onnx"]
    tgt = _target(ctx)
    names = [tgt.export_format(p) for p in tgt.precisions]
    names += [src for n in list(names) for src in FORMATS[n].built_from if src not in names]
    return [n for n in names if n != "onnx"]


def _optimize_config(ctx: RunContext) -> dict[str, Any]:
    return {"options": _export_options(ctx), "formats": target_formats(ctx)}


def _optimize_run(ctx: RunContext, folder: Path) -> dict[str, Any]:
    from export.api import export_all

    formats = target_formats(ctx)
    if not formats:
        return {"artifacts": [], "skipped": []}
    manifest = export_all(_student_pt(ctx), folder / "artifacts", formats=formats, calib=load_bundle(ctx),
                          on_parity_failure=ON_PARITY_FAILURE, **_export_options(ctx))
    rows, skipped = _artifacts_from_manifest(manifest, folder / "artifacts", folder)
    for s in skipped:
        ctx.log(f"  {s['format']}: {'REJECTED' if s.get('rejected') else 'not built here'} ({s['reason']})")
    return {"artifacts": rows, "skipped": skipped, "manifest": "artifacts/manifest.json"}


# ---------------------------------------------------------------- deploy: measure on the target
def _deploy_config(ctx: RunContext) -> dict[str, Any]:
    t = ctx.recipe.target
    cfg = {k: getattr(t, k) for k in ("name", "device", "python", "trtexec", "threads", "batch_sizes",
                                       *PROTOCOL_KEYS)}
    base = ctx.options.get("baseline_report")
    cfg["baseline"] = stable_hash(base) if base else None
    if ctx.recipe.export.trt_builder != "onnx":  # (the default keeps the cache keys it had)
        cfg["trt_builder"] = ctx.recipe.export.trt_builder
    for key in ("hint", "streams"):  # likewise: only a non-default hint/streams changes the key
        if getattr(t, key):
            cfg[key] = getattr(t, key)
    cfg["nonce"] = ctx.options.get("remeasure_nonce")
    cfg["ab_protocol"] = 3 if base else None  # interleaved rounds for the paired regression rule
    if base:  # the A/B rounds stop when the rule decides against the tolerance, or at the budget
        cfg["ab_stop"] = [ctx.recipe.gates.max_latency_regression, ctx.recipe.gates.regression_budget_s]
    return cfg


def shipped_artifacts(ctx: RunContext) -> list[ArtifactResult]:
    """Artifacts of the export/optimize stages with the stage folder made part of their path
    (not measured yet: `measured` is False until the deploy stage measures them)."""
    tgt = _target(ctx)
    out = []
    for stage in ("export", "optimize"):
        source = str(ctx.folder(stage) / STAGE_FILE)
        for i, a in enumerate(ctx.out(stage)["artifacts"]):
            row = ArtifactResult.from_report(a, source, f"outputs.artifacts[{i}]")
            out.append(row.replace(path=str((ctx.folder(stage) / (row.path or "")).relative_to(ctx.run_dir)),
                                   shipped=row.runtime == tgt.runtime and row.precision in tgt.precisions,
                                   measured=False))
    return out


def write_eval_set(ctx: RunContext, folder: Path) -> Path:
    """The test split as uint8 + the PyTorch student's predictions (for the agreement number)."""
    from deploy_targets.evalset import write_eval_npz
    from dskd.checkpoint import build_model
    from dskd.trainer import evaluate

    bundle = load_bundle(ctx)
    model, meta = build_model(_student_pt(ctx))
    top1, pred = evaluate(model, bundle.test_x, bundle.test_y, meta["mean"], meta["std"], __import__("torch").device("cpu"))
    path = folder / "eval.npz"
    write_eval_npz(path, bundle.test_x.numpy(), bundle.test_y.numpy(), meta["mean"], meta["std"], ref_pred=pred.numpy())
    return path


def _protocol(ctx: RunContext):
    return ctx.recipe.target.protocol()


def _measure(ctx: RunContext, path: Path, target_name: str, precision: str, eval_set: Path | None,
             device: str | None, batch_sizes: list[int], latency_only: bool = False):
    """One runner measurement with the recipe's protocol, threads, hint and streams.

    `latency_only`: the paired A/B rounds compare p50s only, so they skip the throughput run
    and time each side with the shorter round protocol (pipeline.regression_stats.round_protocol).
    """
    from dataclasses import replace

    from deploy_targets.measure import measure
    from pipeline.regression_stats import round_protocol

    t = ctx.recipe.target
    protocol = _protocol(ctx)
    if latency_only:
        protocol = replace(protocol, **round_protocol(protocol.min_iters, protocol.min_seconds))
    return measure(path, target_name, eval_set=eval_set, device=device, precision=precision,
                   batch_sizes=batch_sizes, threads=t.threads or None, protocol=protocol,
                   remote_python=t.python, remote_tmp=t.remote_tmp or None, timeout_s=t.timeout_s,
                   hint="latency" if latency_only else (t.hint or None), streams=t.streams or None)


def _record(a: ArtifactResult | dict[str, Any], m: Any) -> ArtifactResult:
    """`a` with the runner's measurement `m`: accuracy in %, latency at the smallest batch size."""
    lat = m.latency_at(min(m.batch_sizes))
    acc = m.accuracy or {}
    pct = {k: round(100.0 * acc[k], 4) if acc.get(k) is not None else None for k in ("top1", "agreement")}
    stats = LatencyStats(**{k: lat.get(f"{k}_ms") for k in ("p50", "p90", "p99", "mean", "std")}, cov=lat.get("cov"))
    return as_result(a, "deploy row").replace(
        measured=True, top1=pct["top1"], agreement=pct["agreement"], latency_ms=stats,
        latency_by_batch=[{k: v for k, v in e.items() if k != "samples_ms"} for e in m.latency],
        latency_samples_ms=lat.get("samples_ms"), warnings=m.warnings, where=m.where, environment=m.environment,
        runtime_config=m.runtime_config, throughput=m.throughput, preprocess=m.preprocess)


def _with_per_image(row: ArtifactResult, path: Path, m: Any, eval_set: Path) -> ArtifactResult:
    """`row` with which test images the artifact got right (`per_image`), for the paired
    accuracy gates of a later run that uses this report as its baseline (pipeline.per_image)."""
    from pipeline.per_image import measure_record

    if m.where != "local":
        rec, why = None, f"measured on {m.where}: the runner reports no per-image predictions"
    else:
        try:
            rec, why = measure_record(path, m.runtime, m.precision, m.threads, eval_set,
                                      (m.accuracy or {}).get("predictions_sha256"))
        except Exception as exc:  # an extra record, not the measurement: say why, keep the numbers
            rec, why = None, f"per-image predictions could not be recomputed here: {str(exc).splitlines()[0][:200]}"
    return row.replace(per_image=rec, per_image_note=why or None)


def _interleaved_ratio(ctx: RunContext, cand: Path, base: Path, target_name: str, precision: str,
                       device: str | None) -> BaselineComparison:
    """Candidate and baseline measured alternately (C B, B C, ...) in this job, until decided.

    Each round is one paired ratio; the gate judges the median of the ratios with its
    confidence interval (pipeline.regression_stats). At least the fewest rounds that give a
    95 % interval are measured, then more while the verdict against
    `gates.max_latency_regression` is inconclusive, within `gates.regression_budget_s` seconds.
    A round in which the runner saw CPU contention on either side is kept in the record but
    not used (`kept`), and another is measured instead. `ratio` (of the two median p50s)
    stays for older readers.
    """
    from pipeline.latency_ab import interleaved_ab

    # Engines are timed by the runner's own TensorRT backend here, as in `_measure` (`target.trtexec`
    # only builds engines; it never times them in a run), so they pair like every other format.
    g, t = ctx.recipe.gates, ctx.recipe.target
    rec = interleaved_ab(cand, base, target_name, precision, _protocol(ctx), g.max_latency_regression,
                         g.regression_budget_s, device=device, threads=t.threads or None, timeout_s=t.timeout_s,
                         remote_python=t.python, remote_tmp=t.remote_tmp or None,
                         measure_side=lambda p: _measure(ctx, p, target_name, precision, None, device, [1],
                                                         latency_only=True))
    ratio = statistics.median(rec["candidate_p50_ms"]) / statistics.median(rec["baseline_p50_ms"])
    return BaselineComparison.from_rounds({"ratio": ratio, **rec})


def _deploy_run(ctx: RunContext, folder: Path) -> dict[str, Any]:
    from dskd.errors import UserError

    tgt = _target(ctx)
    t = ctx.recipe.target
    device = t.device or None
    eval_set = write_eval_set(ctx, folder)
    artifacts = shipped_artifacts(ctx)
    ok, reason = tgt.availability(device=device, remote_python=t.python)
    base_report = ctx.options.get("baseline_report")
    base_dir = ctx.options.get("baseline_dir")
    results = []
    results: list[ArtifactResult] = []
    for a in artifacts:
        path = ctx.run_dir / (a.path or "")
        if a.shipped:
            if not ok:
                results.append(a.replace(measured=False, top1=None, latency_ms=None, not_measured_reason=reason))
                continue
            try:
                m = _measure(ctx, path, tgt.name, a.precision, eval_set, device, t.batch_sizes)
            except UserError as exc:
                if device is None:  # on this machine there is no device to blame: the artifact does not run
                    why = f"the runtime cannot run it on this machine: {str(exc).splitlines()[0][:300]}"
                    results.append(a.replace(measured=False, top1=None, latency_ms=None, not_measured_reason=why,
                                             rejected=True, rejected_reason=why))
                    ctx.log(f"  {a.label}: REJECTED: {why}")
                    continue
                # device trouble: keep going, record why (--allow-unmeasured may accept it)
                results.append(a.replace(measured=False, top1=None, latency_ms=None, not_measured_reason=str(exc)))
                ctx.log(f"  {a.label}: not measured: {exc}")
                continue
            row = _with_per_image(_record(a, m), path, m, eval_set)
            base_art = _baseline_artifact(base_report, base_dir, a)
            if base_art is not None:
                row = row.replace(baseline_comparison=_interleaved_ratio(ctx, path, base_art, tgt.name, a.precision,
                                                                         device))
            results.append(row)
            ctx.log(f"  {a.label}: {_measured_text(row)}")
        elif a.runtime == "onnxruntime":
            # Not what this target runs (e.g. the ONNX beside a TensorRT target): its accuracy on this CPU
            # still says whether quantization kept the model intact before anything reaches a device.
            m = _measure(ctx, path, CPU_REFERENCE_TARGET, a.precision, eval_set, None, [1])
            results.append(_with_per_image(_record(a, m), path, m, eval_set).replace(
                latency_note="measured on this machine's CPU, not on the target"))
    results += rejected_rows(ctx)
    skipped = [sk for sk in ctx.out("optimize").get("skipped", [])
               if not sk.get("rejected") and _format_spec(sk["format"]).runtime == tgt.runtime
               and _format_spec(sk["format"]).precision in tgt.precisions]
    kit = sorted({ctx.folder("optimize") / p for sk in skipped for p in sk.get("prepared", [])})
    torch_kit = ctx.recipe.export.trt_builder != "onnx" and any(_format_spec(sk["format"]).runtime == "tensorrt"
                                                                  for sk in skipped)
    if torch_kit:  # torch-tensorrt: its own kit (checkpoint, model zoo source, build script), written whether
        # or not the device is reachable, so the deploy bundle ships the builder the recipe chose
        from export.torch_trt import write_stage_kit

        kit = write_stage_kit(_student_pt(ctx), folder / "torch_trt_kit", tgt.precisions, load_bundle(ctx),
                              ctx.recipe.export.calib_size)
    for sk in skipped:
        spec = _format_spec(sk["format"])
        why = sk["reason"] if ok else f"{reason}; {sk['reason']}"
        row = ArtifactResult(
            format=spec.name, precision=spec.precision, runtime=spec.runtime, shipped=True, measured=False,
            not_measured_reason=why, parity=sk.get("parity"),
            prepared=[str(p.relative_to(ctx.run_dir)) for p in kit] if torch_kit and spec.runtime == "tensorrt"
            else [str((ctx.folder("optimize") / p).relative_to(ctx.run_dir)) for p in sk.get("prepared", [])])
        if ok and spec.runtime == "tensorrt":
            row = _engine_row(ctx, folder, row, kit, eval_set, device)
        results.append(row)
    # the target's environment: a shipped artifact's, not the CPU reference run beside a TensorRT target
    env = next((r.environment for r in sorted(results, key=lambda r: not r.shipped) if r.environment), None)
    return {"artifacts": [r.to_json() for r in results], "target_available": ok, "reason": "" if ok else reason,
            "eval_set": "eval.npz", "environment": env, "runtime": tgt.runtime}


def _measured_text(row: ArtifactResult) -> str:
    """'top1 91.20 %, p50 0.412 ms' for the progress log ('—' where the runner gave no number)."""
    top1, p50 = row.top1, row.latency("p50")
    return (f"top1 {'—' if top1 is None else f'{top1:.2f}'} %, "
            f"p50 {'—' if p50 is None else f'{p50:.3f}'} ms")


def rejected_rows(ctx: RunContext) -> list[ArtifactResult]:
    """Artifacts that failed their export parity check: not shipped, not measured, listed with
    the agreement the check measured (so the report says how far off they were)."""
    tgt = _target(ctx)
    rows = []
    for stage in ("export", "optimize"):
        for sk in ctx.out(stage).get("skipped", []):
            if not sk.get("rejected"):
                continue
            spec = _format_spec(sk["format"])
            parity = sk.get("parity") or {}
            agreement = parity.get("top1_agreement")
            rows.append(ArtifactResult(
                format=spec.name, precision=spec.precision, runtime=spec.runtime,
                shipped=spec.runtime == tgt.runtime and spec.precision in tgt.precisions, measured=False,
                agreement=round(100.0 * agreement, 4) if agreement is not None else None,
                not_measured_reason=f"rejected by the export parity check: {sk['reason']}",
                rejected=True, rejected_reason=sk["reason"], parity=sk.get("parity")))
            ctx.log(f"  {spec.runtime}/{spec.precision}: REJECTED ({sk['reason']})")
    return rows


def deploy_complete(outputs: dict[str, Any]) -> bool:
    """A deploy that left a shipped artifact unmeasured (device down, engine build failed) is not
    cached: the next run tries the device again instead of repeating "not measured"."""
    if not outputs.get("target_available", True):
        return False
    return all(a.measured or a.rejected or not a.shipped for a in results_from_stage(outputs, "deploy stage outputs"))


def _engine_row(ctx: RunContext, folder: Path, row: ArtifactResult, kit: list[Path], eval_set: Path,
                device: str | None) -> ArtifactResult:
    """Build the engine on the target from the optimize stage's kit, then measure it there.

    Engines are device-specific, so they are built where they run (over SSH or on this
    Jetson / GPU box) and land in this stage's `engines/` with a JSON of TensorRT version
    and GPU beside each. A failed build or measurement is recorded, never raised.
    """
    from deploy_targets.engine_build import build_engines
    from dskd.errors import UserError

    t = ctx.recipe.target
    tgt = _target(ctx)
    label = row.label
    builder = ctx.recipe.export.trt_builder
    try:  # `kit`: the optimize stage's ONNX kit, or the torch-tensorrt kit (_deploy_run wrote it)
        built = build_engines(kit, [row.precision], device, out_dir=folder / "engines",
                              remote_python=t.python, timeout_s=t.timeout_s, remote_tmp=t.remote_tmp or None,
                              trtexec=t.trtexec or None, builder=builder)[row.precision]
    except UserError as exc:
        ctx.log(f"  {label}: engine not built: {exc}")
        return row.replace(not_measured_reason=f"engine build failed: {exc}")
    engine = built.local_engine_path
    a = row.replace(path=str(engine.relative_to(ctx.run_dir)), sha256=built.sha256,
                    size_bytes=engine.stat().st_size, not_measured_reason=None,
                    engine_build={"tensorrt_version": built.tensorrt_version, "gpu_name": built.gpu_name,
                           "where": built.where, "build_seconds": built.build_seconds,
                           "info": str(built.info_path.relative_to(ctx.run_dir)),
                                  "log": str(built.log_path.relative_to(ctx.run_dir))})
    ctx.log(f"  {label}: engine built on {built.where} (TensorRT {built.tensorrt_version}, "
            f"{built.gpu_name}) in {built.build_seconds:.1f} s")
    try:
        m = _measure(ctx, engine, tgt.name, row.precision, eval_set, device, t.batch_sizes)
    except UserError as exc:
        ctx.log(f"  {label}: not measured: {exc}")
        return a.replace(measured=False, not_measured_reason=str(exc))
    out = _record(a, m).replace(not_measured_reason=None)
    base_art = _baseline_artifact(ctx.options.get("baseline_report"), ctx.options.get("baseline_dir"), out)
    if base_art is not None:
        out = out.replace(baseline_comparison=_interleaved_ratio(ctx, engine, base_art, tgt.name, row.precision,
                                                                 device))
    ctx.log(f"  {label}: {_measured_text(out)}")
    return out


def _format_spec(name: str):
    from export.formats import FORMATS

    return FORMATS[name]


def _baseline_artifact(base_report: dict[str, Any] | None, base_dir: Path | None, a: ArtifactResult) -> Path | None:
    """The same artifact kind's file in the --baseline run folder (None: none to measure against)."""
    if not base_report or base_dir is None:
        return None
    for b in as_results(base_report.get("artifacts"), "--baseline"):
        if b.key == a.key:
            if not b.path:  # rejected, or a device format not built where the baseline ran
                return None
            p = base_dir / b.path
            if not p.exists():
                return None
            if b.sha256 and file_sha256(p) != b.sha256:
                # checked before any stage too (cli_baseline), but a `--force` re-export into the baseline's
                # own folder replaces it later: the pair would then time the new file against itself
                from dskd.errors import UserError

                raise UserError(f"--baseline {b.label}: {p} is no longer the file its report records (it changed "
                                "during this run: is --out the baseline's folder?); give a baseline that is not "
                                "re-written by this run")
            return p
    return None


EXPORT = Stage("export", ("distill",), _export_config, _export_run, "student -> verified ONNX")
OPTIMIZE = Stage("optimize", ("distill",), _optimize_config, _optimize_run, "target formats (INT8, IR, engines)")
DEPLOY = Stage("deploy", ("export", "optimize"), _deploy_config, _deploy_run, "measure latency and accuracy on the target",
               complete=deploy_complete)


def student_sha(ctx: RunContext) -> str:
    return file_sha256(_student_pt(ctx))
