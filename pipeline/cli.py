"""`python -m pipeline COMMAND --help`: the command-line face of the pipeline.

Each command is a plain function: its signature and docstring are its flags and help, read by
the strict argument layer in pipeline/argv.py (values are typed from the annotations, never
evaluated). Adding a command is one function plus one COMMANDS entry.

Exit codes: 0 success, 1 a gate failed, 2 bad usage or input.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from dskd.errors import UserError
from pipeline.argv import command_help, main_help, parse_command
from pipeline.train_cli import train  # its flags are built from dskd.train_settings


class ExitCode(Exception):
    """Raised by a command to end with a specific exit status after printing its own output."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def run(recipe: str | None = None, target: str | None = None, data: str | None = None, out: str | None = None,
        device: str | None = None, baseline: str | None = None, force: str | None = None,
        allow_unmeasured: bool | None = None, set: list[str] | None = None) -> None:  # noqa: A002
    """Run the whole job: teacher -> distill -> export -> optimize -> deploy -> gate -> report.

    Finished stages are cached in OUT/stages/ and skipped on the next run; an interrupted run resumes.
    Exit code 0 when every gate passes, 1 when one fails, 2 on bad input.

    Args:
        recipe: a shipped recipe name (digits-smoke, cifar10-resnet, cifar100-r32x4-r8x4) or a .toml path.
        target: deployment target (see `pipeline targets`); overrides the recipe's target.name.
        data: data spec; overrides the recipe's data.spec.
        out: run folder (default runs/<recipe name>).
        device: user@host[:port] of the target device, reached over SSH.
        baseline: a report.json (or its run folder) to gate regressions against; its artifacts are
            re-measured interleaved with the new ones when they still exist.
        force: re-run this stage and everything after it (or `all`), comma-separated.
        allow_unmeasured: do not fail latency gates on targets that could not be measured here
            (overrides the recipe's target.allow_unmeasured either way; default: the recipe's).
        set: recipe overrides, repeatable: --set student.epochs=5 --set gates.min_top1=90.
    """
    from pathlib import Path

    from pipeline.overrides import parse_overrides
    from pipeline.recipe import load_recipe
    from pipeline.run import execute

    overrides = parse_overrides(set)
    origins: dict[str, str] = {}
    for key, flag, value in (("target.name", "--target", target), ("data.spec", "--data", data),
                             ("target.device", "--device", device)):
        if value is not None:
            overrides[key], origins[key] = str(value), flag
    if allow_unmeasured is not None:
        overrides["target.allow_unmeasured"], origins["target.allow_unmeasured"] = allow_unmeasured, "--allow-unmeasured"
    if out is not None and not str(out).strip():
        raise UserError("--out '': give a folder path (default runs/<recipe name>)")
    rec = load_recipe(recipe, overrides, origins)
    from deploy_targets.registry import get_target

    # Unknown target: fail before any work, naming where the name came from.
    get_target(rec.target.name, "--target" if target else f"{rec.source or rec.name}: target.name")
    run_dir = Path(out or f"runs/{rec.name}")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir}: is a file, not a folder; give a folder path")
    forced = [f.strip() for f in str(force).split(",") if f.strip()] if force else []
    if baseline is not None:  # its artifact files too, before any training (pipeline/cli_baseline.py)
        from pipeline.baseline import load_report
        from pipeline.cli_baseline import baseline_file_notes

        base_report, base_dir = load_report(baseline, "--baseline")
        for note in baseline_file_notes(base_report, base_dir):
            print(note)
        _check_baseline_input(base_report, rec, baseline)
    from pipeline.gates import unset_gates_problem

    problem = unset_gates_problem(rec.gates, baseline is not None)
    if problem and baseline is not None:
        raise UserError(problem)
    if problem:  # a recipe without gates may be exploration: said, not refused
        print(f"note: {problem}")
    from pipeline.run import formats_not_shipped

    for note in formats_not_shipped(rec):
        print(note)
    report = execute(rec, run_dir, forced, baseline)
    _print_report(report, run_dir)
    if not report["passed"]:
        raise ExitCode(1)


def _check_baseline_input(base: dict | None, rec, shown: str) -> None:  # noqa: ANN001
    """A baseline whose models take another input shape cannot be timed on this run's images: said
    before any training (it failed in the deploy stage, after training, naming no flag)."""
    data = ((base or {}).get("recipe") or {}).get("config", {}).get("data") or {}
    for key in ("input_size", "in_chans"):
        theirs, mine = data.get(key), getattr(rec.data, key)
        if isinstance(theirs, int) and theirs != mine:
            raise UserError(f"--baseline {shown}: its models take data.{key} = {theirs}, this run {mine}; "
                            f"compare with a baseline trained on the same input (or set data.{key} = {theirs})")


