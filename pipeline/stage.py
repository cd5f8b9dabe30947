"""Stage framework: each stage is keyed by its config and its inputs' keys, and works in its own folder.

A stage folder is `RUN/stages/<name>-<key12>/`. `stage.json` is written last, atomically: its
presence with the same key means "finished", so a re-run skips it; a folder without it is an
interrupted attempt that the next run continues in (the trainer resumes from `last.pt`).

Two exceptions keep a cached re-run from reporting an old verdict:
- a stage with `cache=False` always runs (the report: it writes the run folder's `report.*`,
  `gates.junit.xml` and bundle, which belong to the invocation, not to a key);
- a stage whose `complete(outputs)` says False (deploy with an artifact left unmeasured) is
  recorded but re-run next time, so a device that came back is measured rather than
  remembered as unreachable; and since a stage's key holds its inputs' outputs (`stage_key`),
  everything downstream of a stage that ran again runs again too.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dskd import atomic

STAGE_FILE = "stage.json"


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class StageResult:
    name: str
    key: str
    folder: Path
    outputs: dict[str, Any]
    cached: bool
    seconds: float


@dataclass
class Stage:
    """One step of the product: `config(ctx)` says what it depends on, `run(ctx, folder)` does it."""

    name: str
    deps: tuple[str, ...]
    config: Callable[[RunContext], dict[str, Any]]
    run: Callable[[RunContext, Path], dict[str, Any]]
    description: str = ""
    cache: bool = True
    complete: Callable[[dict[str, Any]], bool] | None = None


@dataclass
class RunContext:
    run_dir: Path
    recipe: Any
    options: dict[str, Any] = field(default_factory=dict)
    results: dict[str, StageResult] = field(default_factory=dict)
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)

    def out(self, stage: str) -> dict[str, Any]:
        return self.results[stage].outputs

    def folder(self, stage: str) -> Path:
        return self.results[stage].folder


def stage_key(stage: Stage, ctx: RunContext) -> str:
    """A stage's identity: its config, and each input stage's key AND outputs.

    The outputs matter because a stage can run again under the same key (a deploy left incomplete,
    a forced or interrupted re-run): whatever reads its outputs must then run again too, or a
    cached gate would judge the old measurements (a device that came back) and a cached export
    would ship the old model. Outputs are hashed as stage.json stores them (`_as_stored`), so a
    fresh run and a cached one give the same key.
    """
    upstream = {d: [ctx.results[d].key, stable_hash(ctx.results[d].outputs)] for d in stage.deps}
    return stable_hash({"stage": stage.name, "config": stage.config(ctx), "inputs": upstream})


def _as_stored(outputs: dict[str, Any]) -> dict[str, Any]:
    """`outputs` as stage.json holds them (atomic.write_json's encoding), what a cached run reads back."""
    return json.loads(json.dumps(outputs, default=str))


def run_stage(stage: Stage, ctx: RunContext, force: bool = False) -> StageResult:
    key = stage_key(stage, ctx)
    folder = ctx.run_dir / "stages" / f"{stage.name}-{key[:12]}"
    marker = folder / STAGE_FILE
    if marker.exists() and not force and stage.cache:
        try:
            done = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            done = {}
        if done.get("key") == key and done.get("complete", True):
            ctx.log(f"[{stage.name}] cached ({folder.relative_to(ctx.run_dir)})")
            res = StageResult(stage.name, key, folder, done.get("outputs", {}), True, 0.0)
            ctx.results[stage.name] = res
            return res
    folder.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    ctx.log(f"[{stage.name}] running{': ' + stage.description if stage.description else ''}")
    t0 = time.perf_counter()
    outputs = _as_stored(stage.run(ctx, folder))
    seconds = time.perf_counter() - t0
    complete = stage.complete(outputs) if stage.complete else True
    atomic.write_json(marker, {"name": stage.name, "key": key, "config": stage.config(ctx),
                               "inputs": {d: ctx.results[d].key for d in stage.deps},
                               "outputs": outputs, "complete": complete, "seconds": round(seconds, 3),
                               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    ctx.log(f"[{stage.name}] done in {seconds:.1f} s")
    res = StageResult(stage.name, key, folder, outputs, False, seconds)
    ctx.results[stage.name] = res
    return res
