"""The evaluation set (real images and labels) and top-1 accuracy of a loaded artifact.

The eval set is an .npz of uint8 N x C x H x W images, labels, the training mean/std and
optionally the reference (PyTorch) predictions, so the device normalizes exactly as training
did and the result says both top-1 and agreement with the model before export.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ._numpy import np
from .protocol import EXIT_BAD_INPUT, EXIT_USAGE, RunnerError


@dataclass
class EvalSet:
    x: Any  # uint8 N x C x H x W
    y: Any  # int64 N
    mean: Any  # float32 C
    std: Any  # float32 C
    ref_pred: Any | None


def load_eval(path: str) -> EvalSet:
    """Load and check an evaluation .npz (x uint8 NCHW, y, mean, std, optional ref_pred)."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RunnerError(
            "bad-input", f"cannot read eval set {path}: {exc}", EXIT_BAD_INPUT
        ) from exc
    with data:
        missing = [k for k in ("x", "y", "mean", "std") if k not in data.files]
        if missing:
            raise RunnerError(
                "bad-input",
                f"eval set {path} lacks {', '.join(missing)}: rebuild it",
                EXIT_BAD_INPUT,
            )
        x, y = data["x"], data["y"]
        mean = data["mean"].astype(np.float32).reshape(-1)
        std = data["std"].astype(np.float32).reshape(-1)
        ref = data["ref_pred"].astype(np.int64).reshape(-1) if "ref_pred" in data.files else None
    if x.dtype != np.uint8 or x.ndim != 4:
        raise RunnerError(
            "bad-input", f"eval set {path}: x must be uint8 N x C x H x W", EXIT_BAD_INPUT
        )
    n, c = x.shape[:2]
    if y.reshape(-1).shape[0] != n or mean.shape[0] != c or std.shape[0] != c:
        raise RunnerError(
            "bad-input",
            f"eval set {path}: y/mean/std do not match x's N={n}, C={c}",
            EXIT_BAD_INPUT,
        )
    if ref is not None and ref.shape[0] != n:
        raise RunnerError(
            "bad-input", f"eval set {path}: ref_pred must have N={n} entries", EXIT_BAD_INPUT
        )
    if n == 0:
        raise RunnerError("bad-input", f"eval set {path} is empty", EXIT_BAD_INPUT)
    return EvalSet(x, y.reshape(-1).astype(np.int64), mean, std, ref)


def normalize(x_uint8: Any, mean: Any, std: Any) -> Any:
    """(x/255 - mean)/std per channel, float32: the same preprocessing as training."""
    x = x_uint8.astype(np.float32) / np.float32(255.0)
    return (x - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)


def latency_images(
    backend: Any, ev: EvalSet | None, input_shape: tuple[int, ...] | None
) -> Any:
    """Real eval images when given (first 64), else seeded random data of the input shape."""
    if ev is not None:
        return normalize(ev.x[:64], ev.mean, ev.std)
    chw = tuple(input_shape) if input_shape else backend.input_chw
    if not chw:
        raise RunnerError(
            "usage",
            "the artifact has dynamic C/H/W: pass --eval or --input-shape C,H,W",
            EXIT_USAGE,
        )
    rng = np.random.default_rng(0)
    return rng.standard_normal((8, *chw)).astype(np.float32)


def evaluate(backend: Any, ev: EvalSet, batch_size: int) -> dict[str, Any]:
    """Top-1 over the whole set, and agreement with the reference (PyTorch) predictions."""
    if backend.max_batch:
        batch_size = min(batch_size, backend.max_batch)
    preds = []
    for i in range(0, ev.x.shape[0], batch_size):
        logits = np.asarray(backend.infer(normalize(ev.x[i : i + batch_size], ev.mean, ev.std)))
        preds.append(logits.reshape(logits.shape[0], -1).argmax(axis=1))
    pred = np.concatenate(preds).astype(np.int64)
    result: dict[str, Any] = {
        "n": int(pred.shape[0]),
        "correct": int((pred == ev.y).sum()),
        "top1": round(float((pred == ev.y).mean()), 6),
        "predictions_sha256": hashlib.sha256(pred.tobytes()).hexdigest(),
    }
    if ev.ref_pred is not None:
        result["agreement"] = round(float((pred == ev.ref_pred).mean()), 6)
    return result
