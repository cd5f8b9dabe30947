"""Evaluation sets as compact .npz files, the one input format every runner reads."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from dskd.atomic import atomic_write
from dskd.errors import UserError

REQUIRED_KEYS = ("x", "y", "mean", "std")


def write_eval_npz(
    path: str | Path,
    x: Any,
    y: Any,
    mean: Any,
    std: Any,
    ref_pred: Any | None = None,
) -> Path:
    """Write x (uint8 N×C×H×W), y, per-channel mean/std (0..1 scale) and optional ref_pred.

    Images stay uint8 (4x smaller than float32) because the file is copied to devices;
    runners normalize `(x/255 - mean)/std` themselves. `ref_pred` holds the PyTorch
    student's predictions so the runner can report agreement.
    """
    arrays = {
        "x": _as_numpy(x),
        "y": _as_numpy(y).astype(np.int64).reshape(-1),
        "mean": np.asarray(_as_numpy(mean), dtype=np.float32).reshape(-1),
        "std": np.asarray(_as_numpy(std), dtype=np.float32).reshape(-1),
    }
    if ref_pred is not None:
        arrays["ref_pred"] = _as_numpy(ref_pred).astype(np.int64).reshape(-1)
    _check(arrays, str(path))

    def writer(fh: Any) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        fh.write(buf.getvalue())

    atomic_write(path, writer)
    return Path(path)


def check_eval_npz(path: str | Path) -> dict[str, Any]:
    """Validate an eval set before copying it anywhere; return {'n', 'chw', 'has_ref'}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"eval set {path} does not exist: build it with write_eval_npz or fix the path"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise UserError(f"eval set {path}: not a readable .npz ({exc}); rebuild it") from exc
    _check(arrays, str(path))
    x = arrays["x"]
    return {
        "n": int(x.shape[0]),
        "chw": tuple(int(d) for d in x.shape[1:]),
        "has_ref": "ref_pred" in arrays,
    }


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _check(arrays: dict[str, np.ndarray], where: str) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise UserError(f"eval set {where}: missing {', '.join(missing)}; it needs x, y, mean, std")
    x = arrays["x"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[0] == 0:
        raise UserError(
            f"eval set {where}: x must be non-empty uint8 N×C×H×W, got {x.dtype} {x.shape}"
        )
    n, c = x.shape[:2]
    if arrays["y"].reshape(-1).shape[0] != n:
        raise UserError(f"eval set {where}: y has {arrays['y'].size} labels for {n} images")
    for key in ("mean", "std"):
        if arrays[key].reshape(-1).shape[0] != c:
            raise UserError(f"eval set {where}: {key} needs {c} values (one per channel)")
    if np.any(arrays["std"].reshape(-1) <= 0):
        raise UserError(f"eval set {where}: std must be positive")
    if "ref_pred" in arrays and arrays["ref_pred"].reshape(-1).shape[0] != n:
        raise UserError(f"eval set {where}: ref_pred needs {n} entries")
