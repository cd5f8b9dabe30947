"""Every flag of every `python -m pipeline` command, with its true/false/good/bad forms.

The table is generated from the command signatures (pipeline.cli.COMMANDS), so a new
command or flag is covered without editing this file. Nothing here trains: a bad value must
exit 2 while parsing, before any stage; where a command must get past parsing, the command
function is replaced by a recorder (the parsing layer is what is under test), plus a few real
processes for the cases the issue reported.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dskd.errors import UserError
from pipeline.argv import Param, command_params, parse_command
from pipeline.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]

TRUE_FORMS = ["{flag}", "{flag}=true", "{flag}=True", "{flag}=TRUE", "{flag}=1", "{flag}=yes", "{flag}=Yes",
              "{flag} true", "{flag} YES", "{flag} 1"]
FALSE_FORMS = ["{noflag}", "{nodashflag}", "{flag}=false", "{flag}=False", "{flag}=FALSE", "{flag}=0",
               "{flag}=no", "{flag}=NO", "{flag} false", "{flag} No", "{flag} 0"]
BAD = {"bool": ["maybe", "2", "truthy", ""], "int": ["ten", "1.5", "1e3", "0x10", "[1]", "None", ""],
       "float": ["ten", "nan", "inf", "-inf", "1/2", "[0.5]", "None", ""]}
GOOD = {"int": [("7", 7), ("-3", -3), ("+12", 12)], "float": [("0.25", 0.25), ("1e-3", 1e-3), ("-2", -2.0), ("5", 5.0)],
        # strings are never evaluated: what looks like a number, a bool, None or a list stays text
        "str": [("2024", "2024"), ("1e3", "1e3"), ("True", "True"), ("None", "None"), ("[1, 2]", "[1, 2]"),
                ("{'a': 1}", "{'a': 1}"), ("-1", "-1")],
        "list": [("a.b=1", ["a.b=1"])]}


def _required(params: list[Param]) -> list[str]:
    return ["req-" + p.name for p in params if p.required]


def _flag_cases() -> list[tuple[str, Param]]:
    return [(name, p) for name, fn in COMMANDS.items() for p in command_params(fn) if not p.required]


def _id(case: tuple[str, Param]) -> str:
    return f"{case[0]}:{case[1].flag}"


FLAG_CASES = _flag_cases()


def test_the_table_covers_every_command():
    assert {name for name, _ in FLAG_CASES} | {n for n, fn in COMMANDS.items() if not command_params(fn)} \
        >= set(COMMANDS) - {n for n, fn in COMMANDS.items() if all(p.required for p in command_params(fn))}
    assert len(FLAG_CASES) >= 40  # run, train, export, targets, bench, gate, verify, methods, ...


def _parse(name: str, params: list[Param], *tokens: str) -> dict:
    return parse_command([name, *_required(params), *tokens], COMMANDS).kwargs


@pytest.mark.parametrize("case", FLAG_CASES, ids=_id)
def test_flag_true_false_good_and_bad_forms(case: tuple[str, Param]):
    name, p = case
    params = command_params(COMMANDS[name])
    dashed, underscored = p.flag, "--" + p.name
    spellings = {dashed, underscored}
    if p.kind == "bool":
        for form in TRUE_FORMS:
            for flag in spellings:
                toks = form.format(flag=flag).split(" ")
                assert _parse(name, params, *toks)[p.name] is True, (form, flag)
        for form in FALSE_FORMS:
            toks = form.format(flag=dashed, noflag="--no" + p.name.replace("_", "-"),
                               nodashflag="--no-" + p.name.replace("_", "-")).split(" ")
            assert _parse(name, params, *toks)[p.name] is False, form
        for bad in BAD["bool"]:
            with pytest.raises(UserError, match=rf"^{dashed} '{bad}': expected true or false"):
                _parse(name, params, f"{dashed}={bad}")
        return
    for flag in spellings:
        for text, want in GOOD[p.kind]:
            got = _parse(name, params, f"{flag}={text}")[p.name]
            assert got == want and type(got) is type(want), (flag, text, got)
            got = _parse(name, params, flag, text)[p.name]  # the value as the next word
            assert got == want and type(got) is type(want), (flag, text, got)
    if p.kind == "list":
        assert _parse(name, params, dashed, "a=1", underscored, "b=2")[p.name] == ["a=1", "b=2"]
    for bad in BAD.get(p.kind, []):
        with pytest.raises(UserError, match=rf"^{dashed} '{re.escape(bad)}': expected a (whole|finite) number"):
            _parse(name, params, f"{dashed}={bad}")
    with pytest.raises(UserError, match=rf"flag {dashed} of `pipeline {name}` needs a value"):
        _parse(name, params, dashed)


@pytest.mark.parametrize("case", [c for c in FLAG_CASES if c[1].kind in ("bool", "int", "float")], ids=_id)
def test_bad_value_exits_2_with_one_line_through_main(case, capsys, tmp_path, monkeypatch):
    """Through the real entry point: one `error:` line naming the flag, exit 2, nothing created."""
    monkeypatch.chdir(tmp_path)
    name, p = case
    params = command_params(COMMANDS[name])
    bad = BAD[p.kind][0]
    code = main([name, *_required(params), f"{p.flag}={bad}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {p.flag} '{bad}'"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_everywhere_exits_0_and_shows_dashed_flags(name, capsys):
    has_set = any(p.name == "set" for p in command_params(COMMANDS[name]))
    for form in (["-h"], ["--help"], ["--set", "x=1", "-h"] if has_set else ["-h"]):
        assert main([name, *form]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: python -m pipeline {name}")
        for p in command_params(COMMANDS[name]):
            shown = p.metavar if p.required else p.flag
            assert shown in out, (name, shown)
            if "_" in p.name and not p.required:
                assert "--" + p.name not in out, f"help shows the underscored --{p.name}"
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {n} " in listing for n in COMMANDS), listing


def test_unknown_flag_and_short_flag_exit_2(capsys):
    assert main(["run", "--epochs", "3"]) == 2
    assert "unknown flag --epochs for `pipeline run`" in capsys.readouterr().err
    assert main(["gate", "r.json", "-b", "x"]) == 2
    assert "unknown flag -b" in capsys.readouterr().err


class _Called(Exception):
    pass


@pytest.mark.parametrize("tokens, want", [
    (["--allow-unmeasured=false"], False), (["--allow-unmeasured", "false"], False), (["--allow_unmeasured=FALSE"], False),
    (["--noallow-unmeasured"], False), (["--allow-unmeasured=0"], False), (["--allow-unmeasured"], True),
    (["--allow-unmeasured=yes"], True), ([], None),
])
def test_run_allow_unmeasured_reaches_the_recipe_as_typed(tokens, want, monkeypatch, tmp_path):
    """`run --target jetson-orin --allow-unmeasured=false`: the recipe's target.allow_unmeasured
    is false (it was true: fire read "false" as a truthy string)."""
    import pipeline.run

    seen = {}

    def fake_execute(recipe, run_dir, force, baseline):
        seen["recipe"] = recipe
        raise _Called

    monkeypatch.setattr(pipeline.run, "execute", fake_execute)
    with pytest.raises(_Called):
        main(["run", "--target", "jetson-orin", "--out", str(tmp_path / "2024"), *tokens])
    expected = False if want is None else want  # not given: the recipe's own value (false in digits-smoke)
    assert seen["recipe"].target.allow_unmeasured is expected


def test_run_out_that_looks_like_a_number_is_a_folder_name(monkeypatch, tmp_path):
    import pipeline.run

    seen = {}
    def fake_execute(recipe, run_dir, force, baseline):
        seen["run_dir"] = run_dir
        raise _Called

    monkeypatch.setattr(pipeline.run, "execute", fake_execute)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(_Called):
        main(["run", "--out", "2024"])
    assert seen["run_dir"] == Path("2024")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_real_processes_for_the_reported_cases(tmp_path):
    helped = _cli("train", "-h")  # used to set --holdout and fail
    assert helped.returncode == 0 and "--holdout HOLDOUT" in helped.stdout and not helped.stderr.strip()
    for args, line in [
        (("train", "--epochs", "ten", "--out", str(tmp_path / "t")), "error: --epochs 'ten': expected a whole number"),
        (("verify", "1e3"), "error: 1e3: "),
        (("run", "--out", str(tmp_path / "2024"), "--allow-unmeasured=maybe"), "error: --allow-unmeasured 'maybe'"),
    ]:
        proc = _cli(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(line), proc.stderr
    assert list(tmp_path.iterdir()) == []
