"""The strict argument layer of `python -m pipeline`: argv -> typed keyword arguments, or help.

Every command is a plain function; its signature is the only specification. Values are never
evaluated as Python literals (python-fire did: `--out 2024` became an int, `verify 1e3` a
float, `--allow-unmeasured=false` the truthy string "false"). Here:

- a flag is `--name VALUE` or `--name=VALUE`; `--dashed-name` and `--underscored_name` are the
  same flag, help shows the dashed one;
- a bool flag is `--flag` (true), `--noflag` / `--no-flag` (false), or `--flag=WORD` /
  `--flag WORD` with WORD one of true/false/1/0/yes/no/on/off in any case;
- int and float flags must parse as such (floats finite); anything else is a string, as typed,
  and never empty (`--out=` is refused, not read as the current folder);
- a `list[str]` flag (`--set`) is repeatable and collects every value;
- positional arguments fill the parameters in signature order that no flag gave
  (bool and list parameters are flags only); `--` ends the flags;
- `-h` / `--help` anywhere print the help of the command (or of all commands) and exit 0.

Bad usage is a `UserError` naming the flag as typed and the fix (the CLI exits 2).
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dskd.errors import UserError

HELP_FLAGS = {"--help", "-h"}
TRUE_WORDS = {"true", "1", "yes", "y", "on"}
FALSE_WORDS = {"false", "0", "no", "n", "off"}
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


@dataclass(frozen=True)
class Param:
    """One parameter of a command, as the command line sees it."""

    name: str  # the Python name (underscored)
    kind: str  # "bool" | "int" | "float" | "str" | "list"
    default: Any
    required: bool
    optional: bool  # None is an accepted value (the default means "not given")
    doc: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def metavar(self) -> str:
        return self.name.upper()

    @property
    def positional(self) -> bool:
        """Bool and list parameters are flags only; the others may also be given in order."""
        return self.kind not in ("bool", "list")


@dataclass
class Parsed:
    """A command line resolved to a command and its keyword arguments (or a help request)."""

    command: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    help: bool = False


def _kind(annotation: Any) -> tuple[str, bool]:
    """(kind, optional) of a parameter annotation; unknown annotations are read as strings."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else str
        origin = typing.get_origin(annotation)
    if annotation is bool:
        return "bool", optional
    if annotation is int:
        return "int", optional
    if annotation is float:
        return "float", optional
    if origin in (list, tuple) or annotation in (list, tuple):
        return "list", optional
    return "str", optional


def _arg_docs(fn: Callable) -> dict[str, str]:
    """`name: text` entries of the docstring's Args: section (continuation lines joined)."""
    docs: dict[str, str] = {}
    lines = inspect.getdoc(fn) or ""
    in_args, current = False, None
    for line in lines.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        if line and not line.startswith(" "):
            break
        m = re.match(r"^ {4}(\w+):\s*(.*)$", line)
        if m:
            current = m.group(1)
            docs[current] = m.group(2)
        elif current and line.strip():
            docs[current] += " " + line.strip()
    return docs


def command_params(fn: Callable) -> list[Param]:
    """The parameters of a command function, typed from its annotations."""
    hints = typing.get_type_hints(fn)
    docs = _arg_docs(fn)
    out = []
    for name, p in inspect.signature(fn).parameters.items():
        kind, optional = _kind(hints.get(name, str))
        required = p.default is inspect.Parameter.empty
        out.append(Param(name, kind, None if required else p.default, required,
                         optional or (not required and p.default is None), docs.get(name, "")))
    return out


