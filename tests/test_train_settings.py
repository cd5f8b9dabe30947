"""Training settings are declared once (dskd.train_settings.TrainConfig) and every other face is
derived from it: the recipe's [teacher]/[student] keys and rules, the `pipeline train` flags, the
torchrun hand-off file and the teacher/distill stages' cache key (which once left out `nproc`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dskd.errors import UserError
from dskd.train_settings import (
    RESUME_MAY_CHANGE,
    SETTINGS,
    TrainConfig,
    cli_settings,
    recipe_settings,
    rule_problem,
)
from pipeline.argv import command_params
from pipeline.cli import COMMANDS, main
from pipeline.recipe import TrainSection, load_recipe, recipe_keys
from pipeline.stage import RunContext, run_stage
from pipeline.train_stages import DISTILL, TEACHER, _train_config, train_config

# The distill/teacher key before nproc joined it: a recipe with nproc = 1 must keep this key, so
# run folders cached before the change stay cached.
KEY_BEFORE_NPROC = {"model", "method", "epochs", "batch_size", "lr", "weight_decay", "schedule", "warmup_epochs",
                    "precision", "seed", "options"}


def _other_value(name: str, value: object) -> object:
    """A different valid value of setting `name` (to see what changing it does)."""
    meta = SETTINGS[name].metadata
    if meta["choices"]:
        return next(c for c in meta["choices"] if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5 if name != "train_subset" else 0.5
    if isinstance(value, dict):
        return {**value, "w_ce": 0.3}
    if name == "device":
        return "cpu" if value != "cpu" else "auto"
    return str(value) + "x"


def test_recipe_train_section_is_the_recipe_settings_with_their_rules():
    section = {f.name: f for f in dataclasses.fields(TrainSection)}
    assert set(section) == {f.name for f in recipe_settings()} | {"checkpoint"}
    for f in recipe_settings():
        for rule in ("ge", "gt", "choices", "check"):
            assert section[f.name].metadata[rule] is f.metadata[rule], (f.name, rule)
    for side in ("teacher", "student"):
        assert {k.split(".", 1)[1] for k in recipe_keys() if k.startswith(side + ".")} == set(section)


def test_train_flags_are_the_cli_settings_plus_out_config_resume_set():
    flags = {p.name for p in command_params(COMMANDS["train"])}
    assert flags == {f.name for f in cli_settings()} | {"out", "config", "resume", "set"}
    assert "nproc" in flags and "momentum" in flags  # both were missing from the hand-written list


@pytest.mark.parametrize("name", [f.name for f in recipe_settings()])
def test_cache_key_changes_exactly_with_the_settings_that_change_the_weights(name):
    section = load_recipe(None).student
    before = _train_config(section)
    changed = dataclasses.replace(section, **{name: _other_value(name, getattr(section, name))})
    differs = _train_config(changed) != before
    assert differs == SETTINGS[name].metadata["affects_result"], name
    assert (name in RESUME_MAY_CHANGE) == (not differs)


def test_nproc_is_in_the_key_and_an_nproc_1_key_is_the_old_one():
    """`student.nproc = 2` doubles the global batch; it used to reuse the 1-process student."""
    section = load_recipe(None).student
    assert set(_train_config(section)) == KEY_BEFORE_NPROC
    assert _train_config(dataclasses.replace(section, nproc=2))["nproc"] == 2


def test_recipe_section_gives_the_trainer_every_recipe_setting():
    recipe = load_recipe(None, {"student.nproc": 2, "student.warmup_epochs": 1.5, "student.device": "cpu"})
    cfg = train_config(RunContext(run_dir=Path("."), recipe=recipe), recipe.student, "kd", "t/model.pt")
    for f in recipe_settings():
        if f.name != "method":
            assert getattr(cfg, f.name) == getattr(recipe.student, f.name), f.name
    assert (cfg.method, cfg.teacher, cfg.input_size) == ("kd", "t/model.pt", recipe.data.input_size)


def test_hand_off_file_round_trips_and_refuses_unknown_settings():
    cfg = TrainConfig(model="resnet8", nproc=2, options={"tau": 2.0}, data_limits={"max_file_mb": 9.0})
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert "nproc" not in TrainConfig(model="resnet8").to_dict()  # added later: absent at its default
    with pytest.raises(UserError, match="unknown setting 'nprocs'"):
        TrainConfig.from_dict({"model": "resnet8", "nprocs": 2})
    for bad in ({"epochs": "ten"}, {"lr": True}, {"teacher": 3}, {"options": []}, {"channels_last": 1}):
        with pytest.raises(UserError, match=f"setting '{next(iter(bad))}' must be"):
            TrainConfig.from_dict({"model": "resnet8", **bad})
    assert TrainConfig.from_dict({"model": "resnet8", "lr": 1}).lr == 1.0 and TrainConfig.from_dict(
        {"model": "resnet8", "limit_per_class": None}).limit_per_class is None


def test_validate_uses_the_same_rules_as_the_recipe():
    for f in SETTINGS.values():
        for value in (-1, 0):
            if f.metadata["ge"] is not None or f.metadata["gt"] is not None:
                cfg = TrainConfig(model="resnet8", **{f.name: value})
                if rule_problem(f, value):
                    with pytest.raises(UserError, match=f"field '{f.name}'"):
                        cfg.validate()


def test_train_cli_refuses_config_with_other_settings(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(TrainConfig(model="resnet8").to_dict()))
    assert main(["train", "--config", str(path), "--lr", "0.1", "--out", str(tmp_path / "o")]) == 2
    assert "drop --lr" in capsys.readouterr().err
    path.write_text(json.dumps({"model": "resnet8", "bogus": 1}))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "unknown setting 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_cli_rules_name_the_flag(tmp_path, capsys):
    for args, line in ((["--nproc", "0"], "error: --nproc 0: must be >= 1"),
                       (["--momentum", "-1"], "error: --momentum -1.0: must be >= 0"),
                       (["--holdout", "1"], "error: --holdout 1.0: must be a fraction in [0, 1)"),
                       (["--method", "kd"], "error: --method kd distills from a teacher")):
        assert main(["train", "--out", str(tmp_path / "o"), *args]) == 2
        assert capsys.readouterr().err.strip().startswith(line), args
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_changing_nproc_retrains_the_student_under_torchrun(tmp_path):
    """End to end through the stages: nproc 1 trains; the same recipe again is cached; nproc 2
    is a new key, trains again with two DDP processes (the hand-off file carries the settings)."""
    fast = {"data.input_size": 16, "data.in_chans": 1, "data.limit_per_class": 40, "teacher.model": "resnet8",
            "teacher.epochs": 1, "student.model": "resnet8", "student.epochs": 1, "student.method": "kd",
            "student.options": {}, "student.device": "cpu", "teacher.device": "cpu", "student.batch_size": 32}

    def distill(overrides: dict) -> tuple[object, dict]:
        ctx = RunContext(run_dir=tmp_path, recipe=load_recipe(None, {**fast, **overrides}), log=lambda m: None)
        run_stage(TEACHER, ctx)
        res = run_stage(DISTILL, ctx)
        return res, json.loads((res.folder / "summary.json").read_text())

    one, s1 = distill({})
    again, _ = distill({"student.nproc": 1})
    two, s2 = distill({"student.nproc": 2})
    assert not one.cached and again.cached and again.folder == one.folder
    assert not two.cached and two.folder != one.folder
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    handed = json.loads((two.folder / "train_config.json").read_text())
    assert handed["nproc"] == 2 and handed["method"] == "kd" and handed["limit_per_class"] == 40
    assert s2["config"] == handed
