"""Builders of hostile data files, made in seconds without ever holding their payload in memory.

A 2 GiB member of zeros compresses to ~2 MB, but compressing 2 GiB takes ~40 s here. Deflate
output after a full flush does not depend on what came before, so one compressed block of
zeros is computed once and repeated; only the checksums (CRC-32, Adler-32) see every byte.
All files are valid: `tar`, `unzip -t` and PIL accept them.
"""

from __future__ import annotations

import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

CHUNK = 16 << 20
_ZEROS = bytes(CHUNK)


def _deflated_zero_chunk() -> bytes:
    """Raw deflate of CHUNK zeros ending in a full flush: valid anywhere in a stream."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(_ZEROS) + c.flush(zlib.Z_FULL_FLUSH)


def _raw_deflate(data: bytes, final: bool) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)


def gzip_tar_with_zero_member(path: Path, member: str, size: int) -> Path:
    """A .tar.gz holding one member of `size` zero bytes (size a multiple of 16 MiB)."""
    assert size % CHUNK == 0
    info = tarfile.TarInfo(member)
    info.size = size
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    trailer = bytes(2 * tarfile.BLOCKSIZE)  # end-of-archive blocks (the member fills whole blocks)
    crc = zlib.crc32(header)
    for _ in range(size // CHUNK):
        crc = zlib.crc32(_ZEROS, crc)
    crc = zlib.crc32(trailer, crc)
    total = len(header) + size + len(trailer)
    block = _deflated_zero_chunk()
    with open(path, "wb") as fh:
        fh.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip header, no name, no mtime
        fh.write(_raw_deflate(header, final=False))
        for _ in range(size // CHUNK):
            fh.write(block)
        fh.write(_raw_deflate(trailer, final=True))
        fh.write(struct.pack("<II", crc, total & 0xFFFFFFFF))
    return path


class _ReplayCompressor:
    """zipfile's compressor for a stream of CHUNK-sized zero writes, without recompressing."""

    def __init__(self) -> None:
        self._block = _deflated_zero_chunk()

    def compress(self, data: bytes) -> bytes:
        assert data == _ZEROS[:len(data)] and len(data) == CHUNK
        return self._block

    def flush(self) -> bytes:
        return _raw_deflate(b"", final=True)


def zip_with_zero_member(path: Path, member: str, size: int) -> Path:
    """A .zip (zip64, deflated) holding one member of `size` zero bytes; zipfile writes the headers."""
    assert size % CHUNK == 0
    original = zipfile._get_compressor  # type: ignore[attr-defined]
    zipfile._get_compressor = lambda *a, **k: _ReplayCompressor()  # type: ignore[attr-defined]
    try:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, \
                zf.open(member, "w", force_zip64=True) as fh:
            for _ in range(size // CHUNK):
                fh.write(_ZEROS)
    finally:
        zipfile._get_compressor = original  # type: ignore[attr-defined]
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_rgba_png(path: Path, side: int = 13000) -> Path:
    """A side×side RGBA PNG of transparent black (13000: 169 MP, 676 MB decoded, ~0.7 MB on disk)."""
    row = bytes(1 + 4 * side)  # filter byte + pixels
    rows_per_block = max(1, CHUNK // len(row))
    block_raw = row * rows_per_block
    block = _raw_deflate(block_raw, final=False)
    full, rest = divmod(side, rows_per_block)
    adler = 1
    for _ in range(full):
        adler = zlib.adler32(block_raw, adler)
    tail_raw = row * rest
    adler = zlib.adler32(tail_raw, adler)
    stream = b"\x78\xda" + block * full + _raw_deflate(tail_raw, final=True) + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", stream)
                 + _png_chunk(b"IEND", b""))
    return path
