"""Distillation benchmark on CIFAR-10: DSKD against fairly tuned baselines, two teacher–student pairs.

    python bench/distill_cifar10.py --stage teacher                 # the resnet20 teacher (shared)
    python bench/distill_cifar10.py --stage tune                    # every method's configurations, holdout
    python bench/distill_cifar10.py --stage cells                   # 3 seeds of each pick + reference rows
    python bench/distill_cifar10.py --budget cross --stage pair     # MACs and s/step of candidate students
    python bench/distill_cifar10.py --budget cross --stage cells    # cross-family pair, same picks
    python bench/distill_cifar10.py --stage render                  # re-render docs/benchmarks.md only
    python bench/distill_cifar10.py --budget smoke --data digits    # tiny run to check the script

Why it looks like this:
- One teacher, then every (variant, seed) cell trains a student with the same budget
  (subset, epochs, batch, lr, augmentation, precision). A cell's result is written to the
  results JSON the moment it finishes and skipped on the next invocation (only while its options
  are unchanged), so the tables can be completed over several sittings (`--max-minutes` stops
  starting new cells; `--shard K/N` splits the pending work between processes).
- Seed n draws the class-balanced subset with seed n too, so every method sees the same
  images at the same seed: differences between methods are paired per seed.
- Fair tuning: every method gets the same number of configurations (GRID), trained on 80 % of
  the seed-0 subset and scored on the other 20 %; the pick rule (PICK_RULE) never sees the test
  split, and tuning records keep only the holdout accuracy.
- The cross-family budget reuses the same-family teacher and picks, so both pairs are judged with
  one tuning budget; every stage records its command and the load average in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dskd import atomic  # noqa: E402
from dskd.errors import UserError  # noqa: E402

SECTION = "## Distillation on CIFAR-10"
NOTES_START, NOTES_END = "<!-- distill-cifar10 notes:start -->", "<!-- distill-cifar10 notes:end -->"
DEFAULT_DATA = "../shared/data/cifar10-jpg.tar.gz"
# Where cells train: "cpu" for every committed table; `--device cuda` (a lent GPU) writes its own
# results file (`..._cuda.json`) and never the docs, so GPU and CPU numbers are never mixed.
DEVICE = "cpu"


@dataclass(frozen=True)
class Budget:
    """Everything that must be equal across the cells of one table."""

    teacher_model: str = "resnet20"
    teacher_subset: int = 20000
    teacher_epochs: int = 10
    student: str = "resnet8"
    subset: int = 5000
    epochs: int = 10
    batch: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    precision: str = "bf16"
    seeds: tuple[int, ...] = (0, 1, 2)
    holdout: float = 0.2
    augmentation: str = "random crop 32 (pad 4) + horizontal flip"
    teacher_precision: str | None = None  # None: the students' precision
    student_lr: float | None = None  # None: `lr`, the teacher's, for the students too

    @property
    def students_lr(self) -> float:
        return self.lr if self.student_lr is None else self.student_lr

    def key(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seeds"] = list(self.seeds)
        for name in ("teacher_precision", "student_lr"):  # keeps the key of files written before these existed
            if d[name] is None:
                del d[name]
        return d

    @classmethod
    def from_key(cls, key: dict[str, Any]) -> Budget:
        return cls(**{**key, "seeds": tuple(key["seeds"])})


BUDGETS = {
    "default": Budget(),
    "smoke": Budget(teacher_subset=600, teacher_epochs=1, subset=400, epochs=1, batch=64, seeds=(0,)),
    # Same teacher and subsets, 3x the student epochs: does the ranking hold with longer training?
    "long": Budget(epochs=30, seeds=(0, 1)),
    # Cross-family pair: the same resnet20 teacher (64×8×8 last map, residual) and a MobileNetV2
    # student (1280×2×2, inverted residual): widths differ 20×, maps 4× per side. fp32 because this
    # CPU ran MobileNetV2's step slower in bf16 than in fp32 (`--stage pair` measures both).
    # Student lr = LIGHT_STUDENT_LR_FACTOR × the same-family lr (see there): at 0.1 its ReLU head died.
    "cross": Budget(student="mobilenetv2", student_lr=0.02, precision="fp32", teacher_precision="bf16"),
    "smoke_cross": Budget(teacher_subset=600, teacher_epochs=1, student="mobilenetv2", subset=400, epochs=1,
                          batch=64, student_lr=0.02, seeds=(0,), precision="fp32", teacher_precision="bf16"),
}
# Budgets that reuse another budget's teacher (same teacher config) and its tuned picks.
SHARES_WITH = {"cross": "default", "long": "default", "smoke_cross": "smoke"}  # same teacher config and picks
# Depthwise students (MobileNetV2, ShuffleNet) train at 1/5 of the lr the others get, as in RepDistiller/CRD
# (0.01 vs 0.05) and mdistiller. Issue #14: at lr 0.1 the MobileNetV2 student's 1280-wide ReLU head died
# within ~20 steps (≥95 % channels never active, CE stuck at ln 10) whenever a method's terms added about
# a CE's worth of gradient (CE + KD at 1 + 1 in DSKD and DiffKD, LSHFM's L2), with or without an adapter.
LIGHT_STUDENTS = ("mobilenetv2", "shufflenetv2")
LIGHT_STUDENT_LR_FACTOR = 0.2


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""


# -- tuning: the same budget of configurations for every method ------------------------------
#
# Every method gets at most CONFIGS_PER_METHOD configurations, each trained once (TUNING_SEED)
# on 80 % of the seed's subset and scored on the other 20 % (never the test split). The pick
# rule: the highest holdout top-1; a tie goes to the configuration listed first (the reference).
# CE has no knob of its own (its weight only rescales the learning rate, which is fixed for all),
# so it has one configuration.
CONFIGS_PER_METHOD = 3
TUNING_SEED = 0
PICK_RULE = (f"highest holdout top-1 (seed {TUNING_SEED}, {CONFIGS_PER_METHOD} configurations at most per "
             "method); a tie goes to the configuration listed first")
METHOD_ORDER = ("ce", "kd", "dkd", "fitnet", "lshfm", "diffkd", "dskd")
METHOD_LABELS = {"ce": "CE (student alone)", "kd": "KD", "dkd": "DKD", "fitnet": "FitNet",
                 "lshfm": "LSHFM", "diffkd": "DiffKD-style", "dskd": "DSKD"}
GRID: dict[str, list[tuple[str, dict[str, Any], str]]] = {
    "ce": [("ce", {}, "no method knob: one configuration")],
    "kd": [
        ("kd_ref", {}, "mdistiller's CIFAR setting: 0.1·CE + 0.9·τ²KL, τ 4"),
        ("kd_ce1", {"w_ce": 1.0, "w_kd": 1.0}, "full CE beside the KL term"),
        ("kd_tau2", {"tau": 2.0}, "a sharper teacher distribution (τ 2)"),
    ],
    "dkd": [
        ("dkd_ref", {}, "the paper's CIFAR default β 8 (α 1, T 4, warm-up 20/240)"),
        ("dkd_b2", {"beta": 2.0}, "the paper's β for ResNet56→20 (the previous bench setting)"),
        ("dkd_b1", {"beta": 1.0}, "a weaker non-target term"),
    ],
    "fitnet": [
        ("fitnet_ref", {}, "mdistiller: ConvReg (conv + BN + ReLU), hint weight 100"),
        ("fitnet_w10", {"w_hint": 10.0}, "hint weight 10: less pull on a short schedule"),
        ("fitnet_w1", {"w_hint": 1.0}, "hint weight 1"),
    ],
    "lshfm": [
        ("lshfm_ref", {}, "reference lshl2_s: hash + L2, teacher-correct samples, 32×C bits, "
                          "std of the teacher fc, median bias"),
        ("lshfm_all", {"lsh_correct_only": False}, "the reference loss on every sample"),
        ("lshfm_v1", {"lsh_bits": 256, "lsh_std": 1.0, "lsh_l2": False, "lsh_correct_only": False},
         "this repo's earlier form: 4×C bits, std 1, hash only, every sample"),
    ],
    "diffkd": [
        ("diffkd_ref", {}, "defaults: t0 400, 5 DDIM steps, CE + KD + L_diff + feature MSE"),
        ("diffkd_t100", {"t0": 100}, "shallower noising of the student map (t0 100)"),
        ("diffkd_film", {"denoiser_time": "film", "denoiser_norm": "group"},
         "the denoiser fix DSKD v2 got (FiLM + GroupNorm: it knows the noise level while sampling)"),
    ],
    # From H1's status note (/work/notes/h1_status.md): DSKD v2's candidates.
    "dskd": [
        ("dskd_v2", {}, "DSKD v2 defaults (teacher-space diffusion, FiLM GroupNorm denoiser)"),
        ("dskd_s100", {"guidance_scale": 100.0}, "guidance scale 100, what the recipe shipped before issue 15 "
                                                 "(replaces target_mode cancel, last of the three in the v2 tuning)"),
        ("dskd_mse1", {"feature_mse": 1.0}, "LSHFM's L2 term beside the hash"),
    ],
}
# The feature-loss-off ablation: both feature terms off, so no denoising chain runs.
NOFEAT = {"w_lsh": 0.0, "feature_mse": 0.0}
# Reference-default rows shown beside the tuned ones (run only if their config differs from the pick).
REFERENCE_ROWS = {"fitnet": "fitnet_ref", "lshfm": "lshfm_ref"}


def is_current(rec: dict[str, Any] | None, method: str, changes: dict[str, Any]) -> bool:
    """Whether a stored record was trained with what (method, changes) resolves to NOW.

    Comparing `changes` alone kept records whose method defaults changed since (issue 15: DSKD's
    `denoiser_precision` and, earlier, `guidance_scale` moved while the cells stayed), so the
    table showed numbers from code and settings that no longer ship. The resolved options are stored
    with every record; a record without them, or with other values, is stale and is run again.
    """
    if rec is None or rec.get("method") != method or rec.get("changes") != changes:
        return False
    from dskd.methods.registry import resolve_method_options

    try:
        return rec.get("options") == resolve_method_options(method, changes)
    except (UserError, KeyError):  # a method or option that no longer exists
        return False


def tuning_plan() -> list[tuple[str, str, dict[str, Any], str]]:
    """(config name, method, changes, why) in run order: first configurations of every method first."""
    for method, configs in GRID.items():
        if len(configs) > CONFIGS_PER_METHOD:
            raise ValueError(f"{method} has {len(configs)} configurations, more than {CONFIGS_PER_METHOD}")
    width = max(len(c) for c in GRID.values())
    return [(GRID[m][i][0], m, GRID[m][i][1], GRID[m][i][2])
            for i in range(width) for m in METHOD_ORDER if i < len(GRID[m])]


def picks(tuning: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: the chosen configuration by PICK_RULE, or the first one while none is scored.

    Only records made at TUNING_SEED with the configuration's current changes count, so a
    configuration whose definition changed is simply not scored yet.
    """
    out = {}
    for method in METHOD_ORDER:
        scored = []
        for i, (cname, changes, _) in enumerate(GRID[method]):
            rec = tuning.get(f"{cname}/seed{TUNING_SEED}")
            if rec and is_current(rec, method, changes):
                scored.append((-rec["holdout_top1"], i, cname, changes))
        complete = len(scored) == len(GRID[method])
        if scored:
            _, _, cname, changes = min(scored)
        else:
            cname, changes, _ = GRID[method][0]
        out[method] = {"config": cname, "changes": changes, "tuned": bool(scored), "complete": complete}
    return out


