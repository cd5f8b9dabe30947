"""Training loop shared by every method: the distiller computes named losses, this file does the rest.

Files written into the output folder (rank 0 only, each atomically):
- `last.pt`      resumable state (distiller minus teacher, optimizer, scheduler, epoch, RNG)
- `metrics.jsonl` one line per finished epoch
- `model.pt`     final plain-student weights + metadata (see dskd.checkpoint)
- `summary.json` what a report needs: model, method, epochs, params, macs, top1, train_seconds, ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dskd import atomic
from dskd.checkpoint import build_model, file_sha256, save_model, save_torch, torch_load
from dskd.distributed import DistInfo, all_reduce_sum, any_rank, barrier, init_distributed, shutdown
from dskd.errors import UserError
from dskd.methods.bookkeeping import LossBook

TRAIN_STATE_FORMAT = "dskd-train-state/1"
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "step")
# Settings that do not change the result, so a resumed run may differ in them.
# Without a terminal, a progress line at least this often (seconds) during an epoch;
# $DSKD_PROGRESS_EVERY_S overrides it.
PROGRESS_EVERY_S = 30.0
RESUME_MAY_CHANGE = frozenset({"device", "eval_every", "ddp_timeout_s", "cache_dir", "data_limits"})


@dataclass
class TrainConfig:
    """Everything that determines a training run; recorded in summary.json and last.pt."""

    model: str
    data: str = "digits"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    seed: int = 0
    precision: str = "fp32"
    method: str = "ce"
    teacher: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    input_size: int = 32
    in_chans: int = 3
    train_subset: float = 1.0
    holdout: float = 0.0
    limit_per_class: int | None = None
    device: str = "auto"
    channels_last: bool = True
    eval_every: int = 1
    ddp_timeout_s: float = 300.0
    cache_dir: str | None = None
    skip_bad: bool = False  # drop unreadable images (counted in summary.json) instead of failing
    data_limits: dict[str, float] = field(default_factory=dict)  # dskd.data.limits caps; {} = defaults

    def validate(self) -> None:
        def bad(name: str, why: str) -> UserError:
            return UserError(f"train config field '{name}': {why}")

        if self.epochs < 1:
            raise bad("epochs", f"must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise bad("batch_size", f"must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", f"must be a positive number, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.train_subset <= 1 and not (self.train_subset > 1 and float(self.train_subset).is_integer()):
            raise bad("train_subset", "must be a fraction in (0, 1] or a whole number of images")
        if not 0 <= self.holdout < 1:
            raise bad("holdout", f"must be a fraction in [0, 1), got {self.holdout}")
        if self.method != "ce" and not self.teacher:
            raise bad("teacher", f"method '{self.method}' needs a teacher: pass --teacher DIR_OR_model.pt")

    def to_dict(self) -> dict[str, Any]:
        """Fields added after a release appear only when set, so older run folders still resume."""
        d = dataclasses.asdict(self)
        if not d["skip_bad"]:
            del d["skip_bad"]
        if not d["data_limits"]:
            del d["data_limits"]
        return d


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN/inf: training stops, the last good checkpoint stays."""


