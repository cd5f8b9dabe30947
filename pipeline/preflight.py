"""Before training for a remote device: run the doctor, and stop on a FAIL (issue 17).

A user pointing `run` at a Jetson that is off, refuses the key or lacks TensorRT should
learn it in seconds, not after training. So when training is still ahead (the teacher or
distill stage is not cached) and the recipe names a device, the doctor's checks run first
and a FAIL ends the run with exit 2 and the doctor's one-line reason; nothing is trained.

When training is already done (a re-run), the device is not probed here: the deploy stage
meets the same problem, records the target as "not measured" with the reason and the
gates decide, as before. `target.allow_unmeasured = true` also skips the check, since the
user said a missing device is acceptable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.stage import STAGE_FILE, RunContext, StageResult, stage_key
from pipeline.train_stages import DISTILL, TEACHER


def training_ahead(recipe: Any, run_dir: Path, forced: set[str] | list[str]) -> bool:
    """True when `run` would train (teacher or distill not finished with the same key)."""
    if {"teacher", "distill"} & set(forced):
        return True
    ctx = RunContext(run_dir=run_dir, recipe=recipe, log=lambda _msg: None)
    for stage in (TEACHER, DISTILL):
        key = stage_key(stage, ctx)
        folder = run_dir / "stages" / f"{stage.name}-{key[:12]}"
        try:
            done = json.loads((folder / STAGE_FILE).read_text())
        except (OSError, ValueError):
            return True
        if done.get("key") != key or not done.get("complete", True):
            return True
        ctx.results[stage.name] = StageResult(stage.name, key, folder, done.get("outputs", {}), True, 0.0)
    return False


def preflight(recipe: Any, run_dir: Path, forced: set[str] | list[str]) -> None:
    """Run the doctor for a remote device before training; DeviceError (exit 2) on a FAIL."""
    t = recipe.target
    if not t.device or t.allow_unmeasured or not training_ahead(recipe, run_dir, forced):
        return
    from deploy_targets.doctor import require_ready

    require_ready(recipe)
