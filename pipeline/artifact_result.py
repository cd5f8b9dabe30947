"""One typed record per artifact, from the deploy stage through the gates to report.json.

Why: the deploy stage's rows used to be ~25-key dicts read with `a.get("...")` in four modules,
so a renamed key, a hand-edited stage file or a string where a number belongs surfaced (if at
all) as a wrong verdict. Now each row is an `ArtifactResult`; JSON appears only at the stage
boundary: `to_json()` writes the deploy stage's row, `from_json()` reads it back with every
field's type checked (one-line `UserError` naming the field and the file for a corrupt or
hand-edited stage file), and `to_report_row()` is report.json's artifact row
(docs/report-schema.md, unchanged). Report rows read back (`pipeline gate REPORT`,
`--baseline`, hand-made reports in tests) go through `from_report()`: the same type checks,
with the defaults the gates always assumed for keys an older report lacks.

The field types are declared once, as the dataclasses' annotations; the checks are derived
from them. Runner records that nothing here judges (environment, latency_by_batch,
runtime_config, throughput, preprocess, engine_build, per_image, parity) stay JSON objects,
checked as objects of finite JSON values; per_image's meaning is checked by
`pipeline.per_image.read_record`, which says why a record cannot be used.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from dskd.errors import UserError
from pipeline.baseline import _kind  # "a string", "true/false", ...: the report loader's words

R = TypeVar("R", bound="_JsonRecord")
_WANT = {str: "a string", int: "a whole number", float: "a number", bool: "true or false"}


class _Problem(Exception):
    """A field that does not fit its type: `where` (dotted path) and what is wrong."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"field '{where}' {what}")


def _finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise _Problem(where, f"must be a finite number, got {value!r}")


def _json_value(value: Any, where: str) -> Any:
    """Any JSON value with finite numbers (free-form runner records)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise _Problem(where, f"has a non-string key {k!r}")
            _json_value(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _json_value(v, f"{where}[{i}]")
    elif isinstance(value, float):
        _finite(value, where)
    elif not (value is None or isinstance(value, (str, int, bool))):
        raise _Problem(where, f"must be a JSON value, got {_kind(value)}")
    return value


def _describe(tp: Any) -> str:
    """What a field of annotation `tp` must hold, in the words of the error message."""
    if tp in _WANT:
        return _WANT[tp]
    if typing.get_origin(tp) is list:
        return "a list"
    return "a JSON value" if tp is Any else "an object"  # dict[...] or a nested record


def _check(value: Any, tp: Any, where: str, strict: bool, nullable: bool = False) -> Any:
    """`value` as the annotation `tp` says (a nested record parsed), else _Problem naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (arm,) = [a for a in typing.get_args(tp) if a is not type(None)]  # only `X | None` is declared
        return None if value is None else _check(value, arm, where, strict, nullable=True)
    if value is None:
        raise _Problem(where, f"must not be null (expected {_describe(tp)})")
    if tp is Any:
        return _json_value(value, where)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool and isinstance(value, bool) or tp is str and isinstance(value, str):
        return value
    if tp is int and number:
        if isinstance(value, float):
            raise _Problem(where, f"must be a whole number, got {value!r}")
        return value
    if tp is float and number:
        _finite(value, where)
        return value  # an int stays an int: report.json keeps the bytes it had
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(tp)
        return [_check(v, item, f"{where}[{i}]", strict) for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return _json_value(value, where)
    if isinstance(tp, type) and issubclass(tp, _JsonRecord):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return tp._parse(value, where, strict)
    raise _Problem(where, f"must be {_describe(tp)}{' or null' if nullable else ''}, got {_kind(value)}")


def _in_bounds(value: Any, bounds: tuple[float, float | None, bool], where: str) -> None:
    """A number (or each number of a list) within `bounds`, else _Problem naming `where`."""
    if isinstance(value, list):
        for i, v in enumerate(value):
            _in_bounds(v, bounds, f"{where}[{i}]")
        return
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high, open_low = bounds
    if value < low or (open_low and value == low) or (high is not None and value > high):
        want = (f"between {low:g} and {high:g}" if high is not None
                else "greater than 0" if open_low and low == 0 else f"at least {low:g}")
        raise _Problem(where, f"must be {want}, got {value!r}")


_POSITIVE = (0.0, None, True)
_NON_NEGATIVE = (0.0, None, False)
_PERCENT = (0.0, 100.0, False)

_FIELDS: dict[type, dict[str, Any]] = {}


class _JsonRecord:
    """A frozen dataclass read from / written to one JSON object, typed by its annotations.

    `REQUIRED`: keys a stage file must have (strict reading); absent optional keys read as the
    field's default. `_keys` remembers which keys the object had, in order, so a record read
    from an older stage file is written back exactly as it was (report.json byte-compatible);
    `_extra` keeps keys this version does not declare, unjudged but checked as finite JSON.
    """

    REQUIRED: ClassVar[tuple[str, ...]] = ()
    # {field: (lowest, highest, lowest excluded)}: a number outside is as wrong as a string there
    # (a hand-edited p50 of -1 ms or top-1 of 150 % passed every gate before this check)
    BOUNDS: ClassVar[dict[str, tuple[float, float | None, bool]]] = {}
    _keys: tuple[str, ...] | None
    _extra: dict[str, Any]

    @classmethod
    def _fields(cls) -> dict[str, Any]:
        """{field name: its annotation}, resolved once per class."""
        if cls not in _FIELDS:
            hints = typing.get_type_hints(cls)
            _FIELDS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                            if not f.name.startswith("_")}
        return _FIELDS[cls]

    @classmethod
    def _parse(cls: type[R], obj: Any, where: str, strict: bool) -> R:
        if not isinstance(obj, dict):
            raise _Problem(where, f"must be an object, got {_kind(obj)}")
        fields = cls._fields()
        values: dict[str, Any] = {}
        for name, tp in fields.items():
            path = f"{where}.{name}" if where else name
            if name not in obj:
                if strict and name in cls.REQUIRED:
                    raise _Problem(path, "is missing")
                continue
            values[name] = _check(obj[name], tp, path, strict)
            if name in cls.BOUNDS:
                _in_bounds(values[name], cls.BOUNDS[name], path)
        extra = {k: _json_value(v, f"{where}.{k}" if where else k) for k, v in obj.items() if k not in fields}
        return cls(**values, _keys=tuple(obj), _extra=extra)  # type: ignore[call-arg]

    def _json(self) -> dict[str, Any]:
        fields = self._fields()
        keys = self._keys if self._keys is not None else tuple(fields)
        out: dict[str, Any] = {}
        for k in keys:
            if k in fields:
                v = getattr(self, k)
                out[k] = v._json() if isinstance(v, _JsonRecord) else v
            elif k in self._extra:
                out[k] = self._extra[k]
        return out


