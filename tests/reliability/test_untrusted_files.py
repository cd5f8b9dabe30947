"""Untrusted files: code hidden in pickles never runs; archives cannot escape; a bad ONNX never
reaches a device.

Each payload here is live: the test first shows that an unsafe loader WOULD run it (a marker
file appears), then that every way the product reads such a file refuses it with a one-line
error and the marker never appears.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy_targets import DeviceError, measure, write_eval_npz
from deploy_targets.remote.runner import Protocol
from dskd.checkpoint import FORMAT, build_model, load_model_file
from dskd.errors import UserError
from tests._sshd import free_port
from tests.helpers.cli import run_main, set_args

FAST = Protocol(warmup_seconds=0.02, min_iters=10, min_seconds=0.05, contention_retries=0)


class Payload:
    """Unpickling this calls exec(): it writes `marker`. Stands for any code an attacker ships."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').write('payload ran')"

    def __reduce__(self):
        return (exec, (self.code,))


def one_line(text: str) -> str:
    """The one error line (a CLI's stderr may also hold progress lines before it)."""
    if "error: " in text:
        errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and text.rstrip().endswith(errors[0]), text
        return errors[0]
    assert "\n" not in text.strip(), text
    return text.strip()


def write_evil_checkpoint(path: Path, marker: Path, legacy: bool) -> Path:
    """A model.pt whose metadata unpickles into code: torch's zip format or the legacy raw pickle."""
    obj = {"format": FORMAT, "state_dict": {"w": torch.zeros(2)}, "meta": Payload(marker)}
    if legacy:
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(obj, path)
    return path


