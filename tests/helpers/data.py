"""Small real data sets and a briefly trained checkpoint for tests.

The checkpoint is a zoo model trained for a few epochs on scikit-learn's digits (16×16, ~90%+
test top-1), so INT8 accuracy and top-1 agreement measured on it mean something.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from dskd.checkpoint import save_model
from dskd.data import load_data, normalize
from dskd.models import create_model

DIGITS_SIZE = 16


def digits(tmp: Path, in_chans: int = 3):
    """scikit-learn's digits at DIGITS_SIZE, cached under `tmp`."""
    return load_data("digits", input_size=DIGITS_SIZE, in_chans=in_chans, cache_dir=tmp / "cache",
                     progress=False)


def meta_for(bundle, model_name: str, method: str = "ce", top1: float | None = None) -> dict:
    """The checkpoint meta a trainer would write for a model trained on `bundle`."""
    return {"model": model_name, "num_classes": 10, "class_names": list(bundle.class_names),
            "input_size": DIGITS_SIZE, "in_chans": int(bundle.train_x.shape[1]),
            "mean": list(bundle.mean), "std": list(bundle.std), "method": method, "top1": top1}


def train_checkpoint(path: Path, bundle, model_name: str = "resnet8", epochs: int = 3,
                     seed: int = 0, method: str = "ce") -> Path:
    """A few CE epochs: enough for ~90%+ on digits, seconds on one thread."""
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=10, in_chans=int(bundle.train_x.shape[1]))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(bundle.train_x), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(
                model(normalize(bundle.train_x[idx], bundle.mean, bundle.std)), bundle.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(normalize(bundle.test_x, bundle.mean, bundle.std))
    top1 = float((logits.argmax(1) == bundle.test_y).float().mean() * 100)
    save_model(path, model.state_dict(), meta_for(bundle, model_name, method, top1))
    return path


def image_folder(root: Path, classes: tuple[str, ...] = ("a", "b"), per_class: int = 3) -> Path:
    """An ImageFolder dataset (train/ and test/, one folder per class) of tiny grey PNGs."""
    for split in ("train", "test"):
        for i, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for j in range(per_class):
                Image.new("L", (8, 8), 40 * i + j).save(root / split / cls / f"{j}.png")
    return root
