"""Tests for dskd.data: every spec format, conversions, cache, augmentation, subsets, bad input."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dskd.data import (
    augment,
    class_balanced_subset,
    holdout_split,
    load_data,
    normalize,
    safe_extract,
)
from dskd.data import cifar as cifar_mod
from dskd.data import decode as decode_mod
from dskd.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR_JPG = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
SIZE = 16


# ---------------------------------------------------------------- dataset builders
def _img_16bit(value: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.full(size[::-1], value, dtype=np.uint16))


def _palette(index: int, size: tuple[int, int], transparent: bool = False) -> Image.Image:
    im = Image.new("P", size, index)
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    if transparent:
        im.info["transparency"] = index
    return im


# name -> (image, save kwargs, expected RGB after conversion, exact?)
def _images(shift: int = 0) -> dict[str, tuple[Image.Image, dict, tuple[int, int, int], bool]]:
    return {
        "a_red.png": (Image.new("RGB", (20, 12), (255, shift, 0)), {}, (255, shift, 0), True),
        "b_gray.bmp": (Image.new("L", (40, 40), 100), {}, (100, 100, 100), True),
        "c_clear.png": (Image.new("RGBA", (SIZE, SIZE), (10, 20, 30, 0)), {}, (0, 0, 0), True),
        "d_opaque.png": (Image.new("RGBA", (9, 30), (10, 20, 30, 255)), {}, (10, 20, 30), True),
        "e_pal.gif": (_palette(1, (24, 24)), {}, (0, 255, 0), True),
        "f_16bit.png": (_img_16bit(257 * 77, (SIZE, 20)), {}, (77, 77, 77), True),
        "g_bw.png": (Image.new("1", (8, 8), 1), {}, (255, 255, 255), True),
        "h_la.png": (Image.new("LA", (33, 17), (200, 255)), {}, (200, 200, 200), True),
        "i_photo.jpg": (Image.new("RGB", (64, 48), (50, 100, 150)), {"quality": 95}, (50, 100, 150), False),
        "j_paltrans.png": (_palette(1, (12, 12), transparent=True), {}, (0, 0, 0), True),
        "k_cmyk.jpg": (Image.new("CMYK", (20, 20), (0, 0, 0, 0)), {"quality": 95}, (255, 255, 255), False),
        "l_tiff.tif": (Image.new("RGB", (SIZE, SIZE), (1, 2, 3)), {}, (1, 2, 3), True),
    }


TRAIN_FILES = {"a_cat": ["a_red.png", "b_gray.bmp", "c_clear.png", "d_opaque.png", "e_pal.gif", "f_16bit.png"],
               "b_dog": ["g_bw.png", "h_la.png", "i_photo.jpg", "j_paltrans.png", "k_cmyk.jpg", "l_tiff.tif"]}
TEST_FILES = {"a_cat": ["a_red.png", "i_photo.jpg"], "b_dog": ["b_gray.bmp", "l_tiff.tif"]}


def make_folder(root: Path, test_name: str = "test", shift: int = 0) -> dict[str, list[tuple[int, int, int, bool]]]:
    """Write an ImageFolder tree; return the expected RGB per image in load order."""
    images = _images(shift)
    expected: dict[str, list] = {}
    for split, spec in (("train", TRAIN_FILES), (test_name, TEST_FILES)):
        expected[split] = []
        for cls in sorted(spec):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for name in sorted(spec[cls]):
                im, kw, rgb, exact = images[name]
                im.save(folder / name, **kw)
                expected[split].append((*rgb, exact))
    (root / "README.txt").write_text("not an image, ignored\n")
    (root / "train" / "labels.csv").write_text("a file beside the class folders is ignored\n")
    (root / "train" / "a_cat" / ".DS_Store").write_bytes(b"\0junk")
    return expected


def make_tar(src: Path, dest: Path, mode: str = "w", arcroot: str = "") -> Path:
    """Pack `src` (under `arcroot`, plus a top-level LICENSE file when wrapped)."""
    with tarfile.open(dest, mode) as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=arcroot + p.relative_to(src).as_posix(), recursive=False)
        if arcroot.strip("./"):
            tf.add(src / "README.txt", arcname="LICENSE")
    return dest


def make_zip(src: Path, dest: Path, arcroot: str = "", dir_entries: bool = True) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file() or dir_entries:
                zf.write(p, arcroot + p.relative_to(src).as_posix())
        if arcroot:
            zf.write(src / "README.txt", "LICENSE")
    return dest


def _tar_with(dest: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    """A tar holding one good image and then `member`."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    with tarfile.open(dest, "w") as tf:
        good = tarfile.TarInfo("train/a/x.png")
        good.size = len(buf.getvalue())
        tf.addfile(good, io.BytesIO(buf.getvalue()))
        member.size = len(data) if member.isreg() else 0
        tf.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return dest


