"""`pipeline verify` against hostile bundles: every form refused, named, with the right exit code.

The bundles here are built by hand (real files, real manifest, real archives) so each test plants
exactly one fault; tests/test_bundles.py verifies the bundles `pipeline run` writes.
Exit codes: 0 intact, 1 verification failed (named), 2 malformed manifest/archive (one line).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline import bundle_verify
from pipeline.bundle_verify import BUNDLE_FORMAT, MANIFEST

REPO = Path(__file__).resolve().parents[1]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_bundle(root: Path, files: dict[str, bytes] | None = None) -> Path:
    """A minimal valid bundle folder: two files, listed with sha256 and size."""
    files = files if files is not None else {"model.onnx": b"onnx bytes", "infer.py": b"print('hi')\n"}
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    write_manifest(root, {n: {"sha256": sha(d), "size_bytes": len(d)} for n, d in files.items()})
    return root


def write_manifest(root: Path, files: dict, **extra) -> dict:
    m = {"format": BUNDLE_FORMAT, "target": "cpu", "runtime": "onnxruntime", "labels": ["a", "b"],
         "preprocessing": {"input_size": 8, "in_chans": 1, "mean": [0.5], "std": [0.25]},
         "artifacts": [{"format": "onnx", "precision": "fp32", "runtime": "onnxruntime", "path": "model.onnx",
                        "files": ["model.onnx"]}] if "model.onnx" in files else [],
         "files": files, **extra}
    (root / MANIFEST).write_text(json.dumps(m))
    return m


def verify(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from pipeline.cli import main

    capsys.readouterr()
    code = main(["verify", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_intact_bundle_and_its_archive_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    b = make_bundle(tmp_path / "cpu")
    code, out, _ = verify(b, capsys)
    assert code == 0 and out.strip().startswith("OK: 2 files checked")
    arc = tmp_path / "cpu.tar.gz"
    with tarfile.open(arc, "w:gz") as tar:
        tar.add(b, arcname="cpu")
    code, out, err = verify(arc, capsys)
    assert code == 0, out + err
    assert f"in {arc}" in out and "dskd-verify-" not in out + err  # the temp folder is never shown


@pytest.mark.parametrize("planted", ["numpy.py", "sub/evil.py", "sitecustomize.pth"])
def test_file_not_in_the_manifest_fails_naming_it(planted: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """A module planted beside infer.py would be imported by it: verification fails (exit 1)."""
    b = make_bundle(tmp_path / "cpu")
    (b / planted).parent.mkdir(parents=True, exist_ok=True)
    (b / planted).write_text("import os\n")
    code, out, err = verify(b, capsys)
    shown = planted.split("/")[0] + "/" if "/" in planted else planted
    assert code == 1 and f"problem: {shown}: not in the manifest" in out, out + err
    assert out.strip().splitlines()[-1].startswith("FAILED")


def test_unlisted_link_and_fifo_are_named_not_followed(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    b = make_bundle(tmp_path / "cpu")
    (b / "link.py").symlink_to("/etc/hostname")
    os.mkfifo(b / "pipe")
    code, out, _ = verify(b, capsys)
    assert code == 1 and "link.py: not in the manifest" in out and "pipe: not in the manifest" in out


@pytest.mark.parametrize("rel, why", [
    ("../outside.txt", "leaves the bundle"),
    ("sub/../../outside.txt", "leaves the bundle"),
    ("ABS", "absolute path"),
    ("./model.onnx", "not a plain relative path"),
    ("a\\b", "not a plain relative path"),
    (MANIFEST, "cannot list itself"),
])
def test_manifest_path_leaving_the_bundle_is_refused_unread(rel: str, why: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"secret")
    rel = str(outside) if rel == "ABS" else rel
    b = make_bundle(tmp_path / "cpu")
    m = json.loads((b / MANIFEST).read_text())
    m["files"][rel] = {"sha256": sha(b"secret"), "size_bytes": 6}
    (b / MANIFEST).write_text(json.dumps(m))
    code, out, _ = verify(b, capsys)
    assert code == 1 and f"problem: {rel}: " in out and why in out, out


def test_listed_symlink_and_symlinked_folder_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Even with the right sha256: a link is not a file of the bundle (and may point anywhere)."""
    target_dir = tmp_path / "elsewhere"
    target_dir.mkdir()
    (target_dir / "w.bin").write_bytes(b"weights")
    b = make_bundle(tmp_path / "cpu")
    (b / "model.bin").symlink_to(target_dir / "w.bin")
    (b / "sub").symlink_to(target_dir)
    m = json.loads((b / MANIFEST).read_text())
    m["files"]["model.bin"] = m["files"]["sub/w.bin"] = {"sha256": sha(b"weights"), "size_bytes": 7}
    (b / MANIFEST).write_text(json.dumps(m))
    code, out, _ = verify(b, capsys)
    assert code == 1
    assert "model.bin: is a symbolic link" in out and "sub/w.bin: its folder sub is a symbolic link" in out


