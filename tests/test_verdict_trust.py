"""Verdicts that must not be stale or wrong (a review of every PASS/OK the product prints).

Each test here reproduces a case where the product said PASS, OK or exit 0 for the wrong reason
before it was fixed; the scenario is in the test's docstring.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline import run as run_mod
from pipeline import ship_stages
from pipeline.artifact_result import ArtifactResult, LatencyStats
from pipeline.recipe import Recipe
from pipeline.stage import RunContext, Stage, StageResult, run_stage


def _upstream(ctx: RunContext) -> None:
    """Teacher..optimize as finished stages (what the gate and deploy stages read)."""
    summ = {"model": "resnet8", "method": "dskd", "top1": 96.0, "params": 1, "macs": 1}
    for name, out in (("teacher", {"summary": dict(summ, model="resnet20")}),
                      ("distill", {"summary": summ, "model_sha256": "1" * 64, "model_pt": "model.pt"}),
                      ("export", {"artifacts": []}), ("optimize", {"artifacts": [], "skipped": []})):
        ctx.results[name] = StageResult(name, name * 8, ctx.run_dir, out, True, 0.0)


def test_a_cached_gate_never_judges_a_deploy_that_ran_again(tmp_path: Path) -> None:
    """Run 1: the device is down, unmeasured results allowed -> PASSED (NOT MEASURED, allowed).
    Run 2: the device is back and the model measures 40 % against min_top1 = 80. The incomplete
    deploy re-ran under the same key; the gate stage used to be served run 1's rows from cache
    (PASSED). It must judge the new numbers (FAIL). Only the measuring is faked; stages are real."""
    state = {"up": False}

    def deploy_run(ctx: RunContext, folder: Path) -> dict:
        a = ArtifactResult(format="onnx", precision="fp32", runtime="onnxruntime", path="m.onnx", sha256="0" * 64,
                           size_bytes=10, shipped=True, measured=False, not_measured_reason="device unreachable")
        if state["up"]:
            a = a.replace(measured=True, not_measured_reason=None, top1=40.0,
                          latency_ms=LatencyStats(p50=1.0, p90=1.1, p99=1.2))
        return {"artifacts": [a.to_json()], "target_available": state["up"],
                "reason": "" if state["up"] else "device unreachable", "environment": None, "runtime": "onnxruntime"}

    deploy = dataclasses.replace(ship_stages.DEPLOY, run=deploy_run)  # the real key and completeness rule
    recipe = Recipe()
    recipe.target.allow_unmeasured = True
    recipe.gates.min_top1 = 80.0
    verdicts = []
    for _ in range(2):
        ctx = RunContext(run_dir=tmp_path, recipe=recipe, log=lambda _m: None)
        _upstream(ctx)
        d = run_stage(deploy, ctx)
        g = run_stage(run_mod.GATE, ctx)
        verdicts.append((d.cached, g.cached, g.outputs["passed"], [r["status"] for r in g.outputs["gates"]]))
        state["up"] = True
    assert verdicts[0] == (False, False, True, ["NOT MEASURED"])
    assert verdicts[1] == (False, False, False, ["FAIL"])
    ctx = RunContext(run_dir=tmp_path, recipe=recipe, log=lambda _m: None)  # complete now: all cached
    _upstream(ctx)
    assert run_stage(deploy, ctx).cached and run_stage(run_mod.GATE, ctx).cached


def test_a_stage_that_ran_again_under_its_key_reruns_what_reads_it(tmp_path: Path) -> None:
    """An interrupted re-run of an upstream stage (its stage.json removed, as `run_stage` does before
    running) re-runs it under the same key with new outputs (a new model); a downstream stage keyed
    on the upstream KEY alone stayed cached on the old outputs (an export of the old model)."""
    produced = iter(["model-a", "model-b"])
    up = Stage("up", (), lambda ctx: {"k": 1}, lambda ctx, folder: {"model": next(produced)})
    down = Stage("down", ("up",), lambda ctx: {}, lambda ctx, folder: {"exported": ctx.out("up")["model"]})

    def once() -> tuple[StageResult, StageResult]:
        ctx = RunContext(run_dir=tmp_path, recipe=None, log=lambda _m: None)
        return run_stage(up, ctx), run_stage(down, ctx)

    u1, d1 = once()
    (u1.folder / "stage.json").unlink()  # the up stage's re-run was interrupted
    u2, d2 = once()
    assert u2.key == u1.key and not u2.cached and not d2.cached
    assert d2.outputs == {"exported": "model-b"}
    u3, d3 = once()  # nothing changed now: both cached, the same keys as a fresh run gave
    assert u3.cached and d3.cached and d3.key == d2.key


# -- `pipeline verify` reads the verdict of the run that wrote the bundle -----------------------


def _manifest_bundle(tmp_path: Path, **extra: object) -> Path:
    import json

    from tests.test_redteam_trust import IR, _bundle

    root = _bundle(tmp_path / "b", {"infer.py": b"x", "model.fp32.xml": b"<xml/>", "model.fp32.bin": b"w"}, [IR])
    m = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**m, **extra}))
    return root


def test_verify_fails_the_intact_bundle_of_a_run_that_failed_its_gates(tmp_path: Path, capsys) -> None:
    """A run that fails its gates still writes its bundle; `verify` used to say OK (exit 0) for it,
    and OK is read as "ship it". Now: FAILED naming the gates, exit 1; --allow-failed-gates checks
    the files only and says so on the verdict line."""
    from tests.helpers.cli import run_main

    rows = [{"name": "min_top1", "artifact": "openvino/fp32", "passed": False},
            {"name": "max_size_mb", "artifact": "openvino/fp32", "passed": True}]
    bundle = _manifest_bundle(tmp_path, passed=False, gates=rows)
    code, out, _ = run_main(["verify", str(bundle)], capsys)
    assert code == 1 and "FAILED its gates (min_top1[openvino/fp32])" in out, out
    assert out.strip().splitlines()[-1].startswith("FAILED")
    for flag in ("--allow-failed-gates", "--allow-failed-gates=true"):
        code, out, _ = run_main(["verify", str(bundle), flag], capsys)
        assert code == 0 and out.startswith("OK: 3 files checked") and "FAILED its gates" in out, out
    code, out, _ = run_main(["verify", str(bundle), "--allow-failed-gates=false"], capsys)
    assert code == 1, out


def test_verify_passes_a_passed_run_and_refuses_a_mistyped_verdict(tmp_path: Path, capsys) -> None:
    from tests.helpers.cli import run_main

    code, out, _ = run_main(["verify", str(_manifest_bundle(tmp_path / "ok", passed=True, gates=[]))], capsys)
    assert code == 0 and out.startswith("OK: 3 files checked") and "older bundle" not in out, out
    code, out, err = run_main(["verify", str(_manifest_bundle(tmp_path / "bad", passed="yes"))], capsys)
    assert code == 2 and "passed" in err and "Traceback" not in err, err


# -- the training stages' key sees the data, not only its path ------------------------------------


def test_edited_added_or_replaced_images_change_the_training_key(tmp_path: Path) -> None:
    """A folder dataset was keyed by its path alone: new or edited images left every stage cached,
    and the gates judged a model trained and measured on the old images. An archive was keyed by
    size and whole-second mtime: a same-size archive copied with its times kept was missed."""
    import os

    from pipeline.train_stages import _data_config

    root = tmp_path / "data"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            (root / split / cls / "0.png").write_bytes(b"\x89PNG-" + cls.encode())
    recipe = Recipe()
    recipe.data.spec = str(root)
    keys = [_data_config(recipe)]
    img = root / "test" / "a" / "0.png"
    st = img.stat()
    img.write_bytes(b"\x89PNG-x")  # same size, then its mtime put back
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    keys.append(_data_config(recipe))
    (root / "train" / "b" / "1.png").write_bytes(b"\x89PNG-b2")
    keys.append(_data_config(recipe))
    assert len({str(k) for k in keys}) == 3
    assert str(_data_config(recipe)) == str(keys[-1])  # nothing changed: the same key

    arch = tmp_path / "d.tar"
    arch.write_bytes(b"a" * 10240)
    st = arch.stat()
    recipe.data.spec = str(arch)
    before = _data_config(recipe)
    arch.write_bytes(b"b" * 10240)  # another archive of the same size, its times put back (`cp -p`)
    os.utime(arch, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _data_config(recipe) != before
    recipe.data.spec = "digits"
    assert _data_config(recipe)["spec"] == "digits"


# -- a baseline measured another way is no evidence of a regression -------------------------------


def _report(target: str, p50: float, threads: int, cpu: str = "cpu-A", batch: int = 1) -> dict:
    art = {"format": "onnx", "precision": "fp32", "runtime": "onnxruntime", "path": "a/model.onnx",
           "sha256": "0" * 64, "size_bytes": 1000, "top1": 95.0, "shipped": True, "measured": True,
           "latency_ms": {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.2},
           "latency_by_batch": [{"batch_size": batch, "p50_ms": p50}],
           "runtime_config": {"threads": threads}, "environment": {"cpu_model": cpu}}
    return {"target": {"name": target}, "student": {"top1": 96.0}, "artifacts": [art]}


def _latency_row(report: dict, baseline: dict, policy: str = "fail"):
    from pipeline.gates import evaluate_gates
    from pipeline.recipe import GateConfig

    gates = GateConfig(max_latency_regression=0.05, regression_inconclusive=policy)
    return next(r for r in evaluate_gates(report, gates, baseline) if r.name == "max_latency_regression")


def test_latency_regression_across_targets_threads_cpus_or_batches_is_inconclusive() -> None:
    """A 3x slower model measured on an 8-thread x86 box passed against a 1-thread ssh-cpu baseline
    (ratio 0.3): the two reports' numbers were divided whatever they were measured on."""
    base = _report("ssh-cpu", 20.0, threads=1)
    row = _latency_row(_report("cpu", 6.0, threads=8), base)
    assert row.status == "INCONCLUSIVE" and not row.passed, row
    assert "target ssh-cpu in the baseline, cpu here" in row.note and "threads 1 in the baseline, 8 here" in row.note
    assert _latency_row(_report("cpu", 6.0, threads=8), base, policy="pass").passed  # the user's stated policy
    for changed in ({"cpu": "cpu-B"}, {"batch": 4}):
        row = _latency_row(_report("ssh-cpu", 19.0, threads=1, **changed), base)
        assert row.status == "INCONCLUSIVE", (changed, row.note)
    same = _latency_row(_report("ssh-cpu", 19.0, threads=1), base)  # measured alike: judged as before
    assert same.status == "PASS" and same.value == round(19.0 / 20.0, 4)
    slower = _latency_row(_report("ssh-cpu", 30.0, threads=1), base)
    assert slower.status == "FAIL"
    bare = _report("cpu", 30.0, threads=8)  # nothing recorded on one side: compared, as documented
    for a in bare["artifacts"]:
        a.pop("runtime_config"), a.pop("environment"), a.pop("latency_by_batch")
    bare["target"] = {}
    assert _latency_row(bare, base).status == "FAIL"


