"""Bad configuration: exit 2 with one line naming the key, before any work starts.

"Before any work" is checked by the absence of the run folder's stages: a typo found after
training a teacher would cost minutes, so names known only by value (target, formats,
models, methods, method options) are checked up front too (pipeline.run.check_recipe).
`pipeline gate --set gates.TYPO=...` is covered by tests/test_pipeline_run.py::test_gate_command_alone_and_junit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli import cli, run_main, set_args

CASES = {
    "unknown key": ({"student.epoch": 3}, "unknown key 'student.epoch'; did you mean 'student.epochs'?"),
    "unknown section": ({"traget.name": "cpu"}, "unknown key 'traget'"),
    "wrong type": ({"student.epochs": "ten"}, "key 'student.epochs' must be int, got 'ten'"),
    "wrong list type": ({"target.batch_sizes": 8}, "key 'target.batch_sizes' must be list[int]"),
    "negative epochs": ({"teacher.epochs": -1}, "key 'teacher.epochs' must be >= 1, got -1"),
    "negative gate": ({"gates.max_size_mb": -1.0}, "key 'gates.max_size_mb' must be >= 0"),
    "unknown precision": ({"student.precision": "int4"}, "key 'student.precision' must be one of fp32, bf16, fp16, got 'int4'"),
    "unknown channels": ({"data.in_chans": 2}, "key 'data.in_chans' must be one of 1, 3, got 2"),
    "unknown target": ({"target.name": "jetson-nanoo"}, "'jetson-nanoo' is not known: did you mean"),
    "unknown export format": ({"export.formats": ["onnx-int4"]},
                              "key 'export.formats': unknown format 'onnx-int4': did you mean 'onnx-int8'?"),
    "unknown int8 head": ({"export.int8_head": "fp16"}, "key 'export.int8_head': --int8-head 'fp16': use float or int8"),
    "unknown model": ({"student.model": "resnet9"}, "key 'student.model': unknown model 'resnet9'"),
    "unknown method": ({"student.method": "dksd"}, "key 'student.method': unknown method 'dksd': did you mean"),
    "unknown method option": ({"student.options.temprature": 2.0},
                              "key 'student.options.temprature': unknown option kd.temprature: did you mean kd.tau?"),
    "gate on a metric that does not exist": ({"gates.min_latency_ms": 5.0},
                                             "unknown key 'gates.min_latency_ms'; did you mean 'gates.max_latency_ms'?"),
    "unknown latency percentile": ({"gates.latency_percentile": "p95"},
                                   "key 'gates.latency_percentile' must be one of p50, p90, p99, got 'p95'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_recipe_value_exits_2_naming_the_key(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    overrides, expected = CASES[case]
    out = tmp_path / "run"
    code, _, err = run_main(["run", "--out", str(out), *set_args({"student.method": "kd", "student.options": {}, **overrides})], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert not (out / "stages").exists()  # refused before any stage ran


def test_unknown_target_in_a_recipe_file_names_the_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    recipe = tmp_path / "mine.toml"
    recipe.write_text('name = "mine"\n[target]\nname = "jetsn-orin"\n')
    code, _, err = run_main(["run", str(recipe), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and f"error: {recipe}: target.name 'jetsn-orin' is not known: did you mean jetson-orin" in err, err
    code, _, err = run_main(["run", str(recipe), "--target", "orin", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "error: --target 'orin' is not known" in err, err
    assert not (tmp_path / "run" / "stages").exists()


@pytest.mark.slow
def test_bad_recipe_file_exits_2_from_a_real_process(tmp_path: Path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text('name = "mine"\n[student]\nepochs = 5\nbatchsize = 32\n')
    proc = cli("run", str(recipe), "--out", str(tmp_path / "run"), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: {recipe}: unknown key 'student.batchsize'; "
                                   "did you mean 'student.batch_size'?")
    broken = tmp_path / "broken.toml"
    broken.write_text("[student\nepochs = 5\n")
    proc = cli("run", str(broken), "--out", str(tmp_path / "run"), timeout=120)
    assert proc.returncode == 2 and f"{broken}: not valid TOML" in proc.stderr
    assert not (tmp_path / "run" / "stages").exists()


def _nan_checkpoint(path: Path, bad: float = float("nan")) -> Path:
    """A well-formed dskd model.pt whose first conv weight holds one NaN (or inf)."""
    from dskd.checkpoint import save_model
    from dskd.models import create_model

    model = create_model("resnet8", num_classes=10, in_chans=1)
    sd = model.state_dict()
    sd["conv1.weight"][0, 0, 0, 0] = bad
    save_model(path, sd, {"model": "resnet8", "num_classes": 10, "class_names": [str(i) for i in range(10)],
                          "input_size": 16, "in_chans": 1, "mean": [0.5], "std": [0.25], "method": "ce", "top1": 90.0})
    return path


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_teacher_checkpoint_is_a_bad_checkpoint_not_lower_lr(bad: float, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]):
    """A NaN/inf weight in a loaded checkpoint is reported as a bad file (exit 2, one line naming it),
    by `train --teacher` and by `run` with teacher.checkpoint (before any stage) -- it used to surface
    as a NaN loss advising "Lower --lr"."""
    from dskd.checkpoint import load_model_file
    from dskd.errors import UserError

    pt = _nan_checkpoint(tmp_path / "teacher.pt", bad)
    with pytest.raises(UserError, match=rf"^{pt}: bad checkpoint: 'conv1.weight' holds 1 NaN or infinite value"):
        load_model_file(pt)
    code, _, err = run_main(["train", "--teacher", str(pt), "--method", "kd", "--epochs", "1", "--data", "digits",
                             "--input-size", "16", "--in-chans", "1", "--limit-per-class", "5",
                             "--out", str(tmp_path / "student")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith(f"error: {pt}: bad checkpoint:"), err
    assert "--lr" not in err
    out = tmp_path / "run"
    code, _, err = run_main(["run", "--out", str(out), *set_args({"teacher.checkpoint": str(pt)})], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: --set: key 'teacher.checkpoint': {pt}: bad checkpoint: 'conv1.weight'"), err
    assert not out.exists()
