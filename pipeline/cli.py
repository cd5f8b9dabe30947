"""`python -m pipeline COMMAND --help`: the command-line face of the pipeline (python-fire).

Exit codes: 0 success, 1 a gate failed, 2 bad usage or input.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from dskd.errors import UserError
from pipeline.argv import normalize_argv


class ExitCode(Exception):
    """Raised by a command to end with a specific exit status after printing its own output."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def train(model: str = "resnet8", data: str = "digits", epochs: int = 20, out: str = "runs/train",
          teacher: str | None = None, method: str = "ce", batch_size: int = 64, lr: float = 0.05,
          seed: int = 0, precision: str = "fp32", resume: bool = False, schedule: str = "cosine",
          weight_decay: float = 5e-4, warmup_epochs: float = 0.0, input_size: int = 32,
          in_chans: int = 3, device: str = "auto", train_subset: float = 1.0, holdout: float = 0.0,
          limit_per_class: int | None = None, eval_every: int = 1, set: list[str] | None = None) -> None:  # noqa: A002
    """Train a model (CE) or distill a student from a teacher (--method kd|dkd|fitnet|lshfm|diffkd|dskd).

    Writes OUT/model.pt, OUT/last.pt (for --resume), OUT/metrics.jsonl and OUT/summary.json.
    Under `torchrun --nproc_per_node N -m pipeline train ...` it runs DDP (gloo on CPU, NCCL on CUDA).

    Args:
        model: zoo name of the model to train (the student when distilling).
        data: digits | an ImageFolder folder | .tar/.tar.gz/.zip of one | a CIFAR python folder.
        epochs: training epochs.
        out: output folder.
        teacher: a teacher model.pt (or its folder) written by `pipeline train`; needed unless --method ce.
        method: ce, kd, dkd, fitnet, lshfm, diffkd or dskd.
        batch_size: images per step (per process under torchrun).
        lr: peak SGD learning rate.
        seed: seed for initialisation, shuffling and augmentation.
        precision: fp32, bf16 (CPU/CUDA autocast) or fp16 (CUDA, with a grad scaler).
        resume: continue from OUT/last.pt.
        schedule: cosine or step (x0.1 at 5/8, 3/4, 7/8 of training).
        weight_decay: SGD weight decay.
        warmup_epochs: linear learning-rate warm-up length.
        input_size: image side in pixels the data is resized to.
        in_chans: image channels (1 or 3).
        device: auto, cpu or cuda.
        train_subset: class-balanced fraction (or count) of the training split to use.
        holdout: fraction of the training split held out for choosing settings (never the test split).
        limit_per_class: decode only this many images per class and split (quick smoke runs).
        eval_every: evaluate every N epochs (the last epoch always).
        set: method options, repeatable: --set dskd.guidance_scale=0.5 --set w_lsh=3.
    """
    from dskd.trainer import TrainConfig
    from dskd.trainer import train as run_training
    from pipeline.overrides import parse_overrides

    options = {}
    for key, value in parse_overrides(set).items():
        head, _, tail = key.partition(".")
        if tail and head != method:
            raise UserError(f"--set {key}: option is for method '{head}' but --method is '{method}'")
        options[tail or head] = value
    cfg = TrainConfig(
        model=model, data=str(data), epochs=int(epochs), batch_size=int(batch_size), lr=float(lr),
        seed=int(seed), precision=str(precision), method=str(method), teacher=str(teacher) if teacher else None,
        schedule=str(schedule), weight_decay=float(weight_decay), warmup_epochs=float(warmup_epochs),
        input_size=int(input_size), in_chans=int(in_chans), device=str(device),
        train_subset=float(train_subset), holdout=float(holdout),
        limit_per_class=int(limit_per_class) if limit_per_class else None, eval_every=int(eval_every),
        options=options,
    )
    summary = run_training(cfg, out, resume=bool(resume))
    if summary:
        from pipeline.console import print_kv

        print_kv(f"trained {summary['model']} ({summary['method']})", {
            "top1 (%)": f"{summary['top1']:.2f}",
            "params": f"{summary['params']:,}",
            "MACs": f"{summary['macs']:,}",
            "train seconds": summary["train_seconds"],
            "images/s": summary.get("images_seen_per_s"),
            "model": os.path.join(out, "model.pt"),
        })


COMMANDS: dict[str, Callable] = {
    "train": train,
}


def main(argv: list[str] | None = None) -> int:
    import fire

    from dskd.trainer import NonFiniteLoss

    os.environ.setdefault("PAGER", "cat")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = normalize_argv(argv, COMMANDS)
        fire.Fire(COMMANDS, command=argv, name="pipeline")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ExitCode as exc:
        return exc.code
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except fire.core.FireExit as exc:
        return int(exc.code or 0)
    except KeyboardInterrupt:
        print("interrupted; finished stages and checkpoints are kept, re-run to resume", file=sys.stderr)
        return 130
    return 0
