"""Bad data through `pipeline run`: one line naming the file or the mismatch, exit 2, nothing trained.

Loader-level cases (archives, cache, the counted `skip_bad=True` skip) are in tests/test_data.py:
test_corrupt_image_fails_then_skip_bad, test_zero_byte_image_in_archive,
test_skip_bad_that_empties_a_class_is_an_error, test_bad_layouts. Export with calibration data of
other classes or channels: tests/test_export.py::test_calibration_data_with_other_classes_or_channels.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dskd.checkpoint import save_model
from dskd.models import create_model
from tests.helpers.cli import run_main, set_args
from tests.helpers.data import image_folder
from tests.helpers.runs import SMALL


def run_on(data: Path | str, tmp_path: Path, capsys: pytest.CaptureFixture[str], **overrides: object):
    out = tmp_path / "run"
    code, _, err = run_main(["run", "--data", str(data), "--out", str(out),
                             *set_args({**SMALL, "data.cache_dir": str(tmp_path / "cache"), **overrides})], capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0], out


def assert_nothing_trained(out: Path) -> None:
    assert not list((out / "stages").glob("*/last.pt")), "training started on bad data"
    assert not (out / "report.json").exists()


@pytest.mark.parametrize("damage", ["truncated", "zero-byte", "not an image"])
def test_unreadable_image_is_named(damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = image_folder(tmp_path / "data")
    bad = root / "train" / "b" / "1.png"
    bad.write_bytes({"truncated": bad.read_bytes()[:30], "zero-byte": b"", "not an image": b"hello"}[damage])
    msg, out = run_on(root, tmp_path, capsys)
    assert f"{bad}: unreadable image" in msg
    assert_nothing_trained(out)


def test_empty_class_folder_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = image_folder(tmp_path / "data")
    for p in (root / "test" / "b").iterdir():
        p.unlink()
    msg, out = run_on(root, tmp_path, capsys)
    assert f"{root}/test/b/: class folder has no images" in msg
    assert_nothing_trained(out)


def _teacher(path: Path, class_names: list[str], in_chans: int) -> Path:
    model = create_model("resnet8", len(class_names), in_chans=in_chans)
    save_model(path, model.state_dict(), {"model": "resnet8", "num_classes": len(class_names),
                                          "class_names": class_names, "input_size": 16, "in_chans": in_chans,
                                          "mean": [0.5] * in_chans, "std": [0.25] * in_chans, "method": "ce",
                                          "top1": None})
    return path


@pytest.mark.slow
def test_teacher_trained_on_other_classes_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    teacher = _teacher(tmp_path / "teacher.pt", [f"c{i}" for i in range(10)], in_chans=1)
    msg, out = run_on("digits", tmp_path, capsys, **{"teacher.checkpoint": str(teacher)})
    assert f"{out}/stages/teacher-" in msg and "teacher classes ['c0', 'c1'" in msg and "differ from the data's" in msg
    assert_nothing_trained(out)


def test_grayscale_data_for_an_rgb_teacher_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    teacher = _teacher(tmp_path / "rgb.pt", [str(i) for i in range(10)], in_chans=3)
    msg, out = run_on("digits", tmp_path, capsys, **{"teacher.checkpoint": str(teacher)})
    assert "teacher takes 3 channels, data has 1; set in_chans to match" in msg
    assert_nothing_trained(out)


@pytest.mark.slow
def test_skip_bad_is_reachable_from_the_cli_and_the_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """The error's advice works as written: `pipeline train --skip_bad` and `[data] skip_bad = true`."""
    import json

    root = image_folder(tmp_path / "data", per_class=4)
    bad = root / "train" / "a" / "2.png"
    bad.write_bytes(b"not a png")
    base = ["train", "--model", "resnet8", "--data", str(root), "--epochs", "1", "--input_size", "16",
            "--in_chans", "1", "--batch_size", "4"]
    code, _, err = run_main([*base, "--out", str(tmp_path / "t1")], capsys)
    assert code == 2 and f"{bad}: unreadable image" in err and "--skip_bad" in err, err
    assert not (tmp_path / "t1" / "model.pt").exists()
    code, _, err = run_main([*base, "--out", str(tmp_path / "t2"), "--skip_bad"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "t2" / "summary.json").read_text())
    assert summary["skipped_images"] == 1 and summary["train_images"] == 7
    assert summary["config"]["skip_bad"] is True

    out = tmp_path / "run"
    code, _, err = run_main(["run", "--data", str(root), "--out", str(out),
                             *set_args({**SMALL, "data.cache_dir": str(tmp_path / "cache"), "data.skip_bad": True})],
                            capsys)
    assert code in (0, 1) and "unreadable image" not in err, err  # 1: a tiny model may fail an accuracy gate
    teacher = json.loads(next((out / "stages").glob("teacher-*/summary.json")).read_text())
    assert teacher["skipped_images"] == 1
