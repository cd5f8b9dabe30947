"""Decode image files of any mode/size into uint8 C×H×W arrays, in a small process pool.

Only PIL and numpy are used here (no torch), so forked workers stay light. A bad image
never raises inside a worker: its index and reason come back so the caller can name the
file (or skip it when asked).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import sys
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

# Below this many images a pool costs more than it saves.
_MIN_PARALLEL = 1500
_EXIF_ORIENTATION = 0x0112


def _to_8bit(im: Image.Image) -> Image.Image:
    """Integer/float modes carry more than 8 bits: scale 16-bit range to 0..255, clip floats."""
    if im.mode.startswith("I"):  # I;16, I;16B, I;16L, I (16-bit PNG/TIFF open as these)
        arr = np.asarray(im, dtype=np.float64) / 257.0
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
    else:
        return im
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def _to_target_mode(im: Image.Image, in_chans: int) -> Image.Image:
    """Convert to L or RGB; transparent pixels are composited on black."""
    im = _to_8bit(im)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, rgba).convert("RGB")
    if im.mode not in ("L", "RGB"):  # 1, P, CMYK, YCbCr, LAB, ...
        im = im.convert("RGB")
    target = "L" if in_chans == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos); broken EXIF is ignored, the pixels are fine."""
    try:
        if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            return ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF blocks raise all sorts of errors
        pass
    return im


def decode_image(src: bytes | str, size: int, in_chans: int) -> np.ndarray:
    """One image (file bytes or a path) -> uint8 array in_chans×size×size (bilinear resize)."""
    fh = io.BytesIO(src) if isinstance(src, bytes) else open(src, "rb")  # noqa: SIM115
    with fh, Image.open(fh) as im:
        if im.format == "JPEG" and min(im.size) >= 2 * size:
            im.draft(None, (size, size))  # decode at a reduced scale: much faster for big JPEGs
        im.load()
        im = _upright(im)
        im = _to_target_mode(im, in_chans)
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _decode_chunk(args: tuple[Sequence[bytes | str], int, int]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    sources, size, in_chans = args
    out = np.zeros((len(sources), in_chans, size, size), dtype=np.uint8)
    bad: list[tuple[int, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns on odd EXIF/palettes; errors are what matter
        for i, src in enumerate(sources):
            try:
                out[i] = decode_image(src, size, in_chans)
            except Exception as exc:  # any failure means "this file is not a usable image"
                detail = str(exc).replace("\n", " ").strip() or "empty or unreadable file"
                bad.append((i, f"{type(exc).__name__}: {detail}"))
    return out, bad


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork avoids re-importing torch in each worker; spawn where fork does not exist.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods and sys.platform != "darwin" else "spawn")


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def decode_many(sources: Sequence[bytes | str], size: int, in_chans: int,
                workers: int | None = None, on_done: Callable[[int], None] | None = None
                ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode all `sources` in order -> (uint8 N×C×H×W, [(index, reason) of bad images]).

    Bad images are left as zeros in the array; the caller decides to fail or drop them.
    `on_done(n)` reports progress per finished chunk.
    """
    n = len(sources)
    workers = default_workers() if workers is None else max(1, int(workers))
    out = np.zeros((n, in_chans, size, size), dtype=np.uint8)
    bad: list[tuple[int, str]] = []
    if n == 0:
        return out, bad
    chunk = max(64, min(1024, n // (workers * 8) or 1))
    starts = range(0, n, chunk)
    tasks = ((sources[s:s + chunk], size, in_chans) for s in starts)

    def collect(start: int, res: tuple[np.ndarray, list[tuple[int, str]]]) -> None:
        arr, errs = res
        out[start:start + len(arr)] = arr
        bad.extend((start + i, msg) for i, msg in errs)
        if on_done is not None:
            on_done(len(arr))

    if workers == 1 or n < _MIN_PARALLEL:
        for start, task in zip(starts, tasks, strict=True):
            collect(start, _decode_chunk(task))
    else:
        with _pool_context().Pool(workers) as pool:
            for start, res in zip(starts, pool.imap(_decode_chunk, tasks), strict=True):
                collect(start, res)
    return out, bad