def variants(tuning: dict[str, Any]) -> tuple[list[Variant], list[Variant], list[Variant]]:
    """(tuned methods, reference-default rows, DSKD ablation) for the cells of one table."""
    p = picks(tuning)

    def label(m: str) -> str:
        mark = "" if p[m]["complete"] else (" (tuning incomplete)" if p[m]["tuned"] else " (untuned)")
        return f"{METHOD_LABELS[m]}, tuned: {p[m]['config']}{mark}"

    main = [Variant(m, m, dict(p[m]["changes"]), label(m)) for m in METHOD_ORDER]
    refs = [Variant(ref, m, dict(GRID[m][0][1]), f"{METHOD_LABELS[m]}, reference default ({ref})")
            for m, ref in REFERENCE_ROWS.items()]
    ablation = [Variant("dskd_nofeat", "dskd", {**p["dskd"]["changes"], **NOFEAT},
                        f"DSKD ({p['dskd']['config']}) with the feature loss off")]
    return main, refs, ablation


def same_as_pick(v: Variant, main: list[Variant]) -> Variant | None:
    """The tuned variant a reference row duplicates (same method and options), if any."""
    return next((m for m in main if m.method == v.method and m.options == v.options and m.name != v.name), None)


def cell_order(seeds: tuple[int, ...], tuning: dict[str, Any]) -> list[tuple[Variant, int]]:
    """Seed by seed, so every row gets its first seed before any gets its third; reference rows
    that equal the tuned pick are not run again (the table shows the pick's cells for them)."""
    main, refs, ablation = variants(tuning)
    rows = main + [v for v in refs if same_as_pick(v, main) is None] + ablation
    return [(v, s) for s in seeds for v in rows]


