"""A tar is read as exactly one clean stream, so what is checked is what `tar xf` extracts.

Red-team cases (scratch/rt2): a second gzip member, a garbage header mid-archive, a broken
gzip trailer and name clashes each passed `pipeline verify` (or gave a traceback) while GNU
tar extracted other files. Each is now read in full or refused with one UserError line.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from dskd.data.archive import TAR_SUFFIXES, read_archive, safe_extract
from dskd.errors import UserError
from tests.helpers.cli import run_main

GOOD = {"cpu/infer.py": b"print('ok')\n", "cpu/model.onnx": b"\x08\x07" * 700}
EVIL = {"cpu/numpy.py": b"raise SystemExit(66)\n"}


def _tar(members: dict[str, bytes | None], *, end: bool = True) -> bytes:
    """Tar bytes of `members` (None: a folder); end=False drops the end-of-archive blocks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    if not end:
        size = 0
        for info in tarfile.open(fileobj=io.BytesIO(raw)):
            size = info.offset_data + -(-info.size // 512) * 512
        raw = raw[:size]
    return raw


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _one_line(exc: pytest.ExceptionInfo[UserError], *needles: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def _names(path: Path) -> list[str]:
    return read_archive(path, lambda n: False)[1]


# --------------------------------------------------------------- multi-member gzip
def test_every_gzip_member_is_read_like_gnu_tar(tmp_path: Path) -> None:
    """Before: only the first gzip member was read, so cpu/numpy.py went unseen (verify said OK)."""
    path = _write(tmp_path / "m.tar.gz", gzip.compress(_tar(GOOD, end=False)) + gzip.compress(_tar(EVIL)))
    data, files, _ = read_archive(path, lambda n: True)
    assert files == ["cpu/infer.py", "cpu/model.onnx", "cpu/numpy.py"]
    assert data["cpu/numpy.py"] == EVIL["cpu/numpy.py"]
    if shutil.which("tar"):
        listed = subprocess.run(["tar", "tzf", str(path)], capture_output=True, text=True, check=True).stdout
        assert listed.split() == files


def test_second_member_replacing_a_file_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.tar.gz", gzip.compress(_tar(GOOD, end=False))
                  + gzip.compress(_tar({"cpu/infer.py": b"raise SystemExit(66)\n"})))
    with pytest.raises(UserError) as exc:
        safe_extract(path, tmp_path / "out")
    _one_line(exc, "d.tar.gz", "duplicate or conflicting archive member 'cpu/infer.py'")
    assert not (tmp_path / "out").exists()


def test_a_second_archive_after_the_end_marker_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "two.tar.gz", gzip.compress(_tar(GOOD)) + gzip.compress(_tar(EVIL)))
    with pytest.raises(UserError) as exc:
        _names(path)
    _one_line(exc, "two.tar.gz", "data after the end of the tar archive", "not a clean archive")


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_garbage_header_midway_is_refused(tmp_path: Path, suffix: str) -> None:
    """Before: tarfile stopped at the bad block silently; GNU tar skipped it and extracted the rest."""
    raw = _tar(GOOD, end=False) + b"X" * 512 + _tar(EVIL)
    path = _write(tmp_path / f"h{suffix}", gzip.compress(raw) if suffix == ".tar.gz" else raw)
    with pytest.raises(UserError) as exc:
        safe_extract(path, tmp_path / "out")
    _one_line(exc, f"h{suffix}", "data after the end of the tar archive")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------- damaged compression
