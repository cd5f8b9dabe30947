"""Name -> factory registry (timm style), so recipes and checkpoints refer to models by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from dskd.errors import UserError

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(fn: ModelFactory) -> ModelFactory:
    """Decorator: register `fn(num_classes, in_chans)` under its function name."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    """All registered model names, sorted."""
    return sorted(_REGISTRY)


def _positive_int(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{field} must be a positive integer, got {value!r}")
    return value


def create_model(name: str, num_classes: int, in_chans: int = 3) -> nn.Module:
    """Build a freshly initialised model; unknown names raise UserError with close matches."""
    factory = _REGISTRY.get(name)
    if factory is None:
        close = difflib.get_close_matches(str(name), list_models(), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(
            f"model {name!r} is not known: {hint}choose one of {', '.join(list_models())}"
        )
    num_classes = _positive_int(num_classes, "num_classes")
    in_chans = _positive_int(in_chans, "in_chans")
    return factory(num_classes=num_classes, in_chans=in_chans)