# -- small helpers --------------------------------------------------------------------------


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "platform": platform.platform(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "device": DEVICE, "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else None,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive lock beside the results file, so parallel shards never lose each other's cells."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Results:
    """The results JSON: read-modify-write under a lock, each write atomic."""

    def __init__(self, path: Path, budget_name: str, budget: Budget, command: str) -> None:
        self.path, self.budget_name, self.budget, self.command = path, budget_name, budget, command

    def load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{self.path}: not valid JSON ({exc}); fix or delete it") from None
        if data.get("budget") not in (None, self.budget.key()):
            raise UserError(
                f"{self.path}: made with a different budget; pass --results NEW.json or delete it"
            )
        return data

    def update(self, fn) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        with locked(self.path):
            data = self.load()
            data.setdefault("benchmark", "distill_cifar10")
            data["budget_name"], data["budget"] = self.budget_name, self.budget.key()
            data.setdefault("commands", [])
            if self.command not in data["commands"]:
                data["commands"].append(self.command)
            data.setdefault("machine", machine_info())
            for key in ("teacher", "cells", "tuning", "cost"):
                data.setdefault(key, {} if key != "teacher" else None)
            fn(data)
            data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            atomic.write_json(self.path, data)
            return data


# -- training ------------------------------------------------------------------------------


def data_spec(path: str) -> str:
    """The data path as the trainer records it: relative to the repository root (we chdir there)."""
    return os.path.relpath(Path(path).resolve(), ROOT) if not os.path.isabs(path) else path


def teacher_config(b: Budget, data: str):  # type: ignore[no-untyped-def]
    from dskd.trainer import TrainConfig

    return TrainConfig(model=b.teacher_model, data=data, epochs=b.teacher_epochs, batch_size=b.batch,
                       lr=b.lr, weight_decay=b.weight_decay, schedule=b.schedule,
                       precision=b.teacher_precision or b.precision,
                       method="ce", train_subset=b.teacher_subset, seed=0, device=DEVICE)


def student_config(b: Budget, data: str, method: str, options: dict[str, Any], seed: int,
                   teacher: str | None, holdout: float = 0.0):  # type: ignore[no-untyped-def]
    from dskd.trainer import TrainConfig

    return TrainConfig(model=b.student, data=data, epochs=b.epochs, batch_size=b.batch, lr=b.students_lr,
                       weight_decay=b.weight_decay, schedule=b.schedule, precision=b.precision,
                       method=method, teacher=teacher if method != "ce" else None,
                       options=dict(options), train_subset=b.subset, holdout=holdout, seed=seed,
                       device=DEVICE, eval_every=b.epochs)  # evaluate once, at the end: saves ~15% here


def run_teacher(b: Budget, data: str, out: Path, results: Results, shared: bool = False) -> Path:
    """Train the teacher once (resumable); later calls reuse its model.pt.

    `shared`: the folder belongs to another budget's run (same teacher config); it is only read,
    never trained here, so two budgets never train one teacher at once.
    """
    from dskd.trainer import train

    cfg = teacher_config(b, data)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    if summary is None or summary.get("config") != cfg.to_dict():
        if shared:
            raise UserError(f"no finished teacher with this budget's teacher config in {out}: "
                            "run `python bench/distill_cifar10.py --stage teacher` first")
        print(f"[bench] training teacher {b.teacher_model} -> {out}", flush=True)
        summary = train(cfg, out, resume=True)
    record = {"model": b.teacher_model, "top1": summary["top1"], "train_images": summary["train_images"],
              "epochs": b.teacher_epochs, "train_seconds": summary["train_seconds"], "params": summary["params"],
              "macs": summary["macs"], "path": str(out / "model.pt")}
    results.update(lambda d: d.__setitem__("teacher", record))
    print(f"[bench] teacher {b.teacher_model}: test top-1 {summary['top1']:.2f}", flush=True)
    return out / "model.pt"


def final_losses(out: Path) -> dict[str, float]:
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {k: round(v, 4) for k, v in lines[-1].items() if k.startswith("loss_")} if lines else {}


CELL_MARKER = "bench_options.json"  # a cell folder's resolved options, written before its training starts


def cell_folder_current(out: Path, variant: Variant) -> bool:
    """Whether a cell's run folder, finished or half-trained, was made with what `variant` resolves to now.

    The marker is written before training, so a half-trained folder (only a checkpoint) is resumed
    only under the same resolved options; the trainer's own resume check compares `changes` alone.
    A finished folder from before the marker is judged by its summary's resolved options.
    """
    try:
        stored = json.loads((out / CELL_MARKER).read_text())
    except (OSError, ValueError):
        stored = None
    if stored is None and (out / "summary.json").exists():
        try:
            summary = json.loads((out / "summary.json").read_text())
        except (OSError, ValueError):
            return False
        stored = {"method": variant.method, "changes": summary.get("config", {}).get("options"),
                  "options": summary.get("options")}
    return is_current(stored, variant.method, variant.options)


def run_cell(b: Budget, data: str, teacher: Path, work: Path, variant: Variant, seed: int,
             holdout: float = 0.0) -> dict[str, Any]:
    from dskd.trainer import train

    kind = "tune" if holdout else "cells"
    out = work / kind / variant.name / f"seed{seed}"
    if out.exists() and not cell_folder_current(out, variant):
        # the folder holds an earlier definition (or other method defaults): start over
        import shutil

        shutil.rmtree(out)
    from dskd.methods.registry import resolve_method_options

    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / CELL_MARKER, json.dumps({"method": variant.method, "changes": variant.options,
                                                     "options": resolve_method_options(variant.method,
                                                                                       variant.options)}))
    cfg = student_config(b, data, variant.method, variant.options, seed, str(teacher), holdout)
    load0 = os.getloadavg()[0]
    summary = train(cfg, out, resume=True)
    steps = b.epochs * max(1, summary["train_images"] // b.batch)
    record = {
        "variant": variant.name, "method": variant.method, "seed": seed, "changes": variant.options,
        "options": summary["options"], "train_seconds": summary["train_seconds"],
        "s_per_step": round(summary["train_seconds"] / steps, 4), "train_images": summary["train_images"],
        "final_losses": final_losses(out), "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if holdout:
        record["holdout_top1"] = summary["holdout_top1"]  # the test accuracy is deliberately not kept
    else:
        record["top1"] = summary["top1"]
    return record


# -- step costs ----------------------------------------------------------------------------


def measure_costs(b: Budget, data: str, teacher: Path, steps: int, rounds: int,
                  methods: list[Variant]) -> dict[str, Any]:
    """Seconds per optimizer step of every method on the same batch, interleaved in rounds."""
    from dskd.data import augment, load_data
    from dskd.methods import create_distiller
    from dskd.models import create_model
    from dskd.trainer import autocast_for, load_teacher

    bundle = load_data(data, progress=False)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(bundle.train_y), generator=gen)[: b.batch]
    x = augment(bundle.train_x[idx], bundle.mean, bundle.std, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)
    y = bundle.train_y[idx]
    runners, reports = {}, {}
    for v in methods:
        torch.manual_seed(0)
        t_model, _ = load_teacher(str(teacher), bundle.class_names, 3)
        student = create_model(b.student, num_classes=len(bundle.class_names))
        d = create_distiller(v.method, student, t_model if v.method != "ce" else None, v.options)
        d.to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(list(d.trainable_parameters()), lr=0.01, momentum=0.9)

        def step(d=d, opt=opt) -> None:  # type: ignore[no-untyped-def]
            with autocast_for(b.precision, torch.device("cpu")):
                _, losses = d(x, y, 0.5)
            loss = sum(val.float() for val in losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(3):
            step()
        runners[v.name] = step
        reports[v.name] = d.cost_report(32, 3) if v.method in ("dskd", "diffkd") else d.cost_report()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, step in runners.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - t0) / steps)
    # Load from other jobs only ever adds time, so the fastest round is the best estimate of a
    # method's own cost; the median is kept to show how noisy the machine was.
    per_step = {name: min(v) for name, v in times.items()}
    return {
        "batch": b.batch, "steps_per_round": steps, "rounds": rounds, "statistic": "min over rounds",
        "options": {v.name: v.options for v in methods},
        "s_per_step": {k: round(v, 4) for k, v in per_step.items()},
        "s_per_step_median": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "ratio_vs_ce": {k: round(v / per_step["ce"], 2) for k, v in per_step.items()},
        "ratio_vs_kd": {k: round(v / per_step["kd"], 2) for k, v in per_step.items()},
        "dskd_cost_report": reports["dskd"], "diffkd_cost_report": reports["diffkd"],
        "training_only_params": {k: r["training_only_params"] for k, r in reports.items()},
        "machine": machine_info(),
    }


