"""The fully resolved recipe (file + --set + flags) is validated before any stage runs.

The recipe schema is enumerated (pipeline.recipe.recipe_keys), so a key added later gets the
same checks: a wrong type for every key, NaN/inf for every number, an out-of-range value for
every bound, a bad value for every enum and every custom rule. Each goes through the real
entry point (`main(["run", ...])`) and must exit 2 with one `error:` line naming the key as
the user wrote it, before anything is created under --out. Nothing here trains.
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.recipe import Recipe, load_recipe, recipe_keys

REPO = Path(__file__).resolve().parents[1]
KEYS = recipe_keys()

# A bad value for every key whose rule is a custom check (the test below fails for a new one
# that is missing here, so it cannot be forgotten).
BAD_FOR_CHECK: dict[str, object] = {
    "data.spec": "", "data.train_subset": 1.5, "teacher.model": "", "student.model": "",
    "teacher.device": "tpu", "student.device": "gpu0", "export.opset": 5, "target.device": "nvidia@",
    "target.python": " ", "target.batch_sizes": [0], "target.threads": "many",
    # gate units: top-1 gates are percent (points), max_latency_regression a fraction
    "gates.min_top1": 0.85, "gates.max_top1_drop": 150.0, "gates.max_top1_regression": 101.0,
    "gates.max_latency_regression": 5.0,
}


def _run(capsys, tmp_path: Path, *args: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["run", "--out", str(tmp_path / "run"), *args])
    return code, capsys.readouterr().err.strip().splitlines()


def _assert_refused(code: int, err: list[str], expected: str, tmp_path: Path) -> None:
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]
    assert not (tmp_path / "run").exists()  # refused before any folder was created


def _wrong_type(annotation) -> object:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is not None and args and origin is not list and origin is not dict:  # Optional[X]
        annotation, origin = args[0], typing.get_origin(args[0])
    if annotation in (int, float):
        return "ten"
    if annotation is bool:
        return "yes"
    if annotation is str:
        return 5
    if origin is list:
        return 5 if typing.get_args(annotation)[0] is str else ["a"]
    return 5


def _hints() -> dict[str, object]:
    out = {}
    for dotted in KEYS:
        cls: object = Recipe
        for part in dotted.split("."):
            ann = typing.get_type_hints(cls)[part]
            cls = ann
        out[dotted] = ann
    return out


HINTS = _hints()


@pytest.mark.parametrize("dotted", list(KEYS))
def test_every_key_refuses_a_wrong_type(dotted, capsys, tmp_path):
    value = _wrong_type(HINTS[dotted])
    code, err = _run(capsys, tmp_path, "--set", f"{dotted}={json.dumps(value)}")
    _assert_refused(code, err, f"--set: key '{dotted}' must be ", tmp_path)


NUMBER_KEYS = [k for k, h in HINTS.items() if float in (h, *typing.get_args(h))]


@pytest.mark.parametrize("dotted", NUMBER_KEYS)
@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_every_number_must_be_finite(dotted, text, capsys, tmp_path):
    code, err = _run(capsys, tmp_path, "--set", f"{dotted}={text}")
    _assert_refused(code, err, f"--set: key '{dotted}' must be a finite number, got", tmp_path)


def _out_of_range(f) -> list[object]:
    m = f.metadata
    bad: list[object] = []
    if m.get("ge") is not None:
        bad.append(m["ge"] - 1)
    if m.get("gt") is not None:
        bad += [m["gt"], m["gt"] - 1]
    if m.get("choices") is not None:
        bad.append(2 if isinstance(m["choices"][0], int) else "bogus")
    return bad


RANGE_CASES = [(k, float(v) if k in NUMBER_KEYS else v) for k, f in KEYS.items() for v in _out_of_range(f)]


def test_every_number_key_has_a_bound_or_a_rule():
    """negative threads/timeout_s/min_iters/warmup_epochs were accepted and failed late"""
    for dotted, f in KEYS.items():
        if dotted in NUMBER_KEYS or HINTS[dotted] is int:
            assert any(f.metadata.get(r) is not None for r in ("ge", "gt", "choices", "check")), dotted


@pytest.mark.parametrize("dotted, value", RANGE_CASES, ids=[f"{k}={v}" for k, v in RANGE_CASES])
def test_every_bound_and_enum_is_enforced(dotted, value, capsys, tmp_path):
    code, err = _run(capsys, tmp_path, "--set", f"{dotted}={json.dumps(value)}")
    _assert_refused(code, err, f"--set: key '{dotted}' must be ", tmp_path)
    assert f"got {value!r}" in err[0]


def test_every_custom_rule_has_a_bad_case():
    with_check = {k for k, f in KEYS.items() if f.metadata.get("check") is not None}
    assert with_check <= set(BAD_FOR_CHECK), f"add a bad value for {sorted(with_check - set(BAD_FOR_CHECK))}"


@pytest.mark.parametrize("dotted", list(BAD_FOR_CHECK))
def test_every_custom_rule_is_enforced(dotted, capsys, tmp_path):
    code, err = _run(capsys, tmp_path, "--set", f"{dotted}={json.dumps(BAD_FOR_CHECK[dotted])}")
    _assert_refused(code, err, f"--set: key '{dotted}' ", tmp_path)


def test_a_bad_value_in_the_file_names_the_file_and_key(capsys, tmp_path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text('name = "mine"\n[target]\nmin_seconds = nan\n[gates]\nmax_latency_ms = -1.0\n')
    code, err = _run(capsys, tmp_path, "--recipe", str(recipe))
    _assert_refused(code, err, f"error: {recipe}: key 'target.min_seconds' must be a finite number, got nan", tmp_path)


@pytest.mark.parametrize("args, expected", [
    (["--device", "nvidia@"], "error: --device 'nvidia@': is not a device address"),
    (["--device", "a b"], "error: --device 'a b': is not a device address: bad host name"),
    (["--data", "/no/such/data.tar.gz"], "error: --data '/no/such/data.tar.gz': no such file or folder"),
    (["--set", "data.spec=\"/no/such/folder\""], "error: --set: key 'data.spec' '/no/such/folder': no such file"),
    (["--set", "export.opset=5"], "key 'export.opset' must be 13..20, got 5"),
    (["--set", "export.opset=21"], "key 'export.opset' must be 13..20, got 21"),
    (["--set", "student.checkpoint=\"x.pt\""], "key 'student.checkpoint' is not read: only the teacher"),
    (["--set", "teacher.method=\"kd\""], "key 'teacher.method' is not read: the teacher trains with ce"),
    (["--set", "teacher.checkpoint=\"/no/such/model.pt\""], "error: --set: key 'teacher.checkpoint' '/no/such/model.pt': no such file"),
    (["--force", "distil"], "--force distil: not a stage"),
    # a method option set with --set is named as typed, not as the recipe file's [student.options]
    (["--set", "student.method=\"dskd\"", "--set", "student.options.t0=-5"],
     "error: --set: key 'student.options.t0': option dskd.t0=-5 is out of range"),
    (["--set", "student.method=\"dskd\"", "--set", "student.options.denoiser_precision=\"fp16\""],
     "error: --set: key 'student.options.denoiser_precision': option dskd.denoiser_precision='fp16' is not valid"),
])
def test_flags_and_inputs_are_named_as_typed(args, expected, capsys, tmp_path):
    code, err = _run(capsys, tmp_path, *args)
    _assert_refused(code, err, expected, tmp_path)


def test_enums_match_the_trainer():
    from dskd import trainer
    from pipeline import recipe

    assert tuple(recipe.PRECISIONS) == tuple(trainer.PRECISIONS)
    assert tuple(recipe.SCHEDULES) == tuple(trainer.SCHEDULES)


def test_opset_bounds_are_the_exporters():
    from export.onnx_build import MAX_OPSET, MIN_OPSET

    for opset in (MIN_OPSET, 18, MAX_OPSET):
        assert load_recipe(None, {"export.opset": opset}).export.opset == opset


# ------------------------------------------------------------------ documented keys are read
def _readme_recipe_block() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("Every key:")
    return re.search(r"```toml\n(.*?)```", text[start:], re.S).group(1)


def _flatten(table: dict, where: str = "") -> set[str]:
    out = set()
    for k, v in table.items():
        dotted = f"{where}.{k}" if where else k
        if isinstance(v, dict) and not dotted.endswith(".options"):
            out |= _flatten(v, dotted)
        else:
            out.add(dotted)
    return out


def test_readme_recipe_block_and_schema_match_both_ways(tmp_path):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    block = tomllib.loads(_readme_recipe_block())
    documented = _flatten(block)
    # "[teacher]  # same keys for [student]": the README lists the shared keys once.
    for k in list(documented):
        for a, b in (("teacher.", "student."), ("student.", "teacher.")):
            if k.startswith(a):
                documented.add(b + k[len(a):])
    schema = set(KEYS)
    assert documented - schema == set(), f"README documents keys the recipe does not have: {documented - schema}"
    assert schema - documented == set(), (f"recipe keys missing from the README's recipe block: "
                                          f"{sorted(schema - documented)}: document each key there")
    path = tmp_path / "readme.toml"
    path.write_text(_readme_recipe_block())
    load_recipe(str(path))  # the documented block is itself a valid recipe


def test_parity_tolerance_is_the_fp32_parity_bound():
    """export.parity_tolerance reaches the export stage's parity check (it was never read)."""
    from export.parity import DEFAULT_TOLERANCES, enforce, tolerances_for
    from pipeline.ship_stages import _export_options
    from pipeline.stage import RunContext

    rec = load_recipe(None, {"export.parity_tolerance": 0.05})
    tol = _export_options(RunContext(run_dir=Path("."), recipe=rec))["tolerances"]
    assert tol["fp32"].max_rel_diff == 0.05
    assert tol["int8"] == DEFAULT_TOLERANCES["int8"] and tol["fp16"] == DEFAULT_TOLERANCES["fp16"]
    report = {"images": 10, "max_abs_diff": 0.02, "rel_max_abs_diff": 0.02, "top1_agreement": 1.0}
    assert enforce("onnx", dict(report), tolerances_for(0.05)["fp32"])["passed"]
    with pytest.raises(Exception, match=r"relative 0.02 > 0.001"):
        enforce("onnx", dict(report), tolerances_for(1e-3)["fp32"])
