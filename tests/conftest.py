"""Fixtures shared by the whole suite; plain helpers are in tests/helpers/, fakes in tests/fakes/.

Fixtures here are found by name, so test modules neither import them nor each other. A test
module may still define a fixture of the same name: pytest then uses the module's own.

Markers (declared in pyproject.toml): `slow` for tests that take more than a few seconds here
(end-to-end runs, process kills, DDP, real sshd round trips); `make test-fast` leaves them out,
`make test` runs everything. Mark a new test `slow` when `--durations` shows it over ~3 s on
this 2-core machine, keeping at least one fast test of each package so the fast run smokes all.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# Helpers assert too (e.g. runs.assert_no_torn_files): have pytest explain their failures.
pytest.register_assert_rewrite("tests.helpers", "tests.fakes")

from tests.fakes.trt_runtime import write_fake_tensorrt_lib  # noqa: E402
from tests.fakes.trtexec import fake_trtexec_measure  # noqa: E402
from tests.helpers.artifacts import build_tiny_artifacts  # noqa: E402
from tests.helpers.data import digits, train_checkpoint  # noqa: E402
from tests.helpers.nets import TinyNet, trained_tiny_teacher  # noqa: E402
from tests.helpers.trtexec_samples import EXPORT_TIMES, SUMMARY_TRT10  # noqa: E402

# `sshd`: a real OpenSSH server on 127.0.0.1 per test module (tests/_sshd.py), skipped where sshd
# is absent. Loaded here once for every module; a module need not name the plugin itself.
pytest_plugins = ["tests.fakes.sshd_plugin"]


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Each test's in-process training, export and evaluation on one torch thread: fast and
    bit-steady on a shared 2-core machine, whichever files are selected. Set per test, because
    product code may set torch's threads (export.runners) and must not leak into later tests.
    Child processes are not affected (they get OMP_NUM_THREADS from their own environment)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny CNN as FP32 ONNX with its eval set (top-1 known): see tests/helpers/artifacts.py."""
    return build_tiny_artifacts(tmp_path_factory.mktemp("tiny_fp32"), quantized=False)


@pytest.fixture(scope="session")
def digits_rgb(tmp_path_factory: pytest.TempPathFactory):
    """scikit-learn's digits at 16×16, 3 channels (a DataBundle); read-only, shared by the session."""
    return digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory: pytest.TempPathFactory, digits_rgb) -> Path:
    """A resnet8 trained 3 CE epochs on `digits_rgb` (~90%+ top-1): a real checkpoint to export.
    Shared read-only by the session: copy it before changing it. Trained on one thread (set
    here: session fixtures are built before the per-test `one_torch_thread`)."""
    import torch

    torch.set_num_threads(1)
    return train_checkpoint(tmp_path_factory.mktemp("digits_ckpt") / "model.pt", digits_rgb)


@pytest.fixture(scope="module")
def fake_gpu(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A FAKE GPU: FAKE `tensorrt`/`pycuda` packages (`lib`, for PYTHONPATH), a FAKE engine
    (logits = GAP(x) @ w.T, max batch 8), its eval set (8 of 40 labels flipped: 32 correct) and a
    FAKE measuring `trtexec` that reports tests/helpers/trtexec_samples.py's EXPORT_TIMES and
    SUMMARY_TRT10. Proves our code around TensorRT, nothing about TensorRT itself."""
    import json

    import numpy as np

    from deploy_targets import write_eval_npz

    root = tmp_path_factory.mktemp("fake_gpu")
    lib = write_fake_tensorrt_lib(root / "lib")
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    engine = root / "model.fp16.engine"
    engine.write_text(json.dumps({"w": w.tolist(), "chw": [3, 8, 8], "max_batch": 8}))
    x = rng.integers(0, 256, (40, 3, 8, 8), dtype=np.uint8)
    mean, std = np.array([0.5, 0.5, 0.5], np.float32), np.array([0.25, 0.25, 0.25], np.float32)
    xn = (x.astype(np.float32) / 255 - mean.reshape(1, 3, 1, 1)) / std.reshape(1, 3, 1, 1)
    ref = (xn.mean(axis=(2, 3)) @ w.T).argmax(1)
    y = ref.copy()
    y[:8] = (y[:8] + 1) % 4
    eval_path = write_eval_npz(root / "eval.npz", x, y, mean, std, ref_pred=ref)
    trtexec = fake_trtexec_measure(root / "trtexec", json.dumps(EXPORT_TIMES), SUMMARY_TRT10)
    return {"lib": lib, "engine": engine, "eval": eval_path, "trtexec": trtexec}


@pytest.fixture(scope="module")
def teacher() -> TinyNet:
    """The DSKD tests' teacher: a TinyNet(32) trained on helpers.nets.synthetic (>90% top-1).
    One per module, shared by its tests: take `fresh_teacher(teacher)` before building a Distiller."""
    return trained_tiny_teacher()