def measure_pair(candidates: list[str], teacher_model: str, batch: int, steps: int) -> dict[str, Any]:
    """MACs (the project's counter), last feature map and s/step (bf16 and fp32) of candidate students.

    Why: the cross-family student must be cheap on this CPU; MACs alone mislead (depthwise convs
    run far below their MAC count, and slower still in bf16 here), so the step is timed as well.
    """
    from dskd.models import count_macs, count_params, create_model
    from dskd.trainer import autocast_for

    rows = {}
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    for name in [teacher_model, *candidates]:
        torch.manual_seed(0)
        m = create_model(name, 10).to(memory_format=torch.channels_last).train()
        with torch.no_grad():
            shape = list(m.eval().forward_features(torch.zeros(1, 3, 32, 32)).shape[1:])
        m.train()
        row: dict[str, Any] = {"params": count_params(m), "macs": count_macs(m, 32), "last_map": shape}
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        for precision in ("bf16", "fp32"):
            best = float("inf")
            for i in range(steps + 1):
                t0 = time.perf_counter()
                with autocast_for(precision, torch.device("cpu")):
                    loss = torch.nn.functional.cross_entropy(m(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if i:  # the first step warms up
                    best = min(best, time.perf_counter() - t0)
            row[f"s_per_step_{precision}"] = round(best, 4)
        rows[name] = row
    return {"batch": batch, "statistic": f"fastest of {steps} steps", "models": rows, "machine": machine_info()}


# -- rendering -----------------------------------------------------------------------------


def fmt(m: float, s: float) -> str:
    if math.isnan(m):
        return "—"
    return f"{m:.2f} ± {s:.2f}" if not math.isnan(s) else f"{m:.2f}"


def row_cells(data: dict[str, Any], v: Variant, main: list[Variant]) -> tuple[list[dict[str, Any]], str]:
    """A row's finished cells (current options only) and a note when it borrows the pick's cells."""
    src, note = v, ""
    twin = same_as_pick(v, main)
    if twin is not None and v not in main:
        src, note = twin, f" (= tuned pick, same cells as `{twin.name}`)"
    cells = sorted((c for c in data.get("cells", {}).values()
                    if c["variant"] == src.name and is_current(c, src.method, src.options)), key=lambda c: c["seed"])
    return cells, note


def cell_rows(data: dict[str, Any], rows: list[Variant], main: list[Variant], ce_mean: float) -> list[str]:
    out = []
    for v in rows:
        cells, note = row_cells(data, v, main)
        accs = [c["top1"] for c in cells]
        m, s = mean_std(accs)
        per_seed = ", ".join(f"{c['top1']:.2f}" for c in cells) or "not run"
        delta = f"{m - ce_mean:+.2f}" if cells and not math.isnan(ce_mean) else "—"
        secs = statistics.fmean(c["train_seconds"] for c in cells) if cells else float("nan")
        loads = [c["load_avg_1m"][0] for c in cells if c.get("load_avg_1m")]
        load = f"{statistics.fmean(loads):.1f}" if loads else "—"
        out.append(f"| {v.label}{note} | `{json.dumps(v.options, ensure_ascii=False)}` | {fmt(m, s)} | {len(cells)} | "
                   f"{per_seed} | {delta} | " + (f"{secs:.0f}" if cells else "—") + f" | {load} |")
    return out


def verdict(data: dict[str, Any], budget: Budget, tuning: dict[str, Any]) -> list[str]:
    """DSKD vs the best row of every other method (tuned or reference default): the mean gap
    against the larger of the two seed spreads; and DSKD vs its feature-loss-off ablation."""
    main, refs, ablation = variants(tuning)
    by: dict[str, list[dict[str, Any]]] = {v.name: row_cells(data, v, main)[0] for v in main + refs + ablation}
    dskd = by["dskd"]
    if not dskd:
        return ["DSKD has no finished cell yet."]
    dm, ds = mean_std([c["top1"] for c in dskd])
    d_seed = {c["seed"]: c["top1"] for c in dskd}
    lines, beaten_all = [], True
    for method in METHOD_ORDER[:-1]:
        names = [method] + [r for m, r in REFERENCE_ROWS.items() if m == method]
        scored = [(mean_std([c["top1"] for c in by[n]]), n) for n in names if by[n]]
        if not scored:
            lines.append(f"- vs {method}: not run")
            beaten_all = False
            continue
        (bm, bs), best = max(scored, key=lambda t: t[0][0])
        spread = max(x for x in (ds, bs, 0.0) if not math.isnan(x))
        gap = dm - bm
        ok = gap > spread and len(dskd) >= 2 and len(by[best]) >= 2
        beaten_all &= ok
        # Seed n gives every method the same subset, so per-seed differences are paired.
        b_seed = {c["seed"]: c["top1"] for c in by[best]}
        diffs = [d_seed[k] - b_seed[k] for k in sorted(set(d_seed) & set(b_seed))]
        paired = (f"; paired per seed {', '.join(f'{d:+.2f}' for d in diffs)}, "
                  f"DSKD ahead on {sum(d > 0 for d in diffs)}/{len(diffs)}") if diffs else ""
        lines.append(f"- vs {method} (best row: `{best}`): {gap:+.2f} points (larger seed std {spread:.2f}{paired}) → "
                     + ("above by more than the spread" if ok else "NOT above by more than the spread"))
    nofeat = by["dskd_nofeat"]
    if nofeat:
        gain = dm - mean_std([c["top1"] for c in nofeat])[0]
        branch_ok = gain >= 1.5
        lines.append(f"- diffusion + LSH branch (dskd − dskd_nofeat): {gain:+.2f} points → "
                     + ("meets the ≥ 1.5 goal" if branch_ok else "does NOT meet the ≥ 1.5 goal"))
    else:
        branch_ok = False
        lines.append("- diffusion + LSH branch (dskd − dskd_nofeat): dskd_nofeat not run")
    missing = [v.name for v in main + ablation if len(by[v.name]) < len(budget.seeds)]
    head = ("**Goal met**: DSKD is above every other method by more than the seed spread and its branch adds ≥ 1.5."
            if beaten_all and branch_ok else
            "**Goal not met**: " + ("DSKD is not above every other method by more than the seed spread"
                                    if not beaten_all else "DSKD beats every other method")
            + (", and its diffusion + LSH branch adds < 1.5 points over dskd_nofeat." if not branch_ok
               else ", and its branch adds ≥ 1.5 points."))
    if missing:
        head += f" (Incomplete: fewer than {len(budget.seeds)} seeds for {', '.join(missing)}.)"
    return [head, "", *lines]


def pair_table(title: str, data: dict[str, Any], results_path: Path, tuning: dict[str, Any]) -> list[str]:
    b = Budget.from_key(data["budget"])
    t = data.get("teacher") or {}
    rel = os.path.relpath(results_path, ROOT)
    main, refs, ablation = variants(tuning)
    ce_cells = row_cells(data, main[0], main)[0]
    ce_mean = mean_std([c["top1"] for c in ce_cells])[0]
    stages = data.get("stages", [])
    return [
        f"### {title}: `{b.teacher_model}` → `{b.student}` (test top-1 %, mean ± std over seeds)", "",
        f"From `{rel}`. Teacher `{b.teacher_model}`: **test top-1 "
        + (f"{t['top1']:.2f}%" if "top1" in t else "— (not recorded in this file yet)") + "** "
        f"(CE, {b.teacher_subset} images, {b.teacher_epochs} epochs, {b.teacher_precision or b.precision}). "
        f"Students `{b.student}`: {b.subset} train images, {b.epochs} epochs, batch {b.batch}, lr {b.students_lr} "
        f"{b.schedule}, {b.precision}, seeds {', '.join(map(str, b.seeds))}. Load average (1 min) per stage: "
        + (", ".join(f"{st['stage']} {st['load_avg_1m'][0]}→"
                     + (f"{st['load_avg_1m'][1]}" if len(st["load_avg_1m"]) > 1 else "(stopped)")
                     for st in stages[-8:]) or "—") + ".", "",
        "| method | options | top-1 | seeds | per seed | Δ vs CE | s per run | load at start |",
        "|---|---|---|---|---|---|---|---|",
        *cell_rows(data, main + refs + ablation, main, ce_mean), "",
        *verdict(data, b, tuning), "",
    ]


def render(data: dict[str, Any], results_path: Path, cross: dict[str, Any] | None = None,
           cross_path: Path | None = None) -> str:
    b = Budget.from_key(data["budget"])
    m = data.get("machine", {})
    tuning = data.get("tuning", {})
    commands = data.get("commands", []) + (cross or {}).get("commands", [])
    out = [
        SECTION, "",
        "Generated by `bench/distill_cifar10.py --stage render` from the results JSONs (numbers are not "
        "edited by hand; only the notes block below is). DSKD here is a **reconstruction** of Wang et al. "
        "(arXiv 2602.02107) from the paper's abstract, see [dskd.md](dskd.md).", "",
        f"- Every method has the same budget: class-balanced subset of **{b.subset} train images "
        f"({100 * b.subset / 50000:.0f}%)**, drawn per seed (seed n → subset n, the same for all methods), "
        f"{b.epochs} epochs, batch {b.batch}, SGD momentum 0.9, lr {b.students_lr} {b.schedule}, weight decay "
        f"{b.weight_decay}, {b.augmentation}; top-1 on the full 10 000-image test split.",
        f"- Tuning: every method gets at most **{CONFIGS_PER_METHOD} configurations**, each trained once on "
        f"{100 * (1 - b.holdout):.0f}% of the seed-{TUNING_SEED} subset and scored on the other "
        f"{100 * b.holdout:.0f}% ({int(round(b.subset * b.holdout))} held-out train images, never the test "
        f"split). Pick rule: {PICK_RULE}. The cross-family pair reuses the same-family picks for every method.",
        f"- Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores shared with other jobs, "
        f"torch {m.get('torch', '?')}, {m.get('torch_threads', '?')} thread(s).",
        f"- Commands: {'; '.join(f'`{c}`' for c in commands)}.", "",
        "### Tuning (holdout top-1 %, seed 0)", "",
        "| method | configuration | changes | why | holdout top-1 | picked | s | load at start |",
        "|---|---|---|---|---|---|---|---|",
    ]
    p = picks(tuning)
    for cname, method, changes, why in sorted(tuning_plan(), key=lambda r: METHOD_ORDER.index(r[1])):
        rec = tuning.get(f"{cname}/seed{TUNING_SEED}")
        ok = is_current(rec, method, changes)
        score = f"{rec['holdout_top1']:.2f}" if ok else "not run"
        secs = f"{rec['train_seconds']:.0f}" if ok else "—"
        load = f"{rec['load_avg_1m'][0]}" if ok and rec.get("load_avg_1m") else "—"
        mark = "**✓**" if p[method]["tuned"] and p[method]["config"] == cname else ""
        out.append(f"| {method} | {cname} | `{json.dumps(changes, ensure_ascii=False)}` | {why} | {score} | "
                   f"{mark} | {secs} | {load} |")
    out.append("")
    out += pair_table("Same-family pair", data, results_path, tuning)
    if cross is not None and cross_path is not None:
        out += pair_table("Cross-family pair", cross, cross_path, tuning)
        pair = cross.get("pair_choice")
        if pair:
            out += ["#### Choosing the cross-family student (`--stage pair`)", "",
                    "| model | params | MACs (M) | last feature map | s/step bf16 | s/step fp32 |",
                    "|---|---|---|---|---|---|"]
            for name, r in pair["models"].items():
                out.append(f"| {name} | {r['params']:,} | {r['macs'] / 1e6:.1f} | {'×'.join(map(str, r['last_map']))} "
                           f"| {r['s_per_step_bf16']:.3f} | {r['s_per_step_fp32']:.3f} |")
            out += ["", f"Batch {pair['batch']}, {pair['statistic']}, load average "
                        f"{pair['machine'].get('load_avg_1m')} when measured.", ""]
    cost = data.get("cost") or {}
    if cost and "options" in cost:
        cr = cost["dskd_cost_report"]
        out += [
            "### Training cost (same teacher/student pair, same process, same batch)", "",
            f"Fastest of {cost['rounds']} interleaved rounds of {cost['steps_per_round']} steps (median in "
            "brackets: the spread is load from other jobs), batch "
            f"{cost['batch']}, {b.precision}, {cost['machine'].get('torch_threads')} thread(s), "
            f"load average {cost['machine'].get('load_avg_1m')} when measured.", "",
            "| method | s / step | × CE | × KD | training-only params |", "|---|---|---|---|---|",
        ]
        for name, sec in cost["s_per_step"].items():
            med = cost.get("s_per_step_median", {}).get(name, float("nan"))
            out.append(f"| {name} | {sec:.3f} ({med:.3f}) | {cost['ratio_vs_ce'][name]:.2f} | "
                       f"{cost['ratio_vs_kd'][name]:.2f} | {cost['training_only_params'].get(name, 0):,} |")
        out += ["", f"DSKD's training-only modules: {cr['training_only_params']:,} parameters; none reach "
                    "the saved student.", ""]
    out += [NOTES_START, "", NOTES_END, ""]
    return "\n".join(out)


def write_docs(section: str, docs: Path) -> None:
    """Replace our `##` section (keeping its hand-written notes block), leave others' sections alone."""
    text = docs.read_text() if docs.exists() else "# Benchmarks\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == SECTION), None)
    old = ""
    if start is None:
        before, after = text.rstrip("\n") + "\n\n", ""
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        before, old, after = "".join(lines[:start]), "".join(lines[start:end]), "".join(lines[end:])
    if NOTES_START in old and NOTES_END in old:
        notes = old[old.index(NOTES_START): old.index(NOTES_END) + len(NOTES_END)]
        section = section.replace(f"{NOTES_START}\n\n{NOTES_END}", notes)
    atomic.write_text(docs, before + section.rstrip("\n") + "\n" + ("\n" + after if after else ""))


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="default")
    p.add_argument("--epochs", type=int, help="override the budget's student epochs")
    p.add_argument("--subset", type=int, help="override the budget's student subset (images)")
    p.add_argument("--seeds", type=str, help="override the budget's seeds, e.g. 0,1,2")
    p.add_argument("--stage", choices=("all", "teacher", "cost", "cells", "tune", "pair", "render"), default="all")
    p.add_argument("--only", type=str, help="comma-separated variant / configuration names to run (cells or tune)")
    p.add_argument("--shard", type=str, default="0/1", help="K/N: run every N-th pending cell from K")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new cell after this long")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded 2-core box)")
    p.add_argument("--cost-steps", type=int, default=5)
    p.add_argument("--cost-rounds", type=int, default=6)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: train cells on a GPU, into distill_cifar10_BUDGET_cuda.json (docs untouched)")
    p.add_argument("--work", type=Path, default=None, help="run folders (default runs/distill_cifar10/BUDGET)")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--picks-from", type=Path, default=None,
                   help="results JSON whose tuning sets the picks (default: the budget's own, or for a "
                        "cross budget the same-family file)")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    return p.parse_args(argv)


