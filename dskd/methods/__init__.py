"""Distillation methods behind one contract (docs/design.md): CE, KD, DKD, FitNet, LSHFM, DiffKD-style and DSKD.

`create_distiller(method, student, teacher, options)` returns a `Distiller` whose
`forward(x, y, progress)` gives the student's logits and a dict of named losses.
"""

from __future__ import annotations

from dskd.methods.base import Distiller
from dskd.methods.options import Opt
from dskd.methods.registry import (
    METHODS,
    create_distiller,
    list_methods,
    method_class,
    method_defaults,
    method_options,
    parse_method_option,
    register_method,
    resolve_method_options,
)

__all__ = [
    "METHODS",
    "Distiller",
    "Opt",
    "create_distiller",
    "list_methods",
    "method_class",
    "method_defaults",
    "method_options",
    "parse_method_option",
    "register_method",
    "resolve_method_options",
]
