"""TensorRT engines paired in one runner process: every backend's CUDA calls run in the device's
primary context, shared by all of them and made current once, and the host pairs engines unless
they are timed with trtexec.

Everything TensorRT here is a FAKE (tests/fakes/trt_runtime.py, no GPU on this machine): the FAKE
`pycuda.driver` keeps pycuda's context stack, records the current context of every call in `LOG`
and refuses, as CUDA does, a call with no current context or on an engine / stream / buffer made
in another context. These tests prove the runner's context discipline and the host's pairing
rule against that model, nothing about real TensorRT (the real-engine run stays skipped:
tests/test_targets_trtexec.py::test_real_tensorrt_engine).
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from deploy_targets import Protocol
from deploy_targets.measure_pair import can_pair, measure_pair, pairing_blocker
from deploy_targets.remote.dskd_runner import pairing
from deploy_targets.remote.dskd_runner.protocol import RunnerError
from dskd.errors import UserError
from tests.fakes.trt_runtime import write_fake_tensorrt_lib

FAKE_MODULES = ("tensorrt", "pycuda", "pycuda.driver", "pycuda.autoinit")
PRIMARY = "primary:0"  # the FAKE driver's handle of device 0's primary context
QUICK = Protocol(warmup_seconds=0.0, min_iters=4, min_seconds=0.0, contention_retries=0)


def _engine(path: Path, name: str, seed: int) -> tuple[Path, np.ndarray]:
    """A FAKE engine file (logits = GAP(x) @ w.T, input 3×8×8, max batch 4) tagged `name`."""
    w = np.random.default_rng(seed).standard_normal((4, 3)).astype(np.float32)
    path.write_text(json.dumps({"name": name, "w": w.tolist(), "chw": [3, 8, 8], "max_batch": 4}))
    return path, w


@pytest.fixture()
def fake_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The FAKE `pycuda.driver` (and FAKE `tensorrt`) imported fresh in this process, removed after."""
    lib = write_fake_tensorrt_lib(tmp_path / "lib")
    for name in FAKE_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(lib))
    cuda = importlib.import_module("pycuda.driver")
    from deploy_targets.remote.dskd_runner import backend_tensorrt

    backend_tensorrt._PRIMARY.clear()  # a fresh process's state: no primary context retained yet
    yield cuda
    backend_tensorrt._PRIMARY.clear()
    for name in FAKE_MODULES:
        sys.modules.pop(name, None)


@pytest.fixture()
def engines(tmp_path: Path) -> dict[str, tuple[Path, np.ndarray]]:
    return {"A": _engine(tmp_path / "a.fp16.engine", "A", 1), "B": _engine(tmp_path / "b.fp16.engine", "B", 2)}


def _backends(engines: dict) -> dict[str, Any]:
    """Backend A made first, then B (B's creation was what used to stay current)."""
    from deploy_targets.remote.dskd_runner.backend_tensorrt import TensorRtBackend

    return {name: TensorRtBackend(str(engines[name][0])) for name in ("A", "B")}


