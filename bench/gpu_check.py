"""One prepared script that checks the CUDA paths on a lent GPU machine, in one short sitting.

    python bench/gpu_check.py --data PATH/cifar10-jpg.tar.gz --work /tmp/gpu_check \\
        --results bench/results/gpu_check.json

Why it exists: CI and the development machine have no GPU, so the CUDA code paths (bf16/fp16
autocast and GradScaler, NCCL + DistributedDataParallel, DSKD's guidance gradients on the GPU,
the `pipeline train` CLI with --device cuda) are only exercised when a GPU is lent, for a few
minutes. Each check is independent (one failing does not stop the others) and is written to the
results JSON as soon as it finishes, with the error text when it fails.

What it runs, at the CPU benchmark's budget (bench/distill_cifar10.py, "default") so the numbers
can be set beside the CPU table's seed-0 cells:
- the resnet20 teacher (10 epochs, 20000 images, bf16) on the GPU;
- resnet8 students, seed 0, bf16: ce, kd, dkd, lshfm and DSKD with its holdout-chosen settings;
- DSKD in fp32 and in fp16 (GradScaler);
- DSKD wrapped in DistributedDataParallel on NCCL (world size 1: one GPU is lent);
- `torchrun --nproc_per_node 2` on one GPU, which must end with the one-line error (torchrun exits 1);
- `python -m pipeline train --method dskd --device cuda` (the CLI a user runs).
TensorRT is not in the lent machine's image and cannot be fetched there, so engines are not built.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import distill_cifar10 as bench  # noqa: E402

from dskd import atomic  # noqa: E402

STUDENT_METHODS = ("ce", "kd", "dkd", "lshfm", "dskd")


def _steps(summary: dict[str, Any], batch: int) -> int:
    return summary["epochs"] * max(1, summary["train_images"] // batch)


def _cell(summary: dict[str, Any], batch: int) -> dict[str, Any]:
    return {"top1": round(summary["top1"], 2), "train_seconds": summary["train_seconds"],
            "s_per_step": round(summary["train_seconds"] / _steps(summary, batch), 4),
            "device": summary["device"], "precision": summary["precision"],
            "world_size": summary["world_size"]}


def _cpu_table(results_path: Path) -> tuple[float | None, dict[str, float]]:
    """The CPU table's teacher and seed-0 accuracies, to set beside the GPU's (same budget, subsets)."""
    if not results_path.exists():
        return None, {}
    data = json.loads(results_path.read_text())
    cells = data.get("cells", {})
    return (round(data["teacher"]["top1"], 2) if data.get("teacher") else None,
            {k.split("/")[0]: round(v["top1"], 2) for k, v in cells.items() if k.endswith("/seed0")})


def _forced_ddp_info():  # type: ignore[no-untyped-def]
    """A DistInfo that says "distributed" at world size 1, so the trainer wraps the model in DDP."""
    from dskd.distributed import DistInfo

    class OneRank(DistInfo):
        @property
        def enabled(self) -> bool:
            return True

    return OneRank()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=bench.DEFAULT_DATA)
    ap.add_argument("--work", default="runs/gpu_check")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    ap.add_argument("--budget", choices=sorted(bench.BUDGETS), default="default")
    ap.add_argument("--device", default="cuda", help="cpu runs the script's logic without a GPU (a dry run)")
    ap.add_argument("--copy-model-to", default=None, help="copy the bf16 DSKD student's model.pt here")
    args = ap.parse_args()

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; this script only runs on a GPU machine", file=sys.stderr)
        return 2
    from dskd.trainer import train

    work, results_path = Path(args.work), Path(args.results)
    b = bench.BUDGETS[args.budget]
    data = str(Path(args.data).resolve())
    cpu_teacher_top1, cpu_seed0 = _cpu_table(ROOT / "bench" / "results" / "distill_cifar10.json")
    report: dict[str, Any] = {
        "benchmark": "gpu_check",
        "command": "python " + " ".join(sys.argv),
        "machine": {"gpu": torch.cuda.get_device_name(0) if cuda else None,
                    "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
                    "cuda": torch.version.cuda, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                    "cpu_cores": os.cpu_count(), "python": platform.python_version(), "host": socket.gethostname()},
        "budget": b.key(),
        "cpu_seed0_top1": cpu_seed0,
        "checks": {},
        "started": dt.datetime.now().isoformat(timespec="seconds"),
    }

    def save() -> None:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(results_path, report)

    def check(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            out = fn()
            report["checks"][name] = {"ok": True, **out, "wall_s": round(time.perf_counter() - t0, 1)}
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the next check still runs
            traceback.print_exc()
            out = None
            report["checks"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                                      "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"[gpu_check] {name}: {json.dumps(report['checks'][name])}", flush=True)
        save()
        return out

    def student_cfg(method: str, options: dict[str, Any], **changes: Any):  # type: ignore[no-untyped-def]
        cfg = bench.student_config(b, data, method, options, 0, str(work / "teacher"))
        return dataclasses.replace(cfg, device=args.device, **changes)

    teacher_cfg = dataclasses.replace(bench.teacher_config(b, data), device=args.device)
    check("teacher_bf16", lambda: {"model": b.teacher_model, **_cell(train(teacher_cfg, work / "teacher"), b.batch),
                                   "cpu_top1": cpu_teacher_top1})
    if not (work / "teacher" / "model.pt").exists():
        save()
        return 1

    variants = {v.name: v for v in bench.MAIN}
    for method in STUDENT_METHODS:
        v = variants[method]
        check(f"{method}_bf16", lambda v=v: _cell(train(student_cfg(v.method, v.options), work / v.name), b.batch))
    kd, dskd = report["checks"].get("kd_bf16", {}), report["checks"].get("dskd_bf16", {})
    if kd.get("ok") and dskd.get("ok"):
        report["dskd_over_kd_s_per_step"] = round(dskd["s_per_step"] / kd["s_per_step"], 2)
    dskd_opts = variants["dskd"].options
    for precision in ("fp32", "fp16") if cuda else ("fp32",):
        check(f"dskd_{precision}", lambda p=precision: _cell(
            train(student_cfg("dskd", dskd_opts, precision=p), work / f"dskd_{p}"), b.batch))

    def ddp_one_rank() -> dict[str, Any]:
        import torch.distributed as dist

        import dskd.trainer as trainer

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", RANK="0", WORLD_SIZE="1")
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
        saved = trainer.init_distributed
        trainer.init_distributed = lambda device_type, timeout_s=0: _forced_ddp_info()
        try:
            summary = train(student_cfg("dskd", dskd_opts, epochs=3), work / "dskd_ddp")
        finally:
            trainer.init_distributed = saved
            if dist.is_initialized():
                dist.destroy_process_group()
            for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
                os.environ.pop(k, None)
        return {**_cell(summary, b.batch), "backend": dist.Backend.NCCL if cuda else dist.Backend.GLOO,
                "note": "DDP wrapper at world size 1 (one GPU)"}

    check("dskd_ddp_1rank", ddp_one_rank)

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    teacher_pt = str(work / "teacher" / "model.pt")
    common = ["--model=resnet8", f"--data={data}", f"--teacher={teacher_pt}", "--method=dskd", f"--device={args.device}",
              "--precision=bf16", f"--train-subset={b.subset}", f"--batch-size={b.batch}", f"--lr={b.lr}",
              "--set=dskd.lsh_on=pooled", "--set=dskd.t0=100", "--set=dskd.guidance_scale=100",
              "--set=dskd.detach_adapter_input=false"]

    def two_ranks_one_gpu() -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "pipeline", "train", *common, "--epochs=1", f"--out={work / 'ddp2'}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        said = [ln for ln in proc.stderr.splitlines() if "LOCAL_RANK" in ln and "nproc_per_node" in ln]
        if proc.returncode == 0 or not said:
            raise RuntimeError(f"expected the one-GPU-per-rank error; rc={proc.returncode}; "
                               f"stderr tail: {proc.stderr[-800:]}")
        return {"returncode": proc.returncode, "message": said[0][:300]}

    if cuda and torch.cuda.device_count() == 1:
        check("torchrun_2_ranks_1_gpu_refused", two_ranks_one_gpu)

    def cli_train() -> dict[str, Any]:
        out = work / "cli_dskd"
        proc = subprocess.run([sys.executable, "-m", "pipeline", "train", *common, "--epochs=3", f"--out={out}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"rc={proc.returncode}: {proc.stderr[-800:]}")
        summary = json.loads((out / "summary.json").read_text())
        from dskd.checkpoint import build_model

        build_model(out / "model.pt")  # strict load into a plain resnet8: no training-only keys
        return {**_cell(summary, b.batch), "loads_into_plain_student": True}

    check("cli_train_dskd", cli_train)

    if args.copy_model_to and (work / "dskd" / "model.pt").exists():
        Path(args.copy_model_to).mkdir(parents=True, exist_ok=True)
        shutil.copy2(work / "dskd" / "model.pt", Path(args.copy_model_to) / "dskd_resnet8_gpu.pt")
    report["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    report["all_ok"] = all(c["ok"] for c in report["checks"].values())
    save()
    print(json.dumps({k: (v["ok"], v.get("top1"), v.get("s_per_step")) for k, v in report["checks"].items()}, indent=1))
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
