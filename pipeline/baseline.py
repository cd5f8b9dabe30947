"""Reports read back from disk (`gate REPORT`, `--baseline`), schema-checked on load.

The contract is docs/report-schema.md. A report that does not fit it is bad input (exit 2,
one line naming the field), found before any training: before this check, a JSON list or
`{"artifacts": [{}]}` as a baseline was a traceback after the deploy stage (exit 1, which CI
reads as "a gate failed"), and `{"hello": 1}` passed silently.

Only what a reader of the report relies on is checked: the fields the gates, the baseline
re-measurement and the printed tables read, with their types; fields may be added freely.
Each artifact row is then read as the typed record the gates and pages use
(pipeline.artifact_result), so a wrong type in any of its fields is named here too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath
from typing import Any

from dskd.errors import UserError

MAX_REPORT_BYTES = 64 << 20  # a report is kilobytes; anything near this is not one

# Spec language: "str" / "int" / "number" / "bool" / "object" / "list"; a trailing "?" allows
# null; a dict is an object with those fields (a key starting with "?" is optional); a
# one-element list is a list of that; ("?", spec) is that spec or null.
_LATENCY = {"p50": "number?", "p90": "number?", "p99": "number?"}
_ARTIFACT = {
    "format": "str", "precision": "str", "runtime": "str", "path": "relpath?", "sha256": "str?",
    "size_bytes": "int?", "top1": "number?", "latency_ms": ("?", _LATENCY),
    "?agreement": "number?", "?shipped": "bool", "?measured": "bool", "?not_measured_reason": "str?",
    "?baseline_comparison": ("?", {"ratio": "number?"}),
    "?per_image": "object?",  # which test images it got right (pipeline.per_image); older reports lack it
}
REPORT_SPEC: dict[str, Any] = {
    "schema_version": "int",
    "recipe": {"name": "str", "?source": "str?", "?config": "object"},
    "target": {"name": "str", "?runtime": "str?", "?measured": "bool", "?reason": "str?"},
    "teacher": {"model": "str?", "top1": "number?"},
    "student": {"model": "str", "method": "str", "top1": "number?", "params": "int?", "macs": "int?"},
    "artifacts": [_ARTIFACT],
    "gates": [{"name": "str"}],
    "passed": "bool",
}
_KIND = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
         float: "a number", type(None): "null"}


def _kind(value: Any) -> str:
    return _KIND.get(type(value), type(value).__name__)


def _scalar_problem(value: Any, spec: str) -> str | None:
    nullable = spec.endswith("?")
    base = spec.rstrip("?")
    if value is None:
        return None if nullable else f"must not be null (expected {base})"
    if base == "str" and isinstance(value, str):
        return None
    if base == "relpath" and isinstance(value, str):
        parts = PurePosixPath(value.replace("\\", "/")).parts
        if not value or value.startswith(("/", "\\")) or ".." in parts or ":" in value.split("/")[0]:
            return f"must be a path inside the report's folder, got {value!r}"
        return None
    if base == "bool" and isinstance(value, bool):
        return None
    if base in ("int", "number") and isinstance(value, (int, float)) and not isinstance(value, bool):
        if base == "int" and not isinstance(value, int):
            return f"must be a whole number, got {value!r}"
        if not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        return None
    if base == "object" and isinstance(value, dict):
        return None
    if base == "list" and isinstance(value, list):
        return None
    want = {"str": "a string", "relpath": "a relative path", "int": "a whole number", "number": "a number",
            "bool": "true or false", "object": "an object", "list": "a list"}[base]
    return f"must be {want}{' or null' if nullable else ''}, got {_kind(value)}"


def report_problems(value: Any, spec: Any = None, where: str = "") -> list[str]:
    """`field problem` strings for `value` against `spec` (default: the report schema), first
    problem first; an empty list means the report can be read."""
    spec = REPORT_SPEC if spec is None else spec
    name = where or "the report"
    if isinstance(spec, tuple):
        return [] if value is None else report_problems(value, spec[1], where)
    if isinstance(spec, str):
        problem = _scalar_problem(value, spec)
        return [f"field '{where}' {problem}"] if problem else []
    if isinstance(spec, list):
        if not isinstance(value, list):
            return [f"field '{where}' must be a list, got {_kind(value)}"]
        out: list[str] = []
        for i, item in enumerate(value):
            out += report_problems(item, spec[0], f"{where}[{i}]")
        return out
    if not isinstance(value, dict):
        what = f"field '{where}'" if where else name
        return [f"{what} must be an object, got {_kind(value)}"]
    out = []
    for key, sub in spec.items():
        optional = key.startswith("?")
        key = key.lstrip("?")
        dotted = f"{where}.{key}" if where else key
        if key not in value:
            if not optional:
                out.append(f"field '{dotted}' is missing")
            continue
        out += report_problems(value[key], sub, dotted)
    return out


def _not_a_file(p: Path) -> str:
    """What is at `p` instead of a report file, in words (a FIFO or a link loop is not 'missing')."""
    import errno

    from pipeline.file_kind import describe_mode

    try:
        p.lstat()
    except OSError:
        return "no report.json there"
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        return ("a symlink loop" if exc.errno == errno.ELOOP else "a dangling symlink") + ", not a report.json"
    return f"{describe_mode(mode)}, not a report.json"


def load_report(path: str | None, flag: str = "--baseline") -> tuple[dict[str, Any] | None, Path | None]:
    """(report, its folder) from a report.json or its run folder; None, None for no path.

    Every way the file can be wrong is one UserError naming `flag` (empty for a positional
    argument), the file and the field: missing, unreadable, not JSON, NaN, not the schema.
    """
    if path is None:
        return None, None
    prefix = f"{flag} " if flag else ""
    fix = "pass a report.json written by `pipeline run`"
    if not str(path).strip():
        raise UserError(f"{prefix}{path!r}: empty path; {fix}")
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise UserError(f"{prefix}{path}: {_not_a_file(p)}; {fix}")
    if p.stat().st_size > MAX_REPORT_BYTES:
        raise UserError(f"{prefix}{p}: {p.stat().st_size} bytes is not a report; {fix}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{prefix}{p}: cannot read it ({getattr(exc, 'strerror', None) or exc}); {fix}") from None

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        report = json.loads(text, parse_constant=no_constants)
    except (json.JSONDecodeError, ValueError) as exc:
        raise UserError(f"{prefix}{p}: not valid JSON ({exc}); {fix}") from None
    if not isinstance(report, dict):
        raise UserError(f"{prefix}{p}: not a report (the file holds {_kind(report)}, not an object); {fix}")
    problems = report_problems(report)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{prefix}{p}: not a valid report: {problems[0]}{more}; {fix}")
    from pipeline.report import SCHEMA_VERSION

    if report["schema_version"] != SCHEMA_VERSION:
        raise UserError(f"{prefix}{p}: report schema_version {report['schema_version']} is not "
                        f"{SCHEMA_VERSION}; re-run `pipeline run` with this version to make a new one")
    from pipeline.artifact_result import as_results

    # every artifact row as the gates and pages will read it (all its fields' types), named here
    as_results(report["artifacts"], f"{prefix}{p}: not a valid report")
    return report, p.parent
