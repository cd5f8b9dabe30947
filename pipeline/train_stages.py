"""The teacher and distill stages: train (or load) a teacher, then distill the student."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from dskd.checkpoint import file_sha256, load_model_file
from dskd.errors import UserError
from pipeline.recipe import Recipe, TrainSection
from pipeline.stage import RunContext, Stage


def _data_config(r: Recipe) -> dict[str, Any]:
    d = r.data
    return {"spec": _source_identity(d.spec), "input_size": d.input_size, "in_chans": d.in_chans,
            "train_subset": d.train_subset, "limit_per_class": d.limit_per_class}


def data_limits(d: Any) -> dict[str, float]:
    """The recipe's [data] caps on reading files (dskd.data.limits.DataLimits fields)."""
    return {"max_file_mb": d.max_file_mb, "max_total_mb": d.max_total_mb, "max_image_mp": d.max_image_mp}


def _source_identity(spec: str) -> str:
    """The data spec plus the file's size/mtime, so replacing the data re-runs training."""
    p = Path(spec)
    if p.is_file():
        st = p.stat()
        return f"{p.resolve()}|{st.st_size}|{int(st.st_mtime)}"
    return str(p.resolve()) if p.exists() else spec


def _train_config(s: TrainSection) -> dict[str, Any]:
    keys = ("model", "method", "epochs", "batch_size", "lr", "weight_decay", "schedule", "warmup_epochs",
            "precision", "seed", "options")
    return {k: getattr(s, k) for k in keys}


def train_in_folder(ctx: RunContext, section: TrainSection, method: str, teacher: str | None,
                    folder: Path) -> dict[str, Any]:
    """Train into `folder`, resuming from its `last.pt` if an earlier attempt was interrupted."""
    from dskd.trainer import TrainConfig, train

    d = ctx.recipe.data
    cfg = TrainConfig(
        model=section.model, data=d.spec, epochs=section.epochs, batch_size=section.batch_size, lr=section.lr,
        weight_decay=section.weight_decay, schedule=section.schedule, warmup_epochs=section.warmup_epochs,
        precision=section.precision, seed=section.seed, method=method, teacher=teacher,
        options=dict(section.options), input_size=d.input_size, in_chans=d.in_chans,
        train_subset=d.train_subset, limit_per_class=d.limit_per_class or None,
        device=section.device, cache_dir=d.cache_dir or None, skip_bad=d.skip_bad,
        ddp_timeout_s=section.ddp_timeout_s, data_limits=data_limits(d),
    )
    resume = (folder / "last.pt").exists()
    if resume:
        ctx.log(f"  resuming from {folder / 'last.pt'}")
    if section.nproc > 1:
        _train_torchrun(cfg, folder, section.nproc, resume)
        summary = json.loads((folder / "summary.json").read_text())
    else:
        summary = train(cfg, folder, resume=resume)
    return {"model_pt": "model.pt", "summary": summary, "model_sha256": file_sha256(folder / "model.pt")}


def _train_torchrun(cfg: Any, folder: Path, nproc: int, resume: bool) -> None:
    """Run `pipeline train` under torchrun (DDP); the coordinating process waits for it."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "pipeline", "train", f"--model={cfg.model}", f"--data={cfg.data}", f"--epochs={cfg.epochs}",
            f"--out={folder}", f"--method={cfg.method}", f"--batch-size={cfg.batch_size}", f"--lr={cfg.lr}",
            f"--seed={cfg.seed}", f"--precision={cfg.precision}", f"--schedule={cfg.schedule}",
            f"--weight-decay={cfg.weight_decay}", f"--warmup-epochs={cfg.warmup_epochs}",
            f"--input-size={cfg.input_size}", f"--in-chans={cfg.in_chans}", f"--device={cfg.device}",
            f"--train-subset={cfg.train_subset}", f"--ddp-timeout-s={cfg.ddp_timeout_s}"]
    if cfg.teacher:
        args.append(f"--teacher={cfg.teacher}")
    if cfg.limit_per_class:
        args.append(f"--limit-per-class={cfg.limit_per_class}")
    if cfg.cache_dir:
        args.append(f"--cache-dir={cfg.cache_dir}")
    if cfg.skip_bad:
        args.append("--skip-bad")
    if cfg.data_limits:
        args.append(f"--data-limits={json.dumps(cfg.data_limits)}")
    if resume:
        args.append("--resume")
    for k, v in cfg.options.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(args, env=env)
    if proc.returncode != 0:
        raise UserError(f"distributed training under torchrun failed (exit {proc.returncode}); see the log above. "
                        f"Re-run to resume from {folder / 'last.pt'}")


def _teacher_config(ctx: RunContext) -> dict[str, Any]:
    t = ctx.recipe.teacher
    if t.checkpoint:
        p = Path(t.checkpoint)
        return {"checkpoint": str(p.resolve()), "sha256": file_sha256(p) if p.is_file() else "missing"}
    return {"data": _data_config(ctx.recipe), "train": _train_config(t)}


def _teacher_run(ctx: RunContext, folder: Path) -> dict[str, Any]:
    t = ctx.recipe.teacher
    if t.checkpoint:
        src = Path(t.checkpoint)
        _, meta = load_model_file(src)
        shutil.copyfile(src, folder / "model.pt.tmp")
        os.replace(folder / "model.pt.tmp", folder / "model.pt")
        return {"model_pt": "model.pt", "loaded_from": str(src), "model_sha256": file_sha256(folder / "model.pt"),
                "summary": {"model": meta["model"], "top1": meta.get("top1"), "method": meta.get("method")}}
    return train_in_folder(ctx, t, "ce", None, folder)


def _distill_config(ctx: RunContext) -> dict[str, Any]:
    return {"data": _data_config(ctx.recipe), "train": _train_config(ctx.recipe.student)}


def _distill_run(ctx: RunContext, folder: Path) -> dict[str, Any]:
    s = ctx.recipe.student
    teacher_pt = str(ctx.folder("teacher") / ctx.out("teacher")["model_pt"])
    return train_in_folder(ctx, s, s.method, None if s.method == "ce" else teacher_pt, folder)


TEACHER = Stage("teacher", (), _teacher_config, _teacher_run, "train or load the teacher")
DISTILL = Stage("distill", ("teacher",), _distill_config, _distill_run, "distill the student")
