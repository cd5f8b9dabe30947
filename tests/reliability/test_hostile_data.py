"""Hostile data: bounded memory and time, no hang, nothing written outside the run and cache folders.

Each refusal runs the real CLI (`python -m pipeline train`) in a child and measures it with
`os.wait4` (CPU time and peak RSS of the child and the decode workers it waited for). The
goal in docs/reliability.md is ≤ 10 s and ≤ 1 GiB per hostile input; the tests assert the
memory bound and a CPU-time bound (not wall time: the machine is shared), and record all three
in $DSKD_HOSTILE_RESULTS (JSON) when that is set. Cases that must still train check that the
images and labels are the right ones (class i's images have pixel values 40·i + j).
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dskd.data import load_data
from dskd.errors import UserError
from tests.helpers.cli import REPO, run_main, set_args
from tests.helpers.data import image_folder
from tests.helpers.runs import SMALL
from tests.reliability.hostile import gzip_tar_with_zero_member, huge_rgba_png, zip_with_zero_member

GIB = 1 << 30
MAX_RSS = GIB  # the goal: every hostile input is refused within 1 GiB
MAX_CPU_S = 10.0  # the goal's 10 s, as CPU time so a loaded machine does not break it
RESULTS: dict[str, dict[str, object]] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_results() -> Iterator[None]:
    yield
    target = os.environ.get("DSKD_HOSTILE_RESULTS")
    if target and RESULTS:
        path = Path(target)
        old = json.loads(path.read_text()) if path.is_file() else {}
        machine = {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 1),
                   "cpu_hog": os.environ.get("DSKD_TEST_CPU_HOG", "") or None,
                   "measured_with": "os.wait4 rusage of the CLI child (as /usr/bin/time -v)"}
        path.write_text(json.dumps({**old, **RESULTS, "_machine": machine}, indent=2, sort_keys=True) + "\n")


def measured_cli(name: str, args: list[str], tmp_path: Path, timeout: float = 180,
                 limit_as: int | None = None) -> tuple[int, str]:
    """`python -m pipeline ARGS` with HOME and TMPDIR in `tmp_path`; -> (exit code, stderr).

    Records wall time, CPU time and peak RSS under RESULTS[name]. `limit_as`: RLIMIT_AS
    (ulimit -v) in bytes for the child.
    """
    home, tmp = tmp_path / "home", tmp_path / "tmpdir"
    home.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", "HOME": str(home), "TMPDIR": str(tmp)}
    env.pop("DSKD_CACHE", None)

    def limit() -> None:
        if limit_as is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))

    err_path = tmp_path / f"{name}.stderr"
    start = time.monotonic()
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=limit if limit_as is not None else None)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > timeout:
                os.kill(proc.pid, signal.SIGKILL)
                os.wait4(proc.pid, 0)
                pytest.fail(f"{name}: no answer within {timeout} s (a hang)")
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    stderr = err_path.read_text()
    RESULTS[name] = {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                     "max_rss_mib": round(usage.ru_maxrss / 1024, 1), "exit": proc.returncode,
                     "message": stderr.strip().splitlines()[-1] if stderr.strip() else ""}
    assert usage.ru_maxrss * 1024 <= MAX_RSS, RESULTS[name]
    assert usage.ru_utime + usage.ru_stime <= MAX_CPU_S, RESULTS[name]
    # Training (not a refusal) lets torch keep its own kernel cache in $TMPDIR/torchinductor_<user>.
    stray = [p.name for p in [*home.iterdir(), *tmp.iterdir()]
             if not (proc.returncode == 0 and p.name.startswith("torchinductor_"))]
    assert not stray, f"wrote outside the run and cache folders: {stray}"
    return proc.returncode, stderr


def train_args(data: Path, tmp_path: Path, *extra: str, size: int = 16, chans: int = 1) -> list[str]:
    return ["train", "--data", str(data), "--epochs", "1", "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--input-size", str(size), "--in-chans", str(chans),
            "--batch-size", "4", *extra]


def one_error_line(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]) and "Traceback" not in stderr, stderr
    return errors[0]


def assert_nothing_cached_or_trained(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.iterdir()], "a refused dataset left a cache"
    assert not (tmp_path / "out" / "last.pt").exists()


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


def assert_right_labels(bundle: object, counts: dict[str, int]) -> None:
    """image_folder's class i holds images of value 40·i + j: labels must match the pixels."""
    for split in ("train", "test"):
        x, y = getattr(bundle, f"{split}_x").numpy(), getattr(bundle, f"{split}_y").numpy()
        assert np.array_equal(x[:, 0, 0, 0] // 40, y), split
    names = bundle.class_names  # type: ignore[attr-defined]
    found = {c: int((bundle.train_y == i).sum()) for i, c in enumerate(names)}  # type: ignore[attr-defined]
    assert found == counts


# ------------------------------------------------------------------ size caps
@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """2 MB archives holding one 2 GiB member of zeros named like an image; a 657 KB 169 MP PNG."""
    d = tmp_path_factory.mktemp("bombs")
    return {"tar.gz": gzip_tar_with_zero_member(d / "bomb.tar.gz", "data/train/a/big.png", 2 * GIB),
            "zip": zip_with_zero_member(d / "bomb.zip", "data/train/a/big.png", 2 * GIB),
            "png": huge_rgba_png(d / "huge.png")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_archive_with_a_2gib_member_is_refused_at_its_header(kind: str, bombs: dict[str, Path], tmp_path: Path):
    archive = bombs[kind]
    assert archive.stat().st_size < 3 << 20
    code, err = measured_cli(f"archive_2gib_member_{kind}", train_args(archive, tmp_path), tmp_path)
    msg = one_error_line(err)
    assert code == 2 and f"{archive}:data/train/a/big.png: is 2.0 GiB, over the per-file cap" in msg, msg
    assert "data.max_file_mb" in msg
    assert_nothing_cached_or_trained(tmp_path)


@pytest.mark.slow
def test_sparse_2gib_image_file_is_refused_unread(tmp_path: Path):
    root = image_folder(tmp_path / "data")
    big = root / "train" / "a" / "big.png"
    with open(big, "wb") as fh:
        fh.truncate(2 * GIB)  # sparse: no disk used, 2 GiB if read
    code, err = measured_cli("folder_2gib_file", train_args(root, tmp_path), tmp_path)
    msg = one_error_line(err)
    assert code == 2 and f"{big}: is 2.0 GiB, over the per-file cap of 64.0 MiB (data.max_file_mb)" in msg


@pytest.mark.slow
def test_png_decompression_bomb_is_refused_before_decoding(bombs: dict[str, Path], tmp_path: Path):
    root = image_folder(tmp_path / "data")
    bomb = root / "train" / "b" / "huge.png"
    bomb.write_bytes(bombs["png"].read_bytes())
    code, err = measured_cli("png_13000x13000_rgba", train_args(root, tmp_path), tmp_path)
    msg = one_error_line(err)
    assert code == 2 and f"{bomb}: image of 169.0 megapixels" in msg and "(data.max_image_mp)" in msg, msg
    assert_nothing_cached_or_trained(tmp_path)


def test_pixel_cap_below_pils_own_check_is_ours(tmp_path: Path):
    """Between our cap and PIL's bomb error the header check refuses, naming the size and the key."""
    root = image_folder(tmp_path / "data")
    Image.new("L", (2000, 1000)).save(root / "train" / "a" / "wide.png")
    with pytest.raises(UserError, match=r"wide\.png: image of 2000×1000 = 2\.0 megapixels, over the cap "
                                        r"of 1 megapixels \(data\.max_image_mp\)"):
        load_data(root, 16, 1, cache_dir=tmp_path / "c", progress=False, limits={"max_image_mp": 1})
    bundle = load_data(root, 16, 1, cache_dir=tmp_path / "c", progress=False, limits={"max_image_mp": 3})
    assert len(bundle.train_y) == 7


def test_caps_are_recipe_keys_named_in_the_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`[data] max_total_mb` / `max_file_mb` reach the loader from a recipe (--set) and are named."""
    root = image_folder(tmp_path / "data")
    for key, words in (("data.max_total_mb", "over the total cap"), ("data.max_file_mb", "over the per-file cap")):
        code, _, err = run_main(["run", "--data", str(root), "--out", str(tmp_path / key),
                                 *set_args({**SMALL, "data.cache_dir": str(tmp_path / "cache"), key: 1e-5})],
                                capsys)
        errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and words in errors[0] and f"raise {key}" in errors[0], err
    code, _, err = run_main(["run", "--data", str(root), "--out", str(tmp_path / "neg"),
                             *set_args({**SMALL, "data.max_image_mp": -1})], capsys)
    assert code == 2 and "data.max_image_mp" in err, err


# ------------------------------------------------------------------ the walk
def test_folder_links_are_not_followed_and_labels_stay_right(tmp_path: Path):
    """`train/a/up -> ..` used to make class a collect b's images; two links hung the walk."""
    root = image_folder(tmp_path / "data")
    os.symlink("..", root / "train" / "a" / "up")
    os.symlink(".", root / "train" / "b" / "loop")
    os.symlink("../../train", root / "test" / "a" / "again")
    image_folder(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere" / "train" / "b", root / "train" / "b" / "more")  # out of the dataset
    before = tree(root)
    with pytest.warns(UserWarning, match="4 symlinked folders not followed"):
        bundle = load_data(root, 16, 1, cache_dir=tmp_path / "c", progress=False)
    assert_right_labels(bundle, {"a": 3, "b": 3})
    assert len(bundle.test_y) == 6 and tree(root) == before


def test_file_link_counts_once_in_the_folder_it_really_lies_in(tmp_path: Path):
    root = image_folder(tmp_path / "data")
    os.symlink("../b/0.png", root / "train" / "a" / "9.png")
    bundle = load_data(root, 16, 1, cache_dir=tmp_path / "c", progress=False)
    assert_right_labels(bundle, {"a": 3, "b": 3})


def test_file_link_out_of_the_dataset_is_refused(tmp_path: Path):
    root = image_folder(tmp_path / "data")
    outside = tmp_path / "secret.png"
    Image.new("L", (8, 8)).save(outside)
    os.symlink(outside, root / "train" / "a" / "x.png")
    with pytest.raises(UserError, match=r"train/a/x\.png: symbolic link to .*secret\.png, outside the dataset"):
        load_data(root, 16, 1, cache_dir=tmp_path / "c", progress=False)


def _fifo_and_socket(root: Path) -> tuple[Path, Path, socket.socket]:
    fifo = root / "train" / "a" / "x.png"
    os.mkfifo(fifo)
    sock_path = root / "train" / "b" / "s.png"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    return fifo, sock_path, sock


@pytest.mark.slow
def test_fifo_and_socket_are_refused_without_being_opened(tmp_path: Path):
    root = image_folder(tmp_path / "data")
    fifo, _, sock = _fifo_and_socket(root)
    with sock:
        code, err = measured_cli("fifo_named_like_an_image", train_args(root, tmp_path), tmp_path)
    msg = one_error_line(err)
    assert code == 2 and f"{fifo}: unreadable image (OSError: a FIFO, not a regular file" in msg, msg
    assert "(1 more unreadable images)" in msg  # the socket


@pytest.mark.slow
def test_fifo_and_socket_are_skipped_with_skip_bad_and_training_proceeds(tmp_path: Path):
    root = image_folder(tmp_path / "data")
    fifo, sock_path, sock = _fifo_and_socket(root)
    (root / "train" / "a" / "notes").write_text("no extension: counted in summary.json, not an image")
    with sock:
        code, err = measured_cli("fifo_with_skip_bad_trains", train_args(root, tmp_path, "--skip-bad"), tmp_path)
        assert code == 0, err
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["skipped_images"] == 2 and summary["train_images"] == 6 and summary["ignored_files"] == 1
        with pytest.warns(UserWarning, match="skipped 2 unreadable images"), pytest.warns(UserWarning, match="ignored 1"):
            bundle = load_data(root, 16, 1, cache_dir=tmp_path / "c2", progress=False, skip_bad=True)
    assert_right_labels(bundle, {"a": 3, "b": 3})


def test_files_that_are_not_images_are_counted_not_silently_ignored(tmp_path: Path):
    root = image_folder(tmp_path / "data")
    (root / "train" / "a" / "README").write_text("no extension")
    (root / "train" / "b" / "scan.dat").write_bytes(b"\0" * 10)
    with pytest.warns(UserWarning, match=r"ignored 2 files in the splits that are not images .*first: .*README"):
        bundle = load_data(root, 16, 1, cache_dir=tmp_path / "c", progress=False)
    assert bundle.ignored == 2
    with pytest.warns(UserWarning, match="ignored 2 files"):
        again = load_data(root, 16, 1, cache_dir=tmp_path / "c", progress=False)
    assert again.from_cache and again.ignored == 2


def test_archive_members_follow_the_same_rules(tmp_path: Path):
    """Links, FIFOs and devices in archives are refused by name before anything is written."""
    import tarfile

    for kind in (tarfile.SYMTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE):
        path = tmp_path / f"bad{kind!r}.tar"
        with tarfile.open(path, "w") as tf:
            info = tarfile.TarInfo("train/a/x.png")
            info.type, info.linkname = kind, "../../../etc/passwd"
            tf.addfile(info)
        with pytest.raises(UserError, match=r"unsafe archive member 'train/a/x\.png'"):
            load_data(path, 16, 1, cache_dir=tmp_path / "c", progress=False)


def test_cifar_batch_linked_out_of_the_folder_is_refused(tmp_path: Path):
    from dskd.data.cifar import CIFAR10_FILES

    folder = tmp_path / "cifar"
    folder.mkdir()
    for name in CIFAR10_FILES[1:]:
        (folder / name).write_bytes(b"")
    (tmp_path / "elsewhere").write_bytes(b"")
    os.symlink(tmp_path / "elsewhere", folder / CIFAR10_FILES[0])
    with pytest.raises(UserError, match=r"data_batch_1: symbolic link to .*elsewhere, outside the dataset folder"):
        load_data(folder, 32, 3, cache_dir=tmp_path / "c", progress=False)


# ------------------------------------------------------------------ memory pressure
@pytest.mark.slow
def test_running_out_of_memory_while_decoding_is_one_line(tmp_path: Path):
    """Under RLIMIT_AS (ulimit -v) set just above what the imports need, decoding 1024×1024
    RGB arrays (140 × 3 MiB) cannot fit: exit 2, one line naming the step and what to lower."""
    root = image_folder(tmp_path / "data", per_class=70)
    script = (
        "import resource, sys, torch, numpy, PIL.Image, dskd.data, pipeline.cli\n"
        "vm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize'))\n"
        "lim = vm * 1024 + (256 << 20)\n"
        "resource.setrlimit(resource.RLIMIT_AS, (lim, lim))\n"
        f"sys.exit(pipeline.cli.main({train_args(root, tmp_path, size=1024, chans=3)!r}))\n"
    )
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    msg = one_error_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert f"{root}: out of memory while decoding images; lower data.input_size or data.limit_per_class" in msg
    assert_nothing_cached_or_trained(tmp_path)


@pytest.mark.slow
def test_running_out_of_memory_while_training_is_one_line(tmp_path: Path):
    """The data fit but the training step does not: digits at 128×128 in batches of 512 through
    resnet20 need GBs of activations. Under RLIMIT_AS set 768 MiB above what the imports and the
    loaded data need: exit 2, one line naming the training step and what to lower."""
    out = tmp_path / "out"
    script = (
        "import resource, sys, torch, numpy, dskd.data, pipeline.cli\n"
        f"dskd.data.load_data('digits', 128, 1, cache_dir={str(tmp_path / 'cache')!r}, progress=False)\n"
        "vm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize'))\n"
        "lim = vm * 1024 + (768 << 20)\n"
        "resource.setrlimit(resource.RLIMIT_AS, (lim, lim))\n"
        "sys.exit(pipeline.cli.main(['train', '--model', 'resnet20', '--data', 'digits', '--epochs', '1',\n"
        f"    '--out', {str(out)!r}, '--cache-dir', {str(tmp_path / 'cache')!r}, '--input-size', '128',\n"
        "    '--in-chans', '1', '--batch-size', '512']))\n"
    )
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    msg = one_error_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert "out of memory while training resnet20 (ce); lower batch_size (now 512)" in msg, msg
    assert not (out / "model.pt").exists()


# ------------------------------------------------------------------ statistics and the cache
@pytest.mark.slow
def test_constant_channel_is_normalized_with_std_1_and_training_stays_finite(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for i, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for j in range(4):
                Image.new("RGB", (8, 8), (60 * i + 10 * j, 100, 30 * j)).save(root / split / cls / f"{j}.png")
    with pytest.warns(UserWarning, match=r"channel 1 \(green, std 0\) is constant .* std 1\.0"):
        bundle = load_data(root, 16, 3, cache_dir=tmp_path / "c", progress=False)
    assert bundle.std[1] == 1.0 and bundle.std[0] > 0.01 and abs(bundle.mean[1] - 100 / 255) < 1e-6
    code, _, err = run_main(["train", "--model", "resnet8", "--data", str(root), "--epochs", "1",
                             "--input_size", "16", "--batch_size", "4", "--out", str(tmp_path / "t"),
                             "--cache_dir", str(tmp_path / "c")], capsys)
    assert code == 0, err
    for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines():
        values = [v for k, v in json.loads(line).items() if k.startswith("loss") and isinstance(v, float)]
        assert values and all(math.isfinite(v) for v in values), line


def test_image_edited_in_place_with_its_mtime_kept_is_decoded_again(tmp_path: Path):
    """Same size, same inode, mtime put back: only ctime changes, and the cache key includes it."""
    root = image_folder(tmp_path / "data")
    img = root / "train" / "a" / "edit.pgm"  # raw PGM: the pixels are the last 64 bytes
    img.write_bytes(b"P5\n8 8\n255\n" + bytes([1]) * 64)
    first = load_data(root, 16, 1, cache_dir=tmp_path / "c", progress=False)
    assert int(first.train_x[3, 0, 0, 0]) == 1  # class a: 0.png 1.png 2.png edit.pgm
    st = img.stat()
    time.sleep(0.01)
    with open(img, "r+b") as fh:  # edit in place
        fh.seek(-64, os.SEEK_END)
        fh.write(bytes([2]) * 64)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = img.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    again = load_data(root, 16, 1, cache_dir=tmp_path / "c", progress=False)
    assert not again.from_cache and int(again.train_x[3, 0, 0, 0]) == 2
