"""Per-image correctness of a measured artifact, kept in the report for paired accuracy gates.

A top-1 difference between two models on the same test set is paired: the evidence is in the
images where they disagree (McNemar, pipeline.regression_stats.paired_top1_decision). So the
deploy stage stores, per artifact, which test images it classified correctly (a bitset,
base64: ~1.7 kB for 10,000 images) with a fingerprint of the test set, and a later run that
uses this report as its baseline can pair image by image.

The runner reports only the sha256 of its predictions. For artifacts measured on this machine
the predictions are recomputed here with the runner's own `evaluate` (same batching, same
normalisation) and accepted only when their sha256 equals the runner's, so the bits are those
of the measured predictions. Artifacts measured on a device get no record (the gate then
falls back to the plain threshold and says so).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pipeline.regression_stats import PER_IMAGE_ENCODING, decode_correct, encode_correct

LOCAL_RUNTIMES = ("onnxruntime", "openvino")
EVAL_BATCH_SIZE = 64  # deploy_targets.measure's default: the batching the runner's accuracy used


class _Recording:
    """A runner backend that remembers the argmax of every batch it infers."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.max_batch = getattr(backend, "max_batch", None)
        self.predictions: list[Any] = []

    def infer(self, x: Any) -> Any:
        import numpy as np

        out = np.asarray(self._backend.infer(x))
        self.predictions.append(out.reshape(out.shape[0], -1).argmax(axis=1))
        return out


def fingerprint(x: Any, y: Any) -> str:
    """Fingerprint of a test set (images and labels): two records pair only on the same one."""
    import numpy as np

    h = hashlib.sha256()
    for arr in (np.ascontiguousarray(x), np.ascontiguousarray(np.asarray(y, dtype=np.int64))):
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def record(correct: Any, x: Any, y: Any, predictions_sha256: str | None = None) -> dict[str, Any]:
    """The report's `per_image` object for a boolean correctness vector on test set (x, y)."""
    correct = [bool(c) for c in correct]
    rec = {"encoding": PER_IMAGE_ENCODING, "n": len(correct), "correct": encode_correct(correct),
           "test_set_sha256": fingerprint(x, y)}
    if predictions_sha256:
        rec["predictions_sha256"] = predictions_sha256
    return rec


def _runner_functions() -> tuple[Any, Any, Any]:
    """The runner's own evaluate / load_eval / load_backend (its package layout, or the one-file runner)."""
    try:
        from deploy_targets.remote.dskd_runner.backends import load_backend
        from deploy_targets.remote.dskd_runner.evaluation import evaluate, load_eval
    except ImportError:  # the single-file runner
        from deploy_targets.remote.runner import evaluate, load_backend, load_eval  # type: ignore[attr-defined,no-redef]
    return evaluate, load_eval, load_backend


def measure_record(artifact: Path, runtime: str, precision: str, threads: int, eval_set: Path,
                   runner_sha256: str | None) -> tuple[dict[str, Any] | None, str]:
    """(per_image record, "") for a locally runnable artifact, or (None, why not)."""
    evaluate, load_eval, load_backend = _runner_functions()
    if runtime not in LOCAL_RUNTIMES:
        return None, f"{runtime} runs on the device, which reports no per-image predictions"
    ev = load_eval(str(eval_set))
    backend = load_backend(runtime, str(artifact), precision, threads)
    rec = _Recording(backend)
    try:
        acc = evaluate(rec, ev, EVAL_BATCH_SIZE)
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    if runner_sha256 and acc["predictions_sha256"] != runner_sha256:
        return None, "recomputed predictions differ from the runner's (sha256), so none are kept"
    import numpy as np

    pred = np.concatenate(rec.predictions)
    return record(pred == ev.y, ev.x, ev.y, acc["predictions_sha256"]), ""


def read_record(rec: Any, top1: float | None = None) -> tuple[list[bool] | None, str]:
    """(correctness list, "") from a report's `per_image` object, or (None, why it cannot be used).

    When `top1` (percent) is given the bits must reproduce it: a record edited apart from its
    top-1 (or a top-1 edited apart from its record) is not evidence of anything.
    """
    if not isinstance(rec, dict):
        return None, "no per-image record"
    if rec.get("encoding") != PER_IMAGE_ENCODING or not isinstance(rec.get("n"), int) \
            or not isinstance(rec.get("correct"), str):
        return None, "per-image record in an unknown form"
    try:
        bits = decode_correct(rec["correct"], rec["n"])
    except ValueError as exc:
        return None, f"per-image record unreadable ({exc})"
    if top1 is not None and bits and abs(100.0 * sum(bits) / len(bits) - top1) > 1e-3 + 50.0 / len(bits):
        return None, f"per-image record ({100.0 * sum(bits) / len(bits):.2f} %) does not match top-1 {top1:.2f} %"
    return bits, ""
