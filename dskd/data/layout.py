"""Find the ImageFolder layout (train/<class>/<image>, test/ or val/) in a list of relative paths.

Folders and archives both reduce to "these files and folders exist", so one planner checks
the layout for both and gives the same one-line errors. Labels follow sorted class names;
images within a class follow sorted paths, so the order never depends on the file system.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dskd.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
              ".ppm", ".pgm", ".pbm", ".pnm")
SPLITS = ("train", "test")


def is_hidden(part: str) -> bool:
    """Hidden files, macOS resource forks and __MACOSX folders are never data."""
    return part.startswith(".") or part == "__MACOSX"


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


@dataclass
class Layout:
    """Which relative image paths make up each split, with their labels."""

    class_names: list[str]
    files: dict[str, list[str]]  # split -> relative paths, grouped by label
    labels: dict[str, list[int]]  # split -> label of each path
    dirs: dict[str, str]  # split -> relative folder ("train", "data/val", ...)
    ignored: list[str] = field(default_factory=list)  # files in the splits that are not images


def _parents(path: str) -> Iterable[str]:
    parent = posixpath.dirname(path)
    while parent:
        yield parent
        parent = posixpath.dirname(parent)


def plan_layout(files: Iterable[str], dirs: Iterable[str], where: Callable[[str], str],
                limit_per_class: int | None = None) -> Layout:
    """Check the layout and choose the images; `where(rel)` names a path in error messages.

    Accepts `train/` + `test/` (or `val/`) at the top, or inside a single top-level folder.
    """
    files = [f for f in files if not any(is_hidden(p) for p in f.split("/"))]
    all_dirs = {d for d in dirs if d and not any(is_hidden(p) for p in d.split("/"))}
    for f in files:
        all_dirs.update(_parents(f))

    top = sorted(d for d in all_dirs if "/" not in d)
    if "train" in top:
        root = ""
    elif len(top) == 1 and f"{top[0]}/train" in all_dirs:
        root = top[0] + "/"
    else:
        raise UserError(
            f"{where('train/')}: missing train/ folder; expected train/<class>/<image> and "
            f"test/<class>/<image> (ImageFolder layout), at the top or in one top-level folder"
        )
    test_name = next((n for n in ("test", "val") if f"{root}{n}" in all_dirs), None)
    if test_name is None:
        raise UserError(
            f"{where(root + 'test/')}: missing test/ (or val/) folder beside train/; "
            f"add test/<class>/<image> for evaluation"
        )
    split_dirs = {"train": f"{root}train", "test": f"{root}{test_name}"}

    by_class: dict[str, dict[str, list[str]]] = {}
    ignored: list[str] = []
    for split, folder in split_dirs.items():
        prefix = folder + "/"
        classes: dict[str, list[str]] = {
            d[len(prefix):]: [] for d in all_dirs if d.startswith(prefix) and "/" not in d[len(prefix):]
        }
        if not classes:
            raise UserError(
                f"{where(prefix)}: empty split, no class folders; put images in {prefix}<class>/<image>"
            )
        for f in files:
            if not f.startswith(prefix):
                continue
            cls, sep, _ = f[len(prefix):].partition("/")
            if sep and is_image_name(f):
                classes[cls].append(f)
            else:  # no/unknown extension, or not inside a class folder: said, not silently dropped
                ignored.append(f)
        for cls in sorted(classes):
            if not classes[cls]:
                raise UserError(
                    f"{where(prefix + cls + '/')}: class folder has no images "
                    f"({', '.join(IMAGE_EXTS[:5])}, ...); add images or delete the folder"
                )
        by_class[split] = classes

    train_set, test_set = set(by_class["train"]), set(by_class["test"])
    if train_set != test_set:
        missing = ", ".join(sorted(train_set - test_set)) or "none"
        extra = ", ".join(sorted(test_set - train_set)) or "none"
        raise UserError(
            f"{where(split_dirs['test'] + '/')}: test classes differ from train classes "
            f"(missing in {test_name}/: {missing}; extra in {test_name}/: {extra}); "
            f"give {test_name}/ the same class folders as train/"
        )

    class_names = sorted(train_set)
    layout = Layout(class_names, {}, {}, split_dirs, sorted(ignored))
    for split in SPLITS:
        paths: list[str] = []
        labels: list[int] = []
        for label, cls in enumerate(class_names):
            chosen = sorted(by_class[split][cls])[:limit_per_class]
            paths += chosen
            labels += [label] * len(chosen)
        layout.files[split], layout.labels[split] = paths, labels
    return layout