def parse_bool(text: str, flag: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise UserError(f"{flag} {text!r}: expected true or false (also 1/0, yes/no); e.g. {flag}=false")


def convert(param: Param, text: str, shown: str) -> Any:
    """The typed value of one command-line string for `param` (`shown`: the flag as typed)."""
    if param.kind == "bool":
        return parse_bool(text, shown)
    if param.kind == "int":
        if not _INT.fullmatch(text.strip()):
            raise UserError(f"{shown} {text!r}: expected a whole number, e.g. {shown} {param.default or 1}")
        return int(text)
    if param.kind == "float":
        if not _FLOAT.fullmatch(text.strip()):
            raise UserError(f"{shown} {text!r}: expected a finite number, e.g. {shown} {param.default or 0.5}")
        value = float(text)
        if not math.isfinite(value):
            raise UserError(f"{shown} {text!r}: expected a finite number")
        return value
    if not text.strip():  # `--recipe=` ran the default recipe, `--out=` wrote into the current folder
        raise UserError(f"{shown} is empty: give a value" + ("" if shown == param.metavar
                                                             else f", or leave {shown} out for its default"))
    return text


def _closest(name: str, options: list[str]) -> str:
    near = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {near[0]}?" if near else ""


def _lookup(key: str, by_flag: dict[str, Param]) -> tuple[Param, bool] | None:
    """(param, negated) for a flag name without dashes, or None."""
    norm = key.replace("_", "-")
    if norm in by_flag:
        return by_flag[norm], False
    for prefix in ("no-", "no"):
        if norm.startswith(prefix) and by_flag.get(norm[len(prefix):], None) is not None:
            p = by_flag[norm[len(prefix):]]
            if p.kind == "bool":
                return p, True
    return None


def parse_command(argv: list[str], commands: dict[str, Callable]) -> Parsed:
    """Resolve `argv` (command first) to keyword arguments, strictly; see the module docstring."""
    if not argv or argv[0] in HELP_FLAGS:
        return Parsed(None, help=True)
    name, rest = argv[0], list(argv[1:])
    if name not in commands:
        raise UserError(f"unknown command {name!r}{_closest(name, list(commands))} (see `python -m pipeline --help`)")
    before_dashdash = rest[:rest.index("--")] if "--" in rest else rest
    if any(tok in HELP_FLAGS for tok in before_dashdash):
        return Parsed(name, help=True)
    params = command_params(commands[name])
    by_flag = {p.flag[2:]: p for p in params}
    see = f"(see `python -m pipeline {name} --help`)"
    kwargs: dict[str, Any] = {}
    given: dict[str, str] = {}
    positionals: list[str] = []
    i, flags_done = 0, False
    while i < len(rest):
        tok = rest[i]
        i += 1
        if flags_done or not tok.startswith("-") or tok == "-" or _FLOAT.fullmatch(tok):
            positionals.append(tok)
            continue
        if tok == "--":
            flags_done = True
            continue
        if not tok.startswith("--"):
            raise UserError(f"unknown flag {tok} for `pipeline {name}`: flags are spelled --name {see}")
        key, eq, value = tok[2:].partition("=")
        found = _lookup(key, by_flag)
        if found is None:
            shown = "--" + key.replace("_", "-")
            hint = _closest(key.replace("_", "-"), list(by_flag)).replace("mean ", "mean --")
            raise UserError(f"unknown flag {shown} for `pipeline {name}`{hint} {see}")
        param, negated = found
        shown = "--" + key
        if negated:
            if eq:
                raise UserError(f"{shown} takes no value; write {param.flag}={value} instead")
            result: Any = False
        elif param.kind == "bool":
            if not eq and i < len(rest) and rest[i].strip().lower() in TRUE_WORDS | FALSE_WORDS:
                value, eq, i = rest[i], "=", i + 1
            result = parse_bool(value, shown) if eq else True
        else:
            if not eq:
                if i >= len(rest) or (rest[i].startswith("--") and rest[i] != "--" and len(rest[i]) > 2):
                    raise UserError(f"flag {shown} of `pipeline {name}` needs a value, e.g. {shown}=VALUE")
                value, i = rest[i], i + 1
            result = value if param.kind == "list" else convert(param, value, shown)
        if param.kind == "list":
            kwargs.setdefault(param.name, []).append(result)
            continue
        if param.name in given:
            raise UserError(f"{shown} given twice ({given[param.name]} and {tok}); give it once")
        given[param.name] = tok
        kwargs[param.name] = result
    slots = [p for p in params if p.positional and p.name not in kwargs]
    if len(positionals) > len(slots):
        extra = positionals[len(slots)]
        raise UserError(f"unexpected argument {extra!r} for `pipeline {name}` {see}")
    for p, text in zip(slots, positionals, strict=False):
        kwargs[p.name] = convert(p, text, p.metavar)
    missing = [p for p in params if p.required and p.name not in kwargs]
    if missing:
        raise UserError(f"`pipeline {name}` needs {missing[0].metavar}: {usage(name, params)}")
    return Parsed(name, kwargs)


def usage(name: str, params: list[Param]) -> str:
    parts = [f"pipeline {name}"]
    for p in params:
        if p.required:
            parts.append(p.metavar)
        elif p.kind == "bool":
            parts.append(f"[{p.flag}]")
        elif p.kind == "list":
            parts.append(f"[{p.flag} VALUE]...")
        else:
            parts.append(f"[{p.flag} {p.metavar}]")
    return " ".join(parts)


def command_help(name: str, fn: Callable) -> str:
    """Usage, description and one line per flag (dashed spelling, type, default, meaning)."""
    params = command_params(fn)
    doc = inspect.getdoc(fn) or ""
    description = doc.split("\nArgs:")[0].strip()
    head = textwrap.fill("usage: python -m " + usage(name, params), width=100, subsequent_indent=" " * 8,
                         break_on_hyphens=False, break_long_words=False)
    lines = [head, "", description, ""]
    for p in params:
        if p.required:
            head = f"  {p.metavar}"
        elif p.kind == "list":
            head = f"  {p.flag} VALUE"
        elif p.kind == "bool":
            head = f"  {p.flag}, --no{p.name.replace('_', '-')}"
        else:
            head = f"  {p.flag} {p.metavar}"
        kind = {"list": "repeatable", "str": "text"}.get(p.kind, p.kind)
        default = "" if p.required or p.default is None else f", default {p.default}"
        lines.append(f"{head}  ({kind}{default})")
        if p.doc:
            lines += textwrap.wrap(p.doc, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    if any(p.kind == "bool" for p in params):
        lines += ["", "Booleans: --flag, --noflag, or --flag=true|false|1|0|yes|no."]
    lines += ["", "Exit codes: 0 success, 1 a gate failed, 2 bad usage or input."]
    return "\n".join(lines).rstrip() + "\n"


def main_help(commands: dict[str, Callable]) -> str:
    lines = ["usage: python -m pipeline COMMAND [ARGS]   (python -m pipeline COMMAND --help for its flags)", "",
             "commands:"]
    width = max(len(n) for n in commands)
    for n, fn in commands.items():
        first = (inspect.getdoc(fn) or "").splitlines()[0] if inspect.getdoc(fn) else ""
        lines.append(f"  {n.ljust(width)}  {first}")
    lines += ["", "Exit codes: 0 success, 1 a gate failed, 2 bad usage or input."]
    return "\n".join(lines) + "\n"
