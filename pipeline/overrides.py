"""`--set key=value` overrides: dotted keys, values read as TOML scalars (so 0.5, true, "x" work)."""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from typing import Any

from dskd.errors import UserError


def parse_value(text: str) -> Any:
    """Read a value like TOML would; anything that is not a TOML literal stays a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str] | tuple[str, ...] | str | None) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> `{"a.b": 1, "c": "x"}`; a malformed item is a one-line error."""
    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set dskd.guidance_scale=0.5")
        out[key] = parse_value(value.strip())
    return out
