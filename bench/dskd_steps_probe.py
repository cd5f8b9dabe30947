"""Evidence for issue 15: do fewer DDIM steps give DSKD the same target f̂? (no default changes here)

    python bench/dskd_steps_probe.py                    # ks 1,2,3,5, seeds 0,1; ~10 min on one CPU thread
    python bench/dskd_steps_probe.py --train-steps 60 --ks 1,5 --timing-rounds 2

Why: the guided DDIM chain (5 denoiser calls at the shipped `steps = 5`) is most of what a DSKD
step costs over a KD step. `steps` is an option, so changing it re-runs the distillation
benchmark's cells; this bench only measures whether it would be worth it.

What it does: trains DSKD with the shipped `[student.options]` (pipeline/recipes/cifar10-resnet.toml)
for a short budget on a CIFAR-10 subset (bf16 autocast, one torch thread, the distillation
bench's teacher when it exists, as bench/dskd_probes.py), then on a held-out probe batch and one
fixed noise draw computes f̂_k for every k in --ks (only the option `steps` differs) and reports,
against f̂ at the shipped `steps` (the reference, f̂_ref):
- `rel_diff_map` / `rel_diff_pooled`: mean over samples of ‖f̂_k − f̂_ref‖ / ‖f̂_ref − A(f_s)‖ (the
  whole map / the pooled vector the shipped pooled hash reads): how much of the chain's move differs;
- `bit_agree`: share of pooled-hash bits of f̂_k equal to f̂_ref's (all planes, random, head planes);
- `teacher_head_acc`: the teacher head's accuracy on f̂_k; `head_agree`: same argmax as on f̂_ref.
Two reference rows give the scale: `noise_floor` is f̂_ref under ANOTHER noise draw (what the
loss sees change from step to step anyway), `student` is A(f_s) itself (no chain at all).
Then times one training step per k (DSKD with that `steps`, the bench batch of bench/step_cost.py)
interleaved with KD in this process; `x_kd_cpu` = median of per-round CPU-time ratios to KD.

Writes bench/results/dskd_steps_probe.json (machine, load, seeds, command).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from dskd import atomic  # noqa: E402

OUT = ROOT / "bench" / "results" / "dskd_steps_probe.json"


def parse_ks(text: str) -> list[int]:
    """--ks as sorted unique positive ints; one `error:` line and exit 2 otherwise."""
    try:
        ks = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        print(f"error: --ks {text!r} must be comma-separated positive integers, e.g. 1,2,3,5", file=sys.stderr)
        raise SystemExit(2)
    return ks


def train_briefly(d: torch.nn.Module, xs: torch.Tensor, ys: torch.Tensor, bundle: Any, args: argparse.Namespace
                  ) -> dict[str, Any]:
    """args.train_steps DSKD steps (SGD, cosine lr, bf16 autocast), as bench/dskd_probes.py trains."""
    from dskd_probes import train_step

    opt = torch.optim.SGD(list(d.trainable_parameters()), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    losses: dict[str, torch.Tensor] = {}
    for step in range(args.train_steps):
        losses = train_step(d, opt, xs, ys, bundle, gen, step, args.train_steps, args.lr, args.batch)
    return {"steps": args.train_steps, "seconds": round(time.perf_counter() - t0, 1),
            "last_losses": {k: round(float(v.detach()), 4) for k, v in losses.items()}}


def f_hat_for(d: Any, view: torch.Tensor, target: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """DSKD's f̂ with the option `steps` set to `steps` for this call only (same noise, same weights)."""
    from dskd.trainer import autocast_for

    saved = d.options
    d.options = {**saved, "steps": steps}
    try:
        with autocast_for("bf16", torch.device("cpu")):
            f_hat, _ = d.denoise(view, target, noise=noise)
    finally:
        d.options = saved
    return f_hat.float()