def _gz_cases(good: bytes) -> dict[str, bytes]:
    crc = bytearray(good)
    crc[-8] ^= 0xFF
    length = bytearray(good)
    length[-4] ^= 0x01
    return {"crc": bytes(crc), "length": bytes(length), "no trailer": good[:-8],
            "cut": good[: len(good) // 2], "trailing garbage": good + b"junk"}


@pytest.mark.parametrize("case", ["crc", "length", "no trailer", "cut", "trailing garbage"])
def test_damaged_gzip_is_refused(tmp_path: Path, case: str) -> None:
    """Before: the CRC/length trailer was never checked (verify OK; `tar xzf` fails)."""
    path = _write(tmp_path / "g.tgz", _gz_cases(gzip.compress(_tar(GOOD)))[case])
    with pytest.raises(UserError) as exc:
        _names(path)
    _one_line(exc, "g.tgz", "not a clean archive")


@pytest.mark.parametrize("suffix,compress", [(".tar.bz2", bz2.compress), (".txz", lzma.compress)])
@pytest.mark.parametrize("case", ["flipped", "cut", "trailing garbage"])
def test_damaged_bz2_and_xz_are_refused(tmp_path: Path, suffix: str, compress, case: str) -> None:
    good = compress(_tar(GOOD))
    bad = bytearray(good)
    bad[len(good) // 2] ^= 0x55
    data = {"flipped": bytes(bad), "cut": good[:-12], "trailing garbage": good + b"junk"}[case]
    path = _write(tmp_path / f"b{suffix}", data)
    with pytest.raises(UserError) as exc:
        _names(path)
    _one_line(exc, f"b{suffix}")
    # a flipped byte may garble a tar header before the block's CRC is reached: refused either way
    assert "not a clean archive" in str(exc.value) or "cannot read the archive" in str(exc.value)


# --------------------------------------------------------------- name clashes
@pytest.mark.parametrize("members,culprit", [
    ({"cpu/model.onnx": b"m", "cpu/x": b"x", "cpu/model.onnx/": None}, "cpu/model.onnx"),  # file, then folder
    ({"cpu/model.onnx": b"m", "cpu/model.onnx/x": b"x"}, "cpu/model.onnx/x"),  # file, then a child of it
    ({"cpu/": None, "cpu": b"x"}, "cpu"),  # folder, then file
    ({"cpu/a": b"a", "cpu": b"x"}, "cpu"),  # implied folder, then file
    ({"cpu/infer.py": b"a", "./cpu//infer.py": b"b"}, "cpu/infer.py"),  # same file twice
])
def test_name_clashes_are_one_line_errors(tmp_path: Path, members: dict, culprit: str) -> None:
    """Before: FileExistsError/IsADirectoryError tracebacks from safe_extract."""
    path = _write(tmp_path / "c.tar.gz", gzip.compress(_tar(members)))
    with pytest.raises(UserError) as exc:
        safe_extract(path, tmp_path / "out")
    _one_line(exc, "c.tar.gz", f"duplicate or conflicting archive member {culprit!r}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tar.gz"]


def test_repeated_folders_are_fine(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.tar", _tar({"cpu/": None, "cpu/a": b"a", "./cpu": None, "cpu/sub/": None}))
    assert (safe_extract(path, tmp_path / "out") / "cpu" / "a").read_bytes() == b"a"


# --------------------------------------------------------------- clean archives, every kind
COMPRESS = {".tar": lambda b: b, ".tar.gz": gzip.compress, ".tgz": gzip.compress, ".tar.bz2": bz2.compress,
            ".tbz2": bz2.compress, ".tar.xz": lzma.compress, ".txz": lzma.compress}


@pytest.mark.parametrize("suffix", TAR_SUFFIXES)
def test_clean_archives_of_every_kind_read_as_before(tmp_path: Path, suffix: str) -> None:
    members: dict[str, bytes | None] = {"cpu/": None, **GOOD, "cpu/empty": b"", "cpu/big": bytes(range(256)) * 5000}
    path = _write(tmp_path / f"a{suffix}", COMPRESS[suffix](_tar(members)))
    data, files, dirs = read_archive(path, lambda n: True)
    assert dirs == ["cpu"] and files == ["cpu/infer.py", "cpu/model.onnx", "cpu/empty", "cpu/big"]
    assert all(data[n] == members[n] for n in files)
    out = safe_extract(path, tmp_path / "out")
    assert (out / "cpu" / "big").read_bytes() == members["cpu/big"]


def test_zip_still_reads(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in GOOD.items():
            zf.writestr(name, data)
    assert read_archive(path, lambda n: True)[0] == GOOD


def test_tolerated_variations(tmp_path: Path) -> None:
    """A tar without end blocks, zero padding after the gzip data, a tar split over two members."""
    raw = _tar(GOOD)
    half = len(raw) // 2
    for i, blob in enumerate([_tar(GOOD, end=False), gzip.compress(raw) + bytes(4096),
                              gzip.compress(raw[:half]) + gzip.compress(raw[half:])]):
        path = _write(tmp_path / f"v{i}.tar.gz", blob if i else gzip.compress(blob))
        assert read_archive(path, lambda n: True)[0] == GOOD


# --------------------------------------------------------------- through `pipeline verify`
def test_verify_refuses_a_bundle_with_a_garbage_header(tmp_path: Path, capsys) -> None:
    raw = _tar({"cpu/": None, "cpu/manifest.json": b"{}", **GOOD}, end=False) + b"X" * 512 + _tar(EVIL)
    path = _write(tmp_path / "bundle.tar.gz", gzip.compress(raw))
    code, out, err = run_main(["verify", str(path)], capsys)
    text = (out + err).strip()
    assert code == 2 and "data after the end of the tar archive" in text, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
