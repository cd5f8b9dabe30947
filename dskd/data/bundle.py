"""What `load_data` returns: both splits as uint8 tensors plus what a checkpoint must record."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DataBundle:
    """Decoded dataset. Images stay uint8 (4× smaller than float); normalize per batch."""

    train_x: torch.Tensor  # uint8 N×C×H×W
    train_y: torch.Tensor  # int64 N
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: list[str]
    mean: tuple[float, ...]  # per channel, 0..1 scale, from the train split
    std: tuple[float, ...]
    fingerprint: str  # sha256 of the source + conversion settings (the cache key)
    source: str  # "digits" or the absolute path of the folder/archive
    skipped: int = 0  # unreadable images dropped because skip_bad=True
    ignored: int = 0  # files in the splits that are not images (no/unknown extension)
    from_cache: bool = False
    cache_path: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_chans(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def input_size(self) -> int:
        return int(self.train_x.shape[-1])
