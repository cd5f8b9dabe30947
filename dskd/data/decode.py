"""Decode image files of any mode/size into uint8 C×H×W arrays, in a small process pool.

Only PIL and numpy are used here (no torch), so forked workers stay light. A bad image
never raises inside a worker: its index and reason come back so the caller can name the
file (or skip it when asked).

Caps (why: a 657 KB PNG can claim 13000×13000 RGBA pixels, 3.5 GB decoded): a file is
`stat`ed before it is opened (only regular files are opened, so a FIFO never blocks and a
device is never touched), its size is checked against the per-file cap, it is read with
at most one byte past that cap, and its pixel count is checked from the header before
any pixel is decoded. PIL's own decompression-bomb check is kept, set to the same cap.
A cap violation comes back as a reason starting with LIMIT_PREFIX: the caller treats it
as a limit to raise, not as a damaged file. MemoryError is never turned into "bad image":
it propagates, and a worker killed by the kernel raises WorkerDied instead of hanging.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import re
import stat
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from PIL import Image, ImageOps

from dskd.data.limits import PIXELS_KEY, ByteCaps

# Below this many images a pool costs more than it saves.
_MIN_PARALLEL = 1500
_EXIF_ORIENTATION = 0x0112
LIMIT_PREFIX = "over a cap: "

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


class CapExceeded(Exception):
    """A file or image over one of the caps; the message names the cap and its key."""


class WorkerDied(RuntimeError):
    """A decode worker process ended abruptly (typically killed by the kernel for memory)."""


def file_kind(mode: int) -> str:
    """'a FIFO', 'a socket', ... for a stat mode that is not a regular file."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_capped(path: str, caps: ByteCaps | None = None) -> bytes:
    """The bytes of a regular file, refusing special files unopened and oversized ones unread."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{file_kind(st.st_mode)}, not a regular file; remove it from the dataset")
    per_file = caps.per_file if caps is not None else None
    if per_file is not None and st.st_size > per_file:
        raise CapExceeded(str(caps.file_error("file", st.st_size)).partition(": ")[2])  # type: ignore[union-attr]
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if not stat.S_ISREG(mode):  # swapped for something else since the stat
            raise OSError(f"{file_kind(mode)}, not a regular file; remove it from the dataset")
        data = fh.read(per_file + 1 if per_file is not None else -1)
    if per_file is not None and len(data) > per_file:  # grew since the stat
        raise CapExceeded(str(caps.file_error("file", len(data), streamed=True)).partition(": ")[2])  # type: ignore[union-attr]
    return data


def check_pixels(im: Image.Image, max_pixels: int | None) -> None:
    """Refuse an image whose header claims more pixels than the cap, before decoding it."""
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        raise CapExceeded(_pixels_message(f"{w}×{h} = {w * h / 1e6:.1f} megapixels", max_pixels))


def _pixels_message(claimed: str, max_pixels: int | None) -> str:
    cap = f"{max_pixels / 1e6:g}" if max_pixels is not None else "PIL's default"
    return (f"image of {claimed}, over the cap of {cap} megapixels ({PIXELS_KEY}); "
            f"raise {PIXELS_KEY} if the image is trusted, or downscale it")


@contextlib.contextmanager
def pil_pixel_cap(max_pixels: int | None) -> Iterator[None]:
    """PIL's own bomb check at our cap (it errors above 2× the limit), restored afterwards."""
    old = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


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


def decode_image(src: bytes | str, size: int, in_chans: int, *, max_pixels: int | None = None,
                 caps: ByteCaps | None = None) -> np.ndarray:
    """One image (file bytes or a path) -> uint8 array in_chans×size×size (bilinear resize).

    A path is read with `read_capped` (regular files only, at most the per-file cap);
    `max_pixels` is checked from the header before decoding.
    """
    data = src if isinstance(src, bytes) else read_capped(src, caps)
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's check (2× our cap): same message as ours
        found = re.search(r"\((\d+) pixels\)", str(exc))
        claimed = f"{int(found.group(1)) / 1e6:.1f} megapixels" if found else "too many pixels"
        raise CapExceeded(_pixels_message(claimed, max_pixels)) from None
    with im:
        check_pixels(im, max_pixels)
        if im.format == "JPEG" and min(im.size) >= 2 * size:
            im.draft(None, (size, size))  # decode at a reduced scale: much faster for big JPEGs
        im.load()
        im = _upright(im)
        im = _to_target_mode(im, in_chans)
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


_Task = tuple[Sequence[bytes | str], int, int, int | None, ByteCaps | None]


def _decode_chunk(args: _Task) -> tuple[np.ndarray, list[tuple[int, str]]]:
    sources, size, in_chans, max_pixels, caps = args
    out = np.zeros((len(sources), in_chans, size, size), dtype=np.uint8)
    bad: list[tuple[int, str]] = []
    with warnings.catch_warnings(), pil_pixel_cap(max_pixels):
        # PIL warns on odd EXIF/palettes; errors are what matter. Its DecompressionBombWarning
        # is silenced only because check_pixels applies our own, lower cap first.
        warnings.simplefilter("ignore")
        for i, src in enumerate(sources):
            try:
                out[i] = decode_image(src, size, in_chans, max_pixels=max_pixels, caps=caps)
            except MemoryError:
                raise  # the machine, not the file: the caller reports it as such
            except (CapExceeded, Image.DecompressionBombError) as exc:
                bad.append((i, LIMIT_PREFIX + str(exc)))
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
                workers: int | None = None, on_done: Callable[[int], None] | None = None,
                *, max_pixels: int | None = None, caps: ByteCaps | None = None
                ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode all `sources` in order -> (uint8 N×C×H×W, [(index, reason) of bad images]).

    Bad images are left as zeros in the array; the caller decides to fail or drop them
    (reasons starting with LIMIT_PREFIX are caps, not damage). `on_done(n)` reports
    progress per finished chunk. A worker that dies raises WorkerDied, never hangs.
    """
    n = len(sources)
    workers = default_workers() if workers is None else max(1, int(workers))
    out = np.zeros((n, in_chans, size, size), dtype=np.uint8)
    bad: list[tuple[int, str]] = []
    if n == 0:
        return out, bad
    chunk = max(64, min(1024, n // (workers * 8) or 1))
    starts = range(0, n, chunk)
    tasks = ((sources[s:s + chunk], size, in_chans, max_pixels, caps) for s in starts)

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
        # concurrent.futures, not multiprocessing.Pool: a worker killed by the kernel (OOM)
        # breaks the executor with an error, where Pool.imap would wait forever.
        pool = ProcessPoolExecutor(workers, mp_context=_pool_context())
        try:
            for start, res in zip(starts, pool.map(_decode_chunk, tasks), strict=True):
                collect(start, res)
        except BrokenProcessPool as exc:
            raise WorkerDied("a decode worker process was killed (most likely out of memory)") from exc
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return out, bad
