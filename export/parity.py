"""Numerical faithfulness of an artifact vs the PyTorch model, on the same normalized images."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from export.errors import ExportError
from export.runners import Predictor, run_batched


@dataclass(frozen=True)
class Tolerance:
    """Pass bounds. Logit differences are relative to the largest |reference logit| (≥ 1),
    so the same bound fits small and confident models; drops are in top-1 points."""

    max_rel_diff: float | None
    min_top1_agreement: float
    max_top1_drop: float | None = None
    max_batch1_rel_diff: float = 1e-3


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    # FP32 differs from PyTorch only by summation order (~1e-6 relative).
    "fp32": Tolerance(max_rel_diff=1e-3, min_top1_agreement=0.99),
    # FP16-rounded weights, FP32 compute: ~1e-3 relative.
    "fp16": Tolerance(max_rel_diff=3e-2, min_top1_agreement=0.98),
    # INT8 logits move; what must hold is the decision and the accuracy.
    "int8": Tolerance(max_rel_diff=None, min_top1_agreement=0.90, max_top1_drop=2.0,
                      max_batch1_rel_diff=5e-2),
}


def tolerances_for(fp32_max_rel_diff: float | None = None) -> dict[str, Tolerance]:
    """The per-precision bounds with the FP32 logit bound set (a recipe's
    `export.parity_tolerance`): FP32 artifacts differ from PyTorch only by summation order,
    so this one number is what a user tightens or loosens. FP16 and INT8 keep their own
    bounds (rounding, quantization). None: the defaults."""
    if fp32_max_rel_diff is None:
        return dict(DEFAULT_TOLERANCES)
    if not (isinstance(fp32_max_rel_diff, (int, float)) and fp32_max_rel_diff > 0
            and np.isfinite(fp32_max_rel_diff)):
        raise ValueError(f"parity tolerance must be a finite number > 0, got {fp32_max_rel_diff!r}")
    return {**DEFAULT_TOLERANCES, "fp32": replace(DEFAULT_TOLERANCES["fp32"], max_rel_diff=float(fp32_max_rel_diff))}


def top1(logits: np.ndarray) -> np.ndarray:
    return np.argmax(logits, axis=1)


def compare(ref: np.ndarray, got: np.ndarray, y: np.ndarray | None) -> dict[str, Any]:
    """Max/mean |Δlogit|, relative max, top-1 agreement, and accuracies when labels exist."""
    if ref.shape != got.shape:
        raise ExportError(f"parity: output shape {got.shape} differs from PyTorch's {ref.shape}")
    if not np.all(np.isfinite(got)):
        raise ExportError("parity: the artifact produced NaN or infinite logits")
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    scale = max(1.0, float(np.abs(ref).max()))
    out: dict[str, Any] = {
        "images": int(ref.shape[0]),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "rel_max_abs_diff": float(diff.max() / scale),
        "top1_agreement": float(np.mean(top1(ref) == top1(got))),
    }
    if y is not None:
        acc_ref = float(np.mean(top1(ref) == y) * 100)
        acc = float(np.mean(top1(got) == y) * 100)
        out.update(top1=acc, top1_reference=acc_ref, top1_drop=acc_ref - acc)
    return out


def measure(predict: Predictor, x: np.ndarray, ref: np.ndarray, y: np.ndarray | None,
            batch: int = 64, batch1_images: int = 4) -> dict[str, Any]:
    """Run the artifact batched, then a few images one by one (the dynamic batch axis must
    give the same answers at batch 1 as in a full batch)."""
    got = run_batched(predict, x, batch)
    report = compare(ref, got, y)
    n1 = min(batch1_images, len(x))
    single = np.concatenate([predict(np.ascontiguousarray(x[i:i + 1])) for i in range(n1)])
    scale = max(1.0, float(np.abs(got[:n1]).max()))
    report["batch1_rel_diff"] = float(np.abs(single - got[:n1]).max() / scale)
    return report


def enforce(name: str, report: dict[str, Any], tol: Tolerance) -> dict[str, Any]:
    """Raise ExportError naming the first bound that failed; else mark the report passed."""
    problems = []
    if tol.max_rel_diff is not None and report["rel_max_abs_diff"] > tol.max_rel_diff:
        problems.append(f"max |Δlogit| {report['max_abs_diff']:.3g} "
                        f"(relative {report['rel_max_abs_diff']:.2g} > {tol.max_rel_diff:g})")
    if report["top1_agreement"] < tol.min_top1_agreement:
        problems.append(f"top-1 agreement {report['top1_agreement']:.3f} "
                        f"< {tol.min_top1_agreement:g}")
    if tol.max_top1_drop is not None and report.get("top1_drop") is not None \
            and report["top1_drop"] > tol.max_top1_drop:
        problems.append(f"top-1 drop {report['top1_drop']:.2f} points > {tol.max_top1_drop:g}")
    if report.get("batch1_rel_diff", 0.0) > tol.max_batch1_rel_diff:
        problems.append(f"batch-1 vs batched relative diff {report['batch1_rel_diff']:.2g} "
                        f"> {tol.max_batch1_rel_diff:g}")
    report["tolerance"] = asdict(tol)
    report["passed"] = not problems
    if problems:
        raise ExportError(f"{name}: parity check failed on {report['images']} images: "
                          + "; ".join(problems) + " (nothing was written)")
    return report
