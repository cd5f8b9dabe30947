"""Bad configuration: exit 2 with one line naming the key, before any work starts.

"Before any work" is checked by the absence of the run folder's stages: a typo found after
training a teacher would cost minutes, so names known only by value (target, formats,
models, methods, method options) are checked up front too (pipeline.run.check_recipe).
`pipeline gate --set gates.TYPO=...` is covered by tests/test_pipeline_run.py::test_gate_command_alone_and_junit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.conftest import cli, run_main, set_args

CASES = {
    "unknown key": ({"student.epoch": 3}, "unknown key 'student.epoch'; did you mean 'student.epochs'?"),
    "unknown section": ({"traget.name": "cpu"}, "unknown key 'traget'"),
    "wrong type": ({"student.epochs": "ten"}, "key 'student.epochs' must be int, got 'ten'"),
    "wrong list type": ({"target.batch_sizes": 8}, "key 'target.batch_sizes' must be list[int]"),
    "negative epochs": ({"teacher.epochs": -1}, "key 'teacher.epochs' must be >= 1, got -1"),
    "negative gate": ({"gates.max_size_mb": -1.0}, "key 'gates.max_size_mb' must be >= 0"),
    "unknown precision": ({"student.precision": "int4"}, "key 'student.precision' must be fp32, bf16 or fp16"),
    "unknown channels": ({"data.in_chans": 2}, "key 'data.in_chans' must be 1 or 3"),
    "unknown target": ({"target.name": "jetson-nanoo"}, "'jetson-nanoo' is not known: did you mean"),
    "unknown export format": ({"export.formats": ["onnx-int4"]},
                              "key 'export.formats': --formats: unknown format 'onnx-int4': did you mean 'onnx-int8'?"),
    "unknown int8 head": ({"export.int8_head": "fp16"}, "key 'export.int8_head': --int8-head 'fp16': use float or int8"),
    "unknown model": ({"student.model": "resnet9"}, "key 'student.model': unknown model 'resnet9'"),
    "unknown method": ({"student.method": "dksd"}, "key 'student.method': unknown method 'dksd': did you mean"),
    "unknown method option": ({"student.options.temprature": 2.0},
                              "key 'student.options': unknown option kd.temprature: did you mean kd.tau?"),
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
