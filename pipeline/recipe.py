"""Recipes: TOML files validated into typed config, so a typo fails before any work starts."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from deploy_targets.remote.dskd_runner.protocol import Protocol
from dskd.errors import UserError
from dskd.train_settings import (
    PRECISIONS,  # noqa: F401  (re-exported: the recipe's enums are the trainer's)
    SCHEDULES,  # noqa: F401
    SETTING_TYPES,
    recipe_settings,
    rule_of,
    rule_problem,
)

RECIPES_DIR = Path(__file__).parent / "recipes"
# The deploy stage times artifacts with the runner's Protocol (its one declaration of the timing
# fields), with longer defaults than the runner's own; PROTOCOL_KEYS are the Protocol fields a
# recipe's [target] may set (same names), the rest keep the Protocol's values.
RECIPE_PROTOCOL = Protocol(warmup_seconds=0.5, min_iters=200, min_seconds=2.0)
PROTOCOL_KEYS = ("min_iters", "min_seconds", "warmup_seconds")
DEFAULT_RECIPE = "digits-smoke"
PERCENTILES = ("p50", "p90", "p99")


def _device_ok(value: str) -> str | None:
    """target.device / --device: empty (local) or user@host[:port], parsed as the SSH layer will."""
    if not value:
        return None
    from deploy_targets.ssh import parse_device

    try:
        parse_device(value)
    except UserError as exc:
        return "is not a device address: " + str(exc).split(": ", 1)[-1]
    return None


def _opset_ok(value: int) -> str | None:
    """The opsets the installed exporter path supports (export.onnx_build decides)."""
    from export.onnx_build import MAX_OPSET, MIN_OPSET

    if MIN_OPSET <= value <= MAX_OPSET:
        return None
    return (f"must be {MIN_OPSET}..{MAX_OPSET}, got {value} (18 is the default; 17 for TensorRT 8.6; "
            "ORT static INT8 and TensorRT 10 parse at most 20)")


def _batch_sizes_ok(value: list[int]) -> str | None:
    if value and all(b >= 1 for b in value):
        return None
    return f"must be a non-empty list of positive integers, got {value!r}"


def _nonempty(value: str) -> str | None:
    return None if str(value).strip() else "must not be empty"


def recipe_key(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, ge: float | None = None,
        gt: float | None = None, choices: tuple[Any, ...] | None = None,
        check: Callable[[Any], str | None] | None = None) -> Any:
    """A recipe key with its rule, so adding a key and its validation is one line.

    ge/gt: numeric bounds; choices: an enum; check: a function returning the problem ("must be ...")
    or None. Every float (and every float in a list) must also be finite, for every key.
    """
    meta = {"ge": ge, "gt": gt, "choices": choices, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _percent_rule(value: float | None, fraction_hint: bool = False) -> str | None:
    """Top-1 gates are in percent (points): at most 100; for min_top1, 0 < value < 1 is a fraction."""
    if value is None:
        return None
    if value > 100:
        return "is in percent (0-100)"
    if fraction_hint and 0 < value < 1:
        return f"is in percent (0-100): {value:g} looks like a fraction; write {100 * value:g} for {100 * value:g} %"
    return None


def _fraction_rule(value: float | None) -> str | None:
    """max_latency_regression is a fraction of the baseline's latency (0.05 = 5 % slower allowed)."""
    if value is not None and value >= 1:
        return (f"is a fraction (0.05 = 5 % slower allowed): {value:g} would allow {1 + value:g}x the "
                f"baseline's latency; write {value / 100:g} for {value:g} %")
    return None


@dataclass
class DataConfig:
    # The keys that are also training settings share their rule (dskd.train_settings).
    spec: str = recipe_key("digits", **rule_of("data"))
    input_size: int = recipe_key(32, **rule_of("input_size"))
    in_chans: int = recipe_key(3, **rule_of("in_chans"))
    train_subset: float = recipe_key(1.0, **rule_of("train_subset"))
    limit_per_class: int = recipe_key(0, **rule_of("limit_per_class"))
    cache_dir: str = ""
    skip_bad: bool = False
    max_file_mb: float = recipe_key(64.0, gt=0)  # caps on reading data: dskd.data.limits
    max_total_mb: float = recipe_key(4096.0, gt=0)
    max_image_mp: float = recipe_key(40.0, gt=0)


