"""Read .tar/.tar.gz/.tgz/.zip datasets member by member, refusing anything that could escape.

A dataset archive comes from somewhere else, so every member is checked before use: names
with `..`, absolute names, links of any kind and device/special files are refused with a
one-line UserError naming the member. `iter_members` streams the archive (no extraction);
`safe_extract` writes it to a folder with the same checks, atomically.

Sizes are capped (`ByteCaps`): each member's header size is checked before it is read, and
the bytes actually delivered are counted while streaming, because a header can lie (a zip
central directory, a truncated tar). A 2 MB archive holding a 2 GiB member of zeros is
refused at its header, before any of it is decompressed into memory.

A tar is read as exactly one clean stream, because `tar xf` must get the same files that
were checked (deploy bundles are verified with this reader): compressed tars go through
`_TarStream`, which decodes every gzip/bz2/xz member and checks each one's CRC and length
(Python's `tarfile` alone reads only the first gzip member and never checks the trailer),
and when `tarfile` stops, everything left must be zero padding: a damaged header, a second
archive or appended bytes are refused, not silently ignored while GNU tar extracts them.
Two members with the same name, or a file where a folder is (or the reverse), are refused
too: the extracted tree must not depend on which copy an extractor keeps.
"""

from __future__ import annotations

import bz2
import contextlib
import io
import lzma
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
from typing import IO, Any

from dskd.data.limits import ByteCaps
from dskd.errors import UserError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_SUFFIXES = (".zip",)

_DRIVE = re.compile(r"^[A-Za-z]:")

_RAW_CHUNK = 1 << 16  # compressed bytes read at a time
_MAX_PADDING = 64 << 20  # zero bytes allowed after the end of a tar / the last compressed stream
_REPACK = "not a clean archive; re-download or re-create it"


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


def _sniff(head: bytes) -> str:
    """Compression of a tar from its first bytes: 'gzip', 'bzip2', 'xz' or 'tar' (none).

    Same magic numbers as tarfile's 'r|*' (the extension is not trusted to name it).
    """
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head[:3] == b"BZh" and head[4:10] == b"1AY&SY":
        return "bzip2"
    if head.startswith((b"\xfd7zXZ\x00", b"\x5d\x00\x00\x80")):
        return "xz"
    return "tar"


def _decoder(kind: str) -> Any:
    """A fresh decoder for one compressed member (zlib, bz2 and lzma share decompress/eof/unused_data)."""
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip wrapper: checks CRC-32 and ISIZE
    if kind == "bzip2":
        return bz2.BZ2Decompressor()
    return lzma.LZMADecompressor(lzma.FORMAT_AUTO)  # .xz (checked) or legacy .lzma


class _TarStream:
    """The decompressed bytes of a tar file, all compressed members of it, checked; forward only.

    Given to `tarfile.open(mode="r:")`, which reads headers with `read` and skips data with
    forward `seek`, so this object knows exactly where `tarfile` stopped: `check_end` then
    requires the rest to be zero padding. Each compressed member must end with a valid
    trailer (CRC, length); the file may end after a member, or with zero bytes only. A
    corrupt, truncated or trailing-garbage stream raises a UserError naming the archive.
    """

    def __init__(self, archive: Path, raw: _ProgressReader) -> None:
        self._archive, self._raw = archive, raw
        self._input = raw.read(_RAW_CHUNK)  # compressed bytes not yet given to the decoder
        self.kind = _sniff(self._input)
        self._dec = _decoder(self.kind) if self.kind != "tar" else None
        self._ended = False
        self._pos = 0  # decompressed bytes handed out
        self._last_start, self._last = 0, b""  # the latest read, for check_end

    # -- the file interface tarfile uses ------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False  # forward skips only; tarfile calls seek() itself, never seekable()

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self._pos + offset}.get(whence)
        if target is None or target < self._pos:
            raise io.UnsupportedOperation("a tar stream is read forward only")
        while self._pos < target and self.read(min(target - self._pos, 1 << 20)):
            pass
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        """Up to `n` bytes (all when n < 0); fewer only at the end, as a plain file does."""
        start, parts, want = self._pos, [], (n if n is not None and n >= 0 else None)
        while want is None or want > 0:
            block = self._produce(min(want, 1 << 20) if want is not None else 1 << 20)
            if not block:
                break
            parts.append(block)
            self._pos += len(block)
            if want is not None:
                want -= len(block)
        data = b"".join(parts)
        self._last_start, self._last = start, data
        return data

    # -- decoding ---------------------------------------------------------------------------
    def _error(self, what: str) -> UserError:
        return UserError(f"{self._archive}: cannot read the archive ({what}); {_REPACK}")

    def _produce(self, n: int) -> bytes:
        """At most `n` (> 0) decompressed bytes; b'' only after the last member ended cleanly."""
        if self._dec is None:
            data, self._input = (self._input[:n], self._input[n:]) if self._input else (self._raw.read(n), b"")
            return data
        stalled = 0
        while not self._ended:
            dec = self._dec
            if dec.eof:
                self._next_member()
                continue
            data = b""
            if self.kind == "gzip" or dec.needs_input:
                data = self._input or self._raw.read(_RAW_CHUNK)
            try:
                out = dec.decompress(data, n)
            except (zlib.error, OSError, lzma.LZMAError, EOFError) as exc:
                raise self._error(f"the {self.kind} data is corrupt ({exc})") from None
            # zlib leaves the bytes after a member's end in both unused_data and unconsumed_tail
            self._input = dec.unconsumed_tail if self.kind == "gzip" and not dec.eof else b""
            if out:
                return out
            if not data and not dec.eof:
                stalled += 1
                if stalled > 2:  # no input left and the decoder wants more: cut short
                    raise self._error(f"the {self.kind} stream ends early (truncated or damaged)")
        return b""

    def _next_member(self) -> None:
        """After a compressed member: end of file, zero padding, or another member of the same kind."""
        assert self._dec is not None
        rest = self._dec.unused_data + self._input
        self._input = b""
        if not rest:
            rest = self._raw.read(_RAW_CHUNK)
        if not rest:
            self._ended = True
        elif rest[0] == 0:
            self._require_zeros(rest, self._raw.read, f"after the end of the {self.kind} data")
            self._ended = True
        else:
            self._dec, self._input = _decoder(self.kind), rest  # a corrupt start raises in _produce

    def _require_zeros(self, first: bytes, more: Callable[[int], bytes], where: str) -> None:
        seen, block = 0, first
        while block:
            if block.count(0) != len(block):
                raise self._error(f"data {where} (a second archive, a damaged header or appended bytes)")
            seen += len(block)
            if seen > _MAX_PADDING:
                raise self._error(f"over {_MAX_PADDING >> 20} MiB of padding {where}")
            block = more(1 << 20)

    def check_end(self, offset: int) -> None:
        """`tarfile` stopped at `offset` (its end-of-archive block, or a header it could not
        parse): require everything from there to the end of the file to be zero bytes."""
        if offset > self._pos:
            self.seek(offset)  # padding of a member nobody read
        if offset < self._last_start:
            raise self._error(f"cannot find where the tar data ends (offset {offset})")
        self._require_zeros(self._last[offset - self._last_start:], self.read,
                            "after the end of the tar archive")


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
    with open(archive, "rb") as raw:
        stream = _TarStream(archive, _ProgressReader(raw, on_read))
        with tarfile.open(fileobj=stream, mode="r:") as tf:  # type: ignore[call-overload]
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
            stream.check_end(tf.offset)


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