def _print_report(report: dict, run_dir) -> None:
    from pipeline.console import print_table
    from pipeline.report import ARTIFACT_COLUMNS, artifact_rows

    s = report["student"]
    print_table(f"{report['recipe']['name']} -> {report['target']['name']}: student {s['model']} ({s['method']}) "
                f"top1 {s['top1']:.2f} %, teacher {report['teacher']['model']} top1 {report['teacher']['top1']:.2f} %",
                ["artifact", *ARTIFACT_COLUMNS[1:]], artifact_rows(report))
    from pipeline.gates import TABLE_COLUMNS, table_rows

    failed = table_rows([g for g in report["gates"] if not g["passed"]])
    if failed:
        print_table("failed gates", TABLE_COLUMNS, failed)
    note = (report.get("not_measured") or {}).get("note")
    if note:  # said once, not on every gate row
        print(note)
    print(f"{'PASSED' if report['passed'] else 'FAILED'}: report {run_dir}/report.md, bundle {run_dir}/bundle/")


def gate(report: str, baseline: str | None = None, recipe: str | None = None, junit: str | None = None,
         allow_unmeasured: bool | None = None, set: list[str] | None = None) -> None:  # noqa: A002
    """Run the gates alone on a report.json (optionally against a baseline report.json).

    Thresholds come from --recipe (default: the recipe recorded in the report) and --set gates.KEY=VALUE.
    Exit code 0 when every gate passes, 1 when one fails, 2 on bad input.

    Args:
        report: report.json (or its run folder) written by `pipeline run`.
        baseline: a baseline report.json (or its run folder) for the regression gates.
        recipe: recipe name or .toml path whose [gates] to use instead of the report's.
        junit: also write the gate rows as JUnit XML to this path.
        allow_unmeasured: unmeasured artifacts do not fail latency/accuracy gates (default: what the run
            recorded, target.allow_unmeasured of its recipe, or of --recipe).
        set: gate overrides, repeatable: --set gates.max_latency_regression=0.1.
    """
    from pathlib import Path

    from dskd import atomic
    from pipeline import gates as g
    from pipeline.baseline import load_report
    from pipeline.console import print_table
    from pipeline.overrides import parse_overrides
    from pipeline.recipe import GateConfig, Origins, _build, load_recipe

    rep, _ = load_report(report, "")
    base, _ = load_report(baseline, "--baseline")
    overrides = parse_overrides(set)
    bad = [k for k in overrides if not k.startswith("gates.")]
    if bad:
        raise UserError(f"--set {bad[0]}: only gates.* keys apply to `pipeline gate`")
    if junit is not None and Path(junit).is_dir():
        raise UserError(f"--junit {junit}: is a folder; give a file path, e.g. {Path(junit) / 'gates.junit.xml'}")
    if recipe:
        chosen = load_recipe(recipe, overrides)
        gates_cfg, recorded_allow = chosen.gates, chosen.target.allow_unmeasured
    else:
        config = rep["recipe"].get("config") or {}
        table = dict(config.get("gates", {}))
        for k, v in overrides.items():
            table[k.split(".", 1)[1]] = v
        gates_cfg = _build(GateConfig, table, "gates", f"{report} (recorded recipe)",
                           Origins(f"{report} (recorded recipe)", {k: "--set" for k in overrides}))
        recorded_allow = (config.get("target") or {}).get("allow_unmeasured") is True
    problem = g.unset_gates_problem(gates_cfg, base is not None)
    if problem:
        raise UserError(problem)
    if allow_unmeasured is None:  # re-gating a report gives the verdict its run gave
        allow_unmeasured = recorded_allow
    results = g.evaluate_gates(rep, gates_cfg, base, allow_unmeasured)
    print_table("gates", g.TABLE_COLUMNS, g.table_rows([r.to_dict() for r in results]))
    summary = g.not_measured_summary(rep, allow_unmeasured)
    if summary:
        print(summary["note"])
    recorded = rep.get("baseline")
    if base is None and isinstance(recorded, dict) and (gates_cfg.max_latency_regression is not None
                                                        or gates_cfg.max_top1_regression is not None):
        # the run's regression rows are not re-judged without a baseline: say so, not a silent PASS
        print(f"note: {report} was gated against the baseline {recorded.get('path')}; the regression gates "
              f"(max_top1_regression, max_latency_regression) apply only with --baseline")
    if junit:
        atomic.write_text(Path(junit), g.junit_xml(results))
    passed = g.all_passed(results)
    print("PASSED" if passed else "FAILED")
    if not passed:
        raise ExitCode(1)