def _onnx_bytes(chw: tuple[int, int, int], outputs: int) -> bytes:
    """A tiny valid ONNX model: input N×C×H×W, output N×outputs (declared shapes are what verify reads)."""
    import onnx
    from onnx import TensorProto, helper

    c, h, w = chw
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, h, w])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", outputs])
    flat = helper.make_node("Flatten", ["input"], ["f"])
    shape = helper.make_tensor("s", TensorProto.INT64, [2], [0, outputs])
    graph = helper.make_graph([flat, helper.make_node("Reshape", ["f", "s"], ["logits"])], "g", [x], [y],
                              initializer=[shape])
    return onnx.helper.make_model(graph).SerializeToString()


def _onnx_bundle(root: Path, model: bytes, labels: list[str], artifact_sha: str | None = None) -> Path:
    import hashlib
    import json

    from pipeline.bundle_verify import BUNDLE_FORMAT, MANIFEST

    files = {"infer.py": b"x", "model.onnx": model}
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    sha = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    art = {"format": "onnx", "precision": "fp32", "runtime": "onnxruntime", "path": "model.onnx",
           "files": ["model.onnx"], "sha256": artifact_sha or sha["model.onnx"]}
    (root / MANIFEST).write_text(json.dumps({
        "format": BUNDLE_FORMAT, "target": "cpu", "runtime": "onnxruntime", "labels": labels,
        "preprocessing": {"input_size": 4, "in_chans": 1, "mean": [0.5], "std": [0.25]}, "artifacts": [art],
        "files": {n: {"sha256": sha[n], "size_bytes": len(d)} for n, d in files.items()},
        "passed": True, "gates": []}))
    return root


