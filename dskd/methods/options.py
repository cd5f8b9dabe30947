"""Typed, validated method options, so a typo in a recipe or `--set` fails loudly, not silently."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dskd.errors import UserError


@dataclass(frozen=True)
class Opt:
    """One option: its default, its type, and the values or range it may take."""

    default: Any
    kind: type  # bool, int, float or str
    doc: str = ""
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    low: float | None = None  # inclusive bounds for numbers
    high: float | None = None


def _type_name(kind: type) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}[kind]


def check_value(method: str, name: str, opt: Opt, value: Any) -> Any:
    """Return `value` converted to the option's type, or raise UserError saying what is expected."""
    field = f"{method}.{name}"
    if value is None:
        if opt.nullable:
            return None
        raise UserError(f"option {field} cannot be empty; give {_type_name(opt.kind)} (default {opt.default!r})")
    bad_type = UserError(
        f"option {field} must be {_type_name(opt.kind)}"
        + (" or None" if opt.nullable else "")
        + f", got {value!r} ({type(value).__name__})"
    )
    if opt.kind is bool:
        if not isinstance(value, bool):
            raise bad_type
        return value
    if opt.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_type
    elif opt.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_type
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"option {field} must be finite, got {value!r}")
    elif opt.kind is str:
        if not isinstance(value, str):
            raise bad_type
        if opt.choices is not None and value not in opt.choices:
            close = difflib.get_close_matches(value, opt.choices, n=1, cutoff=0.0)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"option {field}={value!r} is not valid: {hint}choose one of {', '.join(opt.choices)}")
        return value
    if opt.low is not None and value < opt.low or opt.high is not None and value > opt.high:
        low = "-inf" if opt.low is None else f"{opt.low:g}"
        high = "inf" if opt.high is None else f"{opt.high:g}"
        raise UserError(f"option {field}={value!r} is out of range: use a value in [{low}, {high}]")
    return value


def resolve_options(method: str, spec: Mapping[str, Opt], given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults overlaid with `given`; unknown names raise UserError naming the closest valid one."""
    values = {name: opt.default for name, opt in spec.items()}
    for name, value in (given or {}).items():
        if name not in spec:
            close = difflib.get_close_matches(str(name), list(spec), n=1, cutoff=0.0)
            hint = f"did you mean {method}.{close[0]}? " if close else ""
            raise UserError(
                f"unknown option {method}.{name}: {hint}valid options: {', '.join(sorted(spec))}"
            )
        values[name] = check_value(method, name, spec[name], value)
    return values


def parse_option_text(method: str, name: str, opt: Opt, text: str) -> Any:
    """Turn a `--set key=value` string into the option's type (for CLIs), then validate it."""
    raw = text.strip()
    if opt.nullable and raw.lower() in ("none", "null", ""):
        return None
    value: Any = raw
    try:
        if opt.kind is bool:
            lowered = raw.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            value = lowered in ("true", "1", "yes")
        elif opt.kind is int:
            value = int(raw)
        elif opt.kind is float:
            value = float(raw)
    except ValueError:
        raise UserError(
            f"option {method}.{name}={text!r} is not {_type_name(opt.kind)}; e.g. {method}.{name}={opt.default}"
        ) from None
    return check_value(method, name, opt, value)
