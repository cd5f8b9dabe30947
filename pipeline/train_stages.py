"""The teacher and distill stages: train (or load) a teacher, then distill the student."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from dskd import atomic
from dskd.checkpoint import file_sha256, load_model_file
from dskd.errors import UserError
from dskd.train_settings import TrainConfig, needs_teacher, recipe_settings, result_key
from pipeline.recipe import Recipe, TrainSection
from pipeline.stage import RunContext, Stage

log = logging.getLogger(__name__)


def _data_config(r: Recipe) -> dict[str, Any]:
    d = r.data
    return {"spec": _source_identity(d.spec), "input_size": d.input_size, "in_chans": d.in_chans,
            "train_subset": d.train_subset, "limit_per_class": d.limit_per_class}


def data_limits(d: Any) -> dict[str, float]:
    """The recipe's [data] caps on reading files (dskd.data.limits.DataLimits fields)."""
    return {"max_file_mb": d.max_file_mb, "max_total_mb": d.max_total_mb, "max_image_mp": d.max_image_mp}


def _source_identity(spec: str) -> str:
    """The data spec and what lies there, so new or edited data re-runs training (and all after it).

    An archive: its content's sha256 (size and whole-second mtime missed a same-size archive copied
    with its times kept, `cp -p`). A folder: its path, and size, mtime, ctime and inode of every
    file the dataset walk lists (`files_digest`, the decode cache's rule), so an added, removed,
    replaced or edited image changes the key without reading any image (the path alone did not).
    A built-in name (digits): the name.
    """
    p = Path(spec)
    if p.is_file():
        st = p.stat()
        return f"{p.resolve()}|{_content_digest(str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)}"
    if p.is_dir():
        from dskd.data.cache import files_digest
        from dskd.data.walk import walk_dataset

        root = p.resolve()
        listing = walk_dataset(root)
        return f"{root}|{files_digest(root, listing.files)}|{len(listing.special)}|{len(listing.linked_dirs)}"
    return spec


@functools.lru_cache(maxsize=8)
def _content_digest(path: str, *stat_key: int) -> str:
    """sha256 of a data archive, once per process for the same file state (every stage key asks)."""
    from dskd.data.cache import file_digest

    return file_digest(Path(path))


def _train_config(s: TrainSection) -> dict[str, Any]:
    """A [teacher]/[student] section's part of the stage cache key: every recipe training setting
    that changes the weights (dskd.train_settings marks them), so a new one cannot be left out."""
    return result_key({f.name: getattr(s, f.name) for f in recipe_settings()})


def train_config(ctx: RunContext, section: TrainSection, method: str, teacher: str | None) -> TrainConfig:
    """The TrainConfig of a recipe section: its recipe settings plus the [data] section's."""
    d = ctx.recipe.data
    values = {f.name: getattr(section, f.name) for f in recipe_settings()}
    values.update(
        method=method, teacher=teacher, options=dict(section.options), data=d.spec, input_size=d.input_size,
        in_chans=d.in_chans, train_subset=d.train_subset, limit_per_class=d.limit_per_class or None,
        cache_dir=d.cache_dir or None, skip_bad=d.skip_bad, data_limits=data_limits(d),
    )
    return TrainConfig(**values)


def train_in_folder(ctx: RunContext, section: TrainSection, method: str, teacher: str | None,
                    folder: Path) -> dict[str, Any]:
    """Train into `folder`, resuming from its `last.pt` if an earlier attempt was interrupted."""
    cfg = train_config(ctx, section, method, teacher)
    resume = (folder / "last.pt").exists()
    if resume:
        ctx.log(f"  resuming from {folder / 'last.pt'}")
    summary = run_training(cfg, folder, resume)
    return {"model_pt": "model.pt", "summary": summary, "model_sha256": file_sha256(folder / "model.pt")}


HANDOFF_FILE = "train_config.json"


def run_training(cfg: TrainConfig, folder: Path, resume: bool) -> dict[str, Any]:
    """Train in this process, or, for nproc > 1 outside torchrun, under torchrun (DDP): the settings
    go to the ranks as one JSON file (`pipeline train --config`), so no setting can be lost on the way."""
    if cfg.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        _train_torchrun(cfg, Path(folder), resume)
        return json.loads((Path(folder) / "summary.json").read_text())
    from dskd.trainer import train

    return train(cfg, folder, resume=resume)


def _train_torchrun(cfg: TrainConfig, folder: Path, resume: bool) -> None:
    """Run `pipeline train --config FOLDER/train_config.json` under torchrun; this process waits for it."""
    folder.mkdir(parents=True, exist_ok=True)
    handoff = folder / HANDOFF_FILE
    atomic.write_json(handoff, cfg.to_dict())
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}",
            "-m", "pipeline", "train", f"--config={handoff}", f"--out={folder}"]
    if resume:
        args.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    log.debug("torchrun: %s", " ".join(args))
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
    return train_in_folder(ctx, s, s.method, teacher_pt if needs_teacher(s.method) else None, folder)


TEACHER = Stage("teacher", (), _teacher_config, _teacher_run, "train or load the teacher")
DISTILL = Stage("distill", ("teacher",), _distill_config, _distill_run, "distill the student")