def results_file(name: str) -> Path:
    return ROOT / "bench" / "results" / ("distill_cifar10.json" if name == "default" else f"distill_cifar10_{name}.json")


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    args = parse_args(argv)
    DEVICE = args.device
    os.chdir(ROOT)
    torch.set_num_threads(args.threads)
    b = BUDGETS[args.budget]
    overrides: dict[str, Any] = {}
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.subset:
        overrides["subset"] = args.subset
    if args.seeds:
        overrides["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    b = dataclasses.replace(b, **overrides)
    name = args.budget + ("" if not overrides else "_custom") + ("" if DEVICE == "cpu" else f"_{DEVICE}")
    results_path = args.results or results_file(name)
    work = args.work or ROOT / "runs" / "distill_cifar10" / name
    shares = SHARES_WITH.get(args.budget)
    teacher_dir = work / "teacher"
    if shares and args.work is None:
        teacher_dir = ROOT / "runs" / "distill_cifar10" / shares / "teacher"
    picks_path = args.picks_from or (results_file(shares) if shares and args.results is None else results_path)
    command = "python bench/distill_cifar10.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = Results(results_path, name, b, command.strip())
    data = data_spec(args.data)
    k, n = (int(v) for v in args.shard.split("/"))
    only = set(args.only.split(",")) if args.only else None
    started = time.monotonic()
    stage_id = f"{time.strftime('%Y-%m-%dT%H:%M:%S')}/{os.getpid()}"

    def time_left() -> bool:
        return args.max_minutes is None or (time.monotonic() - started) / 60 < args.max_minutes

    def log_stage(done: bool) -> None:
        """Each stage's command and the load average at its start and end, in the results JSON."""
        def fn(d: dict[str, Any]) -> None:
            log = d.setdefault("stages", [])
            entry = next((e for e in log if e.get("id") == stage_id), None)
            if entry is None:
                entry = {"id": stage_id, "stage": args.stage, "command": command.strip(),
                         "load_avg_1m": [round(os.getloadavg()[0], 2)]}
                log.append(entry)
            if done:
                entry["load_avg_1m"].append(round(os.getloadavg()[0], 2))
                entry["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        results.update(fn)

    def tuning() -> dict[str, Any]:
        if picks_path == results_path:
            return results.load().get("tuning", {})
        if not picks_path.exists():
            raise UserError(f"{picks_path}: no tuning results to take the picks from; run "
                            "`python bench/distill_cifar10.py --stage tune` first or pass --picks-from FILE")
        return json.loads(picks_path.read_text()).get("tuning", {})

    try:
        if args.stage == "tune" and picks_path != results_path:
            raise UserError(f"--budget {args.budget} reuses the picks of {os.path.relpath(picks_path, ROOT)}; "
                            "tune with that budget instead")
        if args.stage != "render":
            log_stage(False)
        if args.stage == "pair":
            pair = measure_pair(["resnet8", "mobilenetv2", "shufflenetv2"], b.teacher_model, b.batch, 3)
            results.update(lambda d: d.__setitem__("pair_choice", pair))
        elif args.stage != "render":
            teacher = run_teacher(b, data, teacher_dir, results, shared=teacher_dir != work / "teacher")
        if args.stage in ("all", "cost") and n == 1:
            if args.stage == "cost" or not (results.load().get("cost")):
                main_variants = variants(tuning())[0]
                cost = measure_costs(b, data, teacher, args.cost_steps, args.cost_rounds, main_variants)
                results.update(lambda d: d.__setitem__("cost", cost))
                print(f"[bench] s/step {cost['s_per_step']}", flush=True)
        if args.stage in ("all", "tune") and picks_path == results_path:
            plan = [r for r in tuning_plan() if only is None or r[0] in only]
            for cname, method, changes, why in plan[k::n]:
                key = f"{cname}/seed{TUNING_SEED}"
                old = results.load().get("tuning", {}).get(key)
                if is_current(old, method, changes):
                    continue
                if not time_left():
                    print("[bench] --max-minutes reached; rerun to continue", flush=True)
                    break
                print(f"[bench] tune {cname} ({method})", flush=True)
                rec = run_cell(b, data, teacher, work, Variant(cname, method, changes), TUNING_SEED, holdout=b.holdout)
                rec.update(why=why)
                results.update(lambda d, rec=rec, key=key: d["tuning"].__setitem__(key, rec))
                print(f"[bench] tune {cname}: holdout top-1 {rec['holdout_top1']:.2f}", flush=True)
        if args.stage in ("all", "cells"):
            plan = [(v, s) for v, s in cell_order(b.seeds, tuning()) if only is None or v.name in only]
            mine = plan[k::n]  # by position in the full plan, so shards never overlap
            for v, s in mine:
                old = results.load().get("cells", {}).get(f"{v.name}/seed{s}")
                if is_current(old, v.method, v.options):
                    continue
                if not time_left():
                    print("[bench] --max-minutes reached; rerun to continue", flush=True)
                    break
                print(f"[bench] cell {v.name} seed {s} {json.dumps(v.options)}", flush=True)
                rec = run_cell(b, data, teacher, work, v, s)
                results.update(lambda d, rec=rec, key=f"{v.name}/seed{s}": d["cells"].__setitem__(key, rec))
                print(f"[bench] {v.name} seed {s}: top-1 {rec['top1']:.2f} ({rec['train_seconds']:.0f} s)", flush=True)
        if args.stage != "render":
            log_stage(True)
        final = results.update(lambda d: None) if args.stage != "render" else results.load()
        if (not args.no_docs and name == "default") or args.stage == "render":
            if not final:
                raise UserError(f"{results_path}: no results to render yet; run a stage first")
            cross_path = results_file("cross")
            cross = json.loads(cross_path.read_text()) if name == "default" and cross_path.exists() else None
            write_docs(render(final, results_path, cross, cross_path), args.docs)
            print(f"[bench] wrote {args.docs}", flush=True)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
