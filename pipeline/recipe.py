"""Recipes: TOML files validated into typed config, so a typo fails before any work starts."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from dskd.errors import UserError

RECIPES_DIR = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "digits-smoke"
PERCENTILES = ("p50", "p90", "p99")


@dataclass
class DataConfig:
    spec: str = "digits"
    input_size: int = 32
    in_chans: int = 3
    train_subset: float = 1.0
    limit_per_class: int = 0
    cache_dir: str = ""
    skip_bad: bool = False


@dataclass
class TrainSection:
    """Shared by [teacher] and [student]."""

    model: str = "resnet8"
    checkpoint: str = ""
    method: str = "ce"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    precision: str = "fp32"
    seed: int = 0
    device: str = "auto"
    nproc: int = 1
    ddp_timeout_s: float = 300.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportConfig:
    opset: int = 18
    calib_size: int = 300
    formats: list[str] = field(default_factory=list)
    simplify: bool = True
    parity_tolerance: float = 1e-3
    int8_head: str = "float"  # openvino-int8: "float" keeps the classifier float, "int8" quantizes it


@dataclass
class TargetConfig:
    name: str = "cpu"
    device: str = ""
    python: str = "python3"
    trtexec: str = ""
    remote_tmp: str = ""
    threads: int = 0
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    min_iters: int = 200
    min_seconds: float = 2.0
    warmup_seconds: float = 0.5
    timeout_s: float = 900.0
    allow_unmeasured: bool = False


@dataclass
class GateConfig:
    min_top1: float | None = None
    max_latency_ms: float | None = None
    latency_percentile: str = "p50"
    max_size_mb: float | None = None
    max_top1_drop: float | None = None
    max_top1_regression: float | None = None
    max_latency_regression: float | None = None


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


def _build(cls: type, table: Any, where: str, source: str) -> Any:
    if not isinstance(table, dict):
        raise UserError(f"{source}: [{where}] must be a table")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.name != "source"]
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{where}.{key}" if where else key
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            prefix = f"{where}." if where else ""
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(names)}"
            raise UserError(f"{source}: unknown key '{dotted}'{hint}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, dotted, source)
            continue
        if not _type_ok(value, annotation):
            raise UserError(f"{source}: key '{dotted}' must be {_type_name(annotation)}, got {value!r}")
        kwargs[key] = float(value) if annotation is float else value
    return cls(**kwargs)


def _check_values(r: Recipe, source: str) -> None:
    def bad(key: str, why: str) -> UserError:
        return UserError(f"{source}: key '{key}' {why}")

    for section_name in ("teacher", "student"):
        s: TrainSection = getattr(r, section_name)
        if s.epochs < 1:
            raise bad(f"{section_name}.epochs", f"must be >= 1, got {s.epochs}")
        if s.batch_size < 1:
            raise bad(f"{section_name}.batch_size", f"must be >= 1, got {s.batch_size}")
        if s.lr <= 0:
            raise bad(f"{section_name}.lr", f"must be > 0, got {s.lr}")
        if s.precision not in ("fp32", "bf16", "fp16"):
            raise bad(f"{section_name}.precision", f"must be fp32, bf16 or fp16, got {s.precision!r}")
        if s.nproc < 1:
            raise bad(f"{section_name}.nproc", f"must be >= 1, got {s.nproc}")
        if not s.ddp_timeout_s > 0:
            raise bad(f"{section_name}.ddp_timeout_s", f"must be > 0, got {s.ddp_timeout_s}")
    if r.data.input_size < 8:
        raise bad("data.input_size", f"must be >= 8, got {r.data.input_size}")
    if r.data.in_chans not in (1, 3):
        raise bad("data.in_chans", f"must be 1 or 3, got {r.data.in_chans}")
    if r.export.calib_size < 1:
        raise bad("export.calib_size", f"must be >= 1, got {r.export.calib_size}")
    if not r.target.batch_sizes or any(b < 1 for b in r.target.batch_sizes):
        raise bad("target.batch_sizes", f"must be a list of positive integers, got {r.target.batch_sizes}")
    if r.gates.latency_percentile not in PERCENTILES:
        raise bad("gates.latency_percentile", f"must be one of {', '.join(PERCENTILES)}, got {r.gates.latency_percentile!r}")
    for f in fields(GateConfig):
        v = getattr(r.gates, f.name)
        if isinstance(v, float) and v < 0:
            raise bad(f"gates.{f.name}", f"must be >= 0, got {v}")


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


def load_recipe(name_or_path: str | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    path = resolve_recipe_path(name_or_path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    for key, value in (overrides or {}).items():
        set_dotted(table, key, value, str(path))
    recipe = _build(Recipe, table, "", str(path))
    recipe.source = str(path)
    _check_values(recipe, str(path))
    return recipe
