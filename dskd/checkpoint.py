"""The `model.pt` format shared by training, distillation and export.

A checkpoint is a plain dict of tensors and primitives so that it loads with
`torch.load(weights_only=True)`: nothing in it can execute code on load.

    {"format": "dskd-model/1",
     "state_dict": {name: tensor},            # exactly the plain student's keys
     "meta": {"model": str, "num_classes": int, "class_names": [str],
              "input_size": int, "in_chans": int, "mean": [float], "std": [float],
              "method": str, "top1": float | None, ...}}
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from dskd.atomic import atomic_write
from dskd.errors import UserError
from dskd.hashing import file_sha256  # noqa: F401  (re-exported: callers import it from here)

FORMAT = "dskd-model/1"
REQUIRED_META = ("model", "num_classes", "class_names", "input_size", "in_chans", "mean", "std")


def save_model(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"checkpoint meta lacks {missing}")
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_torch(path, {"format": FORMAT, "state_dict": sd, "meta": dict(meta)})


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """`torch.save` into memory, then one atomic write of the bytes.

    Saving straight to disk turns a full disk into an opaque "unexpected pos" RuntimeError;
    writing the bytes ourselves gives the real OSError (ENOSPC, EFBIG), reported here as one
    line, and the rename never happens, so the previous file at `path` stays intact.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    try:
        atomic_write(path, lambda fh: fh.write(buf.getbuffer()))
    except OSError as exc:
        raise UserError(
            f"{path}: cannot write the checkpoint ({exc.strerror or exc}); free space on that disk "
            f"and re-run (any previous {Path(path).name} is unchanged)"
        ) from None


def torch_load(path: str | os.PathLike) -> Any:
    """`torch.load` with weights_only=True and one-line errors for each way it can fail."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file; pass the model.pt written by `python -m pipeline train`")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; pass the model.pt inside it (or the folder to a command that accepts one)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = _unpickling_reason(str(exc))
        raise UserError(
            f"{path}: refused to load: it holds objects beyond tensors and plain data "
            f"(possible code payload; {first[:160]}). Re-save it as a plain state_dict checkpoint"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first[:160]})") from None


def _unpickling_reason(text: str) -> str:
    """The line of torch's refusal that names what was refused (its preamble suggests unsafe loading)."""
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    line = match.group(1) if match else (text.strip().splitlines() or ["UnpicklingError"])[0]
    return re.sub(r"\x1b\[[0-9;]*m", "", line).split(" was not an allowed")[0].strip()


def load_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict, meta) of a `model.pt`; accepts its folder too."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    obj = torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"{path}: not a {FORMAT} checkpoint; pass a model.pt written by `python -m pipeline train`")
    meta = obj.get("meta") or {}
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise UserError(f"{path}: checkpoint metadata lacks {', '.join(missing)}; re-train or re-save it")
    state_dict = obj.get("state_dict")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path}: bad checkpoint: 'state_dict' is not a mapping of tensors; re-train or re-save it")
    check_finite(path, state_dict)
    return state_dict, meta


def check_finite(path: str | os.PathLike, state_dict: dict[str, torch.Tensor]) -> None:
    """A checkpoint with NaN/inf weights is a bad file, said so at load time: loaded as a
    teacher it would otherwise surface later as a NaN loss with the wrong advice ("lower --lr")."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() or tensor.is_complex():
            if not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise UserError(f"{path}: bad checkpoint: '{name}' holds {bad} NaN or infinite value(s); "
                                "it cannot be used: re-train it or pass another model.pt")


def build_model(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the zoo model described by a `model.pt` and load its weights (strict)."""
    from dskd.models import create_model, list_models

    sd, meta = load_model_file(path)
    if meta["model"] not in list_models():
        raise UserError(f"{path}: model '{meta['model']}' is not in the zoo ({', '.join(list_models())})")
    model = create_model(meta["model"], num_classes=int(meta["num_classes"]), in_chans=int(meta["in_chans"]))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit a plain {meta['model']} ({str(exc).splitlines()[0][:160]})") from None
    model.eval()
    return model, meta