class _Names:
    """Names seen so far (file or folder), so a second copy or a file/folder clash is refused.

    GNU tar keeps the last copy of a duplicated file and fails on a file where a folder is;
    a checker that saw the first copy, or a half-extracted tree, would vouch for the wrong
    files. Parent folders count as folders even when the archive has no entry for them.
    """

    def __init__(self, archive: Path) -> None:
        self._archive = archive
        self._is_dir: dict[str, bool] = {}

    def _clash(self, name: str, why: str) -> UserError:
        return UserError(f"{self._archive}: duplicate or conflicting archive member {name!r} ({why}); "
                         f"re-pack the archive with each name once")

    def add(self, name: str, is_dir: bool) -> None:
        parent = name
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            seen = self._is_dir.get(parent)
            if seen is True:
                break  # its own parents were registered with it
            if seen is False:
                raise self._clash(name, f"{parent!r} is a file earlier in the archive")
            self._is_dir[parent] = True
        seen = self._is_dir.get(name)
        if seen is not None and not (seen and is_dir):
            what = "a folder" if seen else "a file"
            raise self._clash(name, f"{what} of that name is earlier in the archive")
        self._is_dir[name] = is_dir


def iter_members(archive: str | os.PathLike, on_read: Callable[[int], None] | None = None,
                 *, caps: ByteCaps | None = None) -> Iterator[tuple[str, bool, IO[bytes] | None]]:
    """Yield `(relative_name, is_dir, fileobj)` for each member, checked for safety first.

    `fileobj` (None for folders) is only valid until the next item. `on_read(nbytes)` is
    called as the compressed file is consumed (for progress bars). Unreadable archives
    raise a UserError naming the file. `caps` bounds each member's size and the total
    (header sizes before reading, delivered bytes while reading); None: no caps.
    A tar must be one clean stream (see the module docstring) and no name may repeat or
    clash with a folder; the end of a tar is checked once the last member has been yielded.
    """
    path = Path(archive)
    kind = archive_kind(path)
    if kind is None:
        raise UserError(f"{path}: not a supported archive; use one of {', '.join(TAR_SUFFIXES + ZIP_SUFFIXES)}")
    reader = _iter_tar if kind == "tar" else _iter_zip
    names = _Names(path)
    with archive_errors(path):
        for item in reader(path, on_read, _Budget(path, caps)):
            names.add(item[0], item[1])
            yield item


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
                try:
                    if is_dir:
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open(target, "xb") as out:  # never over an earlier member
                        shutil.copyfileobj(fh, out, 1 << 20)  # type: ignore[arg-type]
                except (FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
                    # iter_members refuses these already; a case-folding file system can still clash
                    raise UserError(f"{archive}: duplicate or conflicting archive member {name!r} "
                                    f"({exc.strerror}); re-pack the archive with each name once") from None
        if dest.exists():
            dest.rmdir()
        os.rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return dest