def export(model_pt: str, out: str = "runs/export", formats: str | None = None, calib_data: str | None = None,
           calib_size: int = 300, opset: int = 18, simplify: bool = True, int8_head: str = "float") -> None:
    """Export a model.pt to ONNX / INT8 ONNX / OpenVINO IR / TensorRT engines, verified, with a manifest.

    Args:
        model_pt: a model.pt (or its folder) written by `pipeline train`.
        out: output folder (OUT/manifest.json lists every artifact with sha256 and size).
        formats: comma-separated: onnx, onnx-int8, openvino, openvino-fp16, openvino-int8,
            tensorrt-fp16, tensorrt-int8, or all (default: every format that can be built here).
        calib_data: data spec whose training split calibrates INT8 and whose test split checks parity.
        calib_size: calibration images (deterministic subset of the training split).
        opset: ONNX opset (18-20; 13-17 use the TorchScript exporter).
        simplify: simplify with onnxslim (a core dependency), verified afterwards.
        int8_head: float (default) keeps the classifier of openvino-int8 in float; int8 quantizes it too.
    """
    import warnings

    from dskd.checkpoint import load_model_file
    from export.api import check_int8_head, export_all
    from pipeline.console import print_table
    from pipeline.recipe import ExportConfig, check_settings

    check_settings(ExportConfig, {"opset": opset, "calib_size": calib_size})  # the flags first, then the file
    check_int8_head(int8_head)
    _, meta = load_model_file(model_pt)
    calib = None
    if calib_data:
        from dskd.data import load_data

        calib = load_data(str(calib_data), input_size=int(meta["input_size"]), in_chans=int(meta["in_chans"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        manifest = export_all(model_pt, out, formats=formats, calib=calib, calib_size=int(calib_size),
                              opset=int(opset), simplify=bool(simplify),
                              ov_int8_head=str(int8_head))
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    rows = [[a.format, a.precision, a.runtime, a.path, a.size_bytes,
             (a.parity or {}).get("top1_agreement"), (a.parity or {}).get("max_abs_diff")] for a in manifest.artifacts]
    print_table(f"exported {model_pt} -> {out}", ["format", "precision", "runtime", "path", "bytes", "agreement",
                                                   "max |dlogit|"], rows)
    for s in manifest.skipped:
        print(f"skipped {s.format}: {s.reason}")


def targets(device: str | None = None, python: str = "python3", probe: bool = True) -> None:
    """List deployment targets and whether each can run here (or on --device).

    Args:
        device: user@host[:port] to probe for SSH-reached targets.
        python: the device's python.
        probe: log in to the device to check its runtime (off: only check local runtimes).
    """
    from deploy_targets.registry import format_targets_table

    print(format_targets_table(device=device, remote_python=python, probe=bool(probe)))


def _bench_threads(threads: str | None) -> int | str | None:
    """`--threads` as the recipe's target.threads reads it: 0 or omitted is the target's default."""
    if threads is None:
        return None
    text = str(threads).strip().lower()
    if text == "all":
        return "all"
    if text.isdigit():
        return int(text) or None
    raise UserError(f'--threads {threads}: give a thread count >= 1, "all" (every physical core) '
                    "or 0 (the target's default)")


def bench(artifact: str, target: str = "cpu", device: str | None = None, data: str | None = None,
          precision: str | None = None, batch_sizes: str = "1", threads: str | None = None,
          python: str = "python3", out: str | None = None, hint: str | None = None,
          streams: int | None = None, image: str | None = None) -> None:
    """Measure one artifact's latency (and accuracy with --data) on a target, locally or over SSH.

    Args:
        artifact: model.onnx, model.int8.onnx, an OpenVINO model.xml or a TensorRT engine.
        target: target name (see `pipeline targets`).
        device: user@host[:port] for targets reached over SSH.
        data: data spec (or an eval .npz) whose test split gives top-1 and agreement.
        precision: the artifact's precision (detected when omitted).
        batch_sizes: comma-separated batch sizes, e.g. 1,8.
        threads: runtime threads: a count >= 1, "all" (every physical core) or 0 (the target's
            default, as when omitted) -- the same values as the recipe's target.threads.
        python: the device's python.
        out: write the measurement JSON here.
        hint: latency or throughput (also images/s at the largest batch size); default: the target's.
        streams: parallel streams in throughput mode (0: the runtime's choice; default: the target's).
        image: a JPEG/PNG whose decode+resize+normalize is timed (default: the --data set's first image).
    """
    import tempfile
    from pathlib import Path

    from deploy_targets.measure import measure
    from deploy_targets.remote.runner import HINTS
    from pipeline.console import print_table

    # named as the user wrote them, before any runtime starts (measure() names the bare keys)
    if hint is not None and str(hint).lower() not in HINTS:
        raise UserError(f"--hint {hint!r}: choose {' or '.join(HINTS)}")
    if streams is not None and streams < 0:
        raise UserError(f"--streams {streams}: must be >= 0 (0: the runtime's choice)")
    threads_value = _bench_threads(threads)
    if image is not None and not Path(image).is_file():
        raise UserError(f"--image {image}: no such file; pass a JPEG or PNG image")
    with tempfile.TemporaryDirectory() as td:
        eval_set = None
        if data:
            eval_set = _eval_set_for(str(data), Path(artifact), Path(td))
        m = measure(artifact, target, eval_set=eval_set, device=device, precision=precision,
                    batch_sizes=str(batch_sizes), threads=threads_value, remote_python=python,
                    hint=hint, streams=streams, image=image)
    from pipeline.report_view import run_config_text, throughput_numbers

    config = run_config_text(m.runtime_config) or f"{m.threads} threads"
    rows = [[e["batch_size"], e.get("p50_ms"), e.get("p90_ms"), e.get("p99_ms"), e.get("mean_ms"), e.get("cov"),
             e.get("iterations"), config, e.get("end_to_end_per_image_ms")] for e in m.latency]
    print_table(f"{artifact} on {m.target} ({m.runtime}/{m.precision}, {m.where})",
                ["batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "CoV", "iters", "threads/streams/hint",
                 "end-to-end ms/image"], rows)
    if m.preprocess:
        print(f"pre-processing ({m.preprocess.get('steps')}, {m.preprocess.get('source')}): "
              f"p50 {m.preprocess['p50_ms']:.3f} ms per image")
    ips, detail = throughput_numbers(m.throughput)
    if ips is not None:
        print(f"throughput: {ips:.1f} images/s ({detail})")
    if m.accuracy:  # the runner reports fractions
        agree = m.accuracy.get("agreement")
        print(f"top-1 {100 * m.accuracy['top1']:.2f} % on {m.accuracy.get('n', '?')} images"
              + (f", agreement with PyTorch {100 * agree:.2f} %" if agree is not None else ""))
    for w in m.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if out:
        m.save(out)


def _eval_set_for(data: str, artifact, tmp):
    """An eval .npz from a data spec, preprocessed as the artifact's ONNX metadata says."""
    from pathlib import Path

    if data.endswith(".npz"):
        return Path(data)
    from deploy_targets.evalset import write_eval_npz
    from dskd.data import load_data
    from export.onnx_inspect import onnx_metadata

    onnx_path = artifact if artifact.suffix == ".onnx" else None
    meta = onnx_metadata(onnx_path) if onnx_path else {}
    size, chans = int(meta.get("input_size", 32)), int(meta.get("in_chans", 3))
    bundle = load_data(data, input_size=size, in_chans=chans, progress=False)
    mean, std = meta.get("mean", bundle.mean), meta.get("std", bundle.std)
    return write_eval_npz(tmp / "eval.npz", bundle.test_x.numpy(), bundle.test_y.numpy(), mean, std)


def verify(bundle: str, allow_failed_gates: bool = False) -> None:
    """Check a deploy bundle's files against the sha256 in its manifest.json (folder or .tar.gz),
    and that the run which wrote it passed its gates (a failed run still writes its bundle).

    Args:
        bundle: RUN/bundle/<target> or RUN/bundle/<target>.tar.gz.
        allow_failed_gates: check the files only; a bundle from a run that failed its gates is OK.
    """
    from pipeline.bundle import verify_bundle

    res = verify_bundle(bundle)
    for p in res["problems"]:
        print(f"problem: {p}")
    failed_run = res["gates_passed"] is False
    gates = ", ".join(res["failed_gates"]) or "see its report"
    if failed_run and not allow_failed_gates:
        print(f"problem: the run that wrote this bundle FAILED its gates ({gates}); do not ship it, "
              "or pass --allow-failed-gates to check its files only")
    ok = res["ok"] and (allow_failed_gates or not failed_run)
    note = ""  # on the verdict line, which stays the first line of an OK and the last of any output
    if failed_run and allow_failed_gates:
        note = f" (files only: the run that wrote it FAILED its gates: {gates})"
    elif res["gates_passed"] is None:
        note = " (the manifest does not record whether its run passed its gates: an older bundle)"
    print(f"{'OK' if ok else 'FAILED'}: {res['files']} files checked in {res['bundle']}{note}")
    if not ok:
        raise ExitCode(1)


def methods(method: str | None = None) -> None:
    """List the distillation methods and every option with its default (set them with --set / [student.options]).

    Args:
        method: show only this method.
    """
    from dskd.methods import list_methods, method_options
    from pipeline.console import print_table

    names = [method] if method else list_methods()
    for name in names:
        opts = method_options(str(name))
        print_table(f"method {name}", ["option", "default", "meaning"],
                    [[k, repr(o.default), getattr(o, "doc", "")] for k, o in opts.items()])


def doctor(target: str = "cpu", device: str | None = None, python: str = "python3", trtexec: str | None = None,
           remote_tmp: str | None = None, trt_builder: str = "onnx", require_max_clocks: bool = False) -> None:
    """Check a target (and its device) before any training: one PASS/WARN/FAIL/SKIP line per check.

    Exit code 0 when a run can proceed, 1 when a check FAILs, 2 on bad usage.

    Args:
        target: target name (see `pipeline targets`).
        device: user@host[:port] for targets reached over SSH.
        python: the device's python.
        trtexec: TensorRT targets: trtexec path on the device (default: PATH, /usr/src/tensorrt/bin).
        remote_tmp: device folder for the private temp dir (default: its $TMPDIR or /tmp).
        trt_builder: onnx or torch-tensorrt (the engine builder the run will use).
        require_max_clocks: a Jetson below maximum power mode / unlocked clocks FAILs instead of WARNs.
    """
    from deploy_targets.doctor import run_doctor

    rep = run_doctor(str(target), device, remote_python=str(python), trtexec=trtexec, remote_tmp=remote_tmp,
                     builder=str(trt_builder), require_max_clocks=bool(require_max_clocks))
    print("\n".join(rep.lines()))
    if not rep.ok:
        raise ExitCode(1)


COMMANDS: dict[str, Callable] = {
    "doctor": doctor,
    "run": run,
    "train": train,
    "export": export,
    "targets": targets,
    "bench": bench,
    "gate": gate,
    "verify": verify,
    "methods": methods,
}


LOG_LEVELS = ("debug", "info", "warning", "error")


def _configure_logging() -> None:
    """Diagnostics (the packages' `logging` records, e.g. the trainer's resume and build details)
    go to stderr at $DSKD_LOG_LEVEL (unset: warnings only); progress and results are printed
    whatever the level."""
    import logging

    raw = os.environ.get("DSKD_LOG_LEVEL", "")
    if not raw:  # Python's default: warnings and errors only, to stderr
        return
    if raw.lower() not in LOG_LEVELS:
        raise UserError(f"DSKD_LOG_LEVEL={raw!r}: use one of {', '.join(LOG_LEVELS)} (or unset it)")
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(levelname)s] %(name)s: %(message)s"))
        root.addHandler(handler)
    for name in ("dskd", "pipeline", "export", "deploy_targets"):
        logging.getLogger(name).setLevel(raw.upper())


def main(argv: list[str] | None = None) -> int:
    """Parse strictly (pipeline/argv.py), run the command, map outcomes to exit codes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _configure_logging()
        parsed = parse_command(argv, COMMANDS)
        if parsed.help:
            print(command_help(parsed.command, COMMANDS[parsed.command]) if parsed.command else main_help(COMMANDS),
                  end="")
            return 0
        COMMANDS[parsed.command](**parsed.kwargs)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ExitCode as exc:
        return exc.code
    except Exception as exc:
        # Training's NaN/inf stop; the trainer (and torch) is imported only by commands that train,
        # so `--help` and bad usage answer without loading torch.
        trainer = sys.modules.get("dskd.trainer")
        if trainer is None or not isinstance(exc, trainer.NonFiniteLoss):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished stages and checkpoints are kept, re-run to resume", file=sys.stderr)
        return 130
    return 0