def _error(source: str, problem: _Problem, fix: str) -> UserError:
    return UserError(f"{source}: {problem}" + (f"; {fix}" if fix else ""))


@dataclass(frozen=True)
class LatencyStats(_JsonRecord):
    """Latency of one call at the smallest measured batch size, in ms (`cov`: std / mean)."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("p50", "p90", "p99")
    BOUNDS: ClassVar[dict[str, tuple[float, float | None, bool]]] = {
        "p50": _POSITIVE, "p90": _POSITIVE, "p99": _POSITIVE, "mean": _POSITIVE, "std": _NON_NEGATIVE,
        "cov": _NON_NEGATIVE}
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    mean: float | None = None
    std: float | None = None
    cov: float | None = None
    _keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    _extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def at(self, percentile: str) -> float | None:
        """p50 / p90 / p99 by name (the recipe's `gates.latency_percentile`)."""
        return getattr(self, percentile) if percentile in ("p50", "p90", "p99") else None


@dataclass(frozen=True)
class BaselineComparison(_JsonRecord):
    """Candidate and baseline measured alternately in this job (pipeline.regression_stats).

    `kept[i]` false: round i was CPU-contended on either side and the gate does not use it;
    `sides` holds each round's runner CPU shares; `stopped` why the rounds ended. Older
    reports have `ratio` (and `rounds`) only.
    """

    BOUNDS: ClassVar[dict[str, tuple[float, float | None, bool]]] = {
        "ratio": _POSITIVE, "rounds": _NON_NEGATIVE, "candidate_p50_ms": _POSITIVE, "baseline_p50_ms": _POSITIVE,
        "seconds": _NON_NEGATIVE, "budget_s": _NON_NEGATIVE}
    ratio: float | None = None
    rounds: int | None = None
    candidate_p50_ms: list[float] | None = None
    baseline_p50_ms: list[float] | None = None
    kept: list[bool] | None = None
    first: list[str] | None = None
    sides: list[dict[str, Any]] | None = None
    stopped: str | None = None
    seconds: float | None = None
    budget_s: float | None = None
    tolerance: float | None = None
    mode: str | None = None  # "paired in one runner process" | "one runner run per side" (measure_pair.pairing_blocker)
    _keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    _extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_rounds(cls, rec: dict[str, Any]) -> BaselineComparison:
        """The record `_interleaved_ratio` builds (its key order kept for report.json)."""
        try:
            return cls._parse(rec, "baseline_comparison", strict=True)
        except _Problem as exc:  # our own measurement: a bug, not user input
            raise ValueError(str(exc)) from None

    def to_json(self) -> dict[str, Any]:
        return self._json()


# What report.json keeps of a deploy row, in its order (docs/report-schema.md); `measured`,
# `not_measured_reason` (unmeasured rows only), `parity` and `rejected`/`rejected_reason`
# (rejected rows only) follow.
REPORT_KEYS = ("format", "precision", "runtime", "path", "sha256", "size_bytes", "top1", "agreement",
               "latency_ms", "shipped", "where", "warnings", "latency_note", "baseline_comparison",
               "latency_by_batch", "latency_samples_ms", "prepared", "engine_build", "runtime_config",
               "throughput", "preprocess", "per_image", "per_image_note")
STAGE_FIX = "re-run with `--force deploy` to measure again"
REPORT_FIX = "pass a report.json written by `pipeline run`"


@dataclass(frozen=True)
class ArtifactResult(_JsonRecord):
    """One artifact as deployed and measured: identity, files, numbers, and why any are missing.

    `shipped`: part of the target's deployment (others are CPU references or rejected);
    `measured`: the numbers were taken (default True: what the gates always assumed of a
    report row that does not say); `rejected`: failed the export parity check;
    `latency_note`: measured on this machine's CPU, not on the target.
    """

    REQUIRED: ClassVar[tuple[str, ...]] = ("format", "precision", "runtime", "path", "sha256", "size_bytes",
                                           "shipped", "measured", "top1", "latency_ms")
    BOUNDS: ClassVar[dict[str, tuple[float, float | None, bool]]] = {
        "size_bytes": _NON_NEGATIVE, "top1": _PERCENT, "agreement": _PERCENT, "latency_samples_ms": _NON_NEGATIVE}
    format: str
    precision: str
    runtime: str
    path: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    shipped: bool = True
    measured: bool = True
    top1: float | None = None
    agreement: float | None = None
    latency_ms: LatencyStats | None = None
    latency_by_batch: list[dict[str, Any]] | None = None
    latency_samples_ms: list[float] | None = None
    warnings: list[str] | None = None
    where: str | None = None
    environment: dict[str, Any] | None = None
    runtime_config: dict[str, Any] | None = None
    throughput: dict[str, Any] | None = None
    preprocess: dict[str, Any] | None = None
    per_image: dict[str, Any] | None = None
    per_image_note: str | None = None
    baseline_comparison: BaselineComparison | None = None
    latency_note: str | None = None
    not_measured_reason: str | None = None
    parity: dict[str, Any] | None = None
    rejected: bool = False
    rejected_reason: str | None = None
    prepared: list[str] | None = None
    engine_build: dict[str, Any] | None = None
    _keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    _extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------ JSON at the stage boundary
    @classmethod
    def from_json(cls, obj: Any, source: str = "deploy stage", where: str = "") -> ArtifactResult:
        """A deploy stage row: every REQUIRED key present, every field of its type, numbers finite.

        `source` names the file and `where` the row (e.g. `outputs.artifacts[2]`) in the message.
        """
        try:
            return cls._parse(obj, where, strict=True)
        except _Problem as exc:
            raise _error(source, exc, STAGE_FIX) from None

    @classmethod
    def from_report(cls, obj: Any, source: str = "report", where: str = "") -> ArtifactResult:
        """A report.json artifact row (this version's or an older one): types checked, and the
        keys it lacks read as the gates' defaults (shipped, measured: true)."""
        try:
            for key in ("format", "precision", "runtime"):
                if isinstance(obj, dict) and key not in obj:
                    raise _Problem(f"{where}.{key}" if where else key, "is missing")
            return cls._parse(obj, where, strict=False)
        except _Problem as exc:
            raise _error(source, exc, REPORT_FIX) from None

    def to_json(self) -> dict[str, Any]:
        """The deploy stage's row: every declared field (null where unknown), in declared order."""
        out = {}
        for name in self._fields():
            v = getattr(self, name)
            out[name] = v._json() if isinstance(v, _JsonRecord) else v
        return out

    def to_report_row(self) -> dict[str, Any]:
        """report.json's artifact row (docs/report-schema.md): the same keys and values as ever."""
        row: dict[str, Any] = {}
        for k in REPORT_KEYS:
            v = getattr(self, k)
            row[k] = v._json() if isinstance(v, _JsonRecord) else v
        row["measured"] = self.measured
        if not self.measured:
            row["not_measured_reason"] = self.not_measured_reason
        row["parity"] = self.parity
        if self.rejected:
            row["rejected"], row["rejected_reason"] = True, self.rejected_reason
        return row

    # ------------------------------------------------------------ what the gates and pages read
    @property
    def label(self) -> str:
        """`runtime/precision`: the artifact's name in gate rows, tables and plots."""
        return f"{self.runtime}/{self.precision}"

    @property
    def key(self) -> tuple[str, str, str]:
        """Matches the same artifact kind in a baseline report."""
        return self.format, self.precision, self.runtime

    def latency(self, percentile: str) -> float | None:
        return self.latency_ms.at(percentile) if self.latency_ms is not None else None

    @property
    def parity_agreement_pct(self) -> float | None:
        """The export parity check's top-1 agreement with PyTorch, in % (4 decimals)."""
        v = (self.parity or {}).get("top1_agreement")
        return round(100.0 * v, 4) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    @property
    def parity_threshold_pct(self) -> float | None:
        tol = (self.parity or {}).get("tolerance")
        v = tol.get("min_top1_agreement") if isinstance(tol, dict) else None
        return round(100.0 * v, 4) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def replace(self, **changes: Any) -> ArtifactResult:
        """A copy with `changes` (records are frozen: each stage step makes a new one)."""
        return dataclasses.replace(self, **changes)


def results_from_stage(outputs: Any, source: str) -> list[ArtifactResult]:
    """The deploy stage outputs' `artifacts`, each row read strictly (UserError naming `source`)."""
    rows = outputs.get("artifacts") if isinstance(outputs, dict) else None
    if not isinstance(rows, list):
        raise UserError(f"{source}: field 'outputs.artifacts' must be a list, got "
                        f"{_kind(rows) if isinstance(outputs, dict) else _kind(outputs)}; {STAGE_FIX}")
    return [ArtifactResult.from_json(r, source, f"outputs.artifacts[{i}]") for i, r in enumerate(rows)]


def as_result(a: ArtifactResult | dict[str, Any], source: str = "report", where: str = "") -> ArtifactResult:
    """`a` itself, or the report row `a` read as one (the gates take either)."""
    return a if isinstance(a, ArtifactResult) else ArtifactResult.from_report(a, source, where)


def as_results(rows: Any, source: str = "report", where: str = "artifacts") -> list[ArtifactResult]:
    """Every artifact of a report (rows or records); None/absent is none."""
    if rows is None:
        return []
    if not isinstance(rows, list):
        raise UserError(f"{source}: field '{where}' must be a list, got {_kind(rows)}; {REPORT_FIX}")
    return [as_result(a, source, f"{where}[{i}]") for i, a in enumerate(rows)]


_SUMMARY_FIELDS: dict[str, tuple[type | tuple[type, ...], tuple[float, float | None, bool] | None]] = {
    "top1": ((int, float), _PERCENT), "params": (int, _NON_NEGATIVE), "macs": (int, _NON_NEGATIVE),
    "model": (str, None), "method": (str, None)}


def checked_summary(outputs: Any, source: str, stage: str) -> dict[str, Any]:
    """A training stage's `outputs.summary` (teacher/distill), its judged fields typed.

    The student's top-1 is what `max_top1_drop` measures against: a hand-edited string there
    was a traceback in the report stage, and -50 made every drop a PASS. One UserError naming
    the field and `source` instead.
    """
    summary = outputs.get("summary") if isinstance(outputs, dict) else None
    try:
        if not isinstance(summary, dict):
            raise _Problem("outputs.summary", f"must be an object, got {_kind(summary)}")
        for key, (types_, bounds) in _SUMMARY_FIELDS.items():
            value, where = summary.get(key), f"outputs.summary.{key}"
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, types_):
                want = _WANT[types_] if isinstance(types_, type) else "a number"
                raise _Problem(where, f"must be {want} or null, got {_kind(value)}")
            _finite(value, where)
            if bounds is not None:
                _in_bounds(value, bounds, where)
    except _Problem as exc:
        raise _error(source, exc, f"re-run with `--force {stage}` to train again") from None
    return summary
