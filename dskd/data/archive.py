"""Read .tar/.tar.gz/.tgz/.zip datasets member by member, refusing anything that could escape.

A dataset archive comes from somewhere else, so every member is checked before use: names
with `..`, absolute names, links of any kind and device/special files are refused with a
one-line UserError naming the member. `iter_members` streams the archive (no extraction);
`safe_extract` writes it to a folder with the same checks, atomically.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from dskd.errors import UserError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_SUFFIXES = (".zip",)

_DRIVE = re.compile(r"^[A-Za-z]:")


def archive_kind(path: str | os.PathLike) -> str | None:
    """'tar', 'zip' or None, from the file name (the spec format is chosen by extension)."""
    name = os.fspath(path).lower()
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(ZIP_SUFFIXES):
        return "zip"
    return None


def unsafe_name_reason(name: str) -> str | None:
    """Why a member name could write outside the destination, or None when it is safe."""
    if "\x00" in name:
        return "NUL byte in the name"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or _DRIVE.match(norm):
        return "absolute path"
    if ".." in norm.split("/"):
        return "'..' path component"
    return None


def clean_name(name: str) -> str:
    """Member name as a relative POSIX path without './' parts or trailing '/'."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts)


def _refuse(archive: Path, name: str, reason: str) -> UserError:
    return UserError(
        f"{archive}: unsafe archive member {name!r} ({reason}); "
        f"re-pack the archive with plain files and folders only"
    )


class _ProgressReader:
    """File wrapper that reports bytes read, so a bar can follow a streamed archive."""

    def __init__(self, fh: IO[bytes], on_read: Callable[[int], None] | None) -> None:
        self._fh, self._on_read = fh, on_read

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        if self._on_read is not None and data:
            self._on_read(len(data))
        return data


def _iter_tar(archive: Path, on_read: Callable[[int], None] | None
              ) -> Iterator[tuple[str, bool, IO[bytes] | None]]:
    with open(archive, "rb") as raw, tarfile.open(
        fileobj=_ProgressReader(raw, on_read), mode="r|*"  # type: ignore[arg-type]
    ) as tf:
        for member in tf:
            reason = unsafe_name_reason(member.name)
            if reason is None and not (member.isreg() or member.isdir()):
                if member.issym() or member.islnk():
                    reason = f"link to {member.linkname!r}; links are not allowed"
                else:
                    reason = "device or special file"
            if reason is not None:
                raise _refuse(archive, member.name, reason)
            name = clean_name(member.name)
            if not name:
                continue
            if member.isdir():
                yield name, True, None
            else:
                yield name, False, tf.extractfile(member)


def _iter_zip(archive: Path, on_read: Callable[[int], None] | None
              ) -> Iterator[tuple[str, bool, IO[bytes] | None]]:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            reason = unsafe_name_reason(info.filename)
            mode = info.external_attr >> 16
            if reason is None and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                reason = "link; links are not allowed" if stat.S_ISLNK(mode) else "device or special file"
            if reason is not None:
                raise _refuse(archive, info.filename, reason)
            name = clean_name(info.filename)
            if not name:
                continue
            if info.is_dir():
                yield name, True, None
            else:
                with zf.open(info) as fh:
                    yield name, False, fh
            if on_read is not None:
                on_read(info.compress_size)


def iter_members(archive: str | os.PathLike, on_read: Callable[[int], None] | None = None
                 ) -> Iterator[tuple[str, bool, IO[bytes] | None]]:
    """Yield `(relative_name, is_dir, fileobj)` for each member, checked for safety first.

    `fileobj` (None for folders) is only valid until the next item. `on_read(nbytes)` is
    called as the compressed file is consumed (for progress bars). Unreadable archives
    raise a UserError naming the file.
    """
    path = Path(archive)
    kind = archive_kind(path)
    if kind is None:
        raise UserError(f"{path}: not a supported archive; use .tar, .tar.gz, .tgz or .zip")
    reader = _iter_tar if kind == "tar" else _iter_zip
    with archive_errors(path):
        yield from reader(path, on_read)


@contextlib.contextmanager
def archive_errors(path: Path) -> Iterator[None]:
    """Turn a corrupt/truncated archive (found while listing or reading) into a UserError."""
    try:
        yield
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, RuntimeError,
            NotImplementedError, ValueError) as exc:
        detail = str(exc).replace("\n", " ") or type(exc).__name__
        raise UserError(f"{path}: cannot read the archive ({detail}); re-download or re-pack it") from exc


def read_archive(archive: str | os.PathLike, want: Callable[[str], bool],
                 on_read: Callable[[int], None] | None = None
                 ) -> tuple[dict[str, bytes], list[str], list[str]]:
    """-> (bytes of the files for which `want(name)` is true, all file names, all folder names)."""
    path = Path(archive)
    data: dict[str, bytes] = {}
    files: list[str] = []
    dirs: list[str] = []
    with archive_errors(path):
        for name, is_dir, fh in iter_members(path, on_read):
            (dirs if is_dir else files).append(name)
            if not is_dir and want(name):
                data[name] = fh.read()  # type: ignore[union-attr]
    return data, files, dirs


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract `archive` into the folder `dest` (absent or empty), checking every member.

    Extraction goes to a temp folder beside `dest` that is renamed into place only when
    complete, so a refused member or an interrupted run leaves no partial `dest`.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{dest}: extraction target exists and is not an empty folder; pick a new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    root = tmp.resolve()
    try:
        with archive_errors(Path(archive)):
            for name, is_dir, fh in iter_members(archive):
                target = (tmp / name).resolve()
                if root not in target.parents:  # belt and braces: names were checked already
                    raise _refuse(Path(archive), name, "resolves outside the destination")
                if is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as out:
                    shutil.copyfileobj(fh, out, 1 << 20)  # type: ignore[arg-type]
        if dest.exists():
            dest.rmdir()
        os.rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return dest
