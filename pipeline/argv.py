"""Check a command line against the command's signature before python-fire runs anything.

Fire calls the function with the flags it recognises and only complains about the
rest afterwards; a typo like `--epoch 5` would silently train with the default.
"""

from __future__ import annotations

import difflib
import inspect
import json
from collections.abc import Callable

from dskd.errors import UserError

HELP_FLAGS = {"--help", "-h"}


def _closest(name: str, options: list[str]) -> str:
    near = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {near[0]}?" if near else ""


def normalize_argv(argv: list[str], commands: dict[str, Callable]) -> list[str]:
    """Validate `argv` (command first) and fold repeated `--set k=v` into one list-valued flag."""
    if not argv or argv[0] in HELP_FLAGS:
        return argv
    name, rest = argv[0], argv[1:]
    if name not in commands:
        raise UserError(f"unknown command {name!r}{_closest(name, list(commands))} (see `python -m pipeline --help`)")
    if any(tok in HELP_FLAGS for tok in rest) or "--" in rest:
        return argv
    params = inspect.signature(commands[name]).parameters
    flags = {p.replace("_", "-"): p for p in params}
    positional_slots = [p for p, v in params.items() if v.kind in (v.POSITIONAL_ONLY, v.POSITIONAL_OR_KEYWORD)]
    sets: list[str] = []
    out: list[str] = [name]
    n_pos, i = 0, 0
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("--"):
            key, eq, value = tok[2:].partition("=")
            key = key.replace("_", "-")
            bool_neg = key.startswith("no") and key[2:] in flags and isinstance(params[flags[key[2:]]].default, bool)
            if key not in flags and not bool_neg:
                shown = "--" + key
                raise UserError(f"unknown flag {shown} for `pipeline {name}`"
                                f"{_closest(key, list(flags)).replace('mean ', 'mean --')} (see `python -m pipeline {name} --help`)")
            param = None if bool_neg else params[flags[key]]
            is_bool = bool_neg or isinstance(param.default, bool)
            if not eq and not is_bool:
                if i + 1 >= len(rest):
                    raise UserError(f"flag --{key} of `pipeline {name}` needs a value")
                value, i = rest[i + 1], i + 1
                eq = "="
            if key == "set":
                sets.append(value)
            else:
                out.append(f"--{flags.get(key, key)}" + (f"={value}" if eq else ""))
        else:
            n_pos += 1
            if n_pos > len(positional_slots):
                raise UserError(f"unexpected argument {tok!r} for `pipeline {name}` (see `python -m pipeline {name} --help`)")
            out.append(tok)
        i += 1
    if sets:
        out.append("--set=" + json.dumps(sets))
    return out
