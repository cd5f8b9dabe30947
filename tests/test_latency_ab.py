"""Paired A/B latency rounds in one runner process (issue 18): runner --pair-with, measure_pair,
regression_stats.paired_rounds and pipeline.latency_ab, with real ONNX Runtime sessions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from deploy_targets import Protocol
from deploy_targets.measure_pair import can_pair, measure_pair
from deploy_targets.remote import runner
from deploy_targets.remote.dskd_runner import pairing
from deploy_targets.remote.dskd_runner.timing import (
    Timing,
    measure_latency,
    merge_timings,
    time_block,
)
from dskd.errors import UserError
from pipeline import regression_stats as rs
from pipeline.latency_ab import interleaved_ab
from tests.helpers.artifacts import build_tiny_artifacts, run_runner_cli

QUICK = Protocol(warmup_seconds=0.05, min_iters=5, min_seconds=0.01)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("pair")
    arts = build_tiny_artifacts(root, quantized=False)
    copy = root / "copy" / "tiny.onnx"  # same file name in another folder, as a baseline run has
    copy.parent.mkdir()
    shutil.copy(arts["onnx"], copy)
    return {**arts, "copy": copy}


def test_runner_times_paired_rounds_alternating_from_the_given_index(tiny: dict, tmp_path: Path):
    out = tmp_path / "r.json"
    res = run_runner_cli(["--artifact", str(tiny["onnx"]), "--runtime", "onnxruntime", "--pair-with",
                          str(tiny["copy"]), "--pair-rounds", "3", "--pair-start", "5",
                          "--protocol", json.dumps(QUICK.to_dict()), "--out", str(out)])
    assert res.returncode == 0, res.stderr
    rec = json.loads(out.read_text())
    rounds = rec["pair"]["rounds"]
    assert [r["index"] for r in rounds] == [5, 6, 7]
    assert [r["first"] for r in rounds] == ["baseline", "candidate", "baseline"]  # odd index: B C
    for r in rounds:
        assert set(r) == {"index", "first", "candidate", "baseline"}
        for side in ("candidate", "baseline"):
            assert set(r[side]) == set(pairing.SIDE_KEYS)  # the keys the host reads, unchanged
            assert r[side]["p50_ms"] > 0 and 0 <= r[side]["cpu_share"] and isinstance(r[side]["contended"], bool)
    assert rec["pair"]["baseline_sha256"] == rec["artifact_sha256"]  # a byte-identical copy
    assert rec["latency"][0]["batch_size"] == 1 and rec["accuracy"] is None


@pytest.mark.parametrize("extra", [["--pair-rounds", "0"], ["--pair-rounds", "2", "--pair-start", "-1"]])
def test_runner_refuses_bad_pair_counts(tiny: dict, tmp_path: Path, extra: list[str]):
    res = run_runner_cli(["--artifact", str(tiny["onnx"]), "--runtime", "onnxruntime", "--pair-with",
                          str(tiny["copy"]), *extra, "--out", str(tmp_path / "r.json")])
    assert res.returncode == 2 and "runner-error:" in res.stderr and "--pair-rounds" in res.stderr


def test_runner_names_a_missing_baseline(tiny: dict, tmp_path: Path):
    res = run_runner_cli(["--artifact", str(tiny["onnx"]), "--runtime", "onnxruntime", "--pair-with",
                          str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "r.json")])
    assert res.returncode == 4 and "nope.onnx" in res.stderr


def test_measure_pair_checks_the_target_and_returns_the_rounds(tiny: dict):
    rounds = measure_pair(tiny["onnx"], tiny["copy"], "cpu", rounds=2, protocol=QUICK)
    assert [r["first"] for r in rounds] == ["candidate", "baseline"]
    assert can_pair("cpu") and can_pair("intel-cpu") and not can_pair("jetson-orin")
    with pytest.raises(UserError, match="pass --device"):
        measure_pair(tiny["onnx"], tiny["copy"], "jetson-orin", rounds=2)
    with pytest.raises(UserError, match="at least 1 round"):
        measure_pair(tiny["onnx"], tiny["copy"], "cpu", rounds=0)


def test_interleaved_ab_pairs_local_targets_in_chunks(tiny: dict):
    rec = interleaved_ab(tiny["onnx"], tiny["copy"], "cpu", "fp32", QUICK, 10.0, 0.0)
    assert rec["mode"] == "paired in one runner process"
    assert rec["rounds"] >= rs.rounds_needed() and len(rec["first"]) == rec["rounds"]
    assert rec["first"][:2] == ["candidate", "baseline"]
    if sum(rec["kept"]) >= rs.rounds_needed():  # a byte-identical copy: far inside an 11x limit
        assert rec["stopped"] == "decided"


def test_interleaved_ab_needs_a_side_measurer_for_device_targets(tiny: dict):
    with pytest.raises(ValueError, match="measure_side"):
        interleaved_ab(tiny["onnx"], tiny["copy"], "jetson-orin", "fp16", QUICK, 0.05, 60.0)


class _Chunks:
    """rounds_fn serving precomputed ratios; records each call's (count, start)."""

    def __init__(self, ratios: list[float], contended: set[int] = frozenset()) -> None:
        self.ratios, self.contended, self.calls = ratios, contended, []

    def __call__(self, count: int, start: int) -> list[dict]:
        self.calls.append((count, start))
        out = []
        for i in range(start, start + count):
            busy = i in self.contended
            side = {"cpu_share": 0.3 if busy else 1.0, "others_cpu": 0.0, "contended": busy}
            out.append({"index": i, "first": "candidate" if i % 2 == 0 else "baseline",
                        "candidate": {**side, "p50_ms": self.ratios[i % len(self.ratios)]},
                        "baseline": {**side, "p50_ms": 1.0}})
        return out


