"""Per-step loss bookkeeping that stays on the device: one host read per step, not two per term.

The trainer used to call `torch.isfinite(v).all()` and `float(v)` on every named loss every
step; on a GPU each is a blocking device→host copy. `LossBook` stacks the terms once, keeps
their running sums as a device tensor, and answers "is everything finite?" with a single
host read. Names are only looked at when something is not finite, or at the end of an epoch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class LossBook:
    """Running sums of named loss terms for one epoch, kept on the device."""

    def __init__(self) -> None:
        self._sums: dict[tuple[str, ...], torch.Tensor] = {}
        self._last: tuple[tuple[str, ...], torch.Tensor] | None = None

    def add(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Record this step's terms; returns their float32 sum (in the graph) for backward."""
        names = tuple(losses)
        stacked = torch.stack([v.float().reshape(()) for v in losses.values()])
        values = stacked.detach()
        self._last = (names, values)
        if names in self._sums:
            self._sums[names].add_(values)
        else:
            self._sums[names] = values.clone()
        return stacked.sum()

    def bad_terms(self) -> list[str]:
        """Names of this step's terms that are NaN/inf; one device→host read when all are finite."""
        if self._last is None:
            return []
        names, values = self._last
        finite = torch.isfinite(values)
        if bool(finite.all()):
            return []
        return [n for n, ok in zip(names, finite.tolist(), strict=True) if not ok]

    def totals(self) -> dict[str, float]:
        """Sum of each term over the recorded steps (one host read for the whole epoch)."""
        out: dict[str, float] = {}
        for names, sums in self._sums.items():
            for name, value in zip(names, sums.tolist(), strict=True):
                out[name] = out.get(name, 0.0) + value
        return out
