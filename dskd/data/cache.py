"""Decoded-dataset cache: one folder per fingerprint, created whole or not at all.

A cache folder is written under a temp name and renamed into place when complete, so a
crash or a failed decode never leaves something that looks like a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

CACHE_FORMAT = "dskd-data-cache/1"
ARRAYS = ("train_x", "train_y", "test_x", "test_y")
_STALE_TMP_S = 24 * 3600


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """`cache_dir`, else $DSKD_CACHE/data, else ~/.cache/dskd/data."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DSKD_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "dskd") / "data"


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def files_digest(root: Path, relpaths: Iterable[str]) -> str:
    """Hash of relative paths + size, mtime, ctime and inode: notices edits without reading images.

    mtime alone misses an image edited in place with its mtime put back (`touch -d`, tools
    that preserve times); the kernel sets ctime on every content or time change and no
    ordinary tool can set it back, and a file replaced by another has a new inode. The
    cost: chmod/chown or restoring a backup also re-decode once. Way out for anything else
    (a file system without ctime): another `cache_dir` (recipe data.cache_dir) or delete the
    cache folder (~/.cache/dskd/data/<fingerprint>).
    """
    h = hashlib.sha256()
    for rel in relpaths:
        st = os.stat(root / rel)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n".encode())
    return h.hexdigest()


def make_fingerprint(kind: str, source_digest: str, settings: dict[str, Any]) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "kind": kind, "source": source_digest, **settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_cache(folder: Path, fingerprint: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """Arrays and meta of a complete cache folder, or None (absent or unusable: then removed)."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != fingerprint:
            raise ValueError("format or fingerprint mismatch")
        arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in ARRAYS}
        for split in ("train", "test"):
            x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
            if x.dtype != np.uint8 or x.ndim != 4 or y.shape != (len(x),):
                raise ValueError(f"{split} arrays have the wrong shape or type")
        return arrays, meta
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"{folder}: unusable data cache ({exc}); decoding again", stacklevel=3)
        remove_tree(folder)
        return None


def remove_tree(folder: Path) -> None:
    """Rename away first, so nobody sees a half-deleted cache."""
    with contextlib.suppress(OSError):
        doomed = folder.with_name(f".tmp-del-{folder.name}-{os.getpid()}")
        os.rename(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _clean_stale(root: Path) -> None:
    """Drop temp folders left by killed processes long ago (never read, only disk garbage)."""
    now = time.time()
    for p in root.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Let one process (e.g. one DDP rank) decode while others on the host wait for its cache.

    Best effort: without fcntl or a writable cache root it does nothing, and a rare race
    only costs a duplicate decode, since cache folders appear by atomic rename anyway.
    """
    created_root = not folder.parent.exists()
    try:
        import fcntl

        folder.parent.mkdir(parents=True, exist_ok=True)
        fh = open(folder.parent / f".lock-{folder.name[:16]}", "a+b")  # noqa: SIM115
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(fh.name)
        fh.close()  # closing releases the lock
        if created_root:  # a failed first load leaves no trace, not even an empty cache root
            with contextlib.suppress(OSError):
                folder.parent.rmdir()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_cache(folder: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bool:
    """Write all files into a temp folder, then rename it to `folder`. False if not writable."""
    tmp: Path | None = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(folder.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name[:16]}-", dir=folder.parent))
        for name in ARRAYS:
            path = tmp / f"{name}.npy"
            np.save(path, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            _fsync(path)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _fsync(tmp / "meta.json")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same cache first
        with contextlib.suppress(OSError):
            _fsync(folder.parent)
        return True
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        warnings.warn(f"{folder}: could not write the data cache ({exc}); continuing without it", stacklevel=3)
        return False
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