def test_paired_rounds_ask_for_chunks_numbered_on_until_decided():
    clock = iter(range(1000))
    feed = _Chunks([1.0, 1.01, 0.99, 1.0, 1.02, 0.98], contended={1})
    rec = rs.paired_rounds(feed, 0.05, 1e9, chunk=4, clock=lambda: float(next(clock)))
    # first call: the 6 rounds an interval needs; round 1 was contended, so one more chunk
    assert feed.calls == [(6, 0), (4, 6)]
    assert rec["stopped"] == "decided" and rec["rounds"] == 10 and rec["kept"][1] is False
    assert rec["first"][:3] == ["candidate", "baseline", "candidate"]
    assert len(rec["sides"]) == 10


def test_paired_rounds_stop_at_the_budget_when_undecided():
    ticks = iter(range(0, 10000, 10))
    feed = _Chunks([0.9, 1.2])  # straddles 1.05 forever
    rec = rs.paired_rounds(feed, 0.05, 35.0, chunk=6, clock=lambda: float(next(ticks)))
    assert rec["stopped"] == "budget" and rec["rounds"] % 6 == 0
    d = rs.paired_ratio_decision(rec["candidate_p50_ms"], rec["baseline_p50_ms"], 0.05, keep=rec["kept"])
    assert d.verdict == rs.INCONCLUSIVE


# ------------------------------------------------------------------ blocks inside a round (runner v5)
def test_blocks_alternate_x_y_y_x_and_are_balanced():
    c, b = pairing.CANDIDATE, pairing.BASELINE
    assert pairing.block_sides(c, 8) == [c, b, b, c, c, b, b, c]
    assert pairing.block_sides(b, 4) == [b, c, c, b]
    for first in (c, b):
        sides = pairing.block_sides(first, 4 * 5)
        pos = {s: [j for j, x in enumerate(sides) if x == s] for s in (c, b)}
        assert len(pos[c]) == len(pos[b]) and sum(pos[c]) == sum(pos[b])  # a linear drift cancels


def test_block_size_follows_the_protocol_not_one_model():
    short = Protocol(min_iters=50, min_seconds=0.5)  # the gate's round protocol (round_protocol)
    assert pairing.block_calls(2.5, short) == 10  # 25 ms blocks for a 2.5 ms model
    for ms in (0.5, 2.5, 7.5):  # blocks last about min_seconds / BLOCKS_PER_SIDE at any speed
        block_ms = ms * pairing.block_calls(ms, short)
        assert 0.5 * 25 <= block_ms <= 1.5 * 25
    assert pairing.block_calls(100.0, short) == 3  # slow model: min_iters spread over the blocks
    assert pairing.block_calls(0.01, QUICK) >= pairing.MIN_BLOCK_CALLS
    assert pairing.block_calls(1000.0, QUICK) == pairing.MIN_BLOCK_CALLS


def test_a_block_times_its_calls_after_one_untimed_rewarm():
    calls: list[int] = []
    block = time_block(lambda: calls.append(1), 4)
    assert len(calls) == 5 and len(block.wall_ms) == 4 and block.span_s > 0 and block.own_s >= 0


def test_merged_blocks_share_cpu_over_the_summed_spans():
    one = Timing([1.0], [], False, 0.5, 1, 0.2, span_s=1.0, own_s=0.5, others_s=0.2)
    two = Timing([2.0, 3.0], [], False, 1.0, 2, 0.0, span_s=3.0, own_s=3.0, others_s=0.0)
    m = merge_timings([one, two])
    assert m.wall_ms == [1.0, 2.0, 3.0] and m.span_s == 4.0 and m.preemptions == 3
    assert m.cpu_share == 0.875 and m.others_cpu == 0.05  # not the mean of the blocks' shares
    unknown = Timing([1.0], [], False, 1.0, None, None, span_s=1.0, own_s=1.0, others_s=None)
    m = merge_timings([one, unknown])
    assert m.others_cpu is None and m.preemptions is None  # unknown stays unknown


