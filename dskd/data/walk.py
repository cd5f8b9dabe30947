"""List a dataset folder without leaving it and without opening anything.

Rules (docs/reliability.md, "Hostile data"):
- Symlinked folders are never followed (listed in `linked_dirs` and reported), so a link
  like `train/a/up -> ..` cannot make class `a` collect class `b`'s images, and a link
  loop cannot make the walk run forever.
- A symlinked file counts as the file it points to, under that file's real path, so its
  class is the folder it really lies in (and a link to an image already listed is not a
  second copy). A link that points outside the dataset folder is refused.
- FIFOs, sockets and devices are listed in `special` from `lstat` alone, never opened;
  the decoder refuses them as unreadable (or skips them with skip_bad).
- Hidden entries (`.x`, `__MACOSX`) are not data, as in archives.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from dskd.data.layout import is_hidden
from dskd.errors import UserError


@dataclass
class FolderListing:
    """Relative POSIX paths under the root, with what was left out and why."""

    files: list[str] = field(default_factory=list)  # regular files (links resolved to real paths)
    dirs: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # file -> bytes (from lstat/stat)
    special: list[str] = field(default_factory=list)  # FIFOs, sockets, devices, broken links
    linked_dirs: list[str] = field(default_factory=list)  # symlinked folders, not followed


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def walk_dataset(root: str | os.PathLike) -> FolderListing:
    """Every regular file and folder under `root` (resolved), following no folder links."""
    top = os.path.realpath(root)
    out = FolderListing()
    seen: set[str] = set()
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(top, rel_dir)) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if is_hidden(entry.name):
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                _add_link(out, top, rel, entry.path, seen)
            elif stat.S_ISDIR(st.st_mode):
                out.dirs.append(rel)
                stack.append(rel)
            elif stat.S_ISREG(st.st_mode):
                if rel not in seen:
                    seen.add(rel)
                    out.files.append(rel)
                    out.sizes[rel] = st.st_size
            else:
                out.special.append(rel)
    return out


def _add_link(out: FolderListing, top: str, rel: str, path: str, seen: set[str]) -> None:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        out.special.append(rel)  # broken link: refused as unreadable, like any bad file
        return
    if stat.S_ISDIR(st.st_mode):  # wherever it points: never followed, reported
        out.linked_dirs.append(rel)
        return
    if not _inside(real, top):
        raise UserError(
            f"{path}: symbolic link to {real}, outside the dataset folder {top}; copy the file "
            f"into the dataset (or point data.spec at the folder that holds the real files)"
        )
    if not stat.S_ISREG(st.st_mode):
        out.special.append(rel)
        return
    real_rel = Path(real).relative_to(top).as_posix()
    if any(is_hidden(p) for p in real_rel.split("/")):
        return  # points into hidden data, which is never a dataset image
    if real_rel not in seen:
        seen.add(real_rel)
        out.files.append(real_rel)
        out.sizes[real_rel] = st.st_size