def test_verify_fails_a_swapped_model_that_does_not_fit_the_manifest(tmp_path: Path, capsys) -> None:
    """A model swapped in with only `files` re-hashed verified OK, and infer.py then crashed (another
    input size) or named classes from the wrong list (another class count)."""
    from tests.helpers.cli import run_main

    good = _onnx_bytes((1, 4, 4), 2)
    code, out, _ = run_main(["verify", str(_onnx_bundle(tmp_path / "ok", good, ["a", "b"]))], capsys)
    assert code == 0 and out.startswith("OK"), out
    cases = {
        "stale artifact sha256": (good, ["a", "b"], "0" * 64, "the model was replaced"),
        "other input size": (_onnx_bytes((1, 8, 8), 2), ["a", "b"], None, "takes C×H×W 1×8×8"),
        "other channels": (_onnx_bytes((3, 4, 4), 2), ["a", "b"], None, "takes C×H×W 3×4×4"),
        "other class count": (_onnx_bytes((1, 4, 4), 20), ["a", "b"], None, "20 outputs, the manifest 2 labels"),
    }
    for name, (model, labels, sha, want) in cases.items():
        bundle = _onnx_bundle(tmp_path / name.replace(" ", "_"), model, labels, sha)
        code, out, _ = run_main(["verify", str(bundle)], capsys)
        assert code == 1 and want in out, (name, out)


