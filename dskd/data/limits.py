"""Resource caps for reading datasets: per file, in total, and per decoded image.

A dataset can come from anywhere, and a 2 MB archive can hold a 2 GiB member of zeros, a
657 KB PNG can claim 13000×13000 RGBA pixels. Every byte count is checked against these
caps before it is read (sizes from headers and `stat`) and again while streaming (headers
can lie); every image's pixel count is checked from its header before it is decoded. The
defaults fit a 2-core / 24 GiB machine with room for training; each cap is a recipe key
under [data], named in the error that it causes so the fix is one edit.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from dskd.errors import UserError

MIB = 1 << 20

# Recipe keys, as the user writes them (`[data] max_file_mb = 128`, `--set data.max_file_mb=128`).
FILE_KEY = "data.max_file_mb"
TOTAL_KEY = "data.max_total_mb"
PIXELS_KEY = "data.max_image_mp"


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; readable sizes for error messages."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


@dataclass(frozen=True)
class ByteCaps:
    """Per-file and total byte caps, with the keys that raise them (for the error message).

    Used for dataset archives and folders (keys under [data]) and reusable by other
    archive readers (deploy bundles) with their own key names. None means no cap.
    """

    per_file: int | None = None
    total: int | None = None
    file_key: str = FILE_KEY
    total_key: str = TOTAL_KEY

    def file_error(self, where: str, size: int, *, streamed: bool = False) -> UserError:
        how = "holds more than" if streamed else "is"
        return UserError(
            f"{where}: {how} {human_bytes(size)}, over the per-file cap of "
            f"{human_bytes(self.per_file or 0)} ({self.file_key}); raise {self.file_key} if the file is trusted"
        )

    def total_error(self, where: str, size: int) -> UserError:
        return UserError(
            f"{where}: the data read reaches {human_bytes(size)}, over the total cap of "
            f"{human_bytes(self.total or 0)} ({self.total_key}); raise {self.total_key} "
            f"or use a smaller dataset (data.limit_per_class)"
        )


@dataclass(frozen=True)
class DataLimits:
    """The [data] caps: MiB per image file or archive member, MiB in all, megapixels per image."""

    max_file_mb: float = 64.0
    max_total_mb: float = 4096.0
    max_image_mp: float = 40.0

    def __post_init__(self) -> None:
        for key, value in ((FILE_KEY, self.max_file_mb), (TOTAL_KEY, self.max_total_mb),
                           (PIXELS_KEY, self.max_image_mp)):
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value <= 0:
                raise UserError(f"{key} = {value!r}: must be a positive number")

    @property
    def byte_caps(self) -> ByteCaps:
        return ByteCaps(int(self.max_file_mb * MIB), int(self.max_total_mb * MIB))

    @property
    def max_pixels(self) -> int:
        return int(self.max_image_mp * 1_000_000)

    @classmethod
    def from_any(cls, value: DataLimits | dict[str, Any] | None) -> DataLimits:
        """A DataLimits, a dict of its fields (recipes, JSON) or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"max_file_mb", "max_total_mb", "max_image_mp"})
            if unknown:
                raise UserError(f"data limits: unknown key {unknown[0]!r}; use max_file_mb, "
                                f"max_total_mb or max_image_mp")
            return cls(**value)
        raise UserError(f"data limits: expected a table of max_file_mb/max_total_mb/max_image_mp, got {value!r}")
