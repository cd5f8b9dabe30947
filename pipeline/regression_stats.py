"""Paired decision rules for the regression gates: judged by evidence, not by one number.

Latency: baseline and candidate are measured alternately in one job (A B A B ...), so each round
gives one ratio candidate/baseline under the same machine state; slow phases of a shared machine
hit both sides of a round. The estimate is the median of the per-round ratios and its interval is
the distribution-free (sign-test) confidence interval of that median: order statistics chosen by
the binomial(n, 1/2) law, exact for any continuous distribution, no resampling, deterministic.

Top-1: both models classify the same test images, so the evidence is in the images where they
disagree about correctness (McNemar). Losses b (baseline right, candidate wrong) and gains c
(baseline wrong, candidate right) give the drop (b - c) / n; conditional on the b + c discordant
images, b is binomial(b + c, p) and the Clopper-Pearson interval of p bounds the drop.

Both give a three-way verdict against a tolerance: FAIL when the whole interval is beyond it,
PASS when the whole interval is within it, INCONCLUSIVE otherwise (too few rounds or images to
tell); what an inconclusive result does to the run is the caller's policy.
Pure functions of their inputs (no I/O, no randomness): tests/test_regression_stats.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Decision:
    """A regression estimate with its interval and the verdict against `limit`.

    For latency the numbers are ratios (candidate / baseline, 1.10 = 10 % slower) and `limit`
    is 1 + tolerance; for top-1 they are points of drop and `limit` is the tolerance.
    `coverage` is the interval's actual confidence (order statistics and the conditional
    binomial give at least the requested one, or the widest available when data are short).
    """

    estimate: float
    low: float
    high: float
    limit: float
    coverage: float
    samples: int
    verdict: str
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}] ({100 * self.coverage:.1f} % interval, "
                f"{self.method}, n={self.samples}) vs limit {self.limit:.4g}: {self.verdict}")


def _verdict(low: float, high: float, limit: float, coverage: float, confidence: float) -> str:
    if coverage + 1e-12 < confidence:
        return INCONCLUSIVE  # not enough data for the confidence asked: say so rather than guess
    if low > limit:
        return FAIL
    if high <= limit:
        return PASS
    return INCONCLUSIVE


# ------------------------------------------------------------------ binomial helpers (log space)
def _log_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), stable for n in the tens of thousands."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    terms = [_log_pmf(i, n, p) for i in range(k + 1)]
    top = max(terms)
    if top == -math.inf:
        return 0.0
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def median_interval_ranks(n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[int, int, float]:
    """0-based ranks (lo, hi) of the order statistics bounding the median, and their coverage.

    [x_(lo), x_(hi)] covers the median with probability 1 - 2 P(B <= lo), B ~ Bin(n, 1/2): the
    narrowest symmetric pair reaching `confidence`, or (0, n-1) with its smaller coverage when n
    is too small (e.g. 3 rounds: 75 %, 6 rounds: 96.9 %).
    """
    if n < 1:
        raise ValueError("need at least one sample")
    def coverage(lo: int) -> float:  # P(x_(lo) <= median <= x_(n-1-lo)), 0-based ranks
        return 1.0 - 2.0 * binom_cdf(lo, n, 0.5)

    best = 0
    for lo in range(1, (n - 1) // 2 + 1):
        if coverage(lo) < confidence - 1e-12:
            break
        best = lo
    return best, n - 1 - best, coverage(best)


def rounds_needed(confidence: float = DEFAULT_CONFIDENCE) -> int:
    """The fewest interleaved rounds whose widest interval reaches `confidence`."""
    n = 1
    while 1.0 - 2.0 * 0.5 ** n < confidence:
        n += 1
    return n


# ------------------------------------------------------------------ latency
def paired_ratio_decision(candidate: Sequence[float], baseline: Sequence[float], tolerance: float,
                          confidence: float = DEFAULT_CONFIDENCE,
                          keep: Sequence[bool] | None = None) -> Decision:
    """Is the candidate slower than the baseline by more than `tolerance` (0.05 = 5 %)?

    candidate[i] and baseline[i] were measured in the same round (interleaved). `keep` marks
    rounds to use (False: a round the runner flagged as contended); at least one must remain.
    """
    if len(candidate) != len(baseline):
        raise ValueError(f"{len(candidate)} candidate rounds but {len(baseline)} baseline rounds")
    rounds = list(zip(candidate, baseline, strict=True))
    if keep is not None:
        rounds = [r for r, k in zip(rounds, keep, strict=True) if k]
    ratios = sorted(c / b for c, b in rounds if b > 0 and c > 0 and math.isfinite(c / b))
    if not ratios:
        raise ValueError("no usable round (every baseline or candidate time is missing or zero)")
    n = len(ratios)
    lo, hi, coverage = median_interval_ranks(n, confidence)
    mid = n // 2
    estimate = ratios[mid] if n % 2 else 0.5 * (ratios[mid - 1] + ratios[mid])
    limit = 1.0 + tolerance
    return Decision(estimate, ratios[lo], ratios[hi], limit, coverage, n,
                    _verdict(ratios[lo], ratios[hi], limit, coverage, confidence),
                    "median of per-round ratios, sign-test interval")


# ------------------------------------------------------------------ top-1 (McNemar)
def _clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Exact binomial interval for p from k successes in n trials (bisection on the CDF)."""
    alpha = 1.0 - confidence

    def solve(f: Any) -> float:  # f increasing in p on [0, 1]
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if f(mid) < 0:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    low = 0.0 if k == 0 else solve(lambda p: (1.0 - binom_cdf(k - 1, n, p)) - alpha / 2)
    high = 1.0 if k == n else solve(lambda p: alpha / 2 - binom_cdf(k, n, p))
    return low, high


def mcnemar_p_value(losses: int, gains: int) -> float:
    """Two-sided exact McNemar p-value: are losses and gains equally likely?"""
    n = losses + gains
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * binom_cdf(min(losses, gains), n, 0.5))


def paired_top1_decision(baseline_correct: Sequence[bool], candidate_correct: Sequence[bool],
                         tolerance_points: float, confidence: float = DEFAULT_CONFIDENCE) -> Decision:
    """Has top-1 dropped by more than `tolerance_points` on the same images (McNemar's pairing)?

    The interval is for the drop in points, conditional on the number of discordant images:
    the drop is (2p - 1) (b + c) / n with p = P(a discordant image is a loss).
    """
    if len(baseline_correct) != len(candidate_correct):
        raise ValueError(f"{len(baseline_correct)} baseline images but {len(candidate_correct)} candidate images")
    n = len(baseline_correct)
    if n == 0:
        raise ValueError("no images")
    losses = sum(1 for b, c in zip(baseline_correct, candidate_correct, strict=True) if b and not c)
    gains = sum(1 for b, c in zip(baseline_correct, candidate_correct, strict=True) if c and not b)
    d = losses + gains
    scale = 100.0 * d / n
    estimate = 100.0 * (losses - gains) / n
    if d == 0:  # identical correctness on every image: the drop is exactly 0
        low = high = 0.0
    else:
        p_lo, p_hi = _clopper_pearson(losses, d, confidence)
        low, high = (2 * p_lo - 1) * scale, (2 * p_hi - 1) * scale
    return Decision(estimate, low, high, tolerance_points, confidence, n,
                    _verdict(low, high, tolerance_points, confidence, confidence),
                    f"McNemar pairing ({losses} lost, {gains} gained, p={mcnemar_p_value(losses, gains):.3g})")