def test_verify_refuses_non_finite_or_non_positive_normalisation(tmp_path: Path, capsys) -> None:
    """mean NaN/inf or std 0/negative made infer.py label every image alike, exit 0; verify said OK."""
    import json

    from tests.helpers.cli import run_main

    for i, (key, value) in enumerate([("mean", "NaN"), ("std", "Infinity"), ("std", "0"), ("std", "-0.25")]):
        bundle = _onnx_bundle(tmp_path / str(i), _onnx_bytes((1, 4, 4), 2), ["a", "b"])
        text = (bundle / "manifest.json").read_text()
        m = json.loads(text)
        old = json.dumps(m["preprocessing"][key])
        (bundle / "manifest.json").write_text(text.replace(f'"{key}": {old}', f'"{key}": [{value}]'))
        code, _, err = run_main(["verify", str(bundle)], capsys)
        assert code == 2 and f"preprocessing.{key}" in err and "Traceback" not in err, (key, value, err)


# -- `pipeline gate`: no silent verdict from unset gates; the run's own unmeasured policy -----------


def _full_report(tmp: Path, name: str, gates: dict, *, p50: float = 1.0, top1: float | None = 95.0,
                 student_top1: float | None = 96.0, size: int | None = 1000, allow_unmeasured: bool = False,
                 measured: bool = True, config: bool = True) -> Path:
    """A report.json the schema accepts (what `pipeline gate` reads), written to tmp/name/report.json."""
    import json

    art = {"format": "onnx", "precision": "fp32", "runtime": "onnxruntime", "path": "a/model.onnx",
           "sha256": "0" * 64, "size_bytes": size, "top1": top1 if measured else None,
           "latency_ms": {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.2} if measured else None,
           "shipped": True, "measured": measured,
           **({} if measured else {"not_measured_reason": "device unreachable"})}
    cfg = {"target": {"name": "cpu", "allow_unmeasured": allow_unmeasured}, "gates": gates}
    rep = {"schema_version": 1, "recipe": {"name": "t", "source": "t", **({"config": cfg} if config else {})},
           "target": {"name": "cpu", "runtime": "onnxruntime", "measured": measured, "reason": ""},
           "teacher": {"model": "resnet20", "top1": 97.0},
           "student": {"model": "resnet8", "method": "dskd", "top1": student_top1, "params": 1, "macs": 1},
           "artifacts": [art], "gates": [], "passed": True}
    folder = tmp / name
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(rep))
    return folder / "report.json"