def _train_section() -> type:
    """[teacher]/[student]: the training settings marked `recipe=True` in dskd.train_settings (so a
    new one is a recipe key with its rule), plus `checkpoint` (a teacher loaded instead of trained)."""
    specs: list[tuple[str, Any, Any]] = [("checkpoint", str, field(default=""))]
    for f in recipe_settings():
        meta = f.metadata
        default = meta["recipe_default"]
        if default is dataclasses.MISSING:
            default = f.default
        if default is dataclasses.MISSING:
            specs.append((f.name, SETTING_TYPES[f.name], field(default_factory=f.default_factory, metadata=meta)))
        else:
            specs.append((f.name, SETTING_TYPES[f.name], field(default=default, metadata=meta)))
    cls = dataclasses.make_dataclass("TrainSection", specs)
    cls.__module__ = __name__
    cls.__doc__ = "Shared by [teacher] and [student]; the fields are dskd.train_settings' recipe settings."
    return cls


TrainSection = _train_section()


@dataclass
class ExportConfig:
    opset: int = recipe_key(18, check=_opset_ok)
    calib_size: int = recipe_key(300, ge=1)
    formats: list[str] = field(default_factory=list)
    simplify: bool = True
    parity_tolerance: float = recipe_key(1e-3, gt=0)  # FP32 parity: max |Δlogit| / max |logit|
    int8_head: str = "float"  # openvino-int8: "float" keeps the classifier float, "int8" quantizes it
    trt_builder: str = recipe_key("onnx", choices=("onnx", "torch-tensorrt"))  # TensorRT engines: trtexec or torch-tensorrt


