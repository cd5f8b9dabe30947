"""Benchmark dskd.data: first decode and cached load of the CIFAR-10 JPEG archive, and augment().

Writes bench/results/data_loading.json. Run: .venv/bin/python bench/data_loading.py
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch

from deploy_targets.remote.dskd_runner.environment import cpu_model
from dskd.atomic import write_json
from dskd.data import augment, load_data, normalize
from dskd.data.decode import default_workers

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def machine_info(threads: int) -> dict:
    cpu = cpu_model()  # the same reading the device runner records
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
        "pillow": PIL.__version__, "torch_threads": threads,
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),  # the machine may be shared
    }


def time_loads(archive: Path, workers: int, repeats: int) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="dskd-bench-cache-"))
    try:
        t0 = time.perf_counter()
        first = load_data(archive, cache_dir=cache, progress=False, workers=workers)
        decode_s = time.perf_counter() - t0
        n = len(first.train_y) + len(first.test_y)
        assert not first.from_cache
        cached = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            again = load_data(archive, cache_dir=cache, progress=False)
            cached.append(time.perf_counter() - t0)
            assert again.from_cache and torch.equal(again.test_x, first.test_x)
        cache_bytes = sum(p.stat().st_size for p in Path(first.cache_path).iterdir())
        return {
            "archive": str(archive), "archive_bytes": archive.stat().st_size, "images": n,
            "train_shape": list(first.train_x.shape), "test_shape": list(first.test_x.shape),
            "decode_workers": workers,
            "first_decode_s": round(decode_s, 3), "first_decode_images_per_s": round(n / decode_s, 1),
            "cached_load_s_median": round(statistics.median(cached), 4),
            "cached_load_s_all": [round(s, 4) for s in cached],
            "cached_load_images_per_s": round(n / statistics.median(cached), 1),
            "cache_bytes": cache_bytes,
            "note": "cached loads read the cache just written, so the files are in the OS page cache",
        }
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def time_transforms(batch: int, iters: int) -> dict:
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    gen = torch.Generator().manual_seed(0)
    results = {}
    for name, fn in (("augment", lambda: augment(x, mean, std, generator=gen)),
                     ("normalize", lambda: normalize(x, mean, std))):
        for _ in range(3):
            fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        results[f"{name}_images_per_s"] = round(batch / med, 1)
        results[f"{name}_ms_per_batch"] = round(med * 1000, 3)
    return {"device": "cpu", "batch": batch, "input": "uint8 3x32x32", "pad": 4, "flip": True,
            "iterations": iters, **results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "data_loading.json")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine may be shared)")
    ap.add_argument("--workers", type=int, default=default_workers(), help="decode processes")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not args.archive.is_file():
        print(f"{args.archive}: archive not found; pass --archive", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    result = {
        "benchmark": "dskd.data loading and augmentation",
        "machine": machine_info(args.threads),
        "load": time_loads(args.archive, args.workers, args.repeats),
        "transforms": time_transforms(batch=512, iters=30),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    result["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    write_json(args.out, result)
    print(f"wrote {args.out}")
    load, tr = result["load"], result["transforms"]
    print(f"first decode {load['first_decode_s']} s ({load['first_decode_images_per_s']} img/s), "
          f"cached {load['cached_load_s_median']} s; augment {tr['augment_images_per_s']} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
