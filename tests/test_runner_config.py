"""Issue 20: thread/stream/hint configuration, throughput mode and pre-processing timing.

Real ONNX Runtime and OpenVINO; TensorRT through the FAKE tensorrt/pycuda packages of
tests/test_targets_trtexec.py (test doubles, not NVIDIA's libraries).
"""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from deploy_targets import Measurement, Protocol, get_target, measure
from deploy_targets.remote import runner
from deploy_targets.remote.dskd_runner import preprocess
from dskd.errors import UserError
from tests.helpers.artifacts import build_tiny_artifacts
from tests.helpers.artifacts import run_runner_cli as _run_cli

FAST = Protocol(warmup_seconds=0.05, min_iters=20, min_seconds=0.2, contention_retries=0)
CONFIG_KEYS = ("threads", "streams", "hint", "binding")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_tiny_artifacts(tmp_path_factory.mktemp("config"), quantized=False)


@pytest.mark.parametrize(
    ("target", "binding"), [("cpu", "iobinding"), ("intel-cpu", "set_input_tensor")]
)
def test_config_is_recorded_with_every_latency(tiny: dict, target: str, binding: str):
    m = measure(tiny["onnx"], target, eval_set=tiny["eval"], batch_sizes=(1, 4), protocol=FAST)
    assert m.threads == get_target(target).threads == 1  # the documented local default
    for e in m.latency:
        assert {k: e[k] for k in CONFIG_KEYS} == {
            "threads": 1, "streams": 1, "hint": "latency", "binding": binding,
        }  # fmt: skip
    cfg = m.runtime_config
    assert cfg["threads"] == 1 and cfg["threads_policy"] == "explicit" and cfg["binding"] == binding
    assert cfg["mode_hint"] == "latency" and m.throughput is None
    # bound inputs must not change the answer: accuracy equals the unbound reference
    assert m.accuracy["agreement"] == 1.0
    again = Measurement.from_dict(json.loads(m.to_json()))
    assert again.runtime_config == cfg and again.preprocess == m.preprocess


def test_all_physical_cores_and_explicit_override(tiny: dict):
    m = measure(tiny["onnx"], "cpu", threads=0, protocol=FAST)
    assert m.runtime_config["threads_policy"] == "all physical cores"
    assert m.threads == runner.physical_cores() == m.environment["physical_cores"]
    assert m.latency_at(1)["threads"] == m.threads
    m = measure(tiny["onnx"], "intel-cpu", threads=2, protocol=FAST)
    assert m.threads == 2 and m.environment["compiled"]["INFERENCE_NUM_THREADS"] == "2"
    assert get_target("ssh-cpu").threads == 0  # a dedicated device: all its physical cores


def test_all_cores_is_an_explicit_value_reported_as_the_count(tiny: dict):
    """threads = "all" (measure(), recipe target.threads): every physical core of the machine that
    measures, resolved there; the record, the report's text and each latency show the count."""
    from pipeline.recipe import load_recipe
    from pipeline.report_view import run_config_text

    m = measure(tiny["onnx"], "intel-cpu", threads="all", protocol=FAST)
    cores = m.environment["physical_cores"]
    assert m.threads == cores == m.latency_at(1)["threads"] >= 1
    assert m.environment["compiled"]["INFERENCE_NUM_THREADS"] == str(cores)
    assert m.runtime_config["threads_policy"] == "all physical cores"
    assert run_config_text(m.runtime_config).startswith(f"{cores} thread")
    assert "(all physical cores)" in run_config_text(m.runtime_config)
    with pytest.raises(UserError, match='^--threads many: must be a thread count >= 1, or "all"'):
        measure(tiny["onnx"], "cpu", threads="many", protocol=FAST)
    assert load_recipe(None, {"target.threads": "all"}).target.threads == "all"
    assert load_recipe(None, {"target.threads": 0}).target.threads == 0  # the target's default
    with pytest.raises(UserError, match="target.threads' must be 0 .*\"all\""):
        load_recipe(None, {"target.threads": "every"})


def test_openvino_throughput_mode_uses_streams(tiny: dict):
    m = measure(tiny["onnx"], "intel-cpu", batch_sizes=(1, 4), threads=2, hint="throughput", streams=2,
                protocol=FAST)
    t = m.throughput
    assert t["hint"] == "throughput" and t["streams"] == 2 and t["batch_size"] == 4
    assert t["requests"] >= 2 and t["batches"] > 0 and t["images_per_s"] > 0
    assert t["images_per_s"] == pytest.approx(t["batches"] * 4 / t["seconds"], rel=1e-3)
    assert m.latency_at(1)["hint"] == "latency"  # latency numbers stay in latency mode


def test_onnxruntime_throughput_mode_has_one_stream(tiny: dict):
    m = measure(tiny["onnx"], "cpu", batch_sizes=(1, 4), hint="throughput", streams=3, protocol=FAST)
    assert m.throughput["streams"] == 1 and m.throughput["images_per_s"] > 0
    assert any("no parallel streams" in w for w in m.warnings)


def test_bad_hint_and_streams_are_one_line_errors(tiny: dict):
    with pytest.raises(UserError, match="^hint 'fast': choose latency or throughput"):
        measure(tiny["onnx"], "cpu", hint="fast", protocol=FAST)
    with pytest.raises(UserError, match="^streams -1: must be >= 0"):
        measure(tiny["onnx"], "cpu", streams=-1, protocol=FAST)
    with pytest.raises(UserError, match="^--threads -1"):
        measure(tiny["onnx"], "cpu", threads=-1, protocol=FAST)
    with pytest.raises(UserError, match="^image .*nope.png does not exist"):
        measure(tiny["onnx"], "cpu", image=tiny["onnx"].parent / "nope.png", protocol=FAST)


