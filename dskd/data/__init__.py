"""Datasets as uint8 tensors: load (digits, ImageFolder, archives, CIFAR pickles), cache, augment."""

from dskd.data.archive import safe_extract
from dskd.data.bundle import DataBundle
from dskd.data.loader import load_data
from dskd.data.subsets import class_balanced_subset, holdout_split
from dskd.data.transforms import augment, normalize

__all__ = [
    "DataBundle",
    "augment",
    "class_balanced_subset",
    "holdout_split",
    "load_data",
    "normalize",
    "safe_extract",
]
