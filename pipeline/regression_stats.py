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
tell); what an inconclusive result does to the run is the caller's policy. interleaved_rounds
drives the latency rounds sequentially (more rounds while undecided, within a time budget)
through a measuring function it is given; per-image correctness travels as packed bits.
No I/O of their own, no randomness: tests/test_regression_stats.py.
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Callable, Sequence
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


# ------------------------------------------------------------------ interleaved rounds (sequential)
CANDIDATE, BASELINE = "candidate", "baseline"
DEFAULT_MAX_ROUNDS = 40


RoundsFn = Callable[[int, int], list[dict[str, Any]]]
PAIR_CHUNK = 6  # rounds per runner run in paired mode: the first chunk already gives a 95 % interval
PAIR_MAX_ROUNDS = 200


def interleaved_rounds(measure: Callable[[str], tuple[Any, ...]], tolerance: float | None,
                       budget_s: float, min_rounds: int | None = None, max_rounds: int = DEFAULT_MAX_ROUNDS,
                       confidence: float = DEFAULT_CONFIDENCE,
                       clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Measure baseline and candidate alternately, one side per call, until the rule decides.

    `measure(side)` times one side ("candidate" or "baseline") once and returns (p50 ms,
    contended) or (p50 ms, contended, details); details (e.g. the runner's CPU share) are kept
    per round in `sides`, so the rounds can be re-examined later. The order alternates every
    round (C B, B C, C B ...) so a drift within a round, or a first-run effect, cannot favour
    one side. This is the form for artifacts that cannot share one runner process
    (deploy_targets.measure_pair.pairing_blocker); every other target times whole rounds in one runner
    process, here or over SSH (`paired_rounds`). Stopping: see `_sequential`.
    """
    def one_round(count: int, start: int) -> list[dict[str, Any]]:
        order = (CANDIDATE, BASELINE) if start % 2 == 0 else (BASELINE, CANDIDATE)
        record: dict[str, Any] = {"index": start, "first": order[0]}
        for side in order:
            p50, busy, *more = measure(side)
            record[side] = dict(more[0] if more else {}, p50_ms=float(p50), contended=bool(busy))
        return [record]

    return _sequential(one_round, 1, tolerance, budget_s, min_rounds, max_rounds, confidence, clock)


def paired_rounds(rounds_fn: RoundsFn, tolerance: float | None, budget_s: float,
                  min_rounds: int | None = None, max_rounds: int = PAIR_MAX_ROUNDS,
                  confidence: float = DEFAULT_CONFIDENCE, chunk: int = PAIR_CHUNK,
                  clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """The same sequential rule on rounds timed `chunk` at a time in one process.

    `rounds_fn(count, start)` returns `count` rounds numbered from `start` in the runner's
    pairing format ({"first", "candidate": {p50_ms, contended, cpu_share, others_cpu, ...},
    "baseline": {...}}; deploy_targets.measure_pair). One runner run per chunk instead of one
    per side: many more rounds fit the budget, so the interval narrows to what the noise allows.
    """
    return _sequential(rounds_fn, max(1, chunk), tolerance, budget_s, min_rounds, max_rounds, confidence, clock)


def _sequential(next_rounds: RoundsFn, chunk: int, tolerance: float | None, budget_s: float,
                min_rounds: int | None, max_rounds: int, confidence: float,
                clock: Callable[[], float]) -> dict[str, Any]:
    """At least `min_rounds` usable rounds are sought (default: the fewest that give a
    `confidence` interval); after that rounds are added only while the verdict against
    `tolerance` is INCONCLUSIVE, and none once `budget_s` seconds of measuring are spent or
    `max_rounds` rounds were measured. A contended round is recorded with kept=False and does
    not count: another is measured instead, within the same budget: `paired_usable`'s judgement
    of the two sides (the runner's own flag on either side where it gave no CPU numbers); the
    sides' details are kept in `sides` where the runner gave more than that flag. With `tolerance` None there is nothing to decide and the first `min_rounds`
    usable rounds end it.

    Repeated looks at the interval raise its error rates a little above the one-look 2.5 % per
    side; bench/latency_gate_power.py measures the resulting rates on real runs.
    """
    need = min_rounds or rounds_needed(confidence)
    start = clock()
    cand: list[float] = []
    base: list[float] = []
    kept: list[bool] = []
    first: list[str] = []
    sides: list[dict[str, Any]] = []
    stopped = ""
    while not stopped:
        count = min(chunk, max_rounds - len(kept))
        if chunk > 1 and sum(kept) < need:  # first chunks: at least what the interval needs
            count = min(max(count, need - sum(kept)), max_rounds - len(kept))
        for rec in next_rounds(count, len(kept)):
            c, b = rec[CANDIDATE], rec[BASELINE]
            cand.append(float(c["p50_ms"]))
            base.append(float(b["p50_ms"]))
            first.append(rec["first"])
            details = {side: {k: v for k, v in rec[side].items() if k != "p50_ms"}
                       for side in (rec["first"], BASELINE if rec["first"] == CANDIDATE else CANDIDATE)}
            if any(set(d) - {"contended"} for d in details.values()):  # more than the runner's flag
                sides.append(details)
            kept.append(paired_usable(c, b))
        usable = sum(kept)
        if usable >= need:
            if tolerance is None:
                stopped = "rounds"
            elif paired_ratio_decision(cand, base, tolerance, confidence, kept).verdict != INCONCLUSIVE:
                stopped = "decided"
        if not stopped and len(kept) >= max_rounds:
            stopped = "max_rounds"
        if not stopped and clock() - start >= budget_s and len(kept) >= need:
            stopped = "budget"
    return {"rounds": len(kept), "candidate_p50_ms": cand, "baseline_p50_ms": base, "kept": kept,
            "first": first, **({"sides": sides} if sides else {}), "stopped": stopped,
            "seconds": round(clock() - start, 3), "budget_s": budget_s, "tolerance": tolerance}


# ------------------------------------------------------------------ per-image correctness
PER_IMAGE_ENCODING = "packbits-base64"


def encode_correct(correct: Sequence[bool]) -> str:
    """Per-image correctness as base64 of its bits (numpy packbits order): 10,000 images ~ 1.7 kB."""
    import numpy as np

    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode("ascii")


def decode_correct(text: str, n: int) -> list[bool]:
    """The inverse of encode_correct; ValueError when `text` cannot hold `n` images."""
    import numpy as np

    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError(f"not base64 ({exc})") from None
    if n < 0 or len(raw) != (n + 7) // 8:
        raise ValueError(f"{len(raw)} bytes cannot hold exactly {n} images")
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:n].astype(bool).tolist()


PAIR_MIN_CPU_SHARE = 0.9  # = the runner's Protocol.min_cpu_share
PAIR_MAX_OTHERS_GAP = 0.5  # cores


def paired_usable(cand: dict[str, Any], base: dict[str, Any]) -> bool:
    """Can this round's ratio be trusted? Both sides must have had their core (the runner's CPU
    share at least 0.9: not preempted), and the rest of the machine must have been about as busy
    during one side as during the other (other processes' load within half a core).

    Since runner version 5 a paired round in one process interleaves the two sides in short
    blocks (dskd_runner/pairing.py), so both sides' `others_cpu` cover the same second of machine
    state and the half-core test rarely fires there (it still catches a neighbour that happened
    to load only one side's blocks). It is kept because the same rule judges the rounds of
    artifacts that still take one runner run per side (`interleaved_rounds`: measure_pair.pairing_blocker),
    where it is what catches a neighbour that started or stopped between the two sides. The CPU-share test keeps its
    meaning in both forms: a side that did not get its core has inflated, bimodal call times
    whose median is not a stable basis for a ratio.

    The runner's own `contended` flag also fires when other processes merely keep another core
    busy (more than 0.2 cores), which inflates an absolute latency; a ratio of two sides measured
    beside the same steady neighbour is not inflated by it, so a round is kept then. Missing
    numbers (a runner that does not report them) fall back to the runner's flag. A round neither
    side of which the runner flagged is always kept (GPU runtimes: the flag never fires, their
    CPU share says nothing).
    """
    if not (cand.get("contended") or base.get("contended")):
        return True
    try:
        shares = [float(cand["cpu_share"]), float(base["cpu_share"])]
        others = [float(cand["others_cpu"]), float(base["others_cpu"])]
    except (KeyError, TypeError, ValueError):
        return False
    return min(shares) >= PAIR_MIN_CPU_SHARE and abs(others[0] - others[1]) <= PAIR_MAX_OTHERS_GAP


def side_details(m: Any) -> dict[str, Any]:
    """What a round keeps of one side's runner measurement (deploy_targets.measure.Measurement):
    how much of a core the runner got and how busy the other processes kept the machine."""
    e = min(m.latency, key=lambda e: e["batch_size"])
    return {k: e.get(k) for k in ("cpu_share", "others_cpu", "attempts", "contended")}


ROUND_MAX_ITERS = 100
ROUND_MAX_SECONDS = 0.5


def round_protocol(min_iters: int, min_seconds: float) -> dict[str, Any]:
    """The timing of one side of an A/B round: the recipe's, capped at 100 calls and 0.5 s.

    The paired interval narrows with the number of rounds, and a round's ratio varies with the
    machine's state far more than with the sampling error of a p50 over 100 calls, so within
    a time budget many short rounds decide sooner than a few long ones: with a fresh runner per
    side and the default 2 s protocol a 60 s budget held only about 6 rounds, where the 95 %
    interval is the whole min..max range (it first drops an extreme at 9 rounds). The recipe's
    warm-up is kept (paired rounds in one process warm once, then a tenth of it per side).
    """
    return {"min_iters": min(int(min_iters), ROUND_MAX_ITERS), "min_seconds": min(float(min_seconds), ROUND_MAX_SECONDS)}
