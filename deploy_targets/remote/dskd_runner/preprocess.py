"""Pre-processing of one encoded image, timed on its own: decode, resize, normalize.

What a deployment does before inference for one camera/file image: decode, resize to
the model's H x W, normalize to float32 N x C x H x W. Timed separately from inference
(its own record, `preprocess`), so "end-to-end per image" = preprocess + inference.
Pillow decodes when the device has it (what most deployments use); without it a small
stdlib PNG decoder keeps the runner dependency-free.
"""

from __future__ import annotations

import os
from typing import Any

from ._numpy import np
from .protocol import EXIT_BAD_INPUT, Protocol, RunnerError, one_line
from .timing import summarize, time_calls

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (8-bit only)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    import struct
    import zlib

    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def encode_png(image: Any) -> bytes:
    """H x W (grey) or H x W x 3 uint8 -> PNG bytes (filter 0), standard library only."""
    import struct
    import zlib

    img = np.ascontiguousarray(image, dtype=np.uint8)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    h, w = img.shape[:2]
    colour = 0 if img.ndim == 2 else 2
    rows = img.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw, 6))
        + _png_chunk(b"IEND", b"")
    )


def _unfilter_row(kind: int, row: Any, prev: Any, bpp: int) -> Any:
    """Undo one PNG row filter (RFC 2083 6.3); rows are uint8 arrays of equal length."""
    if kind == 0:
        return row
    if kind == 2:
        return (row.astype(np.uint16) + prev).astype(np.uint8)
    if kind == 1:  # Sub: a running sum per byte position modulo 256
        out = row.astype(np.int64).reshape(-1, bpp).cumsum(axis=0) % 256
        return out.reshape(-1).astype(np.uint8)
    out = bytearray(row.tobytes())
    up = prev.tobytes()
    for i in range(len(out)):
        a = out[i - bpp] if i >= bpp else 0
        b = up[i]
        if kind == 3:
            out[i] = (out[i] + ((a + b) >> 1)) & 0xFF
        elif kind == 4:
            c = up[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            out[i] = (out[i] + pred) & 0xFF
        else:
            raise ValueError(f"unknown PNG filter type {kind}")
    return np.frombuffer(bytes(out), np.uint8)


def decode_png(data: bytes) -> Any:
    """PNG bytes -> H x W x C uint8 (8-bit, non-interlaced grey/RGB[A]); alpha dropped."""
    import struct
    import zlib

    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    pos, idat, header = len(PNG_SIGNATURE), [], None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        payload = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", payload)
        elif kind == b"IDAT":
            idat.append(payload)
        elif kind == b"IEND":
            break
    if header is None or not idat:
        raise ValueError("PNG without IHDR/IDAT")
    w, h, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in _PNG_CHANNELS or interlace:
        raise ValueError(
            f"PNG with bit depth {depth}, colour type {colour}, interlace {interlace}: "
            "only 8-bit non-interlaced grey/RGB(A) without Pillow (install pillow)"
        )
    bpp = _PNG_CHANNELS[colour]
    stride = w * bpp
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    if raw.size != h * (stride + 1):
        raise ValueError("PNG data is truncated")
    raw = raw.reshape(h, stride + 1)
    out = np.empty((h, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(h):
        prev = out[y] = _unfilter_row(int(raw[y, 0]), raw[y, 1:], prev, bpp)
    img = out.reshape(h, w, bpp)
    return img[:, :, :3] if bpp == 4 else img[:, :, :1] if bpp == 2 else img


def resize_bilinear(image: Any, height: int, width: int) -> Any:
    """H x W x C -> height x width x C float32, bilinear with half-pixel centres (no antialias)."""
    src_h, src_w = image.shape[:2]
    img = image.astype(np.float32)
    if (src_h, src_w) == (height, width):
        return img

    def axis(n_out: int, n_in: int) -> tuple[Any, Any, Any]:
        pos = (np.arange(n_out, dtype=np.float32) + 0.5) * (n_in / n_out) - 0.5
        pos = np.clip(pos, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, fy = axis(height, src_h)
    x0, x1, fx = axis(width, src_w)
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bottom = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


class Preprocessor:
    """Encoded image bytes -> normalized 1 x C x H x W float32 (decode, resize, normalize)."""

    def __init__(self, chw: tuple[int, ...], mean: Any, std: Any):
        self.c, self.h, self.w = (int(v) for v in chw)
        self.mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
        try:
            from PIL import Image

            self.pil: Any = Image
            self.decoder = f"Pillow {getattr(__import__('PIL'), '__version__', '')}".strip()
        except ImportError:
            self.pil, self.decoder = None, "builtin-png (stdlib zlib + numpy)"

    def decode_resize(self, data: bytes) -> Any:
        """H x W x C uint8/float32 pixels at the model's size (0..255 scale)."""
        if self.pil is not None:
            import io

            img = self.pil.open(io.BytesIO(data)).convert("L" if self.c == 1 else "RGB")
            img = img.resize((self.w, self.h), self.pil.BILINEAR)
            arr = np.asarray(img, dtype=np.float32)
            return arr[:, :, None] if arr.ndim == 2 else arr
        arr = decode_png(data)
        if self.c == 1 and arr.shape[2] == 3:  # ITU-R 601-2 luma, as Pillow's convert("L")
            arr = (arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[:, :, None]
        elif self.c == 3 and arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        return resize_bilinear(arr, self.h, self.w)

    def __call__(self, data: bytes) -> Any:
        pixels = self.decode_resize(data)
        x = pixels.transpose(2, 0, 1)[None] * np.float32(1.0 / 255.0)
        return np.ascontiguousarray((x - self.mean) / self.std, dtype=np.float32)


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a PNG or JPEG header, without decoding the pixels."""
    import struct

    if data.startswith(PNG_SIGNATURE) and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return int(h), int(w)
    pos = 2 if data[:2] == b"\xff\xd8" else len(data)
    while pos + 9 <= len(data):
        if data[pos] != 0xFF:
            break
        marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            h, w = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return int(h), int(w)
        pos += 2 + length
    raise ValueError("not a PNG or JPEG image")


def measure_preprocess(
    data: bytes, source: str, chw: tuple[int, ...], mean: Any, std: Any, protocol: Protocol
) -> dict[str, Any]:
    """Time decode + resize + normalize of one encoded image (a shorter run than inference)."""
    prep = Preprocessor(chw, mean, std)
    try:
        src_hw = image_size(data)
        prep(data)  # fails here, not inside the timing loop, on an unreadable image
    except Exception as exc:
        raise RunnerError(
            "bad-input", f"cannot decode image {source}: {one_line(exc)}", EXIT_BAD_INPUT
        ) from exc
    short = Protocol(
        warmup_seconds=min(protocol.warmup_seconds, 0.2),
        min_iters=min(protocol.min_iters, 50),
        min_seconds=min(protocol.min_seconds, 1.0),
        max_seconds=min(protocol.max_seconds, 30.0),
    )
    def step() -> None:  # time_calls reads a returned value as a device time
        prep(data)

    stats = summarize(time_calls(step, short).wall_ms)
    return {
        "steps": "decode+resize+normalize",
        "source": source,
        "bytes": len(data),
        "source_hw": list(src_hw),
        "output_chw": [prep.c, prep.h, prep.w],
        "decoder": prep.decoder,
        **{k: stats[k] for k in ("iterations", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "cov")},
    }


def read_image(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise RunnerError("bad-input", f"cannot read image {path}: {exc}", EXIT_BAD_INPUT) from exc


def preprocess_record(
    image: bytes | None,
    image_path: str | None,
    ev: Any,
    chw: tuple[int, ...],
    protocol: Protocol,
) -> dict[str, Any] | None:
    """Pre-processing timing of the given image, else of eval image 0 as a PNG; None without either."""
    if image is None and ev is None:
        return None
    if ev is not None:
        mean, std = ev.mean, ev.std
    else:  # an image without an eval set: ImageNet-style constants do not change the timing
        mean, std = np.full(chw[0], 0.5, np.float32), np.full(chw[0], 0.25, np.float32)
    if image is None:
        image = encode_png(ev.x[0].transpose(1, 2, 0))
        source = "eval-set image 0 as PNG"
    else:
        source = os.path.basename(str(image_path))
    return measure_preprocess(image, source, tuple(chw), mean, std, protocol)
