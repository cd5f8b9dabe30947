"""Read .tar/.tar.gz/.tgz/.zip datasets member by member, refusing anything that could escape.

A dataset archive comes from somewhere else, so every member is checked before use: names
with `..`, absolute names, links of any kind and device/special files are refused with a
one-line UserError naming the member. `iter_members` streams the archive (no extraction);
`safe_extract` writes it to a folder with the same checks, atomically.

Sizes are capped (`ByteCaps`): each member's header size is checked before it is read, and
the bytes actually delivered are counted while streaming, because a header can lie (a zip
central directory, a truncated tar). A 2 MB archive holding a 2 GiB member of zeros is
refused at its header, before any of it is decompressed into memory.
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

from dskd.data.limits import ByteCaps
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


class _Budget:
    """Counts member bytes against `ByteCaps`: header sizes first, then what is streamed."""

    def __init__(self, archive: Path, caps: ByteCaps | None) -> None:
        self.archive, self.caps = archive, caps or ByteCaps()
        self.declared = 0  # sum of header sizes so far
        self.streamed = 0  # bytes actually handed out

    def check_header(self, name: str, size: int) -> None:
        where = f"{self.archive}:{name}"
        if self.caps.per_file is not None and size > self.caps.per_file:
            raise self.caps.file_error(where, size)
        self.declared += max(size, 0)
        if self.caps.total is not None and self.declared > self.caps.total:
            raise self.caps.total_error(where, self.declared)

    def wrap(self, name: str, fh: IO[bytes]) -> _CappedReader:
        return _CappedReader(fh, self, f"{self.archive}:{name}")


class _CappedReader:
    """A member's file object that stops with a UserError once it delivers more than allowed."""

    def __init__(self, fh: IO[bytes], budget: _Budget, where: str) -> None:
        self._fh, self._budget, self._where, self._read = fh, budget, where, 0

    def read(self, n: int = -1) -> bytes:
        caps = self._budget.caps
        if n is None or n < 0:  # never an unbounded read: at most one byte past the cap
            n = (caps.per_file + 1) if caps.per_file is not None else -1
        data = self._fh.read(n)
        self._read += len(data)
        self._budget.streamed += len(data)
        if caps.per_file is not None and self._read > caps.per_file:
            raise caps.file_error(self._where, self._read, streamed=True)
        if caps.total is not None and self._budget.streamed > caps.total:
            raise caps.total_error(self._where, self._budget.streamed)
        return data

    def readall(self) -> bytes:
        chunks = []
        while block := self.read(1 << 20):
            chunks.append(block)
        return b"".join(chunks)


def _iter_tar(archive: Path, on_read: Callable[[int], None] | None, budget: _Budget
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
                budget.check_header(name, member.size)
                yield name, False, budget.wrap(name, tf.extractfile(member))  # type: ignore[arg-type,misc]


def _iter_zip(archive: Path, on_read: Callable[[int], None] | None, budget: _Budget
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
                budget.check_header(name, info.file_size)
                with zf.open(info) as fh:
                    yield name, False, budget.wrap(name, fh)  # type: ignore[misc]
            if on_read is not None:
                on_read(info.compress_size)


def iter_members(archive: str | os.PathLike, on_read: Callable[[int], None] | None = None,
                 *, caps: ByteCaps | None = None) -> Iterator[tuple[str, bool, IO[bytes] | None]]:
    """Yield `(relative_name, is_dir, fileobj)` for each member, checked for safety first.

    `fileobj` (None for folders) is only valid until the next item. `on_read(nbytes)` is
    called as the compressed file is consumed (for progress bars). Unreadable archives
    raise a UserError naming the file. `caps` bounds each member's size and the total
    (header sizes before reading, delivered bytes while reading); None: no caps.
    """
    path = Path(archive)
    kind = archive_kind(path)
    if kind is None:
        raise UserError(f"{path}: not a supported archive; use .tar, .tar.gz, .tgz or .zip")
    reader = _iter_tar if kind == "tar" else _iter_zip
    with archive_errors(path):
        yield from reader(path, on_read, _Budget(path, caps))


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
                 on_read: Callable[[int], None] | None = None, *, caps: ByteCaps | None = None
                 ) -> tuple[dict[str, bytes], list[str], list[str]]:
    """-> (bytes of the files for which `want(name)` is true, all file names, all folder names).

    Every member counts against `caps`, wanted or not: skipping a member still means
    decompressing it, so an oversized README costs as much time as an oversized image.
    """
    path = Path(archive)
    data: dict[str, bytes] = {}
    files: list[str] = []
    dirs: list[str] = []
    with archive_errors(path):
        for name, is_dir, fh in iter_members(path, on_read, caps=caps):
            (dirs if is_dir else files).append(name)
            if not is_dir and want(name):
                data[name] = fh.readall()  # type: ignore[union-attr]
    return data, files, dirs


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike, *,
                 caps: ByteCaps | None = None) -> Path:
    """Extract `archive` into the folder `dest` (absent or empty), checking every member.

    Extraction goes to a temp folder beside `dest` that is renamed into place only when
    complete, so a refused member or an interrupted run leaves no partial `dest`.
    `caps` (optional) bounds each member and the total written, e.g.
    `ByteCaps(256 << 20, 2 << 30, "bundle member", "bundle total")`.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{dest}: extraction target exists and is not an empty folder; pick a new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    root = tmp.resolve()
    try:
        with archive_errors(Path(archive)):
            for name, is_dir, fh in iter_members(archive, caps=caps):
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