def test_listed_fifo_does_not_hang(tmp_path: Path):
    """A FIFO is never opened for reading (it would block forever): a subprocess with a deadline."""
    b = make_bundle(tmp_path / "cpu")
    os.mkfifo(b / "model.bin")
    m = json.loads((b / MANIFEST).read_text())
    m["files"]["model.bin"] = {"sha256": "0" * 64, "size_bytes": 0}
    (b / MANIFEST).write_text(json.dumps(m))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "verify", str(b)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "model.bin: is a FIFO" in proc.stdout, proc.stdout + proc.stderr


def test_listed_device_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    b = make_bundle(tmp_path / "cpu")
    try:
        os.mknod(b / "model.bin", 0o600 | 0o020000, os.makedev(1, 3))  # a character device: /dev/null's numbers
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot create a device node here ({exc})")
    m = json.loads((b / MANIFEST).read_text())
    m["files"]["model.bin"] = {"sha256": sha(b""), "size_bytes": 0}
    (b / MANIFEST).write_text(json.dumps(m))
    code, out, _ = verify(b, capsys)
    assert code == 1 and "model.bin: is a device" in out


def test_missing_changed_resized_and_oversized_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch):
    b = make_bundle(tmp_path / "cpu", {"model.onnx": b"onnx bytes", "infer.py": b"print()\n", "big.bin": b"x" * 64,
                                       "gone.bin": b"y"})
    (b / "gone.bin").unlink()
    (b / "model.onnx").write_bytes(b"ONNX BYTES")  # same size, other bytes
    (b / "infer.py").write_bytes(b"print('longer')\n")
    monkeypatch.setattr(bundle_verify, "MAX_FILE_BYTES", 32)
    code, out, _ = verify(b, capsys)
    assert code == 1
    assert "gone.bin: missing" in out
    assert "model.onnx: sha256 differs from the manifest" in out
    assert "infer.py: sha256 differs from the manifest (not hashed: 16 bytes, the manifest says 8)" in out
    assert "big.bin: 64 B, over the 32 B per-file cap" in out


def _manifest_variants() -> dict[str, object]:
    good = {"format": BUNDLE_FORMAT, "target": "cpu", "runtime": "onnxruntime", "labels": ["a"],
            "preprocessing": {"input_size": 8, "in_chans": 1, "mean": [0.5], "std": [0.25]},
            "artifacts": [], "files": {"infer.py": {"sha256": sha(b"x"), "size_bytes": 1}}}
    no_sha = json.loads(json.dumps(good))
    del no_sha["files"]["infer.py"]["sha256"]
    bad_size = json.loads(json.dumps(good))
    bad_size["files"]["infer.py"]["size_bytes"] = "1"
    files_list = dict(good, files=["infer.py"])
    bad_artifact = dict(good, artifacts=[{"format": "onnx", "precision": "fp32", "runtime": "onnxruntime",
                                          "path": 5, "files": []}])
    return {
        "a list": [good],
        "a string": "bundle",
        "no sha256": no_sha,
        "size as a string": bad_size,
        "short sha256": dict(good, files={"infer.py": {"sha256": "abc", "size_bytes": 1}}),
        "files as a list": files_list,
        "entry not an object": dict(good, files={"infer.py": "abc"}),
        "artifact path a number": bad_artifact,
        "labels not strings": dict(good, labels=[1, 2]),
        "another format": dict(good, format="dskd-bundle/1"),
        "no preprocessing": {k: v for k, v in good.items() if k != "preprocessing"},
    }


@pytest.mark.parametrize("case", list(_manifest_variants()) + ["bad JSON", "not UTF-8", "empty"])
def test_malformed_manifest_is_one_line_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    b = tmp_path / "cpu"
    b.mkdir()
    (b / "infer.py").write_bytes(b"x")
    raw = {"bad JSON": b'{"format": "dskd-bundle/2", "files": {', "not UTF-8": b"\xff\xfe{}",
           "empty": b""}.get(case)
    (b / MANIFEST).write_bytes(raw if raw is not None else json.dumps(_manifest_variants()[case]).encode())
    code, out, err = verify(b, capsys)
    line = one_error_line(err)
    assert code == 2 and str(b / MANIFEST) in line and "rebuild the bundle" in line, err


