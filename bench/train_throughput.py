"""Training and teacher-forward throughput (images/s) at fp32 and bf16, plus batch augmentation.

    python bench/train_throughput.py [--steps 20] [--batch 128] [--out bench/results/train_throughput.json]

Synthetic 32x32 inputs (throughput does not depend on pixel values); CIFAR-10 class count.
Each number is the median of `--repeats` timed windows after warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy_targets.remote.runner import cpu_model  # noqa: E402
from dskd.data import augment  # noqa: E402
from dskd.models import create_model  # noqa: E402


def _autocast(precision: str):
    import contextlib

    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_windows(fn, warmup: int, steps: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        rates.append(steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def train_rate(name: str, precision: str, batch: int, steps: int, repeats: int) -> float:
    model = create_model(name, 10).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step():
        with _autocast(precision):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch * time_windows(step, 3, steps, repeats)


@torch.no_grad()
def forward_rate(name: str, precision: str, batch: int, steps: int, repeats: int) -> float:
    model = create_model(name, 10).to(memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def step():
        with _autocast(precision):
            model(x)

    return batch * time_windows(step, 3, steps, repeats)


def augment_rate(batch: int, steps: int, repeats: int) -> float:
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    return batch * time_windows(lambda: augment(x, mean, std, generator=gen), 3, steps, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for precision in ("fp32", "bf16"):
        for name in ("resnet8x4", "resnet20"):
            r = train_rate(name, precision, args.batch, args.steps, args.repeats)
            rows.append({"what": "train_step", "model": name, "precision": precision, "images_per_s": round(r, 1)})
            print(f"train   {name:10s} {precision}: {r:8.1f} img/s", flush=True)
        for name in ("resnet32x4", "resnet56"):
            r = forward_rate(name, precision, args.batch, args.steps, args.repeats)
            rows.append({"what": "teacher_forward", "model": name, "precision": precision, "images_per_s": round(r, 1)})
            print(f"forward {name:10s} {precision}: {r:8.1f} img/s", flush=True)
    r = augment_rate(512, args.steps, args.repeats)
    rows.append({"what": "augment_batch", "model": None, "precision": "uint8->fp32", "images_per_s": round(r, 1)})
    print(f"augment (crop+flip+normalize, batch 512): {r:10.1f} img/s")
    result = {
        "benchmark": "train_throughput",
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "python": platform.python_version()},
        "settings": {"batch": args.batch, "steps": args.steps, "repeats": args.repeats, "input": "3x32x32 synthetic",
                     "statistic": "median of repeats", "seed": 0},
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
