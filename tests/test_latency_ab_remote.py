"""Paired A/B latency rounds on a device (issue 18): both artifacts in ONE runner run over a
REAL sshd on 127.0.0.1 (tests/_sshd.py) with real ONNX Runtime and OpenVINO sessions.

The two artifacts always share their file names (model.onnx; model.xml + model.bin), as a
baseline run's artifacts do, and differ in work about tenfold, so a swapped or collided upload
(the runner timing one model twice) shows as a ratio near 1 instead of far from it.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import warnings
from pathlib import Path

import pytest

from deploy_targets import DeviceError, Protocol
from deploy_targets.measure_pair import (
    BASELINE_DIR,
    can_pair,
    measure_pair,
    pair_session,
    pairing_blocker,
)
from deploy_targets.registry import REACH_SSH, Target, register_target, unregister_target
from deploy_targets.ssh import SshClient
from dskd.errors import UserError
from pipeline import regression_stats as rs
from pipeline.latency_ab import PAIRED, interleaved_ab
from tests._sshd import Sshd, sshd_missing_reason
from tests.helpers.artifacts import build_tiny_artifacts

pytestmark = [
    pytest.mark.skipif(sshd_missing_reason() is not None, reason=str(sshd_missing_reason())),
    pytest.mark.timeout(300),  # a hang guard only
]

# enough iterations per side that a tenfold difference in work cannot be hidden by a busy machine
PROTO = Protocol(warmup_seconds=0.05, min_iters=20, min_seconds=0.02, contention_retries=0)


def _export_wide(path: Path) -> None:
    """A CNN on the same 3×16×16 input with ~40x the tiny model's multiply-adds."""
    import torch
    from torch import nn

    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 5)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(2, 3, 16, 16),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False, opset_version=17)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fast/model.onnx (the tiny CNN) and slow/model.onnx (a wide one): same name, other folders."""
    root = tmp_path_factory.mktemp("pair-remote")
    (root / "tiny").mkdir()
    tiny = build_tiny_artifacts(root / "tiny", quantized=False)
    out = {}
    for name in ("fast", "slow"):
        (root / name).mkdir()
        out[name] = root / name / "model.onnx"
    shutil.copy(tiny["onnx"], out["fast"])
    _export_wide(out["slow"])
    return out


@pytest.fixture()
def remote_tmp(sshd: Sshd, tmp_path: Path) -> Path:
    """The 'device's temp base, inspected for leftovers."""
    base = tmp_path / "device-tmp"
    base.mkdir()
    return base


def _remote(sshd: Sshd, remote_tmp: Path) -> dict:
    return dict(device=sshd.device, ssh=sshd.options(), remote_python=sys.executable,
                remote_tmp=str(remote_tmp), threads=1, protocol=PROTO)


def _ratio(rounds: list[dict]) -> float:
    """Median candidate p50 over median baseline p50."""
    return (statistics.median(r["candidate"]["p50_ms"] for r in rounds)
            / statistics.median(r["baseline"]["p50_ms"] for r in rounds))


def test_device_pair_times_the_two_models_named_alike_and_cleans_up(
        sshd: Sshd, models: dict[str, Path], remote_tmp: Path):
    slow_first = measure_pair(models["slow"], models["fast"], "ssh-cpu", rounds=4, start=1,
                              **_remote(sshd, remote_tmp))
    assert [r["index"] for r in slow_first] == [1, 2, 3, 4]
    assert [r["first"] for r in slow_first] == ["baseline", "candidate", "baseline", "candidate"]
    assert list(remote_tmp.iterdir()) == []  # the private folder, baseline/ included, is gone
    fast_first = measure_pair(models["fast"], models["slow"], "ssh-cpu", rounds=4, **_remote(sshd, remote_tmp))
    # each side is the model it was given: the wide model is the slower one whichever side it is
    assert _ratio(slow_first) > 2.0, slow_first
    assert _ratio(fast_first) < 0.5, fast_first
    assert list(remote_tmp.iterdir()) == []


def test_a_session_copies_once_and_runs_the_runner_per_chunk(
        sshd: Sshd, models: dict[str, Path], remote_tmp: Path, monkeypatch: pytest.MonkeyPatch):
    uploads: list[tuple[list[str], str]] = []
    real_upload = SshClient.upload

    def spy(self: SshClient, paths, remote_dir: str, *, timeout_s: float) -> None:
        uploads.append(([Path(p).name for p in paths], remote_dir))
        real_upload(self, paths, remote_dir, timeout_s=timeout_s)

    monkeypatch.setattr(SshClient, "upload", spy)
    with pair_session(models["fast"], models["fast"], "ssh-cpu", **_remote(sshd, remote_tmp)) as timed:
        first, second = timed(2, 0), timed(3, 2)
        (workdir,) = remote_tmp.iterdir()
        assert sorted(p.name for p in (workdir / BASELINE_DIR).iterdir()) == ["model.onnx"]
    assert [r["index"] for r in first + second] == [0, 1, 2, 3, 4]
    assert len(uploads) == 2  # the candidate's folder (with the runner) and baseline/, once
    assert uploads[1] == (["model.onnx"], f"{workdir}/{BASELINE_DIR}")
    assert "model.onnx" in uploads[0][0] and "runner.py" in uploads[0][0]
    assert list(remote_tmp.iterdir()) == []


def test_a_baseline_corrupted_on_the_device_is_an_error_and_cleans_up(
        sshd: Sshd, models: dict[str, Path], remote_tmp: Path):
    with pytest.raises(DeviceError) as err:  # noqa: PT012 (the corruption happens between chunks)
        with pair_session(models["slow"], models["fast"], "ssh-cpu", **_remote(sshd, remote_tmp)) as timed:
            timed(1, 0)
            (workdir,) = remote_tmp.iterdir()
            shutil.copy(models["slow"], workdir / BASELINE_DIR / "model.onnx")  # the runner now times slow twice
            timed(1, 1)
    msg = str(err.value)
    assert "\n" not in msg and "baseline" in msg and "sha256" in msg and str(models["fast"]) in msg
    assert list(remote_tmp.iterdir()) == []


def test_interleaved_ab_pairs_a_device_target_and_catches_the_slowdown(
        sshd: Sshd, models: dict[str, Path], remote_tmp: Path):
    kw = _remote(sshd, remote_tmp)
    kw.pop("protocol")
    rec = interleaved_ab(models["slow"], models["fast"], "ssh-cpu", "fp32", PROTO, 0.05, 0.0, **kw)
    assert rec["mode"] == PAIRED
    assert rec["rounds"] >= rs.rounds_needed() and len(rec["first"]) == rec["rounds"]
    assert rec["first"][:2] == ["candidate", "baseline"]
    if sum(rec["kept"]) >= rs.rounds_needed():  # a tenfold slowdown against a 5 % tolerance
        d = rs.paired_ratio_decision(rec["candidate_p50_ms"], rec["baseline_p50_ms"], 0.05, keep=rec["kept"])
        assert d.verdict == rs.FAIL and rec["stopped"] == "decided"
    assert list(remote_tmp.iterdir()) == []


def test_which_targets_pair(sshd: Sshd, models: dict[str, Path]):
    assert can_pair("ssh-cpu", sshd.device, models["fast"]) and can_pair("ssh-cpu", sshd.device)
    assert not can_pair("ssh-cpu")  # no device: its one-per-side path says to pass --device
    for target in ("jetson-orin", "jetson-orin-nano"):  # engines pair in the runner's TensorRT backend
        assert pairing_blocker(target, sshd.device) is None
        assert "trtexec" in (pairing_blocker(target, sshd.device, trtexec="trtexec") or "")  # not with trtexec
    with pytest.raises(UserError, match="paired rounds impossible: .*trtexec"):
        measure_pair(models["fast"], models["fast"], "jetson-orin", rounds=1, device=sshd.device, trtexec="trtexec")


@pytest.fixture()
def ssh_openvino():
    """A device target on OpenVINO (none is registered: this checks the IR's .xml + .bin pair
    is copied as one artifact); removed afterwards."""
    target = register_target(Target("toy-ssh-openvino", ("openvino",), REACH_SSH, 1, "OpenVINO over SSH"))
    try:
        yield target
    finally:
        unregister_target(target.name)


def test_device_pair_of_openvino_irs_named_alike(
        sshd: Sshd, models: dict[str, Path], remote_tmp: Path, tmp_path: Path, ssh_openvino: Target):
    import openvino as ov

    irs = {}
    for name in ("fast", "slow"):
        xml = tmp_path / name / "model.xml"
        ov.save_model(ov.convert_model(str(models[name])), str(xml), compress_to_fp16=False)
        irs[name] = xml
    rounds = measure_pair(irs["slow"], irs["fast"], ssh_openvino, rounds=4, **_remote(sshd, remote_tmp))
    assert _ratio(rounds) > 2.0, rounds
    assert list(remote_tmp.iterdir()) == []


@pytest.mark.parametrize("bad", ["../up", "-rf", "a/b", ".hidden", "x y"])
def test_temp_sub_folders_are_plain_names_checked_before_any_login(bad: str):
    client = SshClient("nobody@127.0.0.1:1")  # never reached: the name is refused first
    with pytest.raises(ValueError, match="temp sub-folder"):
        client.make_workdir(None, subdirs=[bad])