def test_gate_refuses_a_baseline_it_would_ignore_and_gates_that_are_all_unset(tmp_path: Path, capsys) -> None:
    """`gate SLOW --baseline BASE` with no regression threshold set said PASSED for a 10x slower
    model; a report without any threshold (no recorded recipe) said PASSED at 3 % top-1."""
    from tests.helpers.cli import run_main

    base = _full_report(tmp_path, "base", {"min_top1": 10.0}, p50=1.0)
    slow = _full_report(tmp_path, "slow", {"min_top1": 10.0}, p50=10.0)
    code, _, err = run_main(["gate", str(slow), "--baseline", str(base)], capsys)
    assert code == 2 and "no regression gate is set" in err and "Traceback" not in err, err
    code, out, _ = run_main(["gate", str(slow), "--baseline", str(base), "--set",
                             "gates.max_latency_regression=0.05"], capsys)
    assert code == 1 and "FAILED" in out, out
    bare = _full_report(tmp_path, "bare", {}, top1=3.0, config=False)
    code, _, err = run_main(["gate", str(bare)], capsys)
    assert code == 2 and "no gate threshold is set" in err, err
    code, _, err = run_main(["gate", str(bare), "--set", "gates.min_top1=10"], capsys)
    assert code == 1


def test_gate_keeps_set_gates_when_a_number_is_missing(tmp_path: Path, capsys) -> None:
    """max_top1_drop without the student's top-1 and max_size_mb without a size used to vanish:
    PASSED with two configured gates never evaluated."""
    from tests.helpers.cli import run_main

    rep = _full_report(tmp_path, "r", {"max_top1_drop": 2.0, "max_size_mb": 5.0}, student_top1=None, size=None)
    code, out, _ = run_main(["gate", str(rep)], capsys)
    assert code == 1 and out.count("NOT MEASURED") == 2 and "max_top1_drop" in out and "max_size_mb" in out, out


def test_gate_gives_the_verdict_its_run_gave_for_unmeasured_artifacts(tmp_path: Path, capsys) -> None:
    """A run with target.allow_unmeasured exited 0; `pipeline gate` on its report used False and said
    FAILED. The recorded policy applies unless the flag is given."""
    from tests.helpers.cli import run_main

    rep = _full_report(tmp_path, "r", {"min_top1": 10.0}, measured=False, allow_unmeasured=True)
    assert run_main(["gate", str(rep)], capsys)[0] == 0
    assert run_main(["gate", str(rep), "--allow-unmeasured=false"], capsys)[0] == 1
    strict = _full_report(tmp_path, "s", {"min_top1": 10.0}, measured=False, allow_unmeasured=False)
    assert run_main(["gate", str(strict)], capsys)[0] == 1
    assert run_main(["gate", str(strict), "--allow-unmeasured"], capsys)[0] == 0


def test_paths_of_the_wrong_kind_are_one_line(tmp_path: Path, capsys) -> None:
    """`gate R --junit /tmp` printed the table, then an IsADirectoryError traceback (exit 1, read by CI
    as a failed gate); `run --out FILE` gave a FileExistsError traceback."""
    from tests.helpers.cli import run_main

    rep = _full_report(tmp_path, "r", {"min_top1": 10.0})
    code, _, err = run_main(["gate", str(rep), "--junit", str(tmp_path)], capsys)
    assert code == 2 and "is a folder" in err and "Traceback" not in err, err
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run_main(["run", "--out", str(afile)], capsys)
    assert code == 2 and "is a file, not a folder" in err and "Traceback" not in err, err
    for flag in ("--recipe=", "--force=", "--out="):
        code, _, err = run_main(["run", flag], capsys)
        assert code == 2 and "is empty" in err, (flag, err)


def test_a_baseline_of_another_input_shape_is_refused_before_training(tmp_path: Path, capsys) -> None:
    """`run --baseline` of a run trained at input_size 24 reached the deploy stage after training and
    failed there with an ONNX Runtime shape error naming no flag (and left the old verdict in place)."""
    import json

    from tests.helpers.cli import run_main

    rep = _full_report(tmp_path, "b24", {"min_top1": 10.0})
    data = json.loads(rep.read_text())
    data["recipe"]["config"]["data"] = {"input_size": 24, "in_chans": 3}
    rep.write_text(json.dumps(data))
    out_dir = tmp_path / "out"
    code, _, err = run_main(["run", "--out", str(out_dir), "--baseline", str(rep),
                             "--set", "gates.max_latency_regression=0.05"], capsys)
    assert code == 2 and "data.input_size = 24" in err and "--baseline" in err, err
    assert not (out_dir / "stages").exists()