def compare(d: Any, f: torch.Tensor, ref: torch.Tensor, view: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The figures of the module doc for one f (a map in the diffusion space) against f̂_ref."""
    from dskd.methods.diffusion_branch import global_pool

    def r(v: torch.Tensor | float) -> float:
        return round(float(v), 4)

    moved = (ref - view).flatten(1).norm(dim=1).clamp(min=1e-12)
    pf, pr, pv = global_pool(f), global_pool(ref), global_pool(view)
    out = {
        "rel_diff_map": r(((f - ref).flatten(1).norm(dim=1) / moved).mean()),
        "rel_diff_pooled": r(((pf - pr).norm(dim=1) / (pr - pv).norm(dim=1).clamp(min=1e-12)).mean()),
    }
    if d.lsh is not None:
        bf, br = d.lsh.hash(pf), d.lsh.hash(pr)
        n = d.lsh.bits
        out["bit_agree"] = r((bf == br).float().mean())
        out["bit_agree_random"] = r((bf[:, :n] == br[:, :n]).float().mean())
        if bf.shape[1] > n:
            out["bit_agree_head"] = r((bf[:, n:] == br[:, n:]).float().mean())
    with torch.no_grad():
        pred, pred_ref = d.space_logits(f).argmax(1), d.space_logits(ref).argmax(1)
    out["teacher_head_acc"] = r((pred == y).float().mean())
    out["head_agree"] = r((pred == pred_ref).float().mean())
    return out


def probe(d: Any, px: torch.Tensor, py: torch.Tensor, ks: list[int], ref_steps: int, seed: int) -> dict[str, Any]:
    """f̂_k for every k on one noise draw, compared with f̂ at ref_steps; buffers left as they were."""
    saved = {name: b.detach().clone() for name, b in d.named_buffers()}
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            z_t, _ = d.teacher_outputs(px)
            f_s = d.student.forward_features(px).float()
            view = d.adapter.frozen_forward(f_s) if d.teacher_space else f_s  # as dskd.methods.probes
            target = d.guidance_target(py, z_t)
            noise = torch.randn(view.shape, generator=gen)
            other = torch.randn(view.shape, generator=gen)
        ref = f_hat_for(d, view, target, noise, ref_steps)
        rows = {str(k): compare(d, f_hat_for(d, view, target, noise, k), ref, view, py) for k in ks}
        return {"per_steps": rows,
                "noise_floor": compare(d, f_hat_for(d, view, target, other, ref_steps), ref, view, py),
                "student": compare(d, view, ref, view, py),
                "teacher_acc": round(float((z_t.argmax(1) == py).float().mean()), 4)}
    finally:
        with torch.no_grad():
            for name, b in d.named_buffers():
                b.copy_(saved[name])


def time_steps(options: dict[str, Any], ks: list[int], rounds: int, steps_per_round: int, seed: int
               ) -> dict[str, Any]:
    """CPU seconds per training step of KD and of DSKD at each k, interleaved (bench/step_cost.py's step)."""
    import step_cost

    from dskd.methods import create_distiller
    from dskd.models import create_model

    torch.manual_seed(seed)
    teacher = create_model("resnet20", num_classes=10, in_chans=3)
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    fns = {}
    for name, method, opts in [("kd", "kd", {})] + [(f"dskd_steps{k}", "dskd", {**options, "steps": k}) for k in ks]:
        torch.manual_seed(seed)
        dist = create_distiller(method, create_model("resnet8", num_classes=10, in_chans=3), teacher, opts)
        dist.to(memory_format=torch.channels_last).train()
        fn, _ = step_cost.train_step_fn(dist, x, y, torch.device("cpu"))
        for _ in range(2):
            fn()
        fns[name] = fn
    cpu: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            c0 = time.process_time()
            for _ in range(steps_per_round):
                fn()
            cpu[name].append((time.process_time() - c0) / steps_per_round)
    return {name: {"cpu_s_per_step_median": round(statistics.median(v), 4), "cpu_rounds_s": [round(t, 4) for t in v],
                   "x_kd_cpu": round(statistics.median(a / b for a, b in zip(v, cpu["kd"], strict=True)), 3)}
            for name, v in cpu.items()}


def mean_rows(per_seed: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each figure averaged over seeds, per row (steps=k, noise_floor, student)."""
    rows: dict[str, list[dict[str, float]]] = {}
    for record in per_seed.values():
        for k, row in record["per_steps"].items():
            rows.setdefault(f"steps={k}", []).append(row)
        for name in ("noise_floor", "student"):
            rows.setdefault(name, []).append(record[name])
    return {name: {key: round(statistics.mean(r[key] for r in rs), 4) for key in rs[0]} for name, rs in rows.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", default="1,2,3,5", help="DDIM step counts to compare")
    ap.add_argument("--ref-steps", type=int, default=5,
                    help="the step count every k is compared with (5: DiffKD's, what DSKD shipped before issue 15)")
    ap.add_argument("--train-steps", type=int, default=150, help="DSKD training steps before probing")
    ap.add_argument("--subset", type=int, default=5000, help="CIFAR-10 training images used")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--probe-batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seeds", default="0,1", help="training seeds (subset, init, noise); one probe per seed")
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--timing-steps", type=int, default=2, help="timed steps per variant per round")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    ks = parse_ks(args.ks)
    try:
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        print(f"error: --seeds {args.seeds!r} must be comma-separated integers, e.g. 0,1", file=sys.stderr)
        return 2
    if args.ref_steps < 1:
        print(f"error: --ref-steps {args.ref_steps} must be >= 1", file=sys.stderr)
        return 2
    if args.train_steps < 1:
        print(f"error: --train-steps {args.train_steps} must be >= 1", file=sys.stderr)
        return 2
    import dskd_probes
    import step_cost

    from dskd.data import class_balanced_subset, load_data, normalize
    from dskd.methods import create_distiller
    from dskd.models import create_model
    from dskd.trainer import load_teacher

    torch.set_num_threads(1)
    load_before, t_start = os.getloadavg(), time.perf_counter()
    options = step_cost.shipped_dskd_options()
    bundle = load_data(dskd_probes.DATA, progress=False)
    teacher_path, teacher_info = dskd_probes.get_teacher(dskd_probes.DATA, 3, 10000)
    per_seed: dict[str, Any] = {}
    resolved: dict[str, Any] = {}
    ref_steps = 0
    for seed in seeds:
        torch.manual_seed(seed)
        idx = class_balanced_subset(bundle.train_y, args.subset, seed=seed)
        rest = torch.ones(len(bundle.train_y), dtype=torch.bool)
        rest[idx] = False
        held = torch.nonzero(rest).flatten()
        probe_idx = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(1))[: args.probe_batch]]
        px = normalize(bundle.train_x[probe_idx], bundle.mean, bundle.std)
        py = bundle.train_y[probe_idx]
        t_model, _ = load_teacher(str(teacher_path), bundle.class_names, 3)
        student = create_model("resnet8", num_classes=len(bundle.class_names))
        d = create_distiller("dskd", student, t_model, options).train()
        resolved, ref_steps = d.options, args.ref_steps
        args.seed = seed
        training = train_briefly(d, bundle.train_x[idx], bundle.train_y[idx], bundle, args)
        print(f"[steps-probe] seed {seed}: trained {training['steps']} steps in {training['seconds']} s", flush=True)
        probes = probe(d, px, py, sorted(set(ks) | {ref_steps}), ref_steps, seed)
        for k, row in probes["per_steps"].items():
            print(f"[steps-probe] seed {seed} steps={k}: {row}", flush=True)
        print(f"[steps-probe] seed {seed} noise floor: {probes['noise_floor']}", flush=True)
        print(f"[steps-probe] seed {seed} student A(f_s): {probes['student']}", flush=True)
        per_seed[str(seed)] = {"training": training, **probes}
    timing = time_steps(options, ks, args.timing_rounds, args.timing_steps, seeds[0])
    for name, row in timing.items():
        print(f"[steps-probe] {name}: {row['cpu_s_per_step_median']} CPU s/step, x KD {row['x_kd_cpu']}", flush=True)
    result = {
        "benchmark": "dskd_steps_probe",
        "command": "python " + " ".join(sys.argv),
        "machine": {**dskd_probes.machine_info(), "load_avg_before": [round(v, 2) for v in load_before],
                    "load_avg_after": [round(v, 2) for v in os.getloadavg()]},
        "seeds": {"train_noise_subset": seeds, "probe_batch_pick": 1, "timing": seeds[0]},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "seed")},
        "options": options, "resolved_options": resolved, "reference_steps": ref_steps,
        "teacher": teacher_info, "per_seed": per_seed, "mean_over_seeds": mean_rows(per_seed),
        "step_cost": timing,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic.write_json(args.out, result)
    print(f"[steps-probe] wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
