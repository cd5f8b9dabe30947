"""Method name → Distiller class, with validated options."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, TypeVar

from torch import nn

from dskd.errors import UserError
from dskd.methods.base import Distiller
from dskd.methods.options import Opt, parse_option_text, resolve_options

METHODS: dict[str, type[Distiller]] = {}

D = TypeVar("D", bound=type[Distiller])


def register_method(cls: D) -> D:
    """Class decorator: make a Distiller subclass available under its `name` (as
    `dskd.models.register_model` does for models). Registering the same class again is a no-op;
    another class under a taken name is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Distiller)) or not cls.name:
        raise TypeError(f"register_method takes a Distiller subclass with a `name`, got {cls!r}")
    have = METHODS.get(cls.name)
    if have is not None and have is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice ({have.__qualname__}, {cls.__qualname__})")
    METHODS[cls.name] = cls
    return cls


# The built-in methods register themselves with @register_method when their modules are imported,
# here, after register_method exists; listed in the order of the benchmark table, and methods
# registered later (a user's module) follow them.
from dskd.methods.dskd import DSKD  # noqa: E402
from dskd.methods.feature_methods import LSHFM, DiffKDStyle, FitNet  # noqa: E402
from dskd.methods.logit_methods import DKD, KD, CEOnly  # noqa: E402

_TABLE_ORDER = (CEOnly, KD, DKD, FitNet, LSHFM, DiffKDStyle, DSKD)
_later = {n: c for n, c in METHODS.items() if c not in _TABLE_ORDER}
METHODS.clear()
METHODS.update({c.name: c for c in _TABLE_ORDER}, **_later)


def list_methods() -> list[str]:
    """Method names in the order of the benchmark table (baselines first, DSKD last)."""
    return list(METHODS)


def method_class(method: str) -> type[Distiller]:
    """The Distiller class for `method`; unknown names raise UserError with the closest one."""
    cls = METHODS.get(method)
    if cls is None:
        close = difflib.get_close_matches(str(method), list(METHODS), n=1, cutoff=0.0)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown method {method!r}: {hint}choose one of {', '.join(METHODS)}")
    return cls


def method_options(method: str) -> dict[str, Opt]:
    """Declared options of `method` (type, default, range, one-line doc)."""
    return dict(method_class(method).OPTIONS)


def method_defaults(method: str) -> dict[str, Any]:
    """Flat {option: default} of `method`, e.g. for recording in summary.json."""
    return {name: opt.default for name, opt in method_class(method).OPTIONS.items()}


def resolve_method_options(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults overlaid with `options`, validated (UserError on unknown name or bad value)."""
    return resolve_options(method, method_class(method).OPTIONS, options)


def parse_method_option(method: str, name: str, text: str) -> Any:
    """Convert a `--set method.name=text` string to the option's type (UserError if bad)."""
    spec = method_class(method).OPTIONS
    if name not in spec:
        resolve_options(method, spec, {name: None})  # raises the unknown-option error
    return parse_option_text(method, name, spec[name], text)


def create_distiller(
    method: str, student: nn.Module, teacher: nn.Module | None, options: Mapping[str, Any] | None = None
) -> Distiller:
    """Build the Distiller for `method` around `student` and the frozen `teacher`.

    The resolved options (defaults + overrides) are in `distiller.options`.
    """
    cls = method_class(method)
    resolved = resolve_options(method, cls.OPTIONS, options)
    return cls(student, teacher, resolved)
