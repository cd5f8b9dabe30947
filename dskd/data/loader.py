"""`load_data`: any supported spec -> DataBundle, decoding once and caching by fingerprint.

Flow: identify the source and hash it (cheap), look for a complete cache folder with that
fingerprint, otherwise decode, check, compute mean/std, write the cache atomically.

Hostile data is bounded (docs/reliability.md, "Hostile data"): sizes and pixel counts are
capped (`DataLimits`, recipe [data] max_file_mb / max_total_mb / max_image_mp) before
anything is read; folders are walked without following folder links or opening special
files (`walk.walk_dataset`); running out of memory ends in one line naming the step and
what to lower, not a traceback.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import stat
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dskd.data import archive, cifar, decode
from dskd.data.arrays import channel_stats, convert_array
from dskd.data.bundle import DataBundle
from dskd.data.cache import (
    CACHE_FORMAT,
    build_lock,
    cache_root,
    file_digest,
    files_digest,
    make_fingerprint,
    read_cache,
    write_cache,
)
from dskd.data.digits import load_digits_arrays
from dskd.data.layout import Layout, is_hidden, is_image_name, plan_layout
from dskd.data.limits import DataLimits
from dskd.data.walk import walk_dataset
from dskd.errors import UserError

SPEC_HELP = ("pass 'digits', an ImageFolder folder (train/ and test/ of class folders), "
             "a .tar/.tar.gz/.tgz/.zip of one, or a CIFAR-10/100 python folder")
_MAX_BAD_LISTED = 50
# Below one grey level a channel is (nearly) constant: dividing by its std would blow it up.
_MIN_STD = 1.0 / 255.0
_STEP_ADVICE = {
    "reading the archive": "the archive's size (or extract it and pass the folder: folders are read "
                           "one image at a time)",
    "reading the decode cache": "data.input_size or data.limit_per_class",
    "decoding images": "data.input_size or data.limit_per_class (or data.max_image_mp)",
    "checking and caching the decoded images": "data.input_size or data.limit_per_class",
    "reading the CIFAR batches": "data.limit_per_class or data.input_size",
}


@dataclass
class _Split:
    x: np.ndarray
    y: np.ndarray
    names: list[str]  # what to call each image in messages
    bad: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class _Plan:
    """A recognised source: how to name it, its content hash, and how to decode it."""

    kind: str
    digest: str
    build: Callable[[], tuple[_Split, _Split, list[str]]]
    ignored: list[str] = field(default_factory=list)  # files in the splits that are not images


def _bar(progress: bool, **kw: Any) -> AbstractContextManager[tqdm]:
    return tqdm(disable=not (progress and sys.stderr.isatty()), leave=False, dynamic_ncols=True, **kw)


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_args(input_size: Any, in_chans: Any, limit_per_class: Any) -> None:
    if not _whole(input_size) or not 4 <= input_size <= 4096:
        raise UserError(f"input_size={input_size!r}: must be a whole number of pixels from 4 to 4096")
    if not _whole(in_chans) or in_chans not in (1, 3):
        raise UserError(f"in_chans={in_chans!r}: must be 1 (grayscale) or 3 (RGB)")
    if limit_per_class is not None and (not _whole(limit_per_class) or limit_per_class < 1):
        raise UserError(f"limit_per_class={limit_per_class!r}: must be a positive whole number or None")


@contextlib.contextmanager
def _step(path: Path, what: str) -> Iterator[None]:
    """Out of memory in this step -> one line naming the step and what to lower (exit 2)."""
    try:
        yield
    except (MemoryError, decode.WorkerDied) as exc:
        detail = "" if isinstance(exc, MemoryError) else f" ({exc})"
        raise UserError(
            f"{path}: out of memory while {what}{detail}; lower {_STEP_ADVICE[what]}, "
            f"or give the process more memory (ulimit -v, other jobs)"
        ) from None


def _decode_splits(sources: dict[str, list[bytes | str]], labels: dict[str, list[int]],
                   names: dict[str, list[str]], input_size: int, in_chans: int,
                   workers: int | None, progress: bool, limits: DataLimits) -> tuple[_Split, _Split]:
    """Decode train and test in one pool run (one start-up), then cut the result apart."""
    n_train = len(sources["train"])
    everything = sources["train"] + sources["test"]
    with _bar(progress, total=len(everything), unit="img", desc="decode images") as bar:
        x, bad = decode.decode_many(everything, input_size, in_chans, workers, on_done=bar.update,
                                    max_pixels=limits.max_pixels, caps=limits.byte_caps)
    flat_names = names["train"] + names["test"]
    over = [(i, msg) for i, msg in bad if msg.startswith(decode.LIMIT_PREFIX)]
    if over:  # a cap is a limit to raise, not a damaged file: never skipped by skip_bad
        i, msg = over[0]
        raise UserError(f"{flat_names[i]}: {msg[len(decode.LIMIT_PREFIX):]}")
    splits = []
    for split, lo, hi in (("train", 0, n_train), ("test", n_train, len(everything))):
        splits.append(_Split(x[lo:hi], np.asarray(labels[split], dtype=np.int64), names[split],
                             [(i - lo, msg) for i, msg in bad if lo <= i < hi]))
    return splits[0], splits[1]


def _check_sizes(root: Path, chosen: list[str], sizes: dict[str, int], limits: DataLimits) -> None:
    """Per-file and total caps from `stat`, before any image is opened."""
    caps, total = limits.byte_caps, 0
    for rel in chosen:
        size = sizes.get(rel, 0)
        if caps.per_file is not None and size > caps.per_file:
            raise caps.file_error(str(root / rel), size)
        total += size
        if caps.total is not None and total > caps.total:
            raise caps.total_error(str(root / rel), total)


def _folder_plan(root: Path, input_size: int, in_chans: int, limit: int | None,
                 workers: int | None, progress: bool, limits: DataLimits) -> _Plan:
    listing = walk_dataset(root)
    if listing.linked_dirs:
        first = root / listing.linked_dirs[0]
        warnings.warn(f"{root}: {len(listing.linked_dirs)} symlinked folders not followed "
                      f"(first: {first}); a dataset's images must lie inside its own folders", stacklevel=4)
    layout = plan_layout(listing.files + listing.special, listing.dirs,
                         where=lambda rel: os.path.join(root, rel), limit_per_class=limit)
    chosen = layout.files["train"] + layout.files["test"]
    _check_sizes(root, chosen, listing.sizes, limits)
    special = set(listing.special)

    def build() -> tuple[_Split, _Split, list[str]]:
        paths = {s: [str(root / r) for r in layout.files[s]] for s in layout.files}
        train, test = _decode_splits(paths, layout.labels, paths,  # type: ignore[arg-type]
                                     input_size, in_chans, workers, progress, limits)
        return train, test, layout.class_names

    digest = files_digest(root, [r for r in chosen if r not in special])
    return _Plan("folder", digest, build, [str(root / r) for r in layout.ignored])


def _archive_plan(path: Path, input_size: int, in_chans: int, limit: int | None,
                  workers: int | None, progress: bool, limits: DataLimits) -> _Plan:
    def wanted(name: str) -> bool:
        return is_image_name(name) and not any(is_hidden(p) for p in name.split("/"))

    ignored: list[str] = []

    def build() -> tuple[_Split, _Split, list[str]]:
        with _step(path, "reading the archive"), _bar(progress, total=path.stat().st_size, unit="B",
                                                       unit_scale=True, desc=f"read {path.name}") as bar:
            data, files, dirs = archive.read_archive(path, wanted, on_read=bar.update, caps=limits.byte_caps)
        layout: Layout = plan_layout(files, dirs, where=lambda rel: f"{path}:{rel}",
                                     limit_per_class=limit)
        ignored.extend(f"{path}:{r}" for r in layout.ignored)
        sources = {s: [data[r] for r in layout.files[s]] for s in layout.files}
        labels = {s: [f"{path}:{r}" for r in layout.files[s]] for s in layout.files}
        data.clear()
        train, test = _decode_splits(sources, layout.labels, labels,  # type: ignore[arg-type]
                                     input_size, in_chans, workers, progress, limits)
        return train, test, layout.class_names

    return _Plan("archive", file_digest(path), build, ignored)


def _cifar_plan(folder: Path, kind: str, input_size: int, in_chans: int, limit: int | None,
                limits: DataLimits) -> _Plan:
    needed = cifar.cifar_files(folder, kind)
    cifar.check_files(folder, needed, limits.byte_caps)

    def build() -> tuple[_Split, _Split, list[str]]:
        with _step(folder, "reading the CIFAR batches"):
            trx, try_, tex, tey, names = cifar.load_cifar(folder, kind, limit)
            return (_Split(convert_array(trx, in_chans, input_size), try_, []),
                    _Split(convert_array(tex, in_chans, input_size), tey, []), names)

    return _Plan(kind, files_digest(folder, needed), build)


def _plan(path: Path, input_size: int, in_chans: int, limit: int | None,
          workers: int | None, progress: bool, limits: DataLimits) -> _Plan:
    mode = path.stat().st_mode
    if stat.S_ISREG(mode):
        if archive.archive_kind(path) is None:
            raise UserError(f"{path}: unknown data spec (not a .tar/.tar.gz/.tgz/.zip archive); {SPEC_HELP}")
        return _archive_plan(path, input_size, in_chans, limit, workers, progress, limits)
    if stat.S_ISDIR(mode):
        kind = cifar.cifar_kind(path)
        if kind is not None:
            return _cifar_plan(path, kind, input_size, in_chans, limit, limits)
        return _folder_plan(path, input_size, in_chans, limit, workers, progress, limits)
    raise UserError(f"{path}: unknown data spec ({decode.file_kind(mode)}, neither a regular file nor a "
                    f"folder); {SPEC_HELP}")


def _bad_image_error(bad: list[tuple[str, str]], total: int) -> UserError:
    name, reason = bad[0]
    more = f" ({total - 1} more unreadable images)" if total > 1 else ""
    return UserError(
        f"{name}: unreadable image ({reason}){more}; replace or delete it, "
        f"or skip unreadable images (recipe [data] skip_bad = true, --skip_bad, skip_bad=True)"
    )


def _drop_bad(split: _Split, split_name: str, class_names: list[str], source: str) -> _Split:
    """Remove skipped images; a class that loses all its images is an error, not a silent gap."""
    if not split.bad:
        return split
    keep = np.ones(len(split.y), dtype=bool)
    keep[[i for i, _ in split.bad]] = False
    before = set(np.unique(split.y).tolist())
    split = _Split(split.x[keep], split.y[keep], [n for n, k in zip(split.names, keep, strict=True) if k])
    empty = [class_names[i] for i in sorted(before - set(np.unique(split.y).tolist()))]
    if empty:
        raise UserError(
            f"{source}: no readable {split_name} images for class {empty[0]!r}; add images or fix the files"
        )
    return split


def usable_std(std: Any, source: str) -> tuple[float, ...]:
    """Per-channel std with (nearly) constant channels set to 1.0, and a warning naming them.

    A constant channel (e.g. synthetic images whose green is the same everywhere) has std 0,
    and (x - mean)/0 is NaN at the first step. With std 1.0 the channel is only centred: it
    carries no information either way, and the padding of random crops stays small.
    """
    values = tuple(float(s) for s in std)
    low = [i for i, s in enumerate(values) if not s >= _MIN_STD]
    if low:
        names = ("red", "green", "blue") if len(values) == 3 else ("grey",)
        which = ", ".join(f"{i} ({names[i]}, std {values[i]:.2g})" for i in low)
        warnings.warn(f"{source}: channel {which} is constant across the training images; it is "
                      f"normalized with std 1.0 (only the mean is subtracted)", stacklevel=4)
    return tuple(1.0 if i in low else s for i, s in enumerate(values))


def _to_bundle(arrays: dict[str, np.ndarray], meta: dict[str, Any], from_cache: bool,
               cache_path: Path | None) -> DataBundle:
    ignored = meta.get("ignored_files", 0)
    if ignored:
        first = (meta.get("ignored_examples") or ["?"])[0]
        warnings.warn(f"{meta['source']}: ignored {ignored} files in the splits that are not images "
                      f"(no or unknown extension, or outside a class folder; first: {first})", stacklevel=4)
    return DataBundle(
        train_x=torch.from_numpy(arrays["train_x"]), train_y=torch.from_numpy(arrays["train_y"]).long(),
        test_x=torch.from_numpy(arrays["test_x"]), test_y=torch.from_numpy(arrays["test_y"]).long(),
        class_names=list(meta["class_names"]), mean=tuple(meta["mean"]),
        std=usable_std(meta["std"], meta["source"]),
        fingerprint=meta["fingerprint"], source=meta["source"], skipped=int(meta.get("skipped", 0)),
        ignored=int(ignored), from_cache=from_cache, cache_path=str(cache_path) if cache_path is not None else None,
    )


def _digits_bundle(input_size: int, in_chans: int, limit: int | None) -> DataBundle:
    trx, try_, tex, tey, names, digest = load_digits_arrays(input_size, in_chans, limit)
    mean, std = channel_stats(trx)
    fp = make_fingerprint("digits", digest, {"input_size": input_size, "in_chans": in_chans,
                                             "limit_per_class": limit})
    meta = {"class_names": names, "mean": mean, "std": std, "fingerprint": fp, "source": "digits"}
    return _to_bundle({"train_x": trx, "train_y": try_, "test_x": tex, "test_y": tey}, meta, False, None)


def load_data(spec: str | os.PathLike, input_size: int = 32, in_chans: int = 3,
              cache_dir: str | os.PathLike | None = None, progress: bool = True, *,
              limit_per_class: int | None = None, skip_bad: bool = False,
              workers: int | None = None, limits: DataLimits | dict[str, Any] | None = None) -> DataBundle:
    """Load a dataset as uint8 N×C×H×W tensors, decoding once and caching the result.

    spec: 'digits' | ImageFolder folder | .tar/.tar.gz/.tgz/.zip of one | CIFAR python folder.
    Images are converted to `in_chans` (1 = L, 3 = RGB) and resized to `input_size`.
    cache_dir: parent of the per-fingerprint cache folders (default $DSKD_CACHE/data or
    ~/.cache/dskd/data). limit_per_class: decode only the first N images (sorted by path)
    per class and split, for smoke runs. skip_bad: drop unreadable images with a warning
    (counted in `bundle.skipped`) instead of failing. workers: decode processes (default 2).
    limits: caps on file sizes and pixels (`DataLimits` or a dict of max_file_mb,
    max_total_mb, max_image_mp; defaults when None); a file over a cap is an error even
    with skip_bad. Caps apply while decoding: a cache hit decodes nothing.
    """
    _check_args(input_size, in_chans, limit_per_class)
    caps = DataLimits.from_any(limits)
    input_size, in_chans = int(input_size), int(in_chans)
    limit_per_class = None if limit_per_class is None else int(limit_per_class)
    if isinstance(spec, str) and spec.strip().lower() == "digits":
        return _digits_bundle(input_size, in_chans, limit_per_class)
    if not str(spec).strip():
        raise UserError(f"data spec is empty; {SPEC_HELP}")
    path = Path(spec).expanduser().absolute()
    if not path.exists():
        raise UserError(f"{path}: data path not found; {SPEC_HELP}")

    plan = _plan(path, input_size, in_chans, limit_per_class, workers, progress, caps)
    settings = {"input_size": input_size, "in_chans": in_chans, "limit_per_class": limit_per_class}
    fp = make_fingerprint(plan.kind, plan.digest, settings)
    folder = cache_root(cache_dir) / fp

    with _step(path, "reading the decode cache"):
        cached = read_cache(folder, fp)
    if cached is None:
        with build_lock(folder):
            cached = read_cache(folder, fp)  # another process may have built it meanwhile
            if cached is None:
                return _build(plan, path, fp, settings, folder, skip_bad)
    arrays, meta = cached
    if meta.get("skipped") and not skip_bad:
        raise _bad_image_error([tuple(b) for b in meta["bad_images"]], int(meta["skipped"]))
    return _to_bundle(arrays, meta, True, folder)


def _build(plan: _Plan, path: Path, fp: str, settings: dict[str, Any], folder: Path,
           skip_bad: bool) -> DataBundle:
    """Decode, check bad images, compute stats, write the cache; nothing is cached on failure."""
    with _step(path, "decoding images"):
        train, test, class_names = plan.build()
    with _step(path, "checking and caching the decoded images"):
        return _finish(plan, path, fp, settings, folder, skip_bad, train, test, class_names)


def _finish(plan: _Plan, path: Path, fp: str, settings: dict[str, Any], folder: Path, skip_bad: bool,
            train: _Split, test: _Split, class_names: list[str]) -> DataBundle:
    bad = [(s.names[i], msg) for s in (train, test) for i, msg in s.bad]
    if bad and not skip_bad:
        raise _bad_image_error(bad, len(bad))
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} unreadable images (first: {bad[0][0]}: {bad[0][1]})",
                      stacklevel=4)
    train = _drop_bad(train, "train", class_names, str(path))
    test = _drop_bad(test, "test", class_names, str(path))

    mean, std = channel_stats(train.x)
    meta = {
        "format": CACHE_FORMAT, "fingerprint": fp, "source": str(path), "kind": plan.kind,
        "settings": settings, "class_names": class_names, "mean": mean, "std": std,
        "counts": {"train": len(train.y), "test": len(test.y)}, "skipped": len(bad),
        "bad_images": [list(b) for b in bad[:_MAX_BAD_LISTED]],
        "ignored_files": len(plan.ignored), "ignored_examples": plan.ignored[:_MAX_BAD_LISTED],
    }
    arrays = {"train_x": train.x, "train_y": train.y, "test_x": test.x, "test_y": test.y}
    written = write_cache(folder, arrays, meta)
    return _to_bundle(arrays, meta, False, folder if written else None)
