"""Every training setting, declared once: `TrainConfig` and the rule, help and role of each field.

The other faces of a training run are derived from the field metadata here, so a new setting is
one `setting(...)` line and cannot be forgotten in any of them:

- the recipe's [teacher]/[student] section (pipeline.recipe.TrainSection): fields with `recipe=True`;
- the `pipeline train` flags (pipeline.train_cli): fields with `cli=True`, help from `doc`;
- the torchrun hand-off: `to_dict()` written as JSON, read back with `from_dict()`;
- the distill/teacher stages' cache key and the resume check: fields with `affects_result=True`
  (a setting that cannot change the trained weights, e.g. `device`, may differ on resume and
  does not re-run a stage).

Rules (`ge`, `gt`, `choices`, `check`) use the metadata keys pipeline.recipe.rule_problem reads,
so the recipe, the CLI and `TrainConfig.validate()` give the same verdict on a value.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from dskd.errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "step")


def _nonempty(value: str) -> str | None:
    return None if str(value).strip() else "must not be empty"


def train_device_ok(value: str) -> str | None:
    """auto, cpu, cuda or cuda:N (what dskd.trainer.pick_device accepts)."""
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return None
    return f"must be auto, cpu, cuda or cuda:N, got {value!r}"


def subset_ok(value: float) -> str | None:
    """A fraction of the training split, or a whole number of images."""
    if 0 < value <= 1 or (value > 1 and float(value).is_integer()):
        return None
    return f"must be a fraction in (0, 1] or a whole number of images, got {value!r}"


def _holdout_ok(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be a fraction in [0, 1)"


def setting(default: Any = dataclasses.MISSING, *, doc: str, factory: Callable[[], Any] | None = None,
            ge: float | None = None, gt: float | None = None, choices: tuple[Any, ...] | None = None,
            check: Callable[[Any], str | None] | None = None, recipe: bool = False,
            recipe_default: Any = dataclasses.MISSING, cli: bool = True, affects_result: bool = True,
            added_later: bool = False) -> Any:
    """One training setting with its rule and its roles.

    recipe: also a key of the recipe's [teacher]/[student] section (`recipe_default` if the
    recipe's default differs); cli: a `pipeline train` flag; affects_result: part of the stage
    cache key and must match on resume; added_later: left out of `to_dict()` (and so of the
    cache key and last.pt) while at its default, so run folders written before it existed
    still resume and stay cached.
    """
    meta = {"ge": ge, "gt": gt, "choices": choices, "check": check, "doc": doc, "recipe": recipe,
            "recipe_default": recipe_default, "cli": cli, "affects_result": affects_result,
            "added_later": added_later}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything that determines a training run; recorded in summary.json and last.pt."""

    model: str = setting(doc="zoo name of the model to train (the student when distilling).", check=_nonempty,
                         recipe=True, recipe_default="resnet8")
    data: str = setting("digits", doc="digits | an ImageFolder folder | .tar/.tar.gz/.zip of one | a CIFAR python folder.",
                        check=_nonempty)
    epochs: int = setting(20, doc="training epochs.", ge=1, recipe=True, recipe_default=10)
    batch_size: int = setting(64, doc="images per step (per process under torchrun).", ge=1, recipe=True)
    lr: float = setting(0.05, doc="peak SGD learning rate.", gt=0, recipe=True)
    momentum: float = setting(0.9, doc="SGD momentum.", ge=0)
    weight_decay: float = setting(5e-4, doc="SGD weight decay.", ge=0, recipe=True)
    schedule: str = setting("cosine", doc="cosine or step (x0.1 at 5/8, 3/4, 7/8 of training).", choices=SCHEDULES,
                            recipe=True)
    warmup_epochs: float = setting(0.0, doc="linear learning-rate warm-up length.", ge=0, recipe=True)
    seed: int = setting(0, doc="seed for initialisation, shuffling and augmentation.", ge=0, recipe=True)
    precision: str = setting("fp32", doc="fp32, bf16 (CPU/CUDA autocast) or fp16 (CUDA, with a grad scaler).",
                             choices=PRECISIONS, recipe=True)
    method: str = setting("ce", doc="a method registered in dskd.methods (ce: plain training, no teacher); "
                         "an unknown name is refused with the list.", recipe=True)
    teacher: str | None = setting(None, doc="a teacher model.pt (or its folder) written by `pipeline train`; "
                                  "needed unless --method ce.")
    options: dict[str, Any] = setting(doc="method options (`--set`).", factory=dict, recipe=True, cli=False)
    input_size: int = setting(32, doc="image side in pixels the data is resized to.", ge=8)
    in_chans: int = setting(3, doc="image channels (1 or 3).", choices=(1, 3))
    train_subset: float = setting(1.0, doc="class-balanced fraction (or count) of the training split to use.",
                                  check=subset_ok)
    holdout: float = setting(0.0, doc="fraction of the training split held out for choosing settings "
                             "(never the test split).", check=_holdout_ok)
    limit_per_class: int | None = setting(None, doc="decode only this many images per class and split "
                                          "(quick smoke runs).", ge=0)
    device: str = setting("auto", doc="auto, cpu, cuda or cuda:N.", check=train_device_ok, recipe=True,
                          affects_result=False)
    nproc: int = setting(1, doc="processes: above 1, `pipeline train` runs itself under torchrun (DDP); "
                         "the global batch is nproc x batch_size.", ge=1, recipe=True, added_later=True)
    channels_last: bool = setting(True, doc="channels-last memory format for training.")
    eval_every: int = setting(1, doc="evaluate every N epochs (the last epoch always).", ge=1, affects_result=False)
    ddp_timeout_s: float = setting(300.0, doc="under torchrun, how long a rank waits for a silent peer before "
                                   "the job fails.", gt=0, recipe=True, affects_result=False)
    cache_dir: str | None = setting(None, doc="decoded-data cache folder (default ~/.cache/dskd/data or "
                                    "$DSKD_CACHE/data).", affects_result=False)
    skip_bad: bool = setting(False, doc="drop unreadable images (counted in summary.json) instead of failing on "
                             "the first.", added_later=True)
    data_limits: dict[str, float] = setting(
        doc='caps on reading data as JSON, e.g. \'{"max_file_mb": 128, "max_image_mp": 60}\' (keys max_file_mb, '
            "max_total_mb, max_image_mp; recipe [data] keys of the same names).",
        factory=dict, affects_result=False, added_later=True)

    def validate(self) -> None:
        """Every field against its rule, then the cross-field rule (a distilling method needs a teacher)."""
        for f in fields(self):
            problem = rule_problem(f, getattr(self, f.name))
            if problem:
                got = f", got {getattr(self, f.name)!r}" if problem[1] else ""
                raise UserError(f"train config field '{f.name}': {problem[0]}{got}")
        if needs_teacher(self.method) and not self.teacher:
            raise UserError(f"train config field 'teacher': method '{self.method}' needs a teacher: "
                            "pass --teacher DIR_OR_model.pt")

    def to_dict(self) -> dict[str, Any]:
        """Fields added after a release appear only when set, so older run folders still resume."""
        d = dataclasses.asdict(self)
        for f in fields(self):
            if f.metadata.get("added_later") and d[f.name] == _default(f):
                del d[f.name]
        return d

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "train config") -> TrainConfig:
        """The inverse of `to_dict()` (the torchrun hand-off file); unknown keys are a UserError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"{where}: unknown setting {unknown[0]!r}; valid: {', '.join(sorted(names))}")
        for name, value in values.items():
            if not _type_ok(value, SETTING_TYPES[name]):
                kind = SETTING_TYPES[name]
                raise UserError(f"{where}: setting '{name}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
        return cls(**{k: float(v) if SETTING_TYPES[k] is float else v for k, v in values.items()})


def _type_ok(value: Any, annotation: Any) -> bool:
    """JSON value `value` fits a TrainConfig field type (an int is a float; a bool is not a number)."""
    args = typing.get_args(annotation)
    if args and typing.get_origin(annotation) is not dict:  # X | None
        return any(_type_ok(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation in (int, float):
        return isinstance(value, (int, float) if annotation is float else int) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(annotation) or annotation)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def setting_default(name: str) -> Any:
    """The default of TrainConfig field `name`."""
    return _default(SETTINGS[name])


SETTINGS: dict[str, dataclasses.Field] = {f.name: f for f in fields(TrainConfig)}
SETTING_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)
# Settings that do not change the result, so a resumed run may differ in them (and a cached stage is kept).
RESUME_MAY_CHANGE = frozenset(n for n, f in SETTINGS.items() if not f.metadata["affects_result"])


def rule_of(name: str) -> dict[str, Any]:
    """The rule (ge/gt/choices/check) of setting `name`, to give another key the same rule."""
    meta = SETTINGS[name].metadata
    return {k: meta[k] for k in ("ge", "gt", "choices", "check")}


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def rule_problem(f: dataclasses.Field, value: Any) -> tuple[str, bool] | None:
    """(problem, show the value) for a key's value against its rule, or None when it is fine."""
    if not _finite(value):
        return "must be a finite number", True
    if value is None:  # an optional key left out
        return None
    meta = f.metadata
    if meta.get("choices") is not None and value not in meta["choices"]:
        return f"must be one of {', '.join(map(str, meta['choices']))}", True
    if meta.get("ge") is not None and value < meta["ge"]:
        return f"must be >= {meta['ge']}", True
    if meta.get("gt") is not None and not value > meta["gt"]:
        return f"must be > {meta['gt']}", True
    if meta.get("check") is not None:
        problem = meta["check"](value)
        if problem:
            return problem, False
    return None


def needs_teacher(method: str) -> bool:
    """Whether `method` distils from a teacher (the Distiller's `needs_teacher`)."""
    from dskd.methods import method_class

    return method_class(method).needs_teacher


def recipe_settings() -> list[dataclasses.Field]:
    """The settings that are also keys of the recipe's [teacher]/[student] section."""
    return [f for f in SETTINGS.values() if f.metadata["recipe"]]


def cli_settings() -> list[dataclasses.Field]:
    """The settings that are `pipeline train` flags."""
    return [f for f in SETTINGS.values() if f.metadata["cli"]]


def result_key(values: Mapping[str, Any]) -> dict[str, Any]:
    """The part of `values` (setting name -> value) that determines the trained weights: the cache key.

    Settings with affects_result=False are left out; added_later ones only when not at their default.
    """
    out = {}
    for name, value in values.items():
        f = SETTINGS.get(name)
        if f is None or not f.metadata["affects_result"]:
            continue
        if f.metadata["added_later"] and value == _default(f):
            continue
        out[name] = value
    return out