def _conv_stack(path: Path, layers: int) -> Path:
    """An ONNX model whose work grows with `layers` (3x3 convs, 32 channels, 16x16 input)."""
    import warnings

    import torch
    from torch import nn

    torch.manual_seed(layers)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1),
                        *[nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()) for _ in range(layers)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.zeros(1, 3, 16, 16),), str(path), input_names=["input"],
                          output_names=["out"], dynamo=False, opset_version=17)
    return path


class _Logged:
    """A real backend whose calls are logged by side (to check the block order), nothing faked."""

    def __init__(self, inner: object, side: str, log: list[str]) -> None:
        self.inner, self.side, self.log = inner, side, log
        self.name, self.timer = inner.name, inner.timer

    def prepare(self, batch: object) -> None:
        self.inner.prepare(batch)

    def timed_step(self, batch: object) -> float | None:
        self.log.append(self.side)
        return self.inner.timed_step(batch)

    def run_config(self) -> dict:
        return self.inner.run_config()


@pytest.fixture(scope="module")
def light_heavy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import numpy as np

    root = tmp_path_factory.mktemp("blocks")
    light = runner.load_backend("onnxruntime", str(_conv_stack(root / "light.onnx", 2)), "fp32", 1)
    heavy = runner.load_backend("onnxruntime", str(_conv_stack(root / "heavy.onnx", 6)), "fp32", 1)
    images = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    return {"light": light, "heavy": heavy, "images": images}


PAIR = Protocol(warmup_seconds=0.05, min_iters=20, min_seconds=0.05)


def test_a_round_interleaves_blocks_of_both_sides_in_the_same_number(light_heavy: dict, monkeypatch):
    log: list[str] = []
    blocks: list[tuple[set[str], int, int]] = []  # (sides called, calls, timed calls) per block
    real_block = pairing.time_block

    def spy(step, calls: int, slowdown: float = 0.0) -> Timing:
        n = len(log)
        t = real_block(step, calls, slowdown)
        blocks.append((set(log[n:]), len(log) - n, len(t.wall_ms)))
        return t

    monkeypatch.setattr(pairing, "time_block", spy)
    cand = _Logged(light_heavy["heavy"], pairing.CANDIDATE, log)
    base = _Logged(light_heavy["light"], pairing.BASELINE, log)
    for start, first in ((1, pairing.BASELINE), (2, pairing.CANDIDATE)):  # the round's first side leads
        blocks.clear()
        pairing.pair_rounds(cand, base, light_heavy["images"], PAIR, 1, start=start)
        assert all(len(sides) == 1 and calls == timed + 1 for sides, calls, timed in blocks)  # 1 re-warm each
        sides = [next(iter(s)) for s, _, _ in blocks]
        assert sides == pairing.block_sides(first, len(sides)) and len(sides) % 4 == 0  # X Y Y X, whole groups
        assert sides.count(pairing.CANDIDATE) == sides.count(pairing.BASELINE) >= 2
    for side in (pairing.CANDIDATE, pairing.BASELINE):  # one block size per side, the heavy one's no larger
        assert len({t for (s, _, t) in blocks if s == {side}}) == 1
    heavy_k = next(t for (s, _, t) in blocks if s == {pairing.CANDIDATE})
    light_k = next(t for (s, _, t) in blocks if s == {pairing.BASELINE})
    assert heavy_k <= light_k


def test_each_side_is_timed_from_its_own_calls(light_heavy: dict):
    light, heavy, images = light_heavy["light"], light_heavy["heavy"], light_heavy["images"]
    solo = {name: measure_latency(b, images, 1, PAIR)["p50_ms"] for name, b in (("light", light), ("heavy", heavy))}
    rounds = pairing.pair_rounds(heavy, light, images, PAIR, 3)
    ratios = sorted(r["candidate"]["p50_ms"] / r["baseline"]["p50_ms"] for r in rounds)
    assert ratios[1] > 1.5  # ~3x the work: blocks of the light model do not dilute the heavy one
    for side, name in ((pairing.CANDIDATE, "heavy"), (pairing.BASELINE, "light")):
        p50 = sorted(r[side]["p50_ms"] for r in rounds)[1]
        assert solo[name] / 3 < p50 < solo[name] * 3  # loose: the machine is shared
        assert all(set(r[side]) == set(pairing.SIDE_KEYS) and r[side]["cpu_share"] > 0 for r in rounds)


def test_a_model_against_itself_gives_ratios_near_one(light_heavy: dict):
    rounds = pairing.pair_rounds(light_heavy["heavy"], light_heavy["heavy"], light_heavy["images"], PAIR, 5)
    ratios = sorted(r["candidate"]["p50_ms"] / r["baseline"]["p50_ms"] for r in rounds)
    assert 0.7 < ratios[2] < 1.4  # the median of 5 rounds; loose, no timing tightness
