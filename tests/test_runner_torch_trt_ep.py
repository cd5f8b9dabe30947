"""The runner measures a Torch-TensorRT ExportedProgram (.ep) through `torch_tensorrt.load`.

torch-tensorrt cannot run here: the command path, loading, binding, timing loop, accuracy and
result parsing run for real against the FAKE torch_tensorrt of tests/fakes/torch_trt.py
(its `load` returns a plain PyTorch ExportedProgram, no TensorRT inside). The real run is a
separate test that is skipped, with the reason, wherever torch_tensorrt is not importable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deploy_targets import DeviceError, Protocol, measure, write_eval_npz
from deploy_targets.measure import runner_args
from deploy_targets.remote.dskd_runner.protocol import RUNTIME_MODULES
from tests.fakes.torch_trt import write_fake_torch_trt_lib

FAST = Protocol(warmup_seconds=0.05, min_iters=15, min_seconds=0.1, contention_retries=0)
MEAN = np.array([0.5, 0.4, 0.3], np.float32)
STD = np.array([0.2, 0.25, 0.3], np.float32)
FAKE_VERSION = "0.0+fake-load"  # what the FAKE torch_tensorrt reports, to tell it was the one loaded


def fake_torch_trt_load_lib(lib: Path) -> Path:
    """Only the FAKE torch_tensorrt (its `load` = the REAL torch.export.load): no tensorrt, no ModelOpt."""
    return write_fake_torch_trt_lib(lib, torch_tensorrt=FAKE_VERSION, tensorrt=None, modelopt=False)


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny CNN saved with the REAL torch.export.save as model.fp16.ep (dynamic batch), and an
    eval set whose labels are the model's own predictions with 5 flipped (top-1 known)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()  # fmt: skip
    root = tmp_path_factory.mktemp("ep")
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (torch.zeros(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    path = root / "model.fp16.ep"
    torch.export.save(ep, str(path))
    x = np.random.default_rng(2).integers(0, 256, (30, 3, 16, 16), dtype=np.uint8)
    xn = (x.astype(np.float32) / 255 - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(1, 3, 1, 1)
    with torch.no_grad():
        ref = model(torch.from_numpy(xn.astype(np.float32))).argmax(1).numpy()
    y = ref.copy()
    y[:5] = (y[:5] + 1) % 4
    eval_path = write_eval_npz(root / "eval.npz", x, y, MEAN, STD, ref_pred=ref)
    return {"ep": path, "eval": eval_path, "lib": fake_torch_trt_load_lib(root / "lib"), "model": model,
            "root": root}


def test_ep_is_measured_through_torch_tensorrt_load(program: dict, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYTHONPATH", str(program["lib"]))
    m = measure(program["ep"], "x86-gpu", eval_set=program["eval"], batch_sizes=(1, 4), protocol=FAST)
    assert (m.runtime, m.precision, m.artifact_format) == ("torch-tensorrt", "fp16", "torch-trt-ep")
    assert m.environment["runtime"] == "torch-tensorrt"
    assert m.environment["runtime_version"] == FAKE_VERSION  # the FAKE package was loaded
    assert m.accuracy["n"] == 30 and m.accuracy["correct"] == 25 and m.accuracy["agreement"] == 1.0
    assert [e["batch_size"] for e in m.latency] == [1, 4]
    for entry in m.latency:
        assert entry["iterations"] >= FAST.min_iters and entry["p50_ms"] > 0
        assert entry["latency_kind"] == "wall"  # no CUDA here: no GPU compute time
        assert entry["binding"] == "cpu-tensors (no CUDA)"
    assert m.runtime_config["threads_policy"] == "not applicable (GPU)"
    assert m.environment["torch_device"] == "cpu"


def test_ep_command_names_the_torch_tensorrt_runtime(program: dict):
    args = runner_args(artifact="./model.fp16.ep", runtime="torch-tensorrt", precision="fp16", threads=1,
                       batch_sizes=[1], protocol=FAST, out="result.json")  # fmt: skip
    assert args[args.index("--runtime") + 1] == "torch-tensorrt"
    assert Protocol.from_json(args[args.index("--protocol") + 1]) == FAST


def test_ep_without_torch_tensorrt_names_the_package(program: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # no (fake) torch_tensorrt on the path
    pytest.importorskip("torch")
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("a real torch_tensorrt is installed here")
    assert RUNTIME_MODULES["torch-tensorrt"] == ("torch", "torch_tensorrt")
    with pytest.raises(DeviceError, match=r"missing runtime: .*lacks torch_tensorrt.*pip install torch-tensorrt"):
        measure(program["ep"], "x86-gpu", batch_sizes=(1,), protocol=FAST, input_shape=(3, 16, 16))


def test_real_torch_tensorrt_ep_run(program: dict):
    """Runs only where a real torch-tensorrt and a CUDA GPU exist (never on this project's CPU
    machines): compiles the tiny model with torch_tensorrt, saves the .ep and measures it."""
    try:
        import torch_tensorrt
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        pytest.skip(f"torch_tensorrt not importable here ({type(exc).__name__}): real .ep run skipped")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: a Torch-TensorRT program cannot run")
    x = torch.zeros(2, 3, 16, 16, device="cuda")
    model = program["model"].cuda()
    trt_module = torch_tensorrt.compile(model, ir="dynamo", inputs=[x], enabled_precisions={torch.float16})
    path = program["root"] / "real.fp16.ep"
    torch_tensorrt.save(trt_module, str(path), output_format="exported_program", arg_inputs=[x])
    m = measure(path, "x86-gpu", eval_set=None, batch_sizes=(2,), protocol=FAST, input_shape=(3, 16, 16))
    assert m.runtime == "torch-tensorrt" and m.latency_at(2)["latency_kind"] == "host"
    assert m.latency_at(2)["gpu_compute"]["p50_ms"] > 0
