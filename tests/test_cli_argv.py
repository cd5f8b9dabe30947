"""The argument layer (pipeline/argv.py) on small stand-in commands; every real command's
every flag is covered by tests/test_cli_flags.py."""

import pytest

from dskd.errors import UserError
from pipeline.argv import command_help, parse_command
from pipeline.overrides import parse_overrides


def cmd(model: str = "m", epochs: int = 1, resume: bool = False, set: list | None = None):  # noqa: A002
    """Stand-in train.

    Args:
        model: the model.
        epochs: how many.
        resume: continue.
        set: overrides.
    """


def pos(path: str, out: str = "x"):
    """Stand-in export."""


COMMANDS = {"train": cmd, "export": pos}


def test_unknown_flag_is_rejected_with_suggestion():
    with pytest.raises(UserError, match=r"unknown flag --epoch .*did you mean --epochs"):
        parse_command(["train", "--epoch", "3"], COMMANDS)


def test_unknown_command_suggests():
    with pytest.raises(UserError, match="did you mean train"):
        parse_command(["trian"], COMMANDS)


def test_values_bools_and_repeated_set_are_collected():
    p = parse_command(["train", "--epochs", "3", "--resume", "--set", "a.b=1", "--set=c=x", "--model=r"], COMMANDS)
    assert p.kwargs == {"epochs": 3, "resume": True, "set": ["a.b=1", "c=x"], "model": "r"}


def test_negated_bool_and_both_spellings():
    assert parse_command(["train", "--noresume"], COMMANDS).kwargs == {"resume": False}
    assert parse_command(["train", "--no-resume"], COMMANDS).kwargs == {"resume": False}
    assert parse_command(["export", "p", "--out", "o"], COMMANDS).kwargs == {"path": "p", "out": "o"}


def test_too_many_positionals_missing_value_and_missing_positional():
    with pytest.raises(UserError, match="unexpected argument"):
        parse_command(["export", "a.pt", "b", "c"], COMMANDS)
    with pytest.raises(UserError, match="needs a value"):
        parse_command(["train", "--epochs"], COMMANDS)
    with pytest.raises(UserError, match="needs PATH"):
        parse_command(["export"], COMMANDS)


def test_a_flag_given_twice_is_refused():
    with pytest.raises(UserError, match="--epochs given twice"):
        parse_command(["train", "--epochs=1", "--epochs=2"], COMMANDS)


def test_double_dash_ends_flags():
    assert parse_command(["export", "--", "--weird-name"], COMMANDS).kwargs == {"path": "--weird-name"}


def test_help_anywhere_before_double_dash():
    assert parse_command(["train", "--epochs", "3", "-h"], COMMANDS).help
    assert parse_command(["--help"], COMMANDS).help and parse_command([], COMMANDS).command is None
    text = command_help("train", cmd)
    assert "--epochs EPOCHS" in text and "--resume, --noresume" in text and "how many." in text


def test_parse_overrides_types():
    assert parse_overrides(["a=1", "b=0.5", "c=true", "d=hello", 'e="q"', "f=[1, 2]"]) == {
        "a": 1, "b": 0.5, "c": True, "d": "hello", "e": "q", "f": [1, 2]}
    with pytest.raises(UserError, match="expected key=value"):
        parse_overrides(["novalue"])
