"""pipeline.regression_stats: exact helpers against scipy, and the decision rules' error rates
checked by simulation (seeded, so the counts are fixed; the bounds are what the rule promises)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.regression_stats import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    binom_cdf,
    mcnemar_p_value,
    median_interval_ranks,
    paired_ratio_decision,
    paired_top1_decision,
    rounds_needed,
)

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("k, n, p", [(0, 1, 0.5), (3, 10, 0.5), (40, 90, 0.5), (4990, 10000, 0.5),
                                     (2, 30, 0.01), (29, 30, 0.99), (7, 20, 0.37)])
def test_binom_cdf_matches_scipy(k: int, n: int, p: float):
    assert binom_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("losses, gains", [(0, 0), (5, 0), (60, 30), (30, 60), (1530, 1500), (1, 1)])
def test_mcnemar_p_value_matches_scipy(losses: int, gains: int):
    expected = 1.0 if losses + gains == 0 else stats.binomtest(losses, losses + gains, 0.5).pvalue
    assert mcnemar_p_value(losses, gains) == pytest.approx(expected, rel=1e-9)


def test_median_interval_ranks_and_rounds_needed():
    assert median_interval_ranks(3) == (0, 2, 0.75)
    assert median_interval_ranks(6) == (0, 5, pytest.approx(1 - 2 / 64))
    lo, hi, cov = median_interval_ranks(10)
    assert (lo, hi) == (1, 8) and cov == pytest.approx(1 - 2 * 11 / 1024)
    assert rounds_needed(0.95) == 6 and rounds_needed(0.99) == 8


def test_too_few_rounds_is_inconclusive_even_when_the_ratio_is_large():
    d = paired_ratio_decision([2.0, 2.1, 1.9], [1.0, 1.0, 1.0], tolerance=0.05)
    assert d.verdict == INCONCLUSIVE and d.coverage == 0.75  # 3 rounds cannot give a 95 % interval
    d = paired_ratio_decision([2.0, 2.1, 1.9, 2.0, 2.05, 1.95], [1.0] * 6, tolerance=0.05)
    assert d.verdict == FAIL and d.low == pytest.approx(1.9) and d.estimate == pytest.approx(2.0)


def test_contended_rounds_can_be_left_out():
    cand = [1.00, 1.01, 0.99, 1.00, 1.02, 0.98, 9.0]
    base = [1.00, 1.00, 1.00, 1.00, 1.00, 1.00, 1.0]
    assert paired_ratio_decision(cand, base, 0.05).high == pytest.approx(9.0)
    kept = paired_ratio_decision(cand, base, 0.05, keep=[True] * 6 + [False])
    assert kept.verdict == PASS and kept.samples == 6 and kept.high == pytest.approx(1.02)
    with pytest.raises(ValueError):
        paired_ratio_decision([1.0], [1.0, 2.0], 0.05)


def _rounds(rng: np.random.Generator, n: int, slowdown: float) -> tuple[list[float], list[float]]:
    """A shared noisy machine: a per-round machine state hits both sides of the round, each
    measurement adds its own noise, and 1 round in 10 one side is contended (2x-3x)."""
    state = rng.lognormal(0.0, 0.15, n)
    base = state * rng.lognormal(0.0, 0.03, n)
    cand = state * (1 + slowdown) * rng.lognormal(0.0, 0.03, n)
    hit = rng.random(n) < 0.1
    side = rng.random(n) < 0.5
    factor = rng.uniform(2, 3, n)
    base = np.where(hit & side, base * factor, base)
    cand = np.where(hit & ~side, cand * factor, cand)
    return cand.tolist(), base.tolist()


def _verdicts(seed: int, rounds: int, slowdown: float, trials: int = 400, tol: float = 0.05) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    out = [paired_ratio_decision(*_rounds(rng, rounds, slowdown), tol).verdict for _ in range(trials)]
    return {v: out.count(v) for v in (PASS, FAIL, INCONCLUSIVE)}


def test_latency_rule_false_alarms_and_power_by_simulation():
    """Tolerance 5 %: an unchanged artifact is never failed; more rounds turn "inconclusive"
    into decisions; real slowdowns are never passed."""
    for rounds in (6, 10, 30):
        assert _verdicts(0, rounds, 0.0)[FAIL] <= 0.025 * 400  # one-sided error of a >= 95 % interval
    assert _verdicts(0, 6, 0.0)[INCONCLUSIVE] > _verdicts(0, 30, 0.0)[INCONCLUSIVE]
    assert _verdicts(0, 30, 0.0)[PASS] >= 0.95 * 400
    for rounds, slowdown, caught in ((20, 0.15, 0.95), (30, 0.10, 0.9)):
        v = _verdicts(1, rounds, slowdown)
        assert v[PASS] == 0 and v[FAIL] >= caught * 400, (rounds, slowdown, v)


def test_top1_rule_on_10000_images():
    n = 10_000

    def outcome(losses: int, gains: int) -> tuple[list[bool], list[bool]]:
        base = [True] * n
        cand = [True] * n
        for i in range(losses):
            cand[i] = False
        for i in range(losses, losses + gains):
            base[i] = False
        return base, cand

    # 0.3 points lost with little churn: clearly a drop (p ~ 0.002) ...
    d = paired_top1_decision(*outcome(60, 30), tolerance_points=0.0)
    assert d.estimate == pytest.approx(0.3) and d.low > 0 and d.verdict == FAIL
    # ... and clearly within a 0.5-point tolerance
    assert paired_top1_decision(*outcome(60, 30), tolerance_points=0.5).verdict == PASS
    # the same 0.3 points amid heavy churn: not evidence of anything
    churn = paired_top1_decision(*outcome(1530, 1500), tolerance_points=0.0)
    assert churn.estimate == pytest.approx(0.3) and churn.low < 0 < churn.high and churn.verdict == INCONCLUSIVE
    same = paired_top1_decision(*outcome(0, 0), tolerance_points=0.0)
    assert (same.estimate, same.low, same.high, same.verdict) == (0.0, 0.0, 0.0, PASS)


def test_top1_rule_false_alarms_by_simulation():
    """A/A: the two models differ on random images, each difference equally likely either way."""
    rng = np.random.default_rng(1)
    n, trials, fails = 2000, 300, 0
    for _ in range(trials):
        # per image: 2 % lost, 2 % gained, else the same answer (both right 88 %, both wrong 8 %),
        # so both models are 90 % accurate and differ on 4 % of the images
        u = rng.random(n)
        base = (u < 0.02) | (u >= 0.12)
        cand = ((u >= 0.02) & (u < 0.04)) | (u >= 0.12)
        fails += paired_top1_decision(base.tolist(), cand.tolist(), tolerance_points=0.0).verdict == FAIL
    assert fails <= 0.05 * trials


def _report_with_rounds(cand: list[float], base: list[float], kept: list[bool] | None = None) -> dict:
    art = {"format": "onnx", "precision": "fp32", "runtime": "onnxruntime", "shipped": True, "measured": True,
           "top1": 90.0, "latency_ms": {"p50": cand[0]}, "size_bytes": 1000,
           "baseline_comparison": {"ratio": 1.0, "rounds": len(cand), "candidate_p50_ms": cand,
                                   "baseline_p50_ms": base, **({"kept": kept} if kept else {})}}
    return {"artifacts": [art], "student": {"top1": 90.0}, "target": {"name": "cpu"}}


@pytest.mark.parametrize("cand, policy, status, passed", [
    ([1.00, 1.01, 0.99, 1.00, 1.02, 0.98], "fail", "PASS", True),          # within 5 %, surely
    ([1.30, 1.28, 1.35, 1.31, 1.29, 1.33], "fail", "FAIL", False),         # 30 % slower, surely
    ([1.00, 1.10, 0.98, 1.08, 1.02, 1.06], "fail", "INCONCLUSIVE", False),  # straddles 1.05
    ([1.00, 1.10, 0.98, 1.08, 1.02, 1.06], "pass", "INCONCLUSIVE", True),
])
def test_latency_regression_gate_uses_the_paired_rule(cand: list[float], policy: str, status: str, passed: bool):
    from pipeline.gates import evaluate_gates, junit_xml
    from pipeline.recipe import load_recipe

    gates = load_recipe("digits-smoke", {"gates.max_latency_regression": 0.05,
                                         "gates.regression_inconclusive": policy}).gates
    baseline = {"artifacts": [{"format": "onnx", "precision": "fp32", "runtime": "onnxruntime", "top1": 90.0}]}
    rows = evaluate_gates(_report_with_rounds(cand, [1.0] * 6), gates, baseline)
    row = next(r for r in rows if r.name == "max_latency_regression")
    assert (row.status, row.passed) == (status, passed)
    assert row.decision["low"] <= row.value <= row.decision["high"] and row.threshold == pytest.approx(1.05)
    assert "interval" in row.note and ("regression_inconclusive" in row.note) == (status == "INCONCLUSIVE")
    assert ("<failure" in junit_xml([row])) == (not passed)


def test_latency_regression_gate_leaves_out_contended_rounds():
    from pipeline.gates import evaluate_gates
    from pipeline.recipe import load_recipe

    gates = load_recipe("digits-smoke", {"gates.max_latency_regression": 0.05}).gates
    baseline = {"artifacts": [{"format": "onnx", "precision": "fp32", "runtime": "onnxruntime", "top1": 90.0}]}
    cand = [1.0, 1.01, 0.99, 3.0, 1.0, 1.02, 0.98]
    rows = evaluate_gates(_report_with_rounds(cand, [1.0] * 7, [True, True, True, False, True, True, True]),
                          gates, baseline)
    row = next(r for r in rows if r.name == "max_latency_regression")
    assert row.status == "PASS" and row.decision["samples"] == 6 and "1 contended round" in row.note


def test_latency_regression_gate_with_every_round_contended_is_inconclusive():
    from pipeline.gates import evaluate_gates
    from pipeline.recipe import load_recipe

    baseline = {"artifacts": [{"format": "onnx", "precision": "fp32", "runtime": "onnxruntime", "top1": 90.0}]}
    for policy, passed in (("fail", False), ("pass", True)):
        gates = load_recipe("digits-smoke", {"gates.max_latency_regression": 0.05,
                                             "gates.regression_inconclusive": policy}).gates
        rows = evaluate_gates(_report_with_rounds([2.0] * 6, [1.0] * 6, [False] * 6), gates, baseline)
        row = next(r for r in rows if r.name == "max_latency_regression")
        assert (row.status, row.passed, row.value) == ("INCONCLUSIVE", passed, None) and "contended" in row.note


# ------------------------------------------------------------------ sequential interleaved rounds
class _Machine:
    """A scripted measuring machine: p50 per side from a list of ratios, a clock that advances
    `step` seconds per measurement, and contention on the rounds listed in `busy`."""

    def __init__(self, ratios: list[float], step: float = 3.0, busy: tuple[int, ...] = ()) -> None:
        self.ratios, self.step, self.busy = ratios, step, busy
        self.now, self.calls = 0.0, []

    def clock(self) -> float:
        return self.now

    def measure(self, side: str) -> tuple[float, bool]:
        self.now += self.step
        self.calls.append(side)
        i = (len(self.calls) - 1) // 2
        ratio = self.ratios[min(i, len(self.ratios) - 1)]
        return (ratio if side == "candidate" else 1.0), i in self.busy


def _interleave(m: _Machine, tolerance: float | None, budget: float = 60.0, **kw):
    from pipeline.regression_stats import interleaved_rounds

    return interleaved_rounds(m.measure, tolerance, budget, clock=m.clock, **kw)


def test_interleaved_rounds_stop_as_soon_as_decided_and_alternate_the_order():
    m = _Machine([1.00, 1.01, 0.99, 1.00, 1.02, 0.98] * 10)
    rec = _interleave(m, 0.05)
    assert rec["stopped"] == "decided" and rec["rounds"] == 6 and all(rec["kept"])
    assert rec["first"] == ["candidate", "baseline"] * 3  # C B, B C, ...: no side always goes first
    assert m.calls[:4] == ["candidate", "baseline", "baseline", "candidate"]
    assert paired_ratio_decision(rec["candidate_p50_ms"], rec["baseline_p50_ms"], 0.05).verdict == PASS


def test_interleaved_rounds_add_rounds_while_inconclusive_until_the_budget():
    # one noisy round keeps 6 rounds' interval (min..max) above 1.05; later rounds narrow it
    m = _Machine([1.00, 1.12, 0.99, 1.01, 1.00, 1.02] + [1.00, 1.01, 0.99] * 20, step=3.0)
    rec = _interleave(m, 0.05, budget=600.0)
    assert rec["stopped"] == "decided" and rec["rounds"] > 6
    assert paired_ratio_decision(rec["candidate_p50_ms"], rec["baseline_p50_ms"], 0.05).verdict == PASS
    # the same machine with a budget of 6 rounds' time: stops undecided, never fewer than 6 rounds
    m = _Machine([1.00, 1.12, 0.99, 1.01, 1.00, 1.02] + [1.00, 1.01, 0.99] * 20, step=3.0)
    rec = _interleave(m, 0.05, budget=30.0)
    assert rec["stopped"] == "budget" and rec["rounds"] == 6
    m = _Machine([1.00, 1.12, 0.99, 1.01, 1.00, 1.02] + [1.00, 1.01, 0.99] * 20, step=0.0)
    assert _interleave(m, 0.05, max_rounds=8)["stopped"] == "max_rounds"


def test_interleaved_rounds_measure_contended_rounds_again():
    m = _Machine([1.0] * 40, busy=(1, 3))
    rec = _interleave(m, 0.05)
    assert rec["rounds"] == 8 and sum(rec["kept"]) == 6 and rec["kept"][1] is False and rec["kept"][3] is False
    # every round contended: the budget ends it, and the gate must not guess
    m = _Machine([1.0] * 40, busy=tuple(range(40)))
    rec = _interleave(m, 0.05, budget=45.0)
    assert rec["stopped"] == "budget" and not any(rec["kept"]) and rec["rounds"] == 8


def test_interleaved_rounds_without_a_tolerance_stop_at_the_minimum():
    rec = _interleave(_Machine([1.3] * 40), None)
    assert rec["stopped"] == "rounds" and rec["rounds"] == rounds_needed()


def test_sequential_rule_error_rates_by_simulation():
    """Looking again after every round (up to 30): unchanged code is still never failed, a 20 %
    slowdown never passed, and undecided A/A runs mostly become decisions."""
    from pipeline.regression_stats import interleaved_rounds

    rng = np.random.default_rng(3)
    for slowdown, trials in ((0.0, 200), (0.20, 100)):
        verdicts = []
        for _ in range(trials):
            cand, base = _rounds(rng, 30, slowdown)
            rec = interleaved_rounds(_PairFeed(cand, base).measure, 0.05, 1e9, max_rounds=30)
            verdicts.append(paired_ratio_decision(rec["candidate_p50_ms"], rec["baseline_p50_ms"], 0.05).verdict)
        counts = {v: verdicts.count(v) for v in (PASS, FAIL, INCONCLUSIVE)}
        if slowdown == 0.0:
            assert counts[FAIL] == 0 and counts[PASS] >= 0.9 * trials, counts
        else:
            assert counts[PASS] == 0 and counts[FAIL] >= 0.9 * trials, counts


class _PairFeed:
    """Serves precomputed (candidate, baseline) rounds to interleaved_rounds, side by side."""

    def __init__(self, cand: list[float], base: list[float]) -> None:
        self.rounds = list(zip(cand, base, strict=True))
        self.seen: dict[str, int] = {"candidate": 0, "baseline": 0}

    def measure(self, side: str) -> tuple[float, bool]:
        i = self.seen[side]
        self.seen[side] += 1
        c, b = self.rounds[i]
        return (c if side == "candidate" else b), False


def test_per_image_bits_round_trip():
    from pipeline.regression_stats import decode_correct, encode_correct

    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 10_000):
        bits = (rng.random(n) < 0.9).tolist()
        text = encode_correct(bits)
        assert decode_correct(text, n) == bits
    assert len(encode_correct([True] * 10_000)) < 1700
    for bad, n in (("not base64!", 8), (encode_correct([True] * 9), 8), (encode_correct([True] * 8), 9)):
        with pytest.raises(ValueError):
            decode_correct(bad, n)


def test_interleaved_rounds_keep_what_the_runner_said_about_each_side():
    m = _Machine([1.0] * 40)

    def measure(side: str):
        p50, busy = m.measure(side)
        return p50, busy, {"cpu_share": 0.99 if side == "candidate" else 0.98}

    from pipeline.regression_stats import interleaved_rounds

    rec = interleaved_rounds(measure, 0.05, 60.0, clock=m.clock)
    assert len(rec["sides"]) == rec["rounds"] == 6
    assert rec["sides"][0] == {"candidate": {"cpu_share": 0.99, "contended": False},
                               "baseline": {"cpu_share": 0.98, "contended": False}}
    assert "sides" not in _interleave(_Machine([1.0] * 40), 0.05)


def test_round_protocol_caps_each_side_of_a_round():
    from pipeline.regression_stats import round_protocol

    assert round_protocol(200, 2.0) == {"min_iters": 100, "min_seconds": 0.5}
    assert round_protocol(10, 0.05) == {"min_iters": 10, "min_seconds": 0.05}  # a quicker recipe stays quick


def test_power_bench_writes_the_issues_schema():
    """bench/latency_gate_power.py's summary from recorded trials (no measuring here): counts of
    non-passing A/A trials (false alarms) and A/B trials (catches) per slowdown level."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "latency_gate_power.py"
    spec = importlib.util.spec_from_file_location("latency_gate_power", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def trial(cond: str, i: int, passed: bool, status: str) -> dict:
        return {"target": "cpu", "condition": cond, "trial": i, "passed": passed, "status": status,
                "estimate": 1.0, "rounds": 6, "kept": 6, "seconds": 30.0}

    state = {"trials": [trial("A/A", 0, True, "PASS"), trial("A/A", 1, False, "INCONCLUSIVE"),
                        trial("0.05", 0, False, "INCONCLUSIVE"), trial("0.05", 1, True, "PASS"),
                        trial("0.10", 0, False, "FAIL"), trial("0.10", 1, False, "FAIL"),
                        trial("0.20", 0, False, "FAIL")],
             "calibration": {"cpu": {"effects": {"0.05": {"slowdown": 0.051}, "0.10": {"slowdown": 0.098},
                                                 "0.20": {"slowdown": 0.21}}}}}
    out = bench.summarize(state, ["cpu"])["cpu"]
    assert out == {"trials": 1, "false_alarms": 1, "caught": {"0.05": 1, "0.10": 2, "0.20": 1},
                   "effect_measured": {"0.05": 0.051, "0.10": 0.098, "0.20": 0.21}, "seconds_per_decision": 30.0}
    assert bench.details(state, ["cpu"])["cpu"]["conditions"]["A/A"]["verdicts"] == {
        "PASS": 1, "FAIL": 0, "INCONCLUSIVE": 1}


@pytest.mark.parametrize("cand, base, usable", [
    ({"contended": False}, {"contended": False}, True),                      # quiet (or a GPU runtime)
    ({"contended": True, "cpu_share": 0.98, "others_cpu": 1.0},
     {"contended": True, "cpu_share": 0.97, "others_cpu": 1.1}, True),        # the same steady neighbour
    ({"contended": True, "cpu_share": 0.25, "others_cpu": 1.7},
     {"contended": True, "cpu_share": 0.24, "others_cpu": 1.7}, False),       # preempted: a quarter of a core
    ({"contended": False, "cpu_share": 0.99, "others_cpu": 0.1},
     {"contended": True, "cpu_share": 0.97, "others_cpu": 1.0}, False),       # a neighbour on one side only
    ({"contended": True}, {"contended": False}, False),                      # no numbers: the runner's flag
])
def test_which_rounds_the_paired_rule_keeps(cand: dict, base: dict, usable: bool):
    from pipeline.regression_stats import paired_usable

    assert paired_usable(cand, base) is usable


def test_rounds_beside_a_steady_neighbour_are_kept_and_preempted_ones_measured_again():
    from pipeline.regression_stats import interleaved_rounds

    m = _Machine([1.0] * 40)
    shares = iter([0.98] * 4 + [0.3] * 2 + [0.98] * 100)  # round 3 (both sides) was preempted

    def measure(side: str):
        p50, _ = m.measure(side)
        return p50, True, {"cpu_share": next(shares), "others_cpu": 1.0}  # the runner flags all

    rec = interleaved_rounds(measure, 0.05, 600.0, clock=m.clock)
    assert rec["kept"] == [True, True, False, True, True, True, True] and rec["stopped"] == "decided"