def test_manifest_that_is_a_link_or_too_big(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch):
    b = make_bundle(tmp_path / "cpu")
    real = tmp_path / "real.json"
    os.replace(b / MANIFEST, real)
    (b / MANIFEST).symlink_to(real)
    code, _, err = verify(b, capsys)
    assert code == 2 and "is a symbolic link" in one_error_line(err)
    (b / MANIFEST).unlink()
    os.replace(real, b / MANIFEST)
    monkeypatch.setattr(bundle_verify, "MAX_MANIFEST_BYTES", 16)
    code, _, err = verify(b, capsys)
    assert code == 2 and "over the" in one_error_line(err)


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info, None


def _bundle_members(top: str = "cpu") -> list[tuple[tarfile.TarInfo, bytes | None]]:
    data = b"onnx bytes"
    m = {"format": BUNDLE_FORMAT, "target": "cpu", "runtime": "onnxruntime", "labels": ["a"],
         "preprocessing": {"input_size": 8, "in_chans": 1, "mean": [0.5], "std": [0.25]},
         "artifacts": [], "files": {"model.onnx": {"sha256": sha(data), "size_bytes": len(data)}}}
    return [_reg(f"{top}/{MANIFEST}", json.dumps(m).encode()), _reg(f"{top}/model.onnx", data)]


@pytest.mark.parametrize("member", ["symlink", "hardlink", "fifo", "device", "dotdot", "absolute"])
def test_archive_with_unsafe_member_is_refused_exit_2(member: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]):
    """The datasets' extractor (dskd.data.archive.safe_extract) refuses it before anything is checked."""
    bad = {"symlink": _special("cpu/numpy.py", tarfile.SYMTYPE, "/etc/passwd"),
           "hardlink": _special("cpu/numpy.py", tarfile.LNKTYPE, "cpu/model.onnx"),
           "fifo": _special("cpu/pipe", tarfile.FIFOTYPE),
           "device": _special("cpu/dev", tarfile.CHRTYPE),
           "dotdot": _reg("cpu/../../escaped.py", b"x"),
           "absolute": _reg(str(tmp_path / "abs-escaped.py"), b"x")}[member]
    arc = _tar(tmp_path / "cpu.tar.gz", [*_bundle_members(), bad])
    code, _, err = verify(arc, capsys)
    line = one_error_line(err)
    assert code == 2 and "unsafe archive member" in line and str(arc) in line
    assert "dskd-verify-" not in err
    assert not (tmp_path / "escaped.py").exists() and not (tmp_path / "abs-escaped.py").exists()


def test_archive_extras_and_malformed_archives(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    extra = _tar(tmp_path / "a.tar.gz", [*_bundle_members(), _reg("cpu/numpy.py", b"x"), _reg("README", b"hi")])
    code, out, err = verify(extra, capsys)
    assert code == 1 and "cpu/numpy.py: not in the manifest" in out and "README: not in the manifest" in out
    assert "dskd-verify-" not in out + err
    two = _tar(tmp_path / "b.tar.gz", [*_bundle_members("cpu"), *_bundle_members("gpu")])
    assert verify(two, capsys)[0] == 2
    none = _tar(tmp_path / "c.tar.gz", [_reg("x/model.onnx", b"x")])
    code, _, err = verify(none, capsys)
    assert code == 2 and "holds no manifest.json" in one_error_line(err)
    corrupt = tmp_path / "d.tar.gz"
    corrupt.write_bytes(extra.read_bytes()[:40])
    code, _, err = verify(corrupt, capsys)
    assert code == 2 and str(corrupt) in one_error_line(err)
    notarc = tmp_path / "e.txt"
    notarc.write_text("hello")
    code, _, err = verify(notarc, capsys)
    assert code == 2 and "not a bundle archive" in one_error_line(err)
    code, _, err = verify(tmp_path / "missing", capsys)
    assert code == 2 and "no such bundle" in one_error_line(err)


def test_archive_manifest_errors_name_the_archive_not_the_temp_folder(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]):
    arc = _tar(tmp_path / "cpu.tar.gz", [_reg(f"cpu/{MANIFEST}", b"[1, 2]")])
    code, _, err = verify(arc, capsys)
    line = one_error_line(err)
    assert code == 2 and line.startswith(f"error: {arc}: cpu/{MANIFEST}: top level: is a JSON list")
    assert "dskd-verify-" not in line


def test_artifact_naming_a_file_outside_the_manifest_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    b = make_bundle(tmp_path / "cpu")
    m = json.loads((b / MANIFEST).read_text())
    m["artifacts"][0]["files"].append("model.bin")
    (b / MANIFEST).write_text(json.dumps(m))
    code, out, _ = verify(b, capsys)
    assert code == 1 and "artifacts[0] (onnx): model.bin is not in the manifest's files" in out
