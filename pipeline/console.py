"""Tables for people: rich when it is installed and stdout is a terminal, plain aligned text otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def render_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Plain-text table (also what CI logs show)."""
    rows = [[_fmt(c) for c in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [title, line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    rows = list(rows)
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            table = Table(title=title)
            for c in columns:
                table.add_column(c)
            for r in rows:
                table.add_row(*[_fmt(c) for c in r])
            Console().print(table)
            return
    print(render_table(title, columns, rows), flush=True)


def print_kv(title: str, items: dict[str, Any]) -> None:
    print_table(title, ["", "value"], list(items.items()))
