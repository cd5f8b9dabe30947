"""Deterministic class-balanced subsets and stratified hold-out splits of a label vector."""

from __future__ import annotations

import numbers

import numpy as np
import torch

from dskd.errors import UserError


def _labels(y: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    return arr.astype(np.int64, copy=False).reshape(-1)


def _per_class(y: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(y == c) for c in np.unique(y)]


def _even_quotas(sizes: list[int], total: int, rng: np.random.Generator) -> list[int]:
    """Spread `total` as evenly as possible over classes, capped by each class's size."""
    quotas = [0] * len(sizes)
    remaining = total
    while remaining > 0:
        open_ = [i for i, s in enumerate(sizes) if quotas[i] < s]
        share = remaining // len(open_)
        if share == 0:  # fewer leftovers than classes: a seeded choice of who gets one more
            for i in rng.permutation(open_)[:remaining]:
                quotas[int(i)] += 1
            break
        for i in open_:
            add = min(share, sizes[i] - quotas[i])
            quotas[i] += add
            remaining -= add
    return quotas


def class_balanced_subset(y: torch.Tensor | np.ndarray, fraction_or_count: float | int, seed: int
                          ) -> torch.Tensor:
    """Sorted indices of a per-class random subset.

    A value in (0, 1] keeps that fraction of every class (at least one image each);
    a whole number > 1 is the total number of images, spread evenly over the classes.
    """
    v = fraction_or_count
    labels = _labels(y)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0:
        raise UserError(f"train_subset={v!r}: must be a fraction in (0, 1] or a whole number of images")
    rng = np.random.default_rng(seed)
    groups = _per_class(labels)
    if v <= 1:
        quotas = [max(1, round(float(v) * len(g))) for g in groups]
    else:
        if not float(v).is_integer():
            raise UserError(f"train_subset={v!r}: above 1 it is a count of images and must be whole")
        if int(v) > len(labels):
            raise UserError(f"train_subset={int(v)}: only {len(labels)} training images; use a smaller count or a fraction")
        quotas = _even_quotas([len(g) for g in groups], int(v), rng)
    return _sorted_index([rng.permutation(g)[:q] for g, q in zip(groups, quotas, strict=True)])


def holdout_split(y: torch.Tensor | np.ndarray, fraction: float, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (train_indices, holdout_indices), both sorted; deterministic for a seed.

    Each class gives round(fraction × size) images to the hold-out, but keeps at least one
    for training.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 <= fraction < 1:
        raise UserError(f"holdout={fraction!r}: must be a fraction in [0, 1)")
    labels = _labels(y)
    rng = np.random.default_rng(seed)
    train, held = [], []
    for g in _per_class(labels):
        k = min(round(float(fraction) * len(g)), len(g) - 1)
        perm = rng.permutation(g)
        held.append(perm[:k])
        train.append(perm[k:])
    return _sorted_index(train), _sorted_index(held)


def _sorted_index(parts: list[np.ndarray]) -> torch.Tensor:
    idx = np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(idx.astype(np.int64))
