import json

import pytest

from dskd.errors import UserError
from pipeline.argv import normalize_argv
from pipeline.overrides import parse_overrides


def cmd(model: str = "m", epochs: int = 1, resume: bool = False, set: list | None = None):  # noqa: A002
    pass


def pos(path, out: str = "x"):
    pass


COMMANDS = {"train": cmd, "export": pos}


def test_unknown_flag_is_rejected_with_suggestion():
    with pytest.raises(UserError, match=r"unknown flag --epoch .*did you mean --epochs"):
        normalize_argv(["train", "--epoch", "3"], COMMANDS)


def test_unknown_command_suggests():
    with pytest.raises(UserError, match="did you mean train"):
        normalize_argv(["trian"], COMMANDS)


def test_values_bools_and_repeated_set_are_folded():
    out = normalize_argv(["train", "--epochs", "3", "--resume", "--set", "a.b=1", "--set=c=x", "--model=r"], COMMANDS)
    assert out[:4] == ["train", "--epochs=3", "--resume", "--model=r"]
    assert json.loads(out[-1].split("=", 1)[1]) == ["a.b=1", "c=x"]


def test_dash_and_underscore_flags_and_negated_bool():
    assert normalize_argv(["train", "--noresume"], COMMANDS) == ["train", "--noresume"]


def test_too_many_positionals_and_missing_value():
    with pytest.raises(UserError, match="unexpected argument"):
        normalize_argv(["export", "a.pt", "b", "c"], COMMANDS)
    with pytest.raises(UserError, match="needs a value"):
        normalize_argv(["train", "--epochs"], COMMANDS)


def test_help_passes_through():
    assert normalize_argv(["train", "--help"], COMMANDS) == ["train", "--help"]


def test_parse_overrides_types():
    assert parse_overrides(["a=1", "b=0.5", "c=true", "d=hello", 'e="q"', "f=[1, 2]"]) == {
        "a": 1, "b": 0.5, "c": True, "d": "hello", "e": "q", "f": [1, 2]}
    with pytest.raises(UserError, match="expected key=value"):
        parse_overrides(["novalue"])