def test_preprocess_is_timed_apart_and_adds_up(tiny: dict):
    m = measure(tiny["onnx"], "cpu", eval_set=tiny["eval"], batch_sizes=(1, 4), protocol=FAST)
    pre = m.preprocess
    assert pre["steps"] == "decode+resize+normalize" and pre["source"] == "eval-set image 0 as PNG"
    assert pre["source_hw"] == [16, 16] and pre["output_chw"] == [3, 16, 16] and pre["p50_ms"] > 0
    for e in m.latency:
        want = pre["p50_ms"] + e["p50_ms"] / e["batch_size"]
        assert e["end_to_end_per_image_ms"] == pytest.approx(want, abs=1e-5)
    # no eval set and no image: nothing to decode, no column
    assert measure(tiny["onnx"], "cpu", protocol=FAST).preprocess is None


def test_a_real_jpeg_is_decoded_and_resized(tiny: dict, tmp_path: Path):
    from PIL import Image

    photo = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    path = tmp_path / "frame.jpg"
    Image.fromarray(photo).save(path, quality=90)
    m = measure(tiny["onnx"], "cpu", eval_set=tiny["eval"], image=path, protocol=FAST)
    assert m.preprocess["source"] == "frame.jpg" and m.preprocess["source_hw"] == [48, 64]
    assert m.preprocess["output_chw"] == [3, 16, 16] and m.preprocess["decoder"].startswith("Pillow")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    out = tmp_path / "r.json"
    proc = _run_cli(["--artifact", str(tiny["onnx"]), "--runtime", "onnxruntime", "--image", str(bad),
                     "--protocol", '{"min_iters": 5, "min_seconds": 0}', "--out", str(out)])  # fmt: skip
    assert proc.returncode == runner.EXIT_BAD_INPUT and "cannot decode image" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def _png_with_filters(img: np.ndarray) -> bytes:
    """A PNG whose rows use each of the 5 filter types in turn (encoder written from RFC 2083)."""
    h, w, c = img.shape
    rows, prev = [], np.zeros(w * c, np.int64)
    for y in range(h):
        cur = img[y].reshape(-1).astype(np.int64)
        left = np.concatenate([np.zeros(c, np.int64), cur[:-c]])
        upleft = np.concatenate([np.zeros(c, np.int64), prev[:-c]])
        kind = y % 5
        if kind == 0:
            f = cur
        elif kind == 1:
            f = cur - left
        elif kind == 2:
            f = cur - prev
        elif kind == 3:
            f = cur - (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
            f = cur - pred
        rows.append(bytes([kind]) + (f % 256).astype(np.uint8).tobytes())
        prev = cur
    import struct

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (preprocess.PNG_SIGNATURE + preprocess._png_chunk(b"IHDR", header)
            + preprocess._png_chunk(b"IDAT", zlib.compress(b"".join(rows))) + preprocess._png_chunk(b"IEND", b""))  # fmt: skip


def test_builtin_png_decoder_handles_every_filter_and_matches_pillow():
    from PIL import Image

    img = np.random.default_rng(2).integers(0, 256, (11, 9, 3), dtype=np.uint8)
    data = _png_with_filters(img)
    assert np.array_equal(preprocess.decode_png(data), img)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), img)  # the file is valid
    assert np.array_equal(preprocess.decode_png(preprocess.encode_png(img)), img)
    assert preprocess.image_size(data) == (11, 9)
    # without Pillow (as on a bare device) the numbers are Pillow's up to resampling details
    pil = preprocess.Preprocessor((3, 7, 5), [0.5] * 3, [0.25] * 3)
    bare = preprocess.Preprocessor((3, 7, 5), [0.5] * 3, [0.25] * 3)
    bare.pil, bare.decoder = None, "builtin-png"
    a, b = pil(data), bare(data)
    assert a.shape == b.shape == (1, 3, 7, 5) and a.dtype == b.dtype == np.float32
    assert np.abs(a - b).mean() < 0.5  # normalized units; same image, different filters
    same = preprocess.Preprocessor((3, 11, 9), [0.5] * 3, [0.25] * 3)
    expect = (img.transpose(2, 0, 1)[None] / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(same(data), expect, atol=1e-5)
    same.pil = None
    np.testing.assert_allclose(same(data), expect, atol=1e-5)


def test_tensorrt_fake_records_buffers_and_throughput(fake_gpu: dict, monkeypatch: pytest.MonkeyPatch):
    """FAKE TensorRT: the runner's pre-allocated device buffers and CUDA-event path."""
    monkeypatch.setenv("PYTHONPATH", str(fake_gpu["lib"]))
    m = measure(fake_gpu["engine"], "x86-gpu", eval_set=fake_gpu["eval"], batch_sizes=(1, 8),
                hint="throughput", protocol=FAST)  # fmt: skip
    e = m.latency_at(1)
    assert e["binding"] == "device-buffers+cuda-events" and e["threads"] is None
    assert "gpu_compute" in e and e["latency_kind"] == "host"
    assert m.runtime_config["threads_policy"] == "not applicable (GPU)"
    assert m.throughput["batch_size"] == 8 and m.throughput["images_per_s"] > 0
    assert m.preprocess is not None and m.preprocess["output_chw"] == [3, 8, 8]