def _cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "ds"
    return root, make_folder(root)


def _check_expected(x: torch.Tensor, expected: list[tuple[int, int, int, bool]]) -> None:
    assert len(x) == len(expected)
    for img, (r, g, b, exact) in zip(x, expected, strict=True):
        center = img[:, SIZE // 2, SIZE // 2].tolist()
        tol = 0 if exact else 4
        assert all(abs(a - e) <= tol for a, e in zip(center, (r, g, b), strict=True)), (center, (r, g, b))
        if exact:  # solid images stay solid through the resize
            assert torch.equal(img, torch.tensor([r, g, b], dtype=torch.uint8).view(3, 1, 1).expand_as(img))


# ---------------------------------------------------------------- formats
def test_folder_shapes_labels_modes(folder: tuple[Path, dict], tmp_path: Path) -> None:
    root, expected = folder
    b = load_data(root, input_size=SIZE, in_chans=3, cache_dir=tmp_path / "c", progress=False)
    assert b.class_names == ["a_cat", "b_dog"]
    assert b.train_x.shape == (12, 3, SIZE, SIZE) and b.test_x.shape == (4, 3, SIZE, SIZE)
    assert b.train_x.dtype == torch.uint8 and b.train_y.dtype == torch.int64
    assert b.train_y.tolist() == [0] * 6 + [1] * 6 and b.test_y.tolist() == [0, 0, 1, 1]
    _check_expected(b.train_x, expected["train"])
    _check_expected(b.test_x, expected["test"])
    xf = b.train_x.double() / 255
    assert b.mean == pytest.approx(tuple(xf.mean(dim=(0, 2, 3)).tolist()), abs=1e-9)
    assert b.std == pytest.approx(tuple(xf.std(dim=(0, 2, 3), unbiased=False).tolist()), abs=1e-9)
    assert b.source == str(root.absolute()) and len(b.fingerprint) == 64 and b.skipped == 0


def test_folder_grayscale_and_val_split(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_folder(root, test_name="val")
    b = load_data(root, input_size=8, in_chans=1, cache_dir=tmp_path / "c", progress=False)
    assert b.train_x.shape == (12, 1, 8, 8) and b.test_x.shape == (4, 1, 8, 8)
    assert len(b.mean) == 1 and len(b.std) == 1
    assert b.train_x[0, 0, 4, 4].item() == 76  # red -> luma 0.299 * 255
    few = load_data(root, input_size=8, in_chans=1, cache_dir=tmp_path / "c", progress=False,
                    limit_per_class=2)
    assert few.train_y.tolist() == [0, 0, 1, 1] and few.test_y.tolist() == [0, 0, 1, 1]
    assert torch.equal(few.train_x[:2], b.train_x[:2]) and torch.equal(few.train_x[2:], b.train_x[6:8])
    assert few.fingerprint != b.fingerprint


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tgz", "zip", "zip-nodirs", "tar-wrapped", "zip-wrapped"])
def test_archives_match_folder(folder: tuple[Path, dict], tmp_path: Path, kind: str) -> None:
    root, _ = folder
    ref = load_data(root, input_size=SIZE, cache_dir=tmp_path / "c", progress=False)
    wrap = "cifar-like/" if kind.endswith("wrapped") else ""
    if kind.startswith("zip"):
        arc = make_zip(root, tmp_path / "ds.zip", wrap, dir_entries=kind != "zip-nodirs")
    else:
        ext = "tar" if kind.startswith("tar") and kind != "tar.gz" else kind
        arc = make_tar(root, tmp_path / f"ds.{ext}", "w:gz" if "gz" in ext else "w", wrap)
    b = load_data(arc, input_size=SIZE, cache_dir=tmp_path / "c", progress=False)
    assert b.class_names == ref.class_names
    assert torch.equal(b.train_x, ref.train_x) and torch.equal(b.test_x, ref.test_x)
    assert torch.equal(b.train_y, ref.train_y) and b.mean == ref.mean
    assert b.fingerprint != ref.fingerprint and not b.from_cache


def _cifar_batch(rng: np.random.Generator, n: int, num_classes: int, label_key: bytes) -> dict:
    labels = [int(v) for v in rng.integers(0, num_classes, n)]
    return {b"batch_label": b"testing batch", label_key: labels,
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def _dump(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar10(folder: Path, per_batch: int = 12) -> dict[str, dict]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(folder / "batches.meta", {b"label_names": [n.encode() for n in names], b"num_vis": 3072})
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = _cifar_batch(rng, per_batch, 10, b"labels")
        _dump(folder / name, batches[name])
    return batches


def test_cifar10_pickles(tmp_path: Path) -> None:
    batches = make_cifar10(tmp_path / "cifar-10-batches-py")
    b = load_data(tmp_path / "cifar-10-batches-py", input_size=32, cache_dir=tmp_path / "c", progress=False)
    assert b.class_names[:3] == ["airplane", "automobile", "bird"] and len(b.class_names) == 10
    assert b.train_x.shape == (60, 3, 32, 32) and b.test_x.shape == (12, 3, 32, 32)
    first = batches["data_batch_1"]
    assert torch.equal(b.train_x[0, 0].flatten(), torch.from_numpy(first[b"data"][0, :1024]))  # R plane first
    assert torch.equal(b.train_x[0, 2].flatten(), torch.from_numpy(first[b"data"][0, 2048:]))
    assert b.train_y[:12].tolist() == first[b"labels"]
    assert b.test_y.tolist() == batches["test_batch"][b"labels"]
    small = load_data(tmp_path / "cifar-10-batches-py", input_size=16, in_chans=1, limit_per_class=1,
                      cache_dir=tmp_path / "c", progress=False)
    assert small.train_x.shape[1:] == (1, 16, 16)
    assert sorted(small.train_y.tolist()) == sorted(set(b.train_y.tolist()))  # one per present class


def test_cifar100_pickles_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    names = [f"class_{i:03d}" for i in range(100)]
    _dump(folder / "meta", {b"fine_label_names": [n.encode() for n in names],
                            b"coarse_label_names": [b"c"] * 20})
    train = _cifar_batch(rng, 30, 100, b"fine_labels")
    train[b"coarse_labels"] = [0] * 30
    _dump(folder / "train", train)
    _dump(folder / "test", _cifar_batch(rng, 10, 100, b"fine_labels"))
    b = load_data(folder, cache_dir=tmp_path / "c", progress=False)
    assert b.class_names == names and b.train_y.tolist() == train[b"fine_labels"]
    assert b.test_x.shape == (10, 3, 32, 32)


def test_cifar_python2_module_names_accepted(tmp_path: Path) -> None:
    """Real CIFAR batches were pickled by Python 2 with numpy.core.multiarray."""
    arr = np.arange(3072, dtype=np.uint8).reshape(1, 3072)
    blob = pickle.dumps({b"data": arr, b"labels": [3]}, protocol=2)
    blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path = tmp_path / "batch"
    path.write_bytes(blob)
    d = cifar_mod.load_pickle(path)
    assert np.array_equal(d["data"], arr) and d["labels"] == [3]


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_with_foreign_global_is_refused(tmp_path: Path) -> None:
    make_cifar10(tmp_path / "cf", per_batch=2)
    evil = _Evil()
    evil.marker = tmp_path / "pwned"
    _dump(tmp_path / "cf" / "data_batch_2", {b"data": evil, b"labels": [0]})
    with pytest.raises(UserError, match=r"data_batch_2.*posix.system is not allowed"):
        load_data(tmp_path / "cf", cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "pwned").exists()
    assert _cache_entries(tmp_path / "c") == []


def test_cifar_missing_batch(tmp_path: Path) -> None:
    make_cifar10(tmp_path / "cf", per_batch=2)
    (tmp_path / "cf" / "data_batch_3").unlink()
    with pytest.raises(UserError, match=r"data_batch_3: missing CIFAR-10 batch file"):
        load_data(tmp_path / "cf", cache_dir=tmp_path / "c", progress=False)


def test_digits_embedded() -> None:
    b = load_data("digits", input_size=8, in_chans=1)
    assert b.train_x.shape == (1437, 1, 8, 8) and b.test_x.shape == (360, 1, 8, 8)
    assert b.class_names == [str(i) for i in range(10)] and b.source == "digits"
    assert torch.bincount(b.test_y).min() >= 35  # stratified: every class ~20% in test
    assert b.train_x.max().item() == 255 and b.cache_path is None
    again = load_data("digits", input_size=32, in_chans=3)
    assert again.train_x.shape == (1437, 3, 32, 32) and torch.equal(again.train_y, b.train_y)
    assert torch.equal(again.train_x[:, 0], again.train_x[:, 2])  # replicated channels
    assert again.fingerprint != b.fingerprint
    assert load_data("digits", limit_per_class=3).train_x.shape[0] == 30


# ---------------------------------------------------------------- cache
def test_cache_hit_skips_decode_and_change_invalidates(folder: tuple[Path, dict], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = folder
    cache = tmp_path / "c"
    calls = []
    real = decode_mod.decode_many
    monkeypatch.setattr(decode_mod, "decode_many", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load_data(root, input_size=SIZE, cache_dir=cache, progress=False)
    assert len(calls) == 1 and not first.from_cache
    assert _cache_entries(cache) == [first.fingerprint]
    files = sorted((cache / first.fingerprint).iterdir())
    assert [p.name for p in files] == ["meta.json", "test_x.npy", "test_y.npy", "train_x.npy", "train_y.npy"]
    mtimes = [p.stat().st_mtime_ns for p in files]

    second = load_data(root, input_size=SIZE, cache_dir=cache, progress=False)
    assert len(calls) == 1 and second.from_cache and second.fingerprint == first.fingerprint
    assert torch.equal(second.train_x, first.train_x) and second.mean == first.mean
    assert [p.stat().st_mtime_ns for p in files] == mtimes

    other = load_data(root, input_size=8, cache_dir=cache, progress=False)  # settings are in the key
    assert len(calls) == 2 and other.fingerprint != first.fingerprint

    Image.new("RGB", (20, 12), (255, 99, 0)).save(root / "train" / "a_cat" / "a_red.png")
    changed = load_data(root, input_size=SIZE, cache_dir=cache, progress=False)
    assert len(calls) == 3 and not changed.from_cache and changed.fingerprint != first.fingerprint
    assert changed.train_x[0, :, 0, 0].tolist() == [255, 99, 0]


def test_archive_cache_keyed_by_content(folder: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = folder
    arc = make_tar(root, tmp_path / "a.tar")
    a = load_data(arc, input_size=SIZE, cache_dir=tmp_path / "c", progress=False)
    assert load_data(arc, input_size=SIZE, cache_dir=tmp_path / "c", progress=False).from_cache
    make_folder(root, shift=7)
    make_tar(root, arc)
    b = load_data(arc, input_size=SIZE, cache_dir=tmp_path / "c", progress=False)
    assert not b.from_cache and b.fingerprint != a.fingerprint
    assert b.train_x[0, :, 0, 0].tolist() == [255, 7, 0]


def test_default_cache_dir_from_env(folder: tuple[Path, dict], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSKD_CACHE", str(tmp_path / "envcache"))
    b = load_data(folder[0], input_size=SIZE, progress=False)
    assert b.cache_path == str(tmp_path / "envcache" / "data" / b.fingerprint)


def test_damaged_cache_is_rebuilt(folder: tuple[Path, dict], tmp_path: Path) -> None:
    a = load_data(folder[0], input_size=SIZE, cache_dir=tmp_path / "c", progress=False)
    Path(a.cache_path, "train_x.npy").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unusable data cache"):
        b = load_data(folder[0], input_size=SIZE, cache_dir=tmp_path / "c", progress=False)
    assert not b.from_cache and torch.equal(a.train_x, b.train_x)


def test_parallel_decode_matches_serial(folder: tuple[Path, dict], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_mod, "_MIN_PARALLEL", 0)
    par = load_data(folder[0], input_size=SIZE, cache_dir=tmp_path / "c1", progress=False, workers=2)
    ser = load_data(folder[0], input_size=SIZE, cache_dir=tmp_path / "c2", progress=False, workers=1)
    assert torch.equal(par.train_x, ser.train_x) and torch.equal(par.test_x, ser.test_x)


def _load_in_child(root: Path, cache: Path, queue) -> None:
    b = load_data(root, input_size=SIZE, cache_dir=cache, progress=False, workers=1)
    queue.put((b.from_cache, b.train_x.sum().item()))


def test_concurrent_loads_decode_once(folder: tuple[Path, dict], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes (e.g. DDP ranks) asking at once: one decodes, the other reads its cache."""
    import multiprocessing
    import time

    real = decode_mod.decode_many
    monkeypatch.setattr(decode_mod, "decode_many", lambda *a, **k: time.sleep(1.0) or real(*a, **k))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(folder[0], tmp_path / "c", queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [r[0] for r in results] == [False, True] and results[0][1] == results[1][1]
    assert len(_cache_entries(tmp_path / "c")) == 1  # the cache folder only: no lock or temp left


# ---------------------------------------------------------------- bad images
def test_corrupt_image_fails_then_skip_bad(folder: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = folder
    bad = root / "train" / "b_dog" / "i_photo.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated JPEG
    cache = tmp_path / "c"
    with pytest.raises(UserError, match=r"i_photo\.jpg: unreadable image .*skip_bad=True"):
        load_data(root, input_size=SIZE, cache_dir=cache, progress=False)
    assert _cache_entries(cache) == []
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        b = load_data(root, input_size=SIZE, cache_dir=cache, progress=False, skip_bad=True)
    assert b.skipped == 1 and b.train_x.shape[0] == 11 and b.train_y.tolist() == [0] * 6 + [1] * 5
    again = load_data(root, input_size=SIZE, cache_dir=cache, progress=False, skip_bad=True)
    assert again.from_cache and again.skipped == 1
    with pytest.raises(UserError, match=r"i_photo\.jpg: unreadable image"):  # same answer from the cache
        load_data(root, input_size=SIZE, cache_dir=cache, progress=False)


def test_zero_byte_image_in_archive(folder: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = folder
    (root / "test" / "a_cat" / "zz_empty.png").write_bytes(b"")
    arc = make_zip(root, tmp_path / "ds.zip")
    with pytest.raises(UserError, match=r"ds\.zip:test/a_cat/zz_empty\.png: unreadable image"):
        load_data(arc, input_size=SIZE, cache_dir=tmp_path / "c", progress=False)
    assert _cache_entries(tmp_path / "c") == []


def test_skip_bad_that_empties_a_class_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_folder(root)
    for p in (root / "test" / "b_dog").iterdir():
        p.write_bytes(b"not an image")
    with pytest.raises(UserError, match="no readable test images for class 'b_dog'"), \
            pytest.warns(UserWarning):
        load_data(root, input_size=SIZE, cache_dir=tmp_path / "c", progress=False, skip_bad=True)
    assert _cache_entries(tmp_path / "c") == []


# ---------------------------------------------------------------- bad specs / layouts
def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope: data path not found; pass 'digits'"):
        load_data(tmp_path / "nope")
    (tmp_path / "data.rar").write_bytes(b"Rar!")
    with pytest.raises(UserError, match=r"data\.rar: unknown data spec"):
        load_data(tmp_path / "data.rar")
    with pytest.raises(UserError, match="in_chans=2"):
        load_data("digits", in_chans=2)
    with pytest.raises(UserError, match="input_size"):
        load_data("digits", input_size=0)
    with pytest.raises(UserError, match="limit_per_class"):
        load_data("digits", limit_per_class=0)
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(UserError, match=r"broken\.tar\.gz: cannot read the archive"):
        load_data(tmp_path / "broken.tar.gz", cache_dir=tmp_path / "c", progress=False)


@pytest.mark.parametrize("breakage, message", [
    ("no_train", r"train/: missing train/ folder"),
    ("no_test", r"test/: missing test/ \(or val/\) folder"),
    ("empty_split", r"train/: empty split, no class folders"),
    ("empty_class", r"test/b_dog/: class folder has no images"),
    ("class_mismatch", r"test classes differ from train classes \(missing in test/: b_dog; extra in test/: c_cow\)"),
])
@pytest.mark.parametrize("as_archive", [False, True])
def test_bad_layouts(tmp_path: Path, breakage: str, message: str, as_archive: bool) -> None:
    import shutil

    root = tmp_path / "ds"
    make_folder(root)
    if breakage == "no_train":
        shutil.rmtree(root / "train")
    elif breakage == "no_test":
        shutil.rmtree(root / "test")
    elif breakage == "empty_split":
        shutil.rmtree(root / "train")
        (root / "train").mkdir()
    elif breakage == "empty_class":
        for p in (root / "test" / "b_dog").iterdir():
            p.unlink()
        (root / "test" / "b_dog" / "notes.txt").write_text("no images here")
    else:
        (root / "test" / "b_dog").rename(root / "test" / "c_cow")
    spec = make_tar(root, tmp_path / "ds.tar.gz", "w:gz") if as_archive else root
    with pytest.raises(UserError, match=message) as info:
        load_data(spec, input_size=SIZE, cache_dir=tmp_path / "c", progress=False)
    assert "\n" not in str(info.value)
    assert str(spec) in str(info.value)
    assert _cache_entries(tmp_path / "c") == []


# ---------------------------------------------------------------- archive safety
def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("member, reason", [
    (tarfile.TarInfo("train/../../evil.png"), "'..' path component"),
    (tarfile.TarInfo("/tmp/evil.png"), "absolute path"),
    (_link("train/a/link.png", "/etc/passwd", tarfile.SYMTYPE), "link"),
    (_link("train/a/inside.png", "train/a/x.png", tarfile.SYMTYPE), "link"),
    (_link("train/a/hard.png", "../../etc/passwd", tarfile.LNKTYPE), "link"),
    (_link("train/a/fifo", "", tarfile.FIFOTYPE), "device or special file"),
    (_link("train/a/dev", "", tarfile.CHRTYPE), "device or special file"),
])
def test_unsafe_tar_members_refused(tmp_path: Path, member: tarfile.TarInfo, reason: str) -> None:
    arc = _tar_with(tmp_path / "evil.tar", member, b"data")
    shown = member.name
    with pytest.raises(UserError, match=rf"evil\.tar: unsafe archive member '{shown}' \({reason}"):
        load_data(arc, cache_dir=tmp_path / "c", progress=False)
    assert _cache_entries(tmp_path / "c") == []
    with pytest.raises(UserError, match="unsafe archive member"):
        safe_extract(arc, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["evil.tar"]  # no temp folder left either


@pytest.mark.parametrize("name, mode, reason", [
    ("train/../../evil.png", 0o100644, "'..' path component"),
    ("..\\evil.png", 0o100644, "'..' path component"),
    ("/abs/evil.png", 0o100644, "absolute path"),
    ("train/a/link.png", 0o120777, "link"),
])
def test_unsafe_zip_members_refused(tmp_path: Path, name: str, mode: int, reason: str) -> None:
    arc = tmp_path / "evil.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("train/a/ok.txt", "fine")
        info = zipfile.ZipInfo(name)
        info.external_attr = mode << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UserError, match=rf"evil\.zip: unsafe archive member .*\({reason}"):
        load_data(arc, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(UserError, match="unsafe archive member"):
        safe_extract(arc, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip"]


def test_safe_extract_roundtrip(folder: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = folder
    arc = make_tar(root, tmp_path / "ds.tgz", "w:gz", arcroot="./")
    out = safe_extract(arc, tmp_path / "out")
    assert (out / "train" / "a_cat" / "a_red.png").read_bytes() == (root / "train" / "a_cat" / "a_red.png").read_bytes()
    a = load_data(out, input_size=SIZE, cache_dir=tmp_path / "c", progress=False)
    b = load_data(root, input_size=SIZE, cache_dir=tmp_path / "c", progress=False)
    assert torch.equal(a.train_x, b.train_x)
    with pytest.raises(UserError, match="not an empty folder"):
        safe_extract(arc, out)


# ---------------------------------------------------------------- transforms
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def test_normalize_formula() -> None:
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    want = (x.numpy().astype(np.float32) / 255 - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]
    got = normalize(x, MEAN, STD)
    assert got.dtype == torch.float32 and np.allclose(got.numpy(), want, atol=1e-6)
    assert normalize(x[0], MEAN, STD).shape == (3, 5, 5)
    with pytest.raises(TypeError):
        normalize(x.float(), MEAN, STD)


def _matching_crop(img: torch.Tensor, out: torch.Tensor, pad: int) -> set[tuple[int, int, bool]]:
    """All (dy, dx, flipped) whose crop of the zero-padded `img` equals `out`."""
    padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    h, w = img.shape[-2:]
    hits = set()
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = normalize(padded[:, dy:dy + h, dx:dx + w], MEAN, STD)
            for flipped in (False, True):
                if torch.equal(crop.flip(-1) if flipped else crop, out):
                    hits.add((dy, dx, flipped))
    return hits


def test_augment_crops_flips_and_determinism() -> None:
    x = torch.randint(1, 256, (64, 3, 12, 10), dtype=torch.uint8)  # no zeros: padding is visible
    out = augment(x, MEAN, STD, pad=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device == x.device
    same = augment(x, MEAN, STD, pad=3, generator=torch.Generator().manual_seed(0))
    other = augment(x, MEAN, STD, pad=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, same) and not torch.equal(out, other)
    found = [_matching_crop(x[i], out[i], 3) for i in range(len(x))]
    assert all(len(f) == 1 for f in found)  # every output is exactly one crop/flip of its input
    shifts = {(dy, dx) for f in found for dy, dx, _ in f}
    flips = [fl for f in found for _, _, fl in f]
    assert len(shifts) > 10 and 10 < sum(flips) < 54
    assert torch.equal(augment(x, MEAN, STD, pad=0, flip=False), normalize(x, MEAN, STD))
    assert augment(x[:0], MEAN, STD).shape == (0, 3, 12, 10)
    with pytest.raises(TypeError):
        augment(x[0], MEAN, STD)


# ---------------------------------------------------------------- subsets
def test_class_balanced_subset() -> None:
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    half = class_balanced_subset(y, 0.5, seed=3)
    assert torch.bincount(y[half]).tolist() == [25, 15, 10]
    assert torch.equal(half, class_balanced_subset(y, 0.5, seed=3))
    assert not torch.equal(half, class_balanced_subset(y, 0.5, seed=4))
    assert torch.equal(half, half.sort().values) and half.dtype == torch.int64
    count = class_balanced_subset(y, 60.0, seed=0)  # float counts come from CLI/recipes
    assert torch.bincount(y[count]).tolist() == [20, 20, 20]
    y2 = torch.tensor([0] * 50 + [1] * 40 + [2] * 20)
    capped = class_balanced_subset(y2, 90, seed=0)  # class 2 has only 20: others take the rest
    assert torch.bincount(y2[capped]).tolist() == [35, 35, 20]
    assert len(class_balanced_subset(y, 1.0, seed=0)) == 100
    assert len(class_balanced_subset(y, 4, seed=0)) == 4
    for bad in (0, -1, 0.0, 1.5, 101, True):
        with pytest.raises(UserError, match="train_subset"):
            class_balanced_subset(y, bad, seed=0)


def test_holdout_split() -> None:
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 1)
    tr, ho = holdout_split(y, 0.2, seed=1)
    assert torch.bincount(y[ho], minlength=3).tolist() == [10, 6, 0]  # a lone image stays in train
    assert sorted(tr.tolist() + ho.tolist()) == list(range(81))
    assert torch.equal(ho, holdout_split(y, 0.2, seed=1)[1])
    assert len(holdout_split(y, 0.0, seed=1)[1]) == 0
    with pytest.raises(UserError, match="holdout"):
        holdout_split(y, 1.0, seed=0)


# ---------------------------------------------------------------- the real archive
@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_JPG.is_file(), reason=f"{CIFAR_JPG} not present (shared data beside the repo)")
def test_real_cifar10_jpg_subset(tmp_path: Path) -> None:
    b = load_data(CIFAR_JPG, cache_dir=tmp_path / "c", limit_per_class=5, progress=False)
    assert b.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                             "horse", "ship", "truck"]
    assert b.train_x.shape == (50, 3, 32, 32) and b.test_x.shape == (50, 3, 32, 32)
    assert b.train_y.tolist() == [c for c in range(10) for _ in range(5)]
    assert 0.3 < b.mean[0] < 0.7 and 0.1 < b.std[0] < 0.4
    assert b.train_x.float().std() > 20  # real pictures, not blank decodes


# ---------------------------------------------------------------- caps (dskd.data.limits)
def _tar_of(dest: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return dest


def test_archive_caps_from_headers_and_while_streaming(tmp_path: Path) -> None:
    from dskd.data.archive import _Budget, iter_members, read_archive
    from dskd.data.limits import ByteCaps

    archive = _tar_of(tmp_path / "a.tar.gz", {"x/a.png": b"\0" * 3000, "x/b.png": b"\0" * 3000})
    with pytest.raises(UserError, match=r"a\.tar\.gz:x/a\.png: is 2\.9 KiB, over the per-file cap of 2\.0 KiB "
                                        r"\(data\.max_file_mb\); raise data\.max_file_mb"):
        read_archive(archive, lambda n: True, caps=ByteCaps(2048, None))
    with pytest.raises(UserError, match=r"x/b\.png: the data read reaches 5\.9 KiB, over the total cap of "
                                        r"4\.9 KiB \(data\.max_total_mb\)"):
        read_archive(archive, lambda n: True, caps=ByteCaps(None, 5000))
    data, files, _ = read_archive(archive, lambda n: True, caps=ByteCaps(3000, 6000))
    assert sorted(files) == ["x/a.png", "x/b.png"] and len(data["x/a.png"]) == 3000
    assert [n for n, d, _ in iter_members(archive)] == ["x/a.png", "x/b.png"]  # no caps: as before
    # A header can lie; what is delivered is counted too.
    reader = _Budget(archive, ByteCaps(100, None)).wrap("x/lie.png", io.BytesIO(b"\0" * 500))  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"x/lie\.png: holds more than 500 B, over the per-file cap of 100 B"):
        reader.readall()


def test_safe_extract_caps_leave_nothing(tmp_path: Path) -> None:
    from dskd.data.limits import ByteCaps

    archive = _tar_of(tmp_path / "b.tar.gz", {"m/model.onnx": b"\0" * 4096})
    caps = ByteCaps(1024, None, "bundle.max_member", "bundle.max_total")
    with pytest.raises(UserError, match=r"over the per-file cap of 1\.0 KiB \(bundle\.max_member\)"):
        safe_extract(archive, tmp_path / "out", caps=caps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tar.gz"]
    assert (safe_extract(archive, tmp_path / "ok") / "m" / "model.onnx").stat().st_size == 4096


def test_data_limits_are_checked_and_named(tmp_path: Path) -> None:
    from dskd.data.limits import DataLimits

    with pytest.raises(UserError, match=r"data\.max_file_mb = 0: must be a positive number"):
        DataLimits(max_file_mb=0)
    with pytest.raises(UserError, match="unknown key 'max_files_mb'"):
        load_data(tmp_path, limits={"max_files_mb": 1})


def test_pil_bomb_limit_is_ours_during_decode_and_restored() -> None:
    before = Image.MAX_IMAGE_PIXELS
    with decode_mod.pil_pixel_cap(1000):
        assert Image.MAX_IMAGE_PIXELS == 1000
    assert Image.MAX_IMAGE_PIXELS == before
    buf = io.BytesIO()
    Image.new("L", (100, 100)).save(buf, "PNG")
    out, bad = decode_mod.decode_many([buf.getvalue()], 8, 1, workers=1, max_pixels=5000)
    assert bad and bad[0][1].startswith(decode_mod.LIMIT_PREFIX + "image of 100×100 = 0.0 megapixels")
    assert Image.MAX_IMAGE_PIXELS == before


def _die(args: object) -> None:
    os._exit(9)  # what the kernel's OOM killer does to a decode worker


def test_a_killed_decode_worker_is_an_error_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, "PNG")
    monkeypatch.setattr(decode_mod, "_decode_chunk", _die)
    with pytest.raises(decode_mod.WorkerDied, match="killed"):
        decode_mod.decode_many([buf.getvalue()] * (decode_mod._MIN_PARALLEL + 10), 8, 1, workers=2)


def test_memory_error_is_never_a_bad_image(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """MemoryError in the decoder is the machine, not the file: one line naming the step."""
    root = tmp_path / "d"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        Image.new("L", (4, 4)).save(root / split / "a" / "0.png")

    def oom(*a: object, **k: object) -> None:
        raise MemoryError

    monkeypatch.setattr(decode_mod, "decode_image", oom)
    with pytest.raises(UserError, match=r"out of memory while decoding images; lower data\.input_size"):
        load_data(root, 8, 1, cache_dir=tmp_path / "c", progress=False, skip_bad=True)
