"""Training loop shared by every method: the distiller computes named losses, this file does the rest.

Files written into the output folder (rank 0 only, each atomically):
- `last.pt`      resumable state (distiller minus teacher, optimizer, scheduler, epoch, RNG)
- `metrics.jsonl` one line per finished epoch
- `model.pt`     final plain-student weights + metadata (see dskd.checkpoint)
- `summary.json` what a report needs: model, method, epochs, params, macs, top1, train_seconds, ...

`train()` runs six steps, each a function with typed inputs: `_load_split` (data), `_build`
(student, distiller, optimizer), `_resume` (last.pt), `_run_epoch`, `_save_checkpoint` and
`_finalize` (model.pt, summary.json). The settings are `TrainConfig` (dskd.train_settings); the
pieces (device, precision, schedule, optimizer, teacher, evaluation) are in dskd.train_parts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from dskd import atomic
from dskd.checkpoint import file_sha256, save_model, save_torch, torch_load
from dskd.distributed import DistInfo, all_reduce_sum, any_rank, barrier, init_distributed, shutdown
from dskd.errors import UserError
from dskd.methods.bookkeeping import LossBook
from dskd.train_parts import (
    autocast_for,
    evaluate,
    is_out_of_memory,
    keep_update_kind,
    load_teacher,
    lr_lambda_for,
    make_optimizer,
    pick_device,
)
from dskd.train_settings import (
    PRECISIONS,
    RESUME_MAY_CHANGE,
    SCHEDULES,
    SETTINGS,
    TrainConfig,
    setting_default,
)

if TYPE_CHECKING:
    from dskd.methods.base import Distiller

__all__ = ["PRECISIONS", "RESUME_MAY_CHANGE", "SCHEDULES", "NonFiniteLoss", "TrainConfig", "autocast_for",
           "evaluate", "load_teacher", "lr_lambda_for", "make_optimizer", "pick_device", "train"]

log = logging.getLogger(__name__)

TRAIN_STATE_FORMAT = "dskd-train-state/1"
# Without a terminal, a progress line at least this often (seconds) during an epoch;
# $DSKD_PROGRESS_EVERY_S overrides it.
PROGRESS_EVERY_S = 30.0


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN/inf: training stops, the last good checkpoint stays."""


def _progress_every_s() -> float:
    """Seconds between progress lines when there is no terminal ($DSKD_PROGRESS_EVERY_S, default 30)."""
    raw = os.environ.get("DSKD_PROGRESS_EVERY_S", "")
    if not raw:
        return PROGRESS_EVERY_S
    try:
        return float(raw)
    except ValueError:
        raise UserError(f"DSKD_PROGRESS_EVERY_S={raw!r}: not a number of seconds; unset it or give e.g. 30") from None


def _show_progress(dist_info: DistInfo) -> bool:
    return dist_info.is_main and sys.stderr.isatty() and not os.environ.get("CI")


def _say(text: str) -> None:
    """A user-facing progress line (the `[train]` lines CI logs and tests/test_terminal_output.py read)."""
    print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the steps' types
@dataclass(frozen=True)
class RunFiles:
    """The files of one output folder."""

    out: Path

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    @property
    def model(self) -> Path:
        return self.out / "model.pt"

    @property
    def summary(self) -> Path:
        return self.out / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"


@dataclass
class Split:
    """The training images and the split evaluated each epoch (the test split or a holdout)."""

    data: Any  # dskd.data.Dataset: class names, test split, mean/std, fingerprint, skipped/ignored counts
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    eval_name: str  # "test" | "holdout"

    @property
    def num_classes(self) -> int:
        return len(self.data.class_names)


@dataclass
class Parts:
    """What training updates: the distiller (student + teacher + extras), its optimizer and schedule."""

    student: nn.Module
    distiller: Distiller
    model: nn.Module  # what the step calls: the distiller, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    steps_per_epoch: int
    per_rank: int
    params: int
    macs: int
    teacher_meta: dict[str, Any] | None


@dataclass
class Context:
    """Where and how this process trains."""

    cfg: TrainConfig
    files: RunFiles
    dist: DistInfo
    device: torch.device