def _expected(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x.mean(axis=(2, 3)) @ w.T


def _executes(cuda: ModuleType) -> list[tuple[str, str | None]]:
    """(engine tag, current context) of every execute call the FAKE driver saw."""
    return [(tag, ctx) for op, ctx, tag in cuda.LOG if op == "execute_async_v3"]


def test_fake_cuda_refuses_an_engine_run_under_another_context(fake_cuda: ModuleType, engines: dict):
    """The FAKE's check has teeth: the old one-context-per-backend scheme (each made and left
    current at creation) runs the first engine under the second's context, and is refused."""
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    dev = fake_cuda.Device(0)
    dev.make_context()  # A's own context, left current
    exec_a = runtime.deserialize_cuda_engine(engines["A"][0].read_bytes()).create_execution_context()
    stream_a = fake_cuda.Stream()
    dev.make_context()  # B's own context: now current
    with pytest.raises(fake_cuda.LogicError, match="invalid resource handle"):
        exec_a.execute_async_v3(stream_a.handle)
    with pytest.raises(fake_cuda.LogicError, match="invalid resource handle"):
        stream_a.synchronize()
    fake_cuda.Context.pop()
    fake_cuda.Context.pop()
    with pytest.raises(fake_cuda.LogicError, match="no current context"):
        fake_cuda.mem_alloc(16)


def test_each_backend_runs_in_its_engines_context_in_pairing_order(fake_cuda: ModuleType, engines: dict):
    be = _backends(engines)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    try:
        fake_cuda.LOG.clear()
        outputs = {}
        for name in ("A", "B", "B", "A"):  # the order of pairing's X Y Y X blocks
            be[name].prepare(x)
            assert be[name].timed_step(x) >= 0
            outputs[name] = be[name].infer(x)
        for name in ("A", "B"):
            np.testing.assert_allclose(outputs[name], _expected(x, engines[name][1]), rtol=1e-5)
        # the FAKE refuses a call outside its engine's context, so reaching here already proves
        # it; the log says the same: every execute under the shared primary context, in order
        assert _executes(fake_cuda) == [(n, PRIMARY) for n in ("A", "A", "B", "B", "B", "B", "A", "A")]
        assert all(ctx == PRIMARY for op, ctx, _ in fake_cuda.LOG if op not in ("retain", "detach"))
        assert not any(op in ("push", "pop") for op, _, _ in fake_cuda.LOG)  # no switch inside a timed call
        assert [op for op, _, _ in fake_cuda.LOG].count("retain") == 0  # retained once, before these calls
    finally:
        for backend in be.values():
            backend.close()


def test_pair_rounds_interleave_two_engines_each_in_its_context(fake_cuda: ModuleType, engines: dict):
    """The runner's own pairing loop (pairing.pair_rounds) over two TensorRT backends."""
    be = _backends(engines)
    images = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    try:
        fake_cuda.LOG.clear()
        rounds = pairing.pair_rounds(be["A"], be["B"], images, QUICK, rounds=2)
    finally:
        for backend in be.values():
            backend.close()
    assert [r["first"] for r in rounds] == [pairing.CANDIDATE, pairing.BASELINE]
    assert all(r[side]["p50_ms"] > 0 for r in rounds for side in (pairing.CANDIDATE, pairing.BASELINE))
    runs = [tag for tag, _ in _executes(fake_cuda)]
    switches = sum(a != b for a, b in zip(runs, runs[1:], strict=False))
    assert {"A", "B"} <= set(runs) and switches >= 4  # blocks alternate (A B B A ...), not A then B
    assert {ctx for _, ctx in _executes(fake_cuda)} == {PRIMARY}


@pytest.mark.parametrize("closed_first", ["A", "B"])
def test_closing_one_backend_leaves_the_other_usable(fake_cuda: ModuleType, engines: dict, closed_first: str):
    be = _backends(engines)
    other = "B" if closed_first == "A" else "A"
    x = np.ones((2, 3, 8, 8), np.float32)
    be[other].prepare(x)
    mem_other = set(fake_cuda._MEM)
    be[closed_first].close()
    be[closed_first].close()  # twice: harmless
    assert fake_cuda._REFS == {PRIMARY: 1}  # one retained primary context, shared, never detached
    np.testing.assert_allclose(be[other].infer(x), _expected(x, engines[other][1]), rtol=1e-5)
    assert be[other].timed_step(x) >= 0
    assert set(fake_cuda._MEM) == mem_other  # the closed backend's buffers are freed, the other's kept
    be[other].close()
    assert fake_cuda._MEM == {}  # no buffer leaked
    assert [c.handle for c in fake_cuda._STACK] == [PRIMARY] and fake_cuda.WARNINGS == []
    with pytest.raises(RunnerError, match="used after close"):
        be[other].timed_step(x)


def test_a_failed_load_frees_its_objects_and_leaves_the_shared_context(fake_cuda: ModuleType, engines: dict,
                                                                       tmp_path: Path):
    from deploy_targets.remote.dskd_runner.backend_tensorrt import TensorRtBackend

    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"\x00not an engine")
    good = TensorRtBackend(str(engines["A"][0]))
    with pytest.raises(RunnerError, match="rebuild it on this device"):
        TensorRtBackend(str(bad))
    assert fake_cuda._REFS == {PRIMARY: 1} and [c.handle for c in fake_cuda._STACK] == [PRIMARY]
    x = np.ones((1, 3, 8, 8), np.float32)
    np.testing.assert_allclose(good.infer(x), _expected(x, engines["A"][1]), rtol=1e-5)
    good.close()


