"""CIFAR-10/100 "python version" folders, read with an unpickler that builds only plain data.

The batches are pickles, and a pickle can name any callable. The unpickler here resolves
only builtin containers and numpy array reconstruction, so a tampered batch fails with a
UserError instead of running code.
"""

from __future__ import annotations

import codecs
import importlib
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from dskd.data.limits import ByteCaps
from dskd.errors import UserError

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
CIFAR100_FILES = ["train", "test", "meta"]


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3's protocol-2 pickles call to rebuild bytes; only latin-1 is honoured."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    for mod in modules:
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {name}")


_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")
_ALLOWED: dict[tuple[str, str], Any] = {
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "bytes"): bytes,
    ("builtins", "str"): str,
    ("builtins", "int"): int,
    ("__builtin__", "dict"): dict,
    ("__builtin__", "list"): list,
    ("__builtin__", "int"): int,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals that plain data and numpy arrays need."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in _MULTIARRAY and name == "_reconstruct":
            return _numpy_attr(_MULTIARRAY, name)
        if module in _NUMERIC and name == "_frombuffer":
            return _numpy_attr(_NUMERIC, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_pickle(path: Path) -> dict[str, Any]:
    """Load a CIFAR batch/meta pickle safely; bytes keys (Python 2 pickles) become str."""
    try:
        with open(path, "rb") as fh:
            obj = RestrictedUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OSError) as exc:
        detail = str(exc).replace("\n", " ") or type(exc).__name__
        raise UserError(f"{path}: not a readable CIFAR pickle ({detail}); re-download the CIFAR python version") from exc
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict in the CIFAR pickle, got {type(obj).__name__}; re-download it")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def cifar_kind(folder: Path) -> str | None:
    """'cifar10', 'cifar100' or None from the file names present in `folder`."""
    names = {p.name for p in folder.iterdir() if p.is_file()}
    if names & set(CIFAR10_FILES):
        return "cifar10"
    if "meta" in names and names & {"train", "test"}:
        return "cifar100"
    return None


def cifar_files(folder: Path, kind: str) -> list[str]:
    """Names of the files the format needs; a UserError names the first missing one."""
    needed = CIFAR10_FILES if kind == "cifar10" else CIFAR100_FILES
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise UserError(
            f"{folder / missing[0]}: missing {'CIFAR-10' if kind == 'cifar10' else 'CIFAR-100'} batch file "
            f"(also missing: {', '.join(missing[1:]) or 'nothing else'}); re-extract the CIFAR python archive"
        )
    return needed


def check_files(folder: Path, names: list[str], caps: ByteCaps) -> None:
    """Batch files must really lie in `folder` (a link may not point out) and fit the total cap.

    The per-file cap is for image files; a CIFAR-100 `train` batch alone is 155 MB.
    """
    top, total = os.path.realpath(folder), 0
    for name in names:
        path = folder / name
        real = os.path.realpath(path)
        if os.path.dirname(real) != top and not real.startswith(top + os.sep):
            raise UserError(f"{path}: symbolic link to {real}, outside the dataset folder {top}; "
                            f"copy the file into the dataset folder")
        total += path.stat().st_size
        if caps.total is not None and total > caps.total:
            raise caps.total_error(str(path), total)


def _names(meta: dict[str, Any], key: str, path: Path) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or not names:
        raise UserError(f"{path}: no {key!r} list in the CIFAR meta file; re-download it")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = load_pickle(path)
    data, labels = d.get("data"), d.get(label_key)
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: 'data' is not an N×3072 array; re-download the CIFAR python version")
    y = np.asarray(labels, dtype=np.int64) if labels is not None else None
    if y is None or y.shape != (data.shape[0],):
        raise UserError(f"{path}: {label_key!r} missing or not one label per image; re-download it")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"{path}: labels outside 0..{num_classes - 1}; re-download it")
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32), y


def _first_per_class(y: np.ndarray, limit: int | None) -> np.ndarray:
    if limit is None:
        return np.arange(len(y))
    keep = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        keep[np.flatnonzero(y == c)[:limit]] = True
    return np.flatnonzero(keep)


def load_cifar(folder: Path, kind: str, limit_per_class: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """-> train_x, train_y, test_x, test_y (uint8 N×3×32×32, int64), class names (meta order)."""
    cifar_files(folder, kind)
    if kind == "cifar10":
        names = _names(load_pickle(folder / "batches.meta"), "label_names", folder / "batches.meta")
        parts = [_batch(folder / f"data_batch_{i}", "labels", len(names)) for i in range(1, 6)]
        train_x = np.concatenate([p[0] for p in parts])
        train_y = np.concatenate([p[1] for p in parts])
        test_x, test_y = _batch(folder / "test_batch", "labels", len(names))
    else:
        names = _names(load_pickle(folder / "meta"), "fine_label_names", folder / "meta")
        train_x, train_y = _batch(folder / "train", "fine_labels", len(names))
        test_x, test_y = _batch(folder / "test", "fine_labels", len(names))
    tr, te = _first_per_class(train_y, limit_per_class), _first_per_class(test_y, limit_per_class)
    return train_x[tr], train_y[tr], test_x[te], test_y[te], names