@dataclass
class EpochResult:
    record: dict[str, Any]  # the metrics.jsonl line
    seconds: float
    top1: float  # the last evaluation on the eval split (NaN before the first)


# ----------------------------------------------------------------------------- entry point
def train(cfg: TrainConfig, out_dir: str | os.PathLike, resume: bool = False,
          stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Train `cfg.model` with `cfg.method`; returns the summary dict (also written to summary.json).

    `stop_after_epoch` ends the process's work early (as an interruption would), for resume tests.
    """
    cfg.validate()
    out = Path(out_dir)
    device_type = "cuda" if (cfg.device in ("auto", "cuda") and torch.cuda.is_available()) or cfg.device.startswith("cuda") else "cpu"
    dist_info = init_distributed(device_type, cfg.ddp_timeout_s)
    try:
        if cfg.nproc > 1 and dist_info.world_size != cfg.nproc:
            raise UserError(f"nproc={cfg.nproc} but this process is one of {dist_info.world_size}: run "
                            f"`python -m pipeline train --nproc {cfg.nproc} ...`, which starts torchrun itself")
        ctx = Context(cfg, RunFiles(out), dist_info, pick_device(cfg.device, dist_info))
        try:
            return _train(ctx, resume, stop_after_epoch)
        except (MemoryError, RuntimeError) as exc:
            # Out of memory is a size the user chose, not a bug: one line with what to lower.
            # Data loading reports its own step; this is the model/optimizer/training step.
            if not is_out_of_memory(exc):
                raise
            raise UserError(
                f"{out}: out of memory while training {cfg.model} ({cfg.method}); lower batch_size "
                f"(now {cfg.batch_size}) or input_size (now {cfg.input_size}), or free memory"
            ) from exc
    finally:
        shutdown(dist_info)


def _train(ctx: Context, resume: bool, stop_after_epoch: int | None) -> dict[str, Any]:
    cfg, files = ctx.cfg, ctx.files
    if ctx.dist.is_main:
        files.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    split = _load_split(cfg, ctx.dist)
    parts = _build(ctx, split)
    start_epoch, train_seconds = 0, 0.0
    if resume and files.last.exists():
        start_epoch, train_seconds = _resume(ctx, parts)
    elif ctx.dist.is_main:
        for p in (files.metrics, files.summary, files.model):
            p.unlink(missing_ok=True)
    if ctx.dist.enabled:  # wrapped after resuming, as every rank loaded the same state
        parts.model = nn.parallel.DistributedDataParallel(
            parts.distiller, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    top1 = float("nan")
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
        result = _run_epoch(ctx, parts, split, epoch, top1)
        train_seconds += result.seconds
        top1 = result.top1
        if ctx.dist.is_main:
            _save_checkpoint(ctx, parts, epoch + 1, train_seconds, result.record)
        barrier(ctx.dist)
    if stop_after_epoch is not None and stop_after_epoch < cfg.epochs:
        return {"stopped_after_epoch": stop_after_epoch}
    if not ctx.dist.is_main:
        return {}
    return _finalize(ctx, parts, split, top1, train_seconds)


# ----------------------------------------------------------------------------- 1. data
def _load_split(cfg: TrainConfig, dist_info: DistInfo) -> Split:
    """Decode the data, take the class-balanced subset, split off the holdout."""
    from dskd.data import class_balanced_subset, holdout_split, load_data

    data = load_data(cfg.data, input_size=cfg.input_size, in_chans=cfg.in_chans, cache_dir=cfg.cache_dir,
                     limit_per_class=cfg.limit_per_class, skip_bad=cfg.skip_bad, progress=dist_info.is_main,
                     limits=cfg.data_limits or None)
    train_x, train_y = data.train_x, data.train_y
    if cfg.train_subset != 1.0:
        idx = class_balanced_subset(train_y, cfg.train_subset, seed=cfg.seed)
        train_x, train_y = train_x[idx], train_y[idx]
    if cfg.holdout > 0:
        tr_idx, ho_idx = holdout_split(train_y, cfg.holdout, seed=cfg.seed)
        return Split(data, train_x[tr_idx], train_y[tr_idx], train_x[ho_idx], train_y[ho_idx], "holdout")
    return Split(data, train_x, train_y, data.test_x, data.test_y, "test")


# ----------------------------------------------------------------------------- 2. build
def _build(ctx: Context, split: Split) -> Parts:
    """Teacher (checked against the data), student, distiller, optimizer, schedule (DDP wraps it later)."""
    from dskd.methods import create_distiller
    from dskd.models import count_macs, count_params, create_model

    cfg, device, dist_info = ctx.cfg, ctx.device, ctx.dist
    teacher, teacher_meta = None, None
    if cfg.teacher:
        teacher, teacher_meta = load_teacher(cfg.teacher, split.data.class_names, cfg.in_chans)
        if int(teacher_meta["input_size"]) != cfg.input_size:
            raise UserError(f"{cfg.teacher}: teacher input size {teacher_meta['input_size']} != {cfg.input_size}; "
                            "set input_size to match")
    student = create_model(cfg.model, num_classes=split.num_classes, in_chans=cfg.in_chans)
    params, macs = count_params(student), count_macs(student, cfg.input_size, cfg.in_chans)
    distiller = create_distiller(cfg.method, student, teacher, dict(cfg.options))
    distiller.to(device)
    if cfg.channels_last:
        distiller.to(memory_format=torch.channels_last)

    per_rank = len(split.train_x) // dist_info.world_size
    steps_per_epoch = max(1, per_rank // cfg.batch_size) if per_rank >= cfg.batch_size else 1
    optimizer = make_optimizer(list(distiller.trainable_parameters()), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(cfg, steps_per_epoch))
    autocast_for(cfg.precision, device)  # fails early on an impossible precision/device pair
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    log.debug("built %s (%s): %d params, %d steps/epoch, world size %d", cfg.model, cfg.method, params,
              steps_per_epoch, dist_info.world_size)
    return Parts(student, distiller, distiller, optimizer, scheduler, scaler, steps_per_epoch, per_rank, params,
                 macs, teacher_meta)


# ----------------------------------------------------------------------------- 3. resume
def _resume(ctx: Context, parts: Parts) -> tuple[int, float]:
    """Load last.pt into `parts` after checking it was written with the same settings;
    returns (epochs done, training seconds so far)."""
    cfg, last = ctx.cfg, ctx.files.last
    state = torch_load(last)
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise UserError(f"{last}: not a training state written by this tool; delete it or drop --resume")
    saved = state["config"]
    for key, value in cfg.to_dict().items():
        before = saved.get(key, setting_default(key) if key in SETTINGS else None)  # added later: its default
        if key not in RESUME_MAY_CHANGE and before != value:
            raise UserError(
                f"{last}: was written with {key}={before!r}, now {getattr(cfg, key)!r}; "
                f"use the same settings to resume, or a new --out"
            )
    missing, unexpected = parts.distiller.load_state_dict(state["distiller"], strict=False)
    missing = [k for k in missing if not k.startswith("teacher.")]
    if missing or unexpected:
        raise UserError(f"{last}: state does not fit this model/method (missing {missing[:3]}, unexpected {unexpected[:3]})")
    parts.optimizer.load_state_dict(state["optimizer"])
    keep_update_kind(parts.optimizer)
    parts.scheduler.load_state_dict(state["scheduler"])
    if parts.scaler is not None and state.get("scaler"):
        parts.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    start_epoch, train_seconds = int(state["epoch"]), float(state["train_seconds"])
    metrics = ctx.files.metrics
    if ctx.dist.is_main and metrics.exists():
        kept = [ln for ln in metrics.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] <= start_epoch]
        atomic.write_text(metrics, "".join(ln + "\n" for ln in kept))
    log.info("resumed %s after epoch %d", last, start_epoch)
    return start_epoch, train_seconds


# ----------------------------------------------------------------------------- 4. epoch
def _run_epoch(ctx: Context, parts: Parts, split: Split, epoch: int, top1: float) -> EpochResult:
    """One pass over this rank's share of the training split, then (on its schedule) evaluation;
    `top1` is the last evaluation, repeated in the metrics line of an epoch that does not evaluate."""
    from dskd.data import augment

    cfg, device, dist_info = ctx.cfg, ctx.device, ctx.dist
    steps, mean, std = parts.steps_per_epoch, split.data.mean, split.data.std
    train_x = split.train_x.to(device) if device.type == "cuda" else split.train_x
    train_y = split.train_y.to(device)
    epoch_t0 = time.perf_counter()
    last_note, note_every = epoch_t0, _progress_every_s()
    # Seeds derive from (seed, epoch): a resumed run replays exactly what an uninterrupted one does.
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    torch.manual_seed(cfg.seed * 7919 + epoch * 31 + dist_info.rank)
    perm = torch.randperm(len(split.train_x), generator=gen)
    perm = perm[dist_info.rank:parts.per_rank * dist_info.world_size:dist_info.world_size]
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 104_729 + epoch * 13 + dist_info.rank)
    parts.distiller.train()
    book = LossBook()  # loss sums stay on the device: the finite check is the one sync per step
    correct, seen = 0, 0
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not _show_progress(dist_info),
               leave=False, dynamic_ncols=True)
    for step in range(steps):
        idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        xb = augment(train_x[idx.to(train_x.device)].to(device, non_blocking=True), mean, std, generator=aug_gen)
        if cfg.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yb = train_y[idx.to(train_y.device)]
        progress = (epoch * steps + step) / (cfg.epochs * steps)
        with autocast_for(cfg.precision, device):
            logits, losses = parts.model(xb, yb, progress)
        loss = book.add(losses)
        bad_terms = book.bad_terms()
        if any_rank(bool(bad_terms), dist_info, device):
            raise NonFiniteLoss(
                f"loss term {', '.join(bad_terms) or '(on another rank)'} became NaN/inf at epoch {epoch + 1}, "
                f"step {step + 1}; {ctx.files.last} keeps the last good epoch. Lower --lr or use --precision fp32"
            )
        _step(parts, loss)
        correct = correct + (logits.detach().argmax(1) == yb).sum()  # a device tensor: no sync
        seen += len(yb)
        if not bar.disable:
            rate = seen * dist_info.world_size / max(1e-9, time.perf_counter() - epoch_t0)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{100 * correct / max(1, seen):.1f}",
                            img_s=f"{rate:.0f}")
            bar.update(1)
        elif dist_info.is_main and time.perf_counter() - last_note >= note_every:
            # No terminal (CI, a log file): a line every note_every seconds inside long epochs.
            last_note = time.perf_counter()
            rate = seen * dist_info.world_size / max(1e-9, last_note - epoch_t0)
            _say(f"[train] epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{steps} "
                 f"loss={float(loss.detach()):.4g} images/s={rate:.0f}")
    bar.close()
    sums = book.totals()
    stats = torch.tensor([int(correct), seen, *sums.values()], dtype=torch.float64, device=device)
    all_reduce_sum(stats, dist_info)
    seconds = time.perf_counter() - epoch_t0
    if dist_info.is_main and (epoch + 1 == cfg.epochs or (epoch + 1) % max(1, cfg.eval_every) == 0):
        top1, _ = evaluate(parts.distiller.student, split.eval_x, split.eval_y, mean, std, device,
                           channels_last=cfg.channels_last)
    record = {
        "epoch": epoch + 1,
        "lr": parts.optimizer.param_groups[0]["lr"],
        "train_acc": 100.0 * float(stats[0] / max(1.0, float(stats[1]))),
        **{f"loss_{k}": float(stats[2 + i]) / (steps * dist_info.world_size) for i, k in enumerate(sums)},
        f"{split.eval_name}_top1": top1,
        "seconds": round(seconds, 3),
        "images_per_s": round(float(stats[1]) / max(1e-9, seconds), 1),
    }
    return EpochResult(record, seconds, top1)


def _step(parts: Parts, loss: torch.Tensor) -> None:
    """Backward and one optimizer + schedule step (through the grad scaler under fp16)."""
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.scaler is not None:
        parts.scaler.scale(loss).backward()
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        loss.backward()
        parts.optimizer.step()
    parts.scheduler.step()


# ----------------------------------------------------------------------------- 5. checkpoint
def _save_checkpoint(ctx: Context, parts: Parts, epochs_done: int, train_seconds: float,
                     record: dict[str, Any]) -> None:
    """last.pt (atomically) then the epoch's metrics line, then the user-facing epoch line."""
    cfg = ctx.cfg
    state = {
        "format": TRAIN_STATE_FORMAT,
        "epoch": epochs_done,
        "train_seconds": train_seconds,
        "config": cfg.to_dict(),
        "distiller": parts.distiller.resume_state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "rng_cpu": torch.get_rng_state(),
    }
    save_torch(ctx.files.last, state)
    atomic.append_line(ctx.files.metrics, json.dumps(record))
    if not _show_progress(ctx.dist):
        _say(f"[train] epoch {epochs_done}/{cfg.epochs} " + " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "epoch"))


# ----------------------------------------------------------------------------- 6. finalize
def _finalize(ctx: Context, parts: Parts, split: Split, top1: float, train_seconds: float) -> dict[str, Any]:
    """model.pt (plain student + metadata) and summary.json; returns the summary."""
    cfg, device, data = ctx.cfg, ctx.device, split.data
    mean, std = data.mean, data.std
    if math.isnan(top1):  # resumed after the last epoch had already finished
        top1, _ = evaluate(parts.distiller.student, split.eval_x, split.eval_y, mean, std, device,
                           channels_last=cfg.channels_last)
    test_top1 = top1
    if split.eval_name != "test":
        test_top1, _ = evaluate(parts.distiller.student, data.test_x, data.test_y, mean, std, device)
    parts.student.to("cpu", memory_format=torch.contiguous_format)
    meta = {
        "model": cfg.model,
        "num_classes": split.num_classes,
        "class_names": list(data.class_names),
        "input_size": cfg.input_size,
        "in_chans": cfg.in_chans,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "method": cfg.method,
        "top1": test_top1,
        "data_fingerprint": data.fingerprint,
        "teacher_sha256": file_sha256(_teacher_file(cfg.teacher)) if cfg.teacher else None,
    }
    save_model(ctx.files.model, parts.student.state_dict(), meta)
    tmeta = parts.teacher_meta
    summary = {
        "model": cfg.model,
        "method": cfg.method,
        "epochs": cfg.epochs,
        "params": parts.params,
        "macs": parts.macs,
        "top1": test_top1,
        f"{split.eval_name}_top1": top1,
        "train_seconds": round(train_seconds, 2),
        "images_seen_per_s": None,
        "precision": cfg.precision,
        "world_size": ctx.dist.world_size,
        "device": str(device),
        "seed": cfg.seed,
        "data": cfg.data,
        "data_fingerprint": data.fingerprint,
        "train_images": len(split.train_x),
        "skipped_images": data.skipped,
        "ignored_files": data.ignored,  # files in the splits that are not images (no/unknown extension)
        "eval_split": split.eval_name,
        "class_names": list(data.class_names),
        "teacher": {"path": cfg.teacher, "model": tmeta["model"], "top1": tmeta.get("top1")} if tmeta else None,
        "options": dict(parts.distiller.options),
        "training_only_params": parts.distiller.count_training_only_params(),
        "config": cfg.to_dict(),
        "model_sha256": file_sha256(ctx.files.model),
    }
    if ctx.files.metrics.exists():
        lines = [json.loads(ln) for ln in ctx.files.metrics.read_text().splitlines() if ln.strip()]
        rates = [r["images_per_s"] for r in lines if r.get("images_per_s")]
        summary["images_seen_per_s"] = round(sum(rates) / len(rates), 1) if rates else None
    atomic.write_json(ctx.files.summary, summary)
    return summary


def _teacher_file(path: str) -> Path:
    p = Path(path)
    return p / "model.pt" if p.is_dir() else p