def test_host_pairs_engines_in_the_runner_backend_but_not_with_trtexec(engines: dict):
    engine = engines["A"][0]
    plan = engine.with_suffix(".plan")  # a.fp16.plan: the other name of a serialized engine
    plan.write_bytes(engine.read_bytes())
    assert pairing_blocker("x86-gpu", None, engine) is None and can_pair("x86-gpu", None, plan)
    for target in ("jetson-orin", "jetson-orin-nano"):
        assert can_pair(target, "nvidia@orin", engine)
    why = pairing_blocker("x86-gpu", None, engine, trtexec="/usr/src/tensorrt/bin/trtexec")
    assert why is not None and "trtexec" in why and "one runner run per side" in why
    assert not can_pair("jetson-orin", "nvidia@orin", engine, trtexec="trtexec")
    with pytest.raises(UserError, match="paired rounds impossible: .*separate trtexec process"):
        measure_pair(engine, engines["B"][0], "x86-gpu", rounds=1, trtexec="trtexec")


def test_measure_pair_times_two_engines_in_one_runner_process(engines: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    """End to end: the host's measure_pair, the real runner process (--pair-with), two FAKE
    engines loaded side by side there under the FAKE driver's context checks."""
    monkeypatch.setenv("PYTHONPATH", str(write_fake_tensorrt_lib(tmp_path / "runner_lib")))
    rounds = measure_pair(engines["A"][0], engines["B"][0], "x86-gpu", rounds=2, start=1, protocol=QUICK)
    assert [r["index"] for r in rounds] == [1, 2] and [r["first"] for r in rounds] == ["baseline", "candidate"]
    assert all(r[side]["p50_ms"] > 0 for r in rounds for side in ("candidate", "baseline"))


def test_the_latency_gate_pairs_engines_in_one_runner_process(engines: dict, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    """pipeline.latency_ab.interleaved_ab (the `max_latency_regression` gate) now takes the paired
    path for engines, with no one-per-side measure_side needed."""
    from pipeline.latency_ab import PAIRED, interleaved_ab

    monkeypatch.setenv("PYTHONPATH", str(write_fake_tensorrt_lib(tmp_path / "runner_lib")))
    rec = interleaved_ab(engines["A"][0], engines["B"][0], "x86-gpu", "fp16", QUICK, 10.0, 0.0)
    assert rec["mode"] == PAIRED and rec["first"][:2] == ["candidate", "baseline"]
    assert len(rec["candidate_p50_ms"]) == len(rec["baseline_p50_ms"]) == rec["rounds"] >= 1


def test_the_runner_refuses_pair_with_together_with_trtexec(fake_cuda: ModuleType, engines: dict):
    """--pair-with times the runner's own backends; with --trtexec it would silently time neither
    side with trtexec. One usage error (exit 2) instead."""
    from deploy_targets.remote.dskd_runner import cli

    args = cli.build_parser().parse_args(["--artifact", str(engines["A"][0]), "--runtime", "tensorrt",
                                          "--precision", "fp16", "--pair-with", str(engines["B"][0]),
                                          "--trtexec", "/usr/bin/trtexec", "--out", "result.json"])
    with pytest.raises(RunnerError, match="--pair-with cannot be combined with --trtexec") as err:
        cli._check(cli.config_from_args(args))
    assert err.value.exit_code == 2
