"""The pieces a training run is assembled from: device and precision, learning-rate schedule,
optimizer, teacher loading and evaluation (dskd.trainer runs the loop; benches reuse these)."""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dskd.checkpoint import build_model
from dskd.distributed import DistInfo
from dskd.errors import UserError
from dskd.train_settings import TrainConfig

log = logging.getLogger(__name__)


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


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with a fused update where torch has one for the device (one kernel for all parameters),
    else the multi-tensor (foreach) one, instead of a Python loop over each parameter: the same
    update (tests/test_trainer.py::test_sgd_update_equals_the_per_parameter_loop). Measured once here
    (resnet8, 1 CPU thread, torch 2.13): loop 2.70 ms, foreach 1.78 ms, fused 0.51 ms per step."""
    kwargs = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "nesterov": False}
    try:
        return torch.optim.SGD(params, fused=True, **kwargs)
    except (RuntimeError, ValueError) as exc:  # no fused kernel for this device or dtype
        log.debug("fused SGD unavailable (%s); using foreach", exc)
        return torch.optim.SGD(params, foreach=True, **kwargs)


def keep_update_kind(optimizer: torch.optim.Optimizer) -> None:
    """A loaded optimizer state brings the saving run's foreach/fused flags; keep this run's (same math)."""
    for group in optimizer.param_groups:
        for key in ("foreach", "fused"):
            group[key] = optimizer.defaults.get(key)


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


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError (CUDA; CPU from torch 2.5), or the CPU allocator's
    plain RuntimeError ("DefaultCPUAllocator: can't allocate memory"), which torch 2.13 still raises."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "can't allocate memory" in str(exc)