def pick_device(name: str, dist_info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("device 'cuda' asked for but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", dist_info.local_rank) if name == "cuda" else torch.device(name)
    if name != "cpu":
        raise UserError(f"device {name!r} not understood; use auto, cpu or cuda")
    return torch.device("cpu")


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision fp16 needs a CUDA GPU; use --precision bf16 or fp32 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_lambda_for(cfg: TrainConfig, steps_per_epoch: int):
    """Per-step multiplier: optional linear warm-up, then cosine, or ×0.1 at 5/8, 3/4, 7/8 of training.

    The step milestones are the standard CIFAR recipe's 150/180/210 of 240 epochs, scaled.
    """
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def fn(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        frac = step / total
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return 0.1 ** sum(frac >= m for m in (5 / 8, 6 / 8, 7 / 8))

    return fn


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


@torch.no_grad()
def evaluate(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, mean, std, device: torch.device,
             batch_size: int = 512, channels_last: bool = False) -> tuple[float, torch.Tensor]:
    """Top-1 (percent) and predictions of `model` in fp32 over uint8 images."""
    from dskd.data import normalize

    was_training = model.training
    model.eval()
    preds = []
    for i in range(0, len(x_u8), batch_size):
        xb = normalize(x_u8[i:i + batch_size].to(device), mean, std)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        preds.append(model(xb).argmax(1).cpu())
    model.train(was_training)
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    top1 = 100.0 * (pred == y.cpu()).float().mean().item() if len(pred) else float("nan")
    return top1, pred


def load_teacher(path: str, class_names: list[str], in_chans: int) -> tuple[nn.Module, dict[str, Any]]:
    """Load a frozen teacher and check it was trained on the same classes as the data."""
    p = Path(path)
    teacher, meta = build_model(p)
    if list(meta["class_names"]) != list(class_names):
        raise UserError(
            f"{p}: teacher classes {list(meta['class_names'])[:5]}... differ from the data's "
            f"{list(class_names)[:5]}...; train the teacher on the same dataset"
        )
    if int(meta["in_chans"]) != in_chans:
        raise UserError(f"{p}: teacher takes {meta['in_chans']} channels, data has {in_chans}; set in_chans to match")
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    return teacher.eval(), meta


def _is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError (CUDA; CPU from torch 2.5), or the CPU allocator's
    plain RuntimeError ("DefaultCPUAllocator: can't allocate memory"), which torch 2.13 still raises."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "can't allocate memory" in str(exc)


def _train_state(distiller: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in distiller.state_dict().items() if not k.startswith("teacher.")}


def train(cfg: TrainConfig, out_dir: str | os.PathLike, resume: bool = False,
          stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Train `cfg.model` with `cfg.method`; returns the summary dict (also written to summary.json).

    `stop_after_epoch` ends the process's work early (as an interruption would), for resume tests.
    """
    from dskd.data import augment, class_balanced_subset, holdout_split, load_data
    from dskd.methods import create_distiller
    from dskd.models import count_macs, count_params, create_model

    cfg.validate()
    out = Path(out_dir)
    device_type = "cuda" if (cfg.device in ("auto", "cuda") and torch.cuda.is_available()) or cfg.device.startswith("cuda") else "cpu"
    dist_info = init_distributed(device_type, cfg.ddp_timeout_s)
    try:
        device = pick_device(cfg.device, dist_info)
        try:
            return _train(cfg, out, resume, stop_after_epoch, dist_info, device,
                          load_data, augment, class_balanced_subset, holdout_split,
                          create_distiller, create_model, count_params, count_macs)
        except (MemoryError, RuntimeError) as exc:
            # Out of memory is a size the user chose, not a bug: one line with what to lower.
            # Data loading reports its own step; this is the model/optimizer/training step.
            if not _is_out_of_memory(exc):
                raise
            raise UserError(
                f"{out}: out of memory while training {cfg.model} ({cfg.method}); lower batch_size "
                f"(now {cfg.batch_size}) or input_size (now {cfg.input_size}), or free memory"
            ) from exc
    finally:
        shutdown(dist_info)


def _train(cfg, out, resume, stop_after_epoch, dist_info, device, load_data, augment,
           class_balanced_subset, holdout_split, create_distiller, create_model, count_params, count_macs):
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    last_path, model_path = out / "last.pt", out / "model.pt"
    summary_path, metrics_path = out / "summary.json", out / "metrics.jsonl"

    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, input_size=cfg.input_size, in_chans=cfg.in_chans, cache_dir=cfg.cache_dir,
                     limit_per_class=cfg.limit_per_class, skip_bad=cfg.skip_bad, progress=dist_info.is_main,
                     limits=cfg.data_limits or None)
    train_x, train_y = data.train_x, data.train_y
    if cfg.train_subset != 1.0:
        idx = class_balanced_subset(train_y, cfg.train_subset, seed=cfg.seed)
        train_x, train_y = train_x[idx], train_y[idx]
    eval_x, eval_y, eval_name = data.test_x, data.test_y, "test"
    if cfg.holdout > 0:
        tr_idx, ho_idx = holdout_split(train_y, cfg.holdout, seed=cfg.seed)
        eval_x, eval_y, eval_name = train_x[ho_idx], train_y[ho_idx], "holdout"
        train_x, train_y = train_x[tr_idx], train_y[tr_idx]
    num_classes = len(data.class_names)

    teacher, teacher_meta = None, None
    if cfg.teacher:
        teacher, teacher_meta = load_teacher(cfg.teacher, data.class_names, cfg.in_chans)
        if int(teacher_meta["input_size"]) != cfg.input_size:
            raise UserError(f"{cfg.teacher}: teacher input size {teacher_meta['input_size']} != {cfg.input_size}; set input_size to match")

    student = create_model(cfg.model, num_classes=num_classes, in_chans=cfg.in_chans)
    params, macs = count_params(student), count_macs(student, cfg.input_size, cfg.in_chans)
    distiller = create_distiller(cfg.method, student, teacher, dict(cfg.options))
    distiller.to(device)
    if cfg.channels_last:
        distiller.to(memory_format=torch.channels_last)

    per_rank = len(train_x) // dist_info.world_size
    steps_per_epoch = max(1, per_rank // cfg.batch_size) if per_rank >= cfg.batch_size else 1
    optimizer = torch.optim.SGD(list(distiller.trainable_parameters()), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(cfg, steps_per_epoch))
    autocast_for(cfg.precision, device)  # fails early on an impossible precision/device pair
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

    start_epoch, train_seconds = 0, 0.0
    if resume and last_path.exists():
        state = torch_load(last_path)
        if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
            raise UserError(f"{last_path}: not a training state written by this tool; delete it or drop --resume")
        saved = state["config"]
        for key, value in cfg.to_dict().items():
            if key not in RESUME_MAY_CHANGE and saved.get(key) != value:
                raise UserError(
                    f"{last_path}: was written with {key}={saved.get(key)!r}, now {getattr(cfg, key)!r}; "
                    f"use the same settings to resume, or a new --out"
                )
        missing, unexpected = distiller.load_state_dict(state["distiller"], strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise UserError(f"{last_path}: state does not fit this model/method (missing {missing[:3]}, unexpected {unexpected[:3]})")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        start_epoch, train_seconds = int(state["epoch"]), float(state["train_seconds"])
        if dist_info.is_main and metrics_path.exists():
            kept = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] <= start_epoch]
            atomic.write_text(metrics_path, "".join(ln + "\n" for ln in kept))
    elif dist_info.is_main:
        for p in (metrics_path, summary_path, model_path):
            p.unlink(missing_ok=True)

    ddp_model: nn.Module = distiller
    if dist_info.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            distiller, device_ids=[device.index] if device.type == "cuda" else None)

    mean, std = data.mean, data.std
    train_x_dev = train_x.to(device) if device.type == "cuda" else train_x
    train_y_dev = train_y.to(device)
    top1 = float("nan")
    bar = None
    last_note, note_every = time.perf_counter(), _progress_every_s()
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
        epoch_t0 = time.perf_counter()
        # Seeds derive from (seed, epoch): a resumed run replays exactly what an uninterrupted one does.
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        torch.manual_seed(cfg.seed * 7919 + epoch * 31 + dist_info.rank)
        perm = torch.randperm(len(train_x), generator=gen)
        perm = perm[dist_info.rank:per_rank * dist_info.world_size:dist_info.world_size]
        aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 104_729 + epoch * 13 + dist_info.rank)
        distiller.train()
        book = LossBook()  # loss sums stay on the device: the finite check is the one sync per step
        correct, seen = 0, 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not _show_progress(dist_info),
                   leave=False, dynamic_ncols=True)
        for step in range(steps_per_epoch):
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            xb = augment(train_x_dev[idx.to(train_x_dev.device)].to(device, non_blocking=True), mean, std, generator=aug_gen)
            if cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = train_y_dev[idx.to(train_y_dev.device)]
            progress = (epoch * steps_per_epoch + step) / (cfg.epochs * steps_per_epoch)
            with autocast_for(cfg.precision, device):
                logits, losses = ddp_model(xb, yb, progress)
            loss = book.add(losses)
            bad_terms = book.bad_terms()
            if any_rank(bool(bad_terms), dist_info, device):
                raise NonFiniteLoss(
                    f"loss term {', '.join(bad_terms) or '(on another rank)'} became NaN/inf at epoch {epoch + 1}, "
                    f"step {step + 1}; {last_path} keeps the last good epoch. Lower --lr or use --precision fp32"
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            correct = correct + (logits.detach().argmax(1) == yb).sum()  # a device tensor: no sync
            seen += len(yb)
            if bar is not None and not bar.disable:
                rate = seen * dist_info.world_size / max(1e-9, time.perf_counter() - epoch_t0)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{100 * correct / max(1, seen):.1f}",
                                img_s=f"{rate:.0f}")
                bar.update(1)
            elif dist_info.is_main and time.perf_counter() - last_note >= note_every:
                # No terminal (CI, a log file): a line every note_every seconds inside long epochs.
                last_note = time.perf_counter()
                rate = seen * dist_info.world_size / max(1e-9, last_note - epoch_t0)
                print(f"[train] epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{steps_per_epoch} "
                      f"loss={float(loss.detach()):.4g} images/s={rate:.0f}", file=sys.stderr, flush=True)
        bar.close()
        sums, correct = book.totals(), int(correct)
        stats = torch.tensor([correct, seen, *sums.values()], dtype=torch.float64, device=device)
        all_reduce_sum(stats, dist_info)
        epoch_seconds = time.perf_counter() - epoch_t0
        train_seconds += epoch_seconds
        last_epoch = epoch + 1 == cfg.epochs
        if dist_info.is_main and (last_epoch or (epoch + 1) % max(1, cfg.eval_every) == 0):
            top1, _ = evaluate(distiller.student, eval_x, eval_y, mean, std, device, channels_last=cfg.channels_last)
        record = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_acc": 100.0 * float(stats[0] / max(1.0, float(stats[1]))),
            **{f"loss_{k}": float(stats[2 + i]) / (steps_per_epoch * dist_info.world_size) for i, k in enumerate(sums)},
            f"{eval_name}_top1": top1,
            "seconds": round(epoch_seconds, 3),
            "images_per_s": round(float(stats[1]) / max(1e-9, epoch_seconds), 1),
        }
        if dist_info.is_main:
            state = {
                "format": TRAIN_STATE_FORMAT,
                "epoch": epoch + 1,
                "train_seconds": train_seconds,
                "config": cfg.to_dict(),
                "distiller": _train_state(distiller),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng_cpu": torch.get_rng_state(),
            }
            save_torch(last_path, state)
            atomic.append_line(metrics_path, json.dumps(record))
            if not _show_progress(dist_info):
                print(f"[train] epoch {epoch + 1}/{cfg.epochs} " + " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "epoch"),
                    file=sys.stderr, flush=True)
        barrier(dist_info)

    finished = stop_after_epoch is None or stop_after_epoch >= cfg.epochs
    if not finished:
        return {"stopped_after_epoch": min(stop_after_epoch, cfg.epochs)}
    if not dist_info.is_main:
        return {}
    if math.isnan(top1):  # resumed after the last epoch had already finished
        top1, _ = evaluate(distiller.student, eval_x, eval_y, mean, std, device, channels_last=cfg.channels_last)
    test_top1 = top1
    if eval_name != "test":
        test_top1, _ = evaluate(distiller.student, data.test_x, data.test_y, mean, std, device)
    student.to("cpu", memory_format=torch.contiguous_format)
    meta = {
        "model": cfg.model,
        "num_classes": num_classes,
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
    save_model(model_path, student.state_dict(), meta)
    summary = {
        "model": cfg.model,
        "method": cfg.method,
        "epochs": cfg.epochs,
        "params": params,
        "macs": macs,
        "top1": test_top1,
        f"{eval_name}_top1": top1,
        "train_seconds": round(train_seconds, 2),
        "images_seen_per_s": None,
        "precision": cfg.precision,
        "world_size": dist_info.world_size,
        "device": str(device),
        "seed": cfg.seed,
        "data": cfg.data,
        "data_fingerprint": data.fingerprint,
        "train_images": len(train_x),
        "skipped_images": data.skipped,
        "ignored_files": data.ignored,  # files in the splits that are not images (no/unknown extension)
        "eval_split": eval_name,
        "class_names": list(data.class_names),
        "teacher": {"path": cfg.teacher, "model": teacher_meta["model"], "top1": teacher_meta.get("top1")} if teacher_meta else None,
        "options": _resolved_options(distiller, cfg),
        "training_only_params": int(sum(p.numel() for n, p in distiller.named_parameters()
                                        if not n.startswith(("student.", "teacher.")))),
        "config": cfg.to_dict(),
        "model_sha256": file_sha256(model_path),
    }
    if metrics_path.exists():
        lines = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
        rates = [r["images_per_s"] for r in lines if r.get("images_per_s")]
        summary["images_seen_per_s"] = round(sum(rates) / len(rates), 1) if rates else None
    atomic.write_json(summary_path, summary)
    return summary


def _teacher_file(path: str) -> Path:
    p = Path(path)
    return p / "model.pt" if p.is_dir() else p


def _resolved_options(distiller: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    opts = getattr(distiller, "options", None)
    if isinstance(opts, dict):
        return {k: v for k, v in opts.items()}
    return dict(cfg.options)

