"""Real images for calibration and parity: deterministic subsets, checked against the checkpoint.

A DataBundle (dskd.data) is read by attribute only (`train_x`, `train_y`, `test_x`,
`test_y`, `class_names`, `fingerprint`), so anything shaped like it works.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from dskd.errors import UserError

MIN_CALIBRATION_IMAGES = 100


@dataclass
class ImageSet:
    """uint8 N×C×H×W images (+ labels when known) and where they came from."""

    x: np.ndarray
    y: np.ndarray | None
    source: str
    indices: np.ndarray | None = None  # rows of the split they were taken from

    @property
    def indices_sha256(self) -> str | None:
        if self.indices is None:
            return None
        return hashlib.sha256(np.asarray(self.indices, dtype=np.int64).tobytes()).hexdigest()

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def normalized(self, mean: list[float], std: list[float]) -> np.ndarray:
        return normalize_uint8(self.x, mean, std)

    def describe(self) -> dict[str, Any]:
        return {"images": len(self), "source": self.source, "labels": self.y is not None,
                "indices_sha256": self.indices_sha256}


def normalize_uint8(x: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """(x/255 - mean)/std per channel, float32: what every runner feeds the model."""
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((x.astype(np.float32) / 255.0 - m) / s).astype(np.float32)


def as_numpy(t: Any) -> np.ndarray:
    """Torch tensors and arrays alike, without importing torch here."""
    if hasattr(t, "detach"):
        t = t.detach().cpu().numpy()
    return np.asarray(t)


def stratified_indices(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """`size` indices spread evenly over the classes, the same for the same labels and seed.

    A seeded permutation is walked class by class in round-robin, so a small subset
    still covers every class (calibration ranges then see every kind of image).
    """
    labels = np.asarray(labels)
    size = min(int(size), len(labels))
    perm = np.random.default_rng(seed).permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = perm[labels[perm] == cls]
        rank[members] = np.arange(len(members))
    order = sorted(range(len(perm)), key=lambda i: (rank[perm[i]], labels[perm[i]], i))
    return np.sort(perm[np.asarray(order[:size], dtype=np.int64)])


def check_images(x: np.ndarray, meta: dict[str, Any], where: str) -> None:
    """Channels, size and dtype must be what the checkpoint was trained on."""
    if x.ndim != 4:
        raise UserError(f"{where}: images must be N×C×H×W, got shape {tuple(x.shape)}")
    if x.dtype != np.uint8:
        raise UserError(f"{where}: images must be uint8 0..255, got {x.dtype}")
    chans, size = int(meta["in_chans"]), int(meta["input_size"])
    if x.shape[1] != chans:
        raise UserError(
            f"{where}: images have {x.shape[1]} channels but the checkpoint expects {chans}; "
            f"load the data with in_chans={chans}"
        )
    if tuple(x.shape[2:]) != (size, size):
        raise UserError(
            f"{where}: images are {x.shape[2]}×{x.shape[3]} but the checkpoint expects "
            f"{size}×{size}; load the data with input_size={size}"
        )


def check_bundle(bundle: Any, meta: dict[str, Any], where: str = "calibration data") -> None:
    """Same classes (names and order), channels and size as the checkpoint, or a UserError."""
    ours, theirs = list(meta["class_names"]), list(getattr(bundle, "class_names", []) or [])
    if theirs != ours:
        diff = sorted(set(theirs) ^ set(ours))[:4]
        what = f"differ ({', '.join(diff)}...)" if diff else "are in a different order"
        raise UserError(
            f"{where}: its {len(theirs)} classes {what} from the checkpoint's {len(ours)}; "
            "pass the data set the model was trained on"
        )
    check_images(as_numpy(bundle.train_x), meta, where)


def calibration_set(bundle: Any, meta: dict[str, Any], size: int = 300, seed: int = 0) -> ImageSet:
    """A class-stratified, seeded subset of the TRAINING split (never the test split)."""
    if size < 1:
        raise UserError(f"--calib-size must be at least 1, got {size}")
    check_bundle(bundle, meta)
    x, y = as_numpy(bundle.train_x), as_numpy(bundle.train_y)
    if size > len(x):
        warnings.warn(f"calibration: asked for {size} images, the training split has {len(x)}; "
                      "using all of them", UserWarning, stacklevel=2)
    idx = stratified_indices(y, size, seed)
    if len(idx) < MIN_CALIBRATION_IMAGES:
        warnings.warn(
            f"calibration uses only {len(idx)} images (< {MIN_CALIBRATION_IMAGES}): INT8 ranges "
            "may be poor; pass --calib-size 300 or more", UserWarning, stacklevel=2)
    fp = getattr(bundle, "fingerprint", "unknown")
    return ImageSet(x[idx], y[idx], f"train split of {fp} (seed {seed})", idx)


def held_out_train_set(bundle: Any, meta: dict[str, Any], size: int, exclude: ImageSet,
                       seed: int = 1) -> ImageSet:
    """Training images outside the calibration subset (for nncf's accuracy control)."""
    x, y = as_numpy(bundle.train_x), as_numpy(bundle.train_y)
    taken = set() if exclude.indices is None else set(exclude.indices.tolist())
    idx = stratified_indices(y, min(len(y), size + len(taken)), seed)
    idx = np.asarray([i for i in idx if i not in taken][:size], dtype=np.int64)
    fp = getattr(bundle, "fingerprint", "unknown")
    return ImageSet(x[idx], y[idx], f"train split of {fp}, outside calibration", idx)


def parity_set(source: Any, meta: dict[str, Any], size: int = 1000, seed: int = 0) -> ImageSet:
    """Test images for parity: an (x_uint8, y) pair, a DataBundle's test split, or synthetic.

    Without real images the check still runs (on seeded uint8 noise) and says so in the
    manifest, so an export from `model.pt` alone remains possible.
    """
    if source is None:
        warnings.warn("parity: no test images given; checking on synthetic noise images "
                      "(pass --calib-data to check on real ones)", UserWarning, stacklevel=2)
        shape = (min(size, 256), int(meta["in_chans"]), int(meta["input_size"]),
                 int(meta["input_size"]))
        x = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
        return ImageSet(x, None, f"synthetic uint8 noise (seed {seed})")
    if isinstance(source, tuple | list):
        x = as_numpy(source[0])
        y = as_numpy(source[1]) if len(source) > 1 and source[1] is not None else None
        check_images(x, meta, "parity images")
        idx = stratified_indices(y, size, seed) if y is not None else np.arange(min(size, len(x)))
        return ImageSet(x[idx], None if y is None else y[idx], "given test images",
                        idx)
    check_bundle(source, meta, "parity data")
    x, y = as_numpy(source.test_x), as_numpy(source.test_y)
    check_images(x, meta, "parity data (test split)")
    idx = stratified_indices(y, size, seed)
    fp = getattr(source, "fingerprint", "unknown")
    return ImageSet(x[idx], y[idx], f"test split of {fp} (seed {seed})", idx)
