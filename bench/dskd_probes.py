"""DSKD probes (issue 14, item 3): does the denoised target f̂ carry the teacher's knowledge?

Trains DSKD variants for a short budget on a CIFAR-10 subset (one torch thread) and, at a few
checkpoints, measures on a fixed probe batch what the feature loss compares
(`dskd.methods.probes.dskd_probes`): hash bits of f̂ that differ from the student's and from
f̂ at guidance scale 0, the cosine between the shift f̂ − A(f_s) and the direction to the
teacher's features (and to ANOTHER image's teacher features, the control), the distance to
the teacher's features, the teacher head's accuracy on A(f_s) and on f̂, and the denoiser's
ε-MSE per t.

    python bench/dskd_probes.py                     # every variant not yet in the JSON
    python bench/dskd_probes.py --only v2,v2_cancel --steps 300
    python bench/dskd_probes.py --plot-only          # redraw docs/dskd_probes.png from the JSON

Teacher: the distillation bench's (runs/distill_cifar10/default/teacher/model.pt) when it exists,
else a resnet20 trained here for a couple of epochs (cached under runs/dskd_probes/teacher).
Results: bench/results/dskd_probes.json (resumable: a finished variant is kept unless --redo).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

import torch  # noqa: E402

from deploy_targets.remote.dskd_runner.environment import cpu_model  # noqa: E402
from dskd import atomic  # noqa: E402
from dskd.errors import UserError  # noqa: E402
from dskd.methods.dskd import V1_OPTIONS  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "dskd_probes.json"
PLOT = ROOT / "docs" / "dskd_probes.png"
DATA = "../shared/data/cifar10-jpg.tar.gz"
SHARED_TEACHER = ROOT / "runs" / "distill_cifar10" / "default" / "teacher" / "model.pt"
OWN_TEACHER = ROOT / "runs" / "dskd_probes" / "teacher"

# The distillation benchmark's tuned v1 values (docs/benchmarks.md), on the v1 structure.
V1_TUNED = {**V1_OPTIONS, "lsh_on": "pooled", "t0": 100, "guidance_scale": 100.0, "detach_adapter_input": False}
FIXED_TIME = {"denoiser_time": "film", "denoiser_norm": "group"}

# name -> (options, hypothesis, what it tests). The v2 rows pin guidance_scale = 100 (the default when
# they were first run; it is 1000 since): `resolved_options` in the JSON is the full truth per row.
S100 = {"guidance_scale": 100.0}
VARIANTS: dict[str, tuple[dict[str, Any], str, str]] = {
    "v1": (V1_TUNED, "-", "v1 as benchmarked: student-space denoiser of sg(f_s), time embedding removed by BN"),
    "v1_time": ({**V1_TUNED, **FIXED_TIME}, "1", "v1 with timestep conditioning that survives the norm (FiLM + GroupNorm)"),
    "v1_teacher_x0": ({**V1_TUNED, **FIXED_TIME, "x0_source": "teacher", "feature_norm": True}, "a",
                      "student space, denoiser learns A⁺(f_t) (the earlier failed attempt, re-tested with item 1)"),
    "v2": (S100, "a+b+e", "v2 at s = 100: teacher-space denoiser of f_t, A(f_s) denoised, head hash planes, feature_start 0.1"),
    "v2_self": ({**S100, "x0_source": "self"}, "a (control)", "teacher space but the denoiser learns sg(A(f_s)): no teacher prior"),
    "v2_s0": ({"guidance_scale": 0.0}, "a (no guidance)", "v2 without classifier guidance"),
    "v2_s1000": ({"guidance_scale": 1000.0}, "a+b (stronger guide)",
                 "v2 with 10× the guidance scale (the teacher-space gradient is smaller than v1's)"),
    "v2_s1000_soft": ({"guidance_scale": 1000.0, "guidance_target": "soft"}, "a (per-image guide)",
                      "s = 1000, guidance towards the teacher's own prediction for the image, not the label"),
    "v2_s1000_cancel": ({"guidance_scale": 1000.0, "target_mode": "cancel"}, "c",
                        "s = 1000, target A(f_s) + f̂ − f̂(s=0) on shared noise"),
    "v2_soft": ({**S100, "guidance_target": "soft"}, "a (per-image guide)",
                "guidance towards the teacher's own prediction for the image (per-image knowledge), not the label"),
    "v2_cancel": ({**S100, "target_mode": "cancel"}, "c", "target A(f_s) + f̂ − f̂(s=0) on shared noise"),
    "v2_invert": ({**S100, "target_mode": "invert"}, "c", "DDIM inversion to t0 instead of random noise"),
    "v2_lossguide": ({**S100, "loss_guidance": 0.3}, "d", "small-scale loss guidance trains the denoiser through the chain"),
    "v2_nostart": ({**S100, "feature_start": 0.0}, "e (control)", "no denoiser pre-training before the feature loss"),
}


def machine_info() -> dict[str, Any]:
    cpu = cpu_model()  # the same reading the device runner records
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}


def load_results() -> dict[str, Any]:
    if not RESULTS.exists():
        return {"benchmark": "dskd_probes", "variants": {}, "commands": []}
    import json

    try:
        return json.loads(RESULTS.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{RESULTS}: not valid JSON ({exc}); fix or delete it") from None


def get_teacher(data: str, teacher_epochs: int, teacher_images: int) -> tuple[Path, dict[str, Any]]:
    """The shared bench teacher if present, else one trained (and cached) here."""
    import json

    if SHARED_TEACHER.exists():
        summary = SHARED_TEACHER.parent / "summary.json"
        top1 = json.loads(summary.read_text()).get("top1") if summary.exists() else None
        return SHARED_TEACHER, {"path": os.path.relpath(SHARED_TEACHER, ROOT), "top1": top1, "source": "distill_cifar10"}
    from dskd.trainer import TrainConfig, train

    cfg = TrainConfig(model="resnet20", data=data, epochs=teacher_epochs, batch_size=128, lr=0.1,
                      weight_decay=5e-4, schedule="cosine", precision="bf16", method="ce",
                      train_subset=teacher_images, seed=0, device="cpu")
    summary_path = OWN_TEACHER / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    if summary is None or summary.get("config") != cfg.to_dict():
        print(f"[probes] training teacher resnet20 ({teacher_epochs} epochs, {teacher_images} images)", flush=True)
        summary = train(cfg, OWN_TEACHER, resume=True)
    return OWN_TEACHER / "model.pt", {"path": os.path.relpath(OWN_TEACHER / "model.pt", ROOT),
                                      "top1": summary["top1"], "source": "trained here",
                                      "epochs": teacher_epochs, "train_images": teacher_images}


def train_step(d: torch.nn.Module, opt: torch.optim.Optimizer, xs: torch.Tensor, ys: torch.Tensor, bundle: Any,
               gen: torch.Generator, step: int, total: int, lr: float, batch: int) -> dict[str, torch.Tensor]:
    """One probe-training step: cosine lr over `total` steps (the benchmark's schedule), a random
    augmented batch, bf16 autocast, SGD; returns the distiller's named losses."""
    from dskd.data import augment
    from dskd.trainer import autocast_for

    for group in opt.param_groups:
        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
    pick = torch.randint(0, len(xs), (batch,), generator=gen)
    x, y = augment(xs[pick], bundle.mean, bundle.std, generator=gen), ys[pick]
    with autocast_for("bf16", torch.device("cpu")):
        _, losses = d(x, y, step / total)
    loss = sum(v.float() for v in losses.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return losses


def run_variant(name: str, options: dict[str, Any], data: str, teacher: Path, args: argparse.Namespace
                ) -> dict[str, Any]:
    """Train DSKD `options` for args.steps steps; probes at the checkpoints on a fixed batch."""
    from dskd.data import class_balanced_subset, load_data, normalize
    from dskd.methods import create_distiller
    from dskd.methods.probes import dskd_probes
    from dskd.models import create_model
    from dskd.trainer import autocast_for, load_teacher

    torch.manual_seed(args.seed)
    bundle = load_data(data, progress=False)
    idx = class_balanced_subset(bundle.train_y, args.subset, seed=args.seed)
    xs, ys = bundle.train_x[idx], bundle.train_y[idx]
    rest = torch.ones(len(bundle.train_y), dtype=torch.bool)
    rest[idx] = False
    probe_idx = torch.nonzero(rest).flatten()[torch.randperm(int(rest.sum()), generator=torch.Generator().manual_seed(1))[: args.probe_batch]]
    px = normalize(bundle.train_x[probe_idx], bundle.mean, bundle.std)
    py = bundle.train_y[probe_idx]
    t_model, _ = load_teacher(str(teacher), bundle.class_names, 3)
    student = create_model("resnet8", num_classes=len(bundle.class_names))
    d = create_distiller("dskd", student, t_model, options).train()
    opt = torch.optim.SGD(list(d.trainable_parameters()), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(args.seed)
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if int(c) <= args.steps} | {args.steps})
    rows, t_start, load0 = [], time.perf_counter(), os.getloadavg()[0]
    train_seconds = 0.0
    last_losses: dict[str, torch.Tensor] = {}
    for step in range(args.steps + 1):
        if step in checkpoints:
            with autocast_for("bf16", torch.device("cpu")):
                probe = dskd_probes(d, px, py, seed=0)
            losses_now = {k: round(float(v.detach()), 4) for k, v in last_losses.items()}
            rows.append({"step": step, "progress": round(step / args.steps, 3), "losses": losses_now, **probe})
            print(f"[probes] {name} step {step}: cos {probe['cos_to_teacher']} (other {probe['cos_to_other_teacher']}), "
                  f"dist {probe['dist_to_teacher_ratio']}, acc A(f_s) {probe['teacher_head_acc_student']} "
                  f"f̂ {probe['teacher_head_acc_f_hat']}, bits {probe.get('bits_differ_from_student')}", flush=True)
        if step == args.steps:
            break
        t0 = time.perf_counter()
        last_losses = train_step(d, opt, xs, ys, bundle, gen, step, args.steps, args.lr, args.batch)
        train_seconds += time.perf_counter() - t0
    d.eval()
    with torch.no_grad(), autocast_for("bf16", torch.device("cpu")):
        student_acc = float((student(px).argmax(1) == py).float().mean())
    return {
        "options": options, "resolved_options": d.options, "checkpoints": rows,
        "student_acc_probe_batch": round(student_acc, 4),
        "s_per_step": round(train_seconds / max(args.steps, 1), 4),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Per variant over the checkpoints: teacher-direction cosine (and its control), distance ratio,
    teacher-head accuracy on f̂ minus on A(f_s), bits differing from the student."""
    variants = results.get("variants", {})
    if not variants:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("cos_to_teacher", "cos(f̂ − A(f_s), f_t − A(f_s))\n(dashed: another image's f_t)", "cos_to_other_teacher"),
        ("dist_to_teacher_ratio", "‖f̂ − f_t‖ / ‖A(f_s) − f_t‖ (pooled)", None),
        ("head_gain", "teacher-head acc: f̂ − A(f_s)", None),
        ("bits_differ_from_student", "hash bits of f̂ ≠ student's", None),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.2))
    for i, (name, v) in enumerate(variants.items()):
        rows = v["checkpoints"]
        steps = [r["step"] for r in rows]
        color = f"C{i % 10}"
        for ax, (key, title, control) in zip(axes, panels, strict=True):
            if key == "head_gain":
                ys = [r["teacher_head_acc_f_hat"] - r["teacher_head_acc_student"] for r in rows]
            else:
                ys = [r.get(key) for r in rows]
            if all(y is None for y in ys):
                continue
            ax.plot(steps, ys, marker="o", ms=3, color=color, label=name)
            if control:
                ax.plot(steps, [r.get(control) for r in rows], ls="--", color=color, lw=0.8)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("training step", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("DSKD probes on a fixed CIFAR-10 batch (bench/results/dskd_probes.json)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_table(results: dict[str, Any]) -> str:
    """Markdown: each variant's probes at its last checkpoint (and at the first checkpoint after
    feature_start), straight from the JSON."""
    b = results.get("budget", {})
    t = results.get("teacher", {})
    top1 = t.get("top1")
    top1_txt = f"{top1:.2f}" if isinstance(top1, (int, float)) else "?"
    loads = [x for v in results.get("variants", {}).values() for x in v.get("load_avg_1m", [])]
    load_txt = f"{min(loads):.1f}–{max(loads):.1f}" if loads else "?"
    lines = [
        f"Generated by `python bench/dskd_probes.py --docs` from `bench/results/dskd_probes.json`: "
        f"resnet20 teacher ({t.get('source')}, test top-1 {top1_txt} %) → resnet8, "
        f"{b.get('steps')} steps of batch {b.get('batch')} on a {b.get('subset')}-image CIFAR-10 subset "
        f"(lr {b.get('lr')} cosine, bf16, 1 thread, seed {b.get('seed')}); probes on a fixed batch of "
        f"{b.get('probe_batch')} other training images, at the last step. `cos` = cosine of pool(f̂ − v) with "
        "pool(f_t − v), v = the student's features in the teacher's space (A(f_s)); `other` = the same "
        "against another image's f_t (the control); `guid.` = the same for the guidance-only shift "
        "pool(f̂ − f̂(s=0)); `dist` = ‖pool(f̂ − f_t)‖/‖pool(v − f_t)‖ (s=0 in brackets); head acc = the "
        "teacher head's accuracy on v / f̂(s=0) / f̂; bits = hash bits of f̂ ≠ the student's (≠ f̂(s=0) in "
        "brackets); ε-MSE at t = 0 / 100 / 999 called as the chain calls it. s/step was measured under "
        f"load average {load_txt} on 2 cores (other jobs): compare costs with bench/step_cost.py, not here.",
        "",
        "| variant | hyp. | s | cos (other) | guid. cos (other) | dist (s=0) | head acc v / f̂₀ / f̂ | bits (vs s=0) "
        "| ε-MSE t=0/100/999 | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in results.get("variants", {}).items():
        r = v["checkpoints"][-1]
        e = r["eps_mse_per_t"]
        bits = r.get("bits_differ_from_student")
        bits_txt = "—" if bits is None else f"{bits:.4f} ({r.get('bits_differ_from_s0'):.4f})"
        lines.append(
            f"| {name} | {v['hypothesis']} | {v['resolved_options']['guidance_scale']:g} | {r['cos_to_teacher']:.3f} ({r['cos_to_other_teacher']:.3f}) "
            f"| {r['cos_guidance_to_teacher']:.3f} ({r['cos_guidance_to_other_teacher']:.3f}) "
            f"| {r['dist_to_teacher_ratio']:.3f} ({r['dist_to_teacher_ratio_s0']:.3f}) "
            f"| {r['teacher_head_acc_student']:.3f} / {r['teacher_head_acc_f_hat_s0']:.3f} / "
            f"{r['teacher_head_acc_f_hat']:.3f} | {bits_txt} "
            f"| {e.get('0')} / {e.get('100')} / {e.get('999')} | {v['s_per_step']} |")
    lines += ["", "![DSKD probes](dskd_probes.png)", ""]
    return "\n".join(lines)


def write_docs(results: dict[str, Any], doc: Path) -> None:
    """Replace the block between the probes markers in docs/dskd.md with `render_table`."""
    text = doc.read_text()
    start, end = "<!-- probes:start -->", "<!-- probes:end -->"
    if start not in text or end not in text:
        raise UserError(f"{doc}: no '{start}' … '{end}' block to fill")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic.write_text(doc, f"{head}{start}\n{render_table(results)}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    global RESULTS, PLOT, OWN_TEACHER
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all not yet done)")
    p.add_argument("--redo", action="store_true", help="rerun variants already in the JSON")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--checkpoints", default="0,30,60,150,300")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--subset", type=int, default=5000)
    p.add_argument("--probe-batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=DATA)
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--teacher-images", type=int, default=10000)
    p.add_argument("--max-minutes", type=float, default=None, help="stop starting new variants after this")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--docs", action="store_true", help="redraw the plot and the table in docs/dskd.md from the JSON")
    p.add_argument("--results", default=str(RESULTS), help="results JSON (default bench/results/dskd_probes.json)")
    p.add_argument("--plot", default=str(PLOT), help="plot PNG (default docs/dskd_probes.png)")
    p.add_argument("--teacher-dir", default=str(OWN_TEACHER), help="where a teacher trained here is cached")
    args = p.parse_args(argv)
    RESULTS, PLOT, OWN_TEACHER = Path(args.results).resolve(), Path(args.plot).resolve(), Path(args.teacher_dir).resolve()
    torch.set_num_threads(1)
    results = load_results()
    if args.plot_only or args.docs:
        print(plot(results, PLOT))
        if args.docs:
            write_docs(results, ROOT / "docs" / "dskd.md")
        return 0
    names = list(VARIANTS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: --only {','.join(unknown)}: unknown variant; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if not Path(args.data).exists():
        print(f"error: --data {args.data}: no such file; pass the CIFAR-10 archive", file=sys.stderr)
        return 2
    started = time.perf_counter()
    teacher, teacher_info = get_teacher(args.data, args.teacher_epochs, args.teacher_images)
    budget = {k: getattr(args, k) for k in ("steps", "checkpoints", "batch", "subset", "probe_batch", "lr", "seed")}
    command = "python bench/dskd_probes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name in names:
        if name in results["variants"] and not args.redo:
            continue
        if args.max_minutes is not None and (time.perf_counter() - started) / 60 > args.max_minutes:
            print(f"[probes] --max-minutes reached; {name} and later not run", flush=True)
            break
        options, hypothesis, what = VARIANTS[name]
        print(f"[probes] {name}: {what}", flush=True)
        record = run_variant(name, options, args.data, teacher, args)
        record.update({"hypothesis": hypothesis, "what": what, "teacher": teacher_info})
        with results_lock():
            save_variant(name, record, budget, teacher_info, command)

    plot(load_results(), PLOT)
    return 0


def results_lock():  # type: ignore[no-untyped-def]
    """An exclusive lock beside the JSON, so two shards never lose each other's variant."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def held():  # type: ignore[no-untyped-def]
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS.with_suffix(".json.lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    return held()


def save_variant(name: str, record: dict[str, Any], budget: dict[str, Any], teacher_info: dict[str, Any],
                 command: str) -> None:
    """Read-modify-write of the results JSON (call under `results_lock`)."""
    results = load_results()
    if results.get("budget") not in (None, budget):
        raise UserError(f"{RESULTS}: made with another budget ({results.get('budget')}); delete it or pass the same")
    results.update({"benchmark": "dskd_probes", "budget": budget, "teacher": teacher_info, "machine": machine_info(),
                    "seeds": [budget["seed"]]})
    results.setdefault("commands", [])
    if command not in results["commands"]:
        results["commands"].append(command)
    results["variants"][name] = record
    results["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic.write_json(RESULTS, results)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