def _threads_ok(value: int | str) -> str | None:
    """target.threads: 0 (the target's default), a count >= 1, or "all" (every physical core of
    the machine that measures; the report shows the count it resolved to)."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return None
    if isinstance(value, int) and value >= 0:
        return None
    return f'must be 0 (the target\'s default), a thread count >= 1 or "all" (every physical core), got {value!r}'


@dataclass
class TargetConfig:
    name: str = "cpu"
    device: str = recipe_key("", check=_device_ok)
    python: str = recipe_key("python3", check=_nonempty)
    trtexec: str = ""
    remote_tmp: str = ""
    threads: int | str = recipe_key(0, check=_threads_ok)  # 0: the target's default; "all": every physical core
    hint: str = recipe_key("", choices=("", "latency", "throughput"))  # "": the target's ("latency")
    streams: int = recipe_key(0, ge=0)  # throughput mode's parallel streams; 0: the runtime's choice
    batch_sizes: list[int] = recipe_key(factory=lambda: [1], check=_batch_sizes_ok)
    min_iters: int = recipe_key(RECIPE_PROTOCOL.min_iters, ge=1)
    min_seconds: float = recipe_key(RECIPE_PROTOCOL.min_seconds, ge=0)
    warmup_seconds: float = recipe_key(RECIPE_PROTOCOL.warmup_seconds, ge=0)
    timeout_s: float = recipe_key(900.0, gt=0)
    allow_unmeasured: bool = False

    def protocol(self) -> Protocol:
        """The runner's timing protocol for this target: RECIPE_PROTOCOL with this recipe's keys."""
        return dataclasses.replace(RECIPE_PROTOCOL, **{k: getattr(self, k) for k in PROTOCOL_KEYS})


@dataclass
class GateConfig:
    # Units: top-1 gates in percent / percentage points, max_latency_regression a fraction. A value in
    # the other unit passed everything silently (min_top1 = 0.85 on an 11 % model), so those are refused.
    min_top1: float | None = recipe_key(None, ge=0, check=lambda v: _percent_rule(v, fraction_hint=True))
    max_latency_ms: float | None = recipe_key(None, ge=0)
    latency_percentile: str = recipe_key("p50", choices=PERCENTILES)
    max_size_mb: float | None = recipe_key(None, ge=0)
    max_top1_drop: float | None = recipe_key(None, ge=0, check=_percent_rule)
    max_top1_regression: float | None = recipe_key(None, ge=0, check=_percent_rule)
    max_latency_regression: float | None = recipe_key(None, ge=0, check=_fraction_rule)
    regression_inconclusive: str = recipe_key("fail", choices=("fail", "pass"))  # paired interval straddles the limit
    regression_budget_s: float = recipe_key(60.0, gt=0)  # --baseline: seconds of interleaved A/B rounds per artifact
    require_max_clocks: bool = False  # Jetson: fail when measured below max power mode / unlocked clocks


@dataclass
class Recipe:
    name: str = DEFAULT_RECIPE
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TrainSection = field(default_factory=lambda: TrainSection(model="resnet20"))
    student: TrainSection = field(default_factory=lambda: TrainSection(model="resnet8", method="dskd"))
    export: ExportConfig = field(default_factory=ExportConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (inner,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


class Origins:
    """Where each recipe value came from, so an error names it as the user wrote it.

    `source` is the recipe file; `by_key` maps dotted keys set on the command line to how they
    were given: "--set" for `--set key=value`, or the flag (`--device`, `--target`, ...) that
    set it. A key inherits its nearest ancestor's origin (`--set student.options={}`).
    """

    def __init__(self, source: str, by_key: Mapping[str, str] | None = None):
        self.source = source
        self.by_key = dict(by_key or {})

    def of(self, dotted: str) -> str:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            found = self.by_key.get(".".join(parts[:i]))
            if found:
                return found
        return self.source

    def error(self, dotted: str, problem: str, value: Any = None, show_value: bool = False) -> UserError:
        """`FILE: key 'a.b' must be ...` / `--set: key 'a.b' ...` / `--device 'x': ...`."""
        origin = self.of(dotted)
        if origin.startswith("--") and origin != "--set":
            return UserError(f"{origin} {value!r}: {problem}")
        got = f", got {value!r}" if show_value else ""
        return UserError(f"{origin}: key '{dotted}' {problem}{got}")


def _build(cls: type, table: Any, where: str, source: str, origins: Origins | None = None) -> Any:
    """Typed config from a TOML table: unknown keys, wrong types and values out of range are
    one-line errors naming the key as the user wrote it (file key, `--set` key or flag)."""
    origins = origins or Origins(source)
    if not isinstance(table, dict):
        raise UserError(f"{origins.of(where)}: [{where}] must be a table")
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls) if f.name != "source"}
    names = list(by_name)
    kwargs: dict[str, Any] = {}
    for name, value in table.items():
        dotted = f"{where}.{name}" if where else name
        if name not in by_name:
            near = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
            prefix = f"{where}." if where else ""
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(names)}"
            raise UserError(f"{origins.of(dotted)}: unknown key '{dotted}'{hint}")
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, dotted, source, origins)
            continue
        if not _type_ok(value, annotation):
            raise origins.error(dotted, f"must be {_type_name(annotation)}", value, show_value=True)
        value = float(value) if annotation is float else value
        problem = rule_problem(by_name[name], value)
        if problem:
            raise origins.error(dotted, problem[0], value, show_value=problem[1])
        kwargs[name] = value
    return cls(**kwargs)


def check_settings(cls: type, values: Mapping[str, Any]) -> None:
    """Check command-line values of `cls` keys with the recipe's rules (`pipeline export`'s
    flags use the [export] rules): `--opset 5: must be 13..20`."""
    by_name = {f.name: f for f in fields(cls)}
    for name, value in values.items():
        problem = rule_problem(by_name[name], value)
        if problem:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {value!r}: {problem[0]}")


def recipe_keys(cls: type | None = None, where: str = "") -> dict[str, dataclasses.Field]:
    """Every leaf key of the recipe schema, dotted (`student.lr`), with its field."""
    cls = cls or Recipe
    hints = typing.get_type_hints(cls)
    out: dict[str, dataclasses.Field] = {}
    for f in fields(cls):
        if f.name == "source":
            continue
        dotted = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(recipe_keys(hints[f.name], dotted))
        else:
            out[dotted] = f
    return out


def resolve_recipe_path(name_or_path: str | None) -> Path:
    """A shipped recipe name (see `pipeline/recipes/`) or a path to a TOML file."""
    name_or_path = name_or_path or DEFAULT_RECIPE
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise UserError(f"{p}: recipe file not found; pass a shipped recipe name ({', '.join(list_recipes())}) or a .toml path")
        return p
    shipped = RECIPES_DIR / f"{name_or_path}.toml"
    if not shipped.is_file():
        near = difflib.get_close_matches(name_or_path, list_recipes(), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else f"; shipped: {', '.join(list_recipes())}"
        raise UserError(f"recipe '{name_or_path}' not found{hint}")
    return shipped


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def set_dotted(table: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = table
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise UserError(f"--set {dotted}: '{part}' is not a table in {source}")
        node = nxt
    node[parts[-1]] = value


def load_recipe(name_or_path: str | None = None, overrides: dict[str, Any] | None = None,
                origins: Mapping[str, str] | None = None) -> Recipe:
    """The recipe file with `overrides` applied, every key type- and range-checked.

    origins: how each override was given (default `--set`; e.g. {"target.device": "--device"}),
    so an error names what the user typed.
    """
    path = resolve_recipe_path(name_or_path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the recipe ({exc})") from None
    by_key = {k: "--set" for k in (overrides or {})}
    by_key.update(origins or {})
    for key, value in (overrides or {}).items():
        set_dotted(table, key, value, str(path))
    origin = Origins(str(path), by_key)
    recipe = _build(Recipe, table, "", str(path), origin)
    # [teacher] and [student] share one schema; these two keys mean something for one of them only.
    if recipe.student.checkpoint:
        raise origin.error("student.checkpoint", "is not read: only the teacher loads a checkpoint "
                           "(teacher.checkpoint); remove it")
    if recipe.teacher.method != "ce":
        raise origin.error("teacher.method", "is not read: the teacher trains with ce; the distillation "
                           "method is student.method", recipe.teacher.method, show_value=True)
    recipe.source = str(path)
    recipe.origins = by_key  # type: ignore[attr-defined]  # read by key_label()
    return recipe


def key_label(recipe: Recipe, dotted: str) -> str:
    """How the user gave a key, for later checks' messages: `FILE: key 'a.b'`, `--set: key 'a.b'`, `--device`."""
    origin = Origins(recipe.source or "recipe", getattr(recipe, "origins", {})).of(dotted)
    if origin.startswith("--") and origin != "--set":
        return origin
    return f"{origin}: key '{dotted}'"


def check_inputs(recipe: Recipe) -> None:
    """The files a run will read, checked before any stage: data.spec is `digits` or an existing
    path, and teacher.checkpoint is a readable dskd model.pt with finite weights. (Not part of
    load_recipe: `gate --recipe` reads only the gates and needs neither file.)"""
    spec = recipe.data.spec
    if spec.strip().lower() != "digits" and not Path(spec).expanduser().exists():
        raise UserError(f"{key_label(recipe, 'data.spec')} {spec!r}: no such file or folder; pass digits, "
                        "an ImageFolder folder (train/ + test/ or val/), a .tar/.tar.gz/.zip of one or a CIFAR python folder")
    ckpt = recipe.teacher.checkpoint
    if ckpt:
        from dskd.checkpoint import load_model_file

        label = key_label(recipe, "teacher.checkpoint")
        if not Path(ckpt).is_file():
            raise UserError(f"{label} {ckpt!r}: no such file; pass the teacher's model.pt "
                            "(written by `python -m pipeline train`)")
        try:
            load_model_file(ckpt)
        except UserError as exc:
            raise UserError(f"{label}: {exc}") from None
