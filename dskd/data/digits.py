"""scikit-learn's bundled 8×8 digits: a real dataset that needs no download (tests, smoke runs)."""

from __future__ import annotations

import hashlib

import numpy as np

from dskd.data.arrays import convert_array

SPLIT_SEED = 0
TEST_FRACTION = 0.2


def load_digits_arrays(input_size: int, in_chans: int, limit_per_class: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str], str]:
    """-> train_x, train_y, test_x, test_y, class names, sha256 of the raw data.

    Stratified 80/20 split with a fixed seed; 0..16 values scaled to 0..255 and upscaled
    (bilinear) before rounding, so enlarging loses no precision.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    images = np.asarray(ds.images, dtype=np.float64)  # N×8×8, 0..16
    y = np.asarray(ds.target, dtype=np.int64)
    digest = hashlib.sha256(images.tobytes() + y.tobytes()).hexdigest()
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)
    tr, te = np.sort(tr), np.sort(te)
    if limit_per_class is not None:
        tr = np.concatenate([tr[y[tr] == c][:limit_per_class] for c in range(10)])
        te = np.concatenate([te[y[te] == c][:limit_per_class] for c in range(10)])
        tr, te = np.sort(tr), np.sort(te)
    x = convert_array((images * (255.0 / 16.0))[:, None], in_chans, input_size)
    names = [str(i) for i in range(10)]
    return x[tr], y[tr], x[te], y[te], names, digest
