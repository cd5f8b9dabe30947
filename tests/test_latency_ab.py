"""Paired A/B latency rounds in one runner process (issue 18): runner --pair-with, measure_pair,
regression_stats.paired_rounds and pipeline.latency_ab, with real ONNX Runtime sessions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from deploy_targets import Protocol
from deploy_targets.measure_pair import can_pair, measure_pair
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
        for side in ("candidate", "baseline"):
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
    with pytest.raises(UserError, match="local targets"):
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