@pytest.fixture(params=["zip", "legacy"])
def evil_pt(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    path = write_evil_checkpoint(tmp_path / "evil.pt", marker, legacy=request.param == "legacy")
    # The payload is live: an unsafe load runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_pickle_payload_checkpoint_is_refused_by_the_loaders(evil_pt: tuple[Path, Path]):
    path, marker = evil_pt
    for load in (load_model_file, build_model):
        with pytest.raises(UserError) as err:
            load(path)
        msg = one_line(str(err.value))
        assert str(path) in msg and "refused to load" in msg and "possible code payload" in msg
    assert not marker.exists()


def test_pickle_payload_checkpoint_is_refused_by_every_command(evil_pt: tuple[Path, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]):
    path, marker = evil_pt
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    (resume_dir / "last.pt").write_bytes(path.read_bytes())
    small = ["--data=digits", "--input-size=16", "--in-chans=1", "--device=cpu", "--epochs=1"]
    commands = {
        "export": ["export", str(path), "--out", str(tmp_path / "export")],
        "train --teacher": ["train", "--method=kd", f"--teacher={path}", f"--out={tmp_path / 'kd'}", *small],
        "train --resume": ["train", f"--out={resume_dir}", "--resume", *small],
        "run teacher.checkpoint": ["run", "--out", str(tmp_path / "run"),
                                   *set_args({"teacher.checkpoint": str(path), "data.input_size": 16,
                                              "data.in_chans": 1})],
    }
    for name, args in commands.items():
        code, _, err = run_main(args, capsys)
        assert code == 2, (name, err)
        msg = one_line(err)
        assert msg.startswith("error: ") and "refused to load" in msg, (name, msg)
        assert not marker.exists(), name
    assert not (tmp_path / "run" / "report.json").exists()


def test_pickle_payload_in_an_eval_set_is_refused(tmp_path: Path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "eval.npz"
    np.savez(evil, x=np.zeros((2, 1, 8, 8), np.uint8), y=np.zeros(2, np.int64), mean=np.zeros(1, np.float32),
             std=np.ones(1, np.float32), ref_pred=np.array([Payload(marker), 0], dtype=object))
    with np.load(evil, allow_pickle=True) as data:
        data["ref_pred"]  # live payload
    assert marker.exists()
    marker.unlink()
    from deploy_targets import check_eval_npz

    with pytest.raises(UserError, match="not a readable .npz") as err:
        check_eval_npz(evil)
    one_line(str(err.value))
    assert not marker.exists()


def test_pickle_payload_in_a_cifar_batch_is_refused(tmp_path: Path):
    from dskd.data import load_data
    from dskd.data.cifar import CIFAR10_FILES

    marker = tmp_path / "PWNED"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    blob = pickle.dumps({"data": Payload(marker)}, protocol=2)
    for name in CIFAR10_FILES:
        (folder / name).write_bytes(blob)
    pickle.loads(blob)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError, match="not a readable CIFAR pickle") as err:
        load_data(folder, cache_dir=tmp_path / "cache", progress=False)
    one_line(str(err.value))
    assert not marker.exists()


# ------------------------------------------------------------------ archives
def _tar(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            data = b"x" * m.size if m.isreg() else None
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = 4 if kind == tarfile.REGTYPE else 0
    return info


ESCAPES = {
    "dotdot": _member("train/../../escaped.png"),
    "absolute": _member("/tmp/dskd-escaped.png"),
    "symlink": _member("train/a/link.png", tarfile.SYMTYPE, "../../../escaped.png"),
    "hardlink": _member("train/a/hard.png", tarfile.LNKTYPE, "/etc/passwd"),
    "device": _member("train/a/dev.png", tarfile.CHRTYPE),
}


@pytest.mark.parametrize("kind", list(ESCAPES))
def test_escaping_dataset_archive_is_refused_by_run(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Member-level cases (zip too) are in tests/test_data.py::test_unsafe_*_members_refused."""
    arc = _tar(tmp_path / "data.tar.gz", [_member("train/a/ok.png"), ESCAPES[kind]])
    code, _, err = run_main(["run", "--data", str(arc), "--out", str(tmp_path / "run"),
                             *set_args({"data.cache_dir": str(tmp_path / "cache")})], capsys)
    assert code == 2, err
    msg = one_line(err)
    assert "unsafe archive member" in msg and str(arc) in msg
    assert not (tmp_path / "escaped.png").exists() and not Path("/tmp/dskd-escaped.png").exists()
    assert not any((tmp_path / "run" / "stages").rglob("*.pt"))


def test_escaping_bundle_archive_is_refused_by_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`pipeline verify` opens bundles received from elsewhere: same checks as datasets."""
    arc = _tar(tmp_path / "cpu.tar.gz", [_member("cpu/manifest.json"), _member("cpu/../../escaped.onnx")])
    code, _, err = run_main(["verify", str(arc)], capsys)
    assert code == 2 and "unsafe archive member" in one_line(err)
    assert not (tmp_path / "escaped.onnx").exists()


# ------------------------------------------------------------------ ONNX files
def tiny_onnx(path: Path, chw: tuple[int, int, int] = (3, 16, 16)) -> Path:
    """A real (hand-built) classifier graph: N×C×H×W -> global pool -> flatten -> logits."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *chw])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", chw[0]])
    graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["input"], ["p"]),
                               helper.make_node("Flatten", ["p"], ["logits"])], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def eval_set(path: Path, chw: tuple[int, int, int]) -> Path:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (8, *chw), dtype=np.uint8)
    return write_eval_npz(path, x, np.zeros(8, np.int64), [0.5] * chw[0], [0.25] * chw[0])


BAD_ONNX = {
    "empty file": b"",
    "text": b"this is not a model\n",
    "a zip": b"PK\x03\x04" + b"\x00" * 60,
}


@pytest.mark.parametrize("what", list(BAD_ONNX))
def test_onnx_that_is_not_a_model_is_refused_before_the_device(what: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(BAD_ONNX[what])
    # An unreachable device: had measure() contacted it, the error would be a DeviceError.
    device = f"nobody@127.0.0.1:{free_port()}"
    import deploy_targets.ssh as ssh_module

    calls: list[list[str]] = []
    real = ssh_module.run_bounded
    monkeypatch.setattr(ssh_module, "run_bounded", lambda args, t: calls.append(list(args)) or real(args, t))
    with pytest.raises(UserError) as err:
        measure(path, "ssh-cpu", device=device, eval_set=eval_set(tmp_path / "e.npz", (3, 16, 16)), protocol=FAST)
    assert not isinstance(err.value, DeviceError)
    msg = one_line(str(err.value))
    assert str(path) in msg and ("not an ONNX model" in msg or "not a readable ONNX file" in msg), msg
    assert calls == []  # no ssh/scp was started (counted, not timed: the machine may be loaded)


def test_onnx_with_the_wrong_input_shape_is_refused_before_the_device(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]):
    rgb = tiny_onnx(tmp_path / "rgb.onnx", (3, 16, 16))
    gray_eval = eval_set(tmp_path / "gray.npz", (1, 16, 16))
    device = f"nobody@127.0.0.1:{free_port()}"
    with pytest.raises(UserError) as err:
        measure(rgb, "ssh-cpu", device=device, eval_set=gray_eval, protocol=FAST)
    assert not isinstance(err.value, DeviceError)
    assert "takes C×H×W 3×16×16 but the eval set's images are 1×16×16" in one_line(str(err.value))
    with pytest.raises(UserError, match="--input-shape is 3×32×32"):
        measure(rgb, "cpu", input_shape=(3, 32, 32), protocol=FAST)
    code, _, cli_err = run_main(["bench", str(rgb), "--target", "ssh-cpu", "--device", device,
                                 "--data", str(gray_eval)], capsys)
    assert code == 2 and "takes C×H×W 3×16×16" in one_line(cli_err)
    # Control: the same model with fitting images is measured (the check refuses only misfits).
    ok = measure(rgb, "cpu", eval_set=eval_set(tmp_path / "rgb.npz", (3, 16, 16)), protocol=FAST)
    assert ok.p50_ms > 0 and ok.accuracy["n"] == 8
