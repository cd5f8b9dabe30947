"""Seconds per optimizer step of every method on one batch, plus tensor-op and sync counts.

    python bench/step_cost.py [--device cpu|cuda] [--rounds 6] [--steps 4] [--threads 1]

Why: DSKD's step was measured at 1.7-3.5x a KD step while its extra arithmetic is ~10 % of
KD's; the gap is per-op overhead and host-device syncs. This bench shows both, for the
shipped settings (`pipeline/recipes/cifar10-resnet.toml` [student.options]), resnet20 ->
resnet8, batch 128, bf16 autocast (issue 15).

Timing: every method trains on the same synthetic CIFAR-shaped batch in this one process;
rounds are interleaved (ce, kd, ..., dskd, then again) so load from other jobs on a shared
machine hits all methods alike. A step is what the trainer does: autocast forward, loss
bookkeeping (finite check + running sums), backward, SGD step.
Each round also records this process's CPU time (time.process_time): on a machine shared with
other jobs wall time stretches with their load, CPU time hardly, so `x_kd_cpu` (median over
rounds of the per-round CPU-time ratio to KD) is the steadier figure there.

Counts (one profiled step per method, torch profiler, CPU activity):
- `ops_top`: outermost aten ops (an op a Python line dispatches; ops it calls inside are not
  counted again) - the per-op overhead that dominates small tensors;
- `ops_all`: every aten op including nested ones;
- `syncs`: calls that block the host on a CUDA device: `aten::_local_scalar_dense` (any
  .item()/float()/bool() of a device tensor: device->host read), `aten::nonzero` (data-
  dependent shape: boolean indexing, nonzero), and `aten::lift_fresh` (torch.tensor(...) from
  Python data: a pageable host->device copy). Counted on CPU too, where they do not block,
  so the number says what the same code costs on a GPU.
On CUDA `cuda_syncs` also counts what torch's sync-debug mode reports during one step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import tomllib
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy_targets.remote.runner import cpu_model  # noqa: E402
from dskd.methods import create_distiller  # noqa: E402
from dskd.models import create_model  # noqa: E402

RECIPE = ROOT / "pipeline" / "recipes" / "cifar10-resnet.toml"
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::lift_fresh")
OUT = ROOT / "bench" / "results" / "step_cost.json"


def shipped_dskd_options() -> dict[str, Any]:
    """The [student.options] DSKD ships with, read from the recipe (never copied by hand)."""
    with RECIPE.open("rb") as fh:
        return dict(tomllib.load(fh)["student"]["options"])


def variants() -> list[tuple[str, str, dict[str, Any]]]:
    """(row name, method, options): baselines at their defaults, DSKD as shipped."""
    dskd = shipped_dskd_options()
    return [
        ("ce", "ce", {}), ("kd", "kd", {}), ("dkd", "dkd", {}), ("lshfm", "lshfm", {}),
        ("diffkd", "diffkd", {}), ("dskd", "dskd", dskd), ("dskd_nofeat", "dskd", {**dskd, "w_lsh": 0.0}),
        # what shipped before issue 15's last pass: the denoiser under the trainer's bf16 autocast;
        # the same code otherwise, so dskd vs this row is the float32 denoiser's share, in one process
        ("dskd_v2_bf16", "dskd", {**dskd, "denoiser_precision": "autocast"}),
        # not shipped: 3 DDIM steps, which bench/dskd_steps_probe.py finds changes f̂ at the shipped s
        ("dskd_steps3", "dskd", {**dskd, "steps": 3}),
    ]


def train_step_fn(distiller: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """One trainer-like step; uses the trainer's loss bookkeeping when it exists (LossBook)."""
    opt = torch.optim.SGD(list(distiller.trainable_parameters()), lr=0.01, momentum=0.9, weight_decay=5e-4)
    try:
        from dskd.methods.bookkeeping import LossBook
    except ImportError:  # the code before issue 15: one sync per term, twice
        LossBook = None  # noqa: N806
    book = LossBook() if LossBook is not None else None
    sums: dict[str, float] = {}
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def step() -> None:
        with autocast:
            _, losses = distiller(x, y, 0.5)
        if book is not None:
            loss = book.add(losses)
            if book.bad_terms():
                raise RuntimeError("non-finite loss")
        else:
            bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).all()]
            if bad:
                raise RuntimeError(f"non-finite {bad}")
            loss = sum(v.float() for v in losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if book is None:
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())

    return step, ("LossBook" if book is not None else "per-term float()")


def malloc_setting() -> str:
    """Whether a method fixed glibc's malloc thresholds in this process (DSKD does on CPU, issue 15)."""
    try:
        from dskd.methods import cpu_memory
    except ImportError:  # the code before issue 15's allocator fix (a before/after run of old code)
        return "default"
    return "glibc thresholds fixed (dskd.methods.cpu_memory)" if cpu_memory._state["applied"] else "default"


def count_ops(step, device: torch.device) -> dict[str, int]:
    """Profile one step: outermost and all aten ops, and the would-sync calls (see module doc)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]

    def outermost(e) -> bool:  # noqa: ANN001
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    counts = {
        "ops_top": sum(1 for e in events if outermost(e)),
        "ops_all": len(events),
        "syncs": sum(1 for e in events if e.name in SYNC_OPS),
        "syncs_by_op": {n: sum(1 for e in events if e.name == n) for n in SYNC_OPS},
    }
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
                torch.cuda.synchronize()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts["cuda_syncs"] = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    return counts


DOCS = ROOT / "docs" / "benchmarks.md"
DOCS_START, DOCS_END = "<!-- step-cost:start -->", "<!-- step-cost:end -->"


def render_markdown(runs: dict[str, Any]) -> str:
    """One table per stored run (device/label), generated from the JSON, never typed in."""
    lines = [DOCS_START, "## Training step cost (issue 15, `bench/step_cost.py`)", "",
             "Generated from `bench/results/step_cost.json` by `python bench/step_cost.py --docs-only`. "
             "Seconds per optimizer step (best of interleaved rounds; median in brackets - the spread is "
             "load from other jobs on this shared machine), resnet20 → resnet8, batch 128, bf16 autocast, "
             "DSKD with the shipped `[student.options]`. `× KD (CPU time)` = median over rounds of this process's CPU "
             "seconds per step over KD's (`time.process_time`: what other jobs' load does to wall time barely "
             "touches it; runs before it was recorded show -). `ops` = outermost aten ops per step, `syncs` = calls "
             "that block the host on a GPU (`.item()`-style reads, `nonzero`, `torch.tensor` uploads; "
             "counted on CPU too, see the bench's docstring).", ""]
    for key, run in runs.items():
        m = run["machine"]
        lines += [f"### {key}", "",
                  f"Command: `{run['command']}`. {m['cpu']}, {m['torch_threads']} thread(s), torch {m['torch']}; "
                  f"load average (1/5/15 min) {m['load_avg_before']} before, {m['load_avg_after']} after; "
                  f"seed {run['settings']['seed']}; loss bookkeeping: {run['rows'][0]['bookkeeping']}; "
                  f"malloc: {m.get('malloc', 'default')}.", "",
                  "| method | s / step | × KD (best) | × KD (median of per-round ratios) | × KD (CPU time) | ops "
                  "| ops incl. nested | syncs |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        kd_rounds = next((r["rounds_s"] for r in run["rows"] if r["name"] == "kd"), None)
        for r in run["rows"]:
            xkd = f"{r['x_kd']:.2f}" if r.get("x_kd") is not None else "-"
            paired = (f"{statistics.median(a / b for a, b in zip(r['rounds_s'], kd_rounds, strict=True)):.2f}"
                      if kd_rounds else "-")
            xcpu = f"{r['x_kd_cpu']:.2f}" if r.get("x_kd_cpu") is not None else "-"
            lines.append(f"| {r['name']} | {r['s_per_step_best']:.3f} ({r['s_per_step_median']:.3f}) | {xkd} | {paired} | "
                         f"{xcpu} | {r['ops_top']:,} | {r['ops_all']:,} | {r['syncs']} |")
        lines.append("")
    lines.append(DOCS_END)
    return "\n".join(lines)


def write_docs(runs: dict[str, Any]) -> None:
    """Replace this bench's own section of docs/benchmarks.md (shared file), or append it."""
    from dskd import atomic

    text = DOCS.read_text()
    block = render_markdown(runs)
    if DOCS_START in text and DOCS_END in text:
        head, rest = text.split(DOCS_START, 1)
        text = head + block + rest.split(DOCS_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic.write_text(DOCS, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per method per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated rows (default: all)")
    ap.add_argument("--label", default="", help="free text stored with the run, e.g. before/after")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--docs", action="store_true", help="also rewrite this bench's section of docs/benchmarks.md")
    ap.add_argument("--docs-only", action="store_true", help="only re-render the docs from the JSON")
    args = ap.parse_args()
    if args.docs_only:
        try:
            runs = json.loads(Path(args.out).read_text())["runs"]
        except (OSError, ValueError, KeyError):
            print(f"error: --out {args.out} holds no step_cost runs: run the bench first", file=sys.stderr)
            raise SystemExit(2) from None
        write_docs(runs)
        print(f"wrote {DOCS}")
        return
    if args.device not in ("cpu", "cuda"):
        print(f"error: --device {args.device!r} is not valid: use cpu or cuda", file=sys.stderr)
        raise SystemExit(2)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda asked for but no CUDA GPU is visible; use --device cpu", file=sys.stderr)
        raise SystemExit(2)
    rows = variants()
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in {r[0] for r in rows}]
        if unknown:
            print(f"error: --only {','.join(unknown)} unknown: choose from {','.join(r[0] for r in rows)}",
                  file=sys.stderr)
            raise SystemExit(2)
        rows = [r for r in rows if r[0] in wanted]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = os.getloadavg()
    t_start = time.perf_counter()

    torch.manual_seed(args.seed)
    teacher = create_model("resnet20", num_classes=10, in_chans=3)
    x = torch.randn(args.batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)
    steps: dict[str, Any] = {}
    info: dict[str, dict[str, Any]] = {}
    for name, method, options in rows:
        torch.manual_seed(args.seed)
        student = create_model("resnet8", num_classes=10, in_chans=3)
        d = create_distiller(method, student, teacher if method != "ce" else None, options)
        d.to(device).to(memory_format=torch.channels_last).train()
        fn, book = train_step_fn(d, x, y, device)
        for _ in range(args.warmup):
            fn()
        info[name] = {"method": method, "options": options, "bookkeeping": book, **count_ops(fn, device)}
        steps[name] = fn
        print(f"{name:12s} ops_top={info[name]['ops_top']:5d} syncs={info[name]['syncs']:3d}", flush=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {n: [] for n in steps}
    cpu_times: dict[str, list[float]] = {n: [] for n in steps}  # this process's CPU seconds: load-robust
    for _ in range(args.rounds):
        for name, fn in steps.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps)
            cpu_times[name].append((time.process_time() - c0) / args.steps)
    load_after = os.getloadavg()

    table = []
    kd_best = min(times["kd"]) if "kd" in times else None
    ce_best = min(times["ce"]) if "ce" in times else None
    for name, ts in times.items():
        best = min(ts)
        row = {"name": name, **info[name], "s_per_step_best": round(best, 5),
               "s_per_step_median": round(statistics.median(ts), 5), "rounds_s": [round(t, 5) for t in ts]}
        row["x_kd"] = round(best / kd_best, 3) if kd_best else None
        row["cpu_rounds_s"] = [round(t, 5) for t in cpu_times[name]]
        row["x_kd_cpu"] = (round(statistics.median(a / b for a, b in zip(cpu_times[name], cpu_times["kd"],
                                                                        strict=True)), 3)
                           if "kd" in cpu_times else None)
        row["x_ce"] = round(best / ce_best, 3) if ce_best else None
        table.append(row)
        print(f"{name:12s} {best:.4f} s/step (median {statistics.median(ts):.4f})"
              + (f"  x KD {row['x_kd']:.2f} (CPU time {row['x_kd_cpu']:.2f})" if kd_best else ""), flush=True)

    result = {
        "benchmark": "step_cost",
        "label": args.label,
        "command": "python " + " ".join(sys.argv),
        "machine": {
            "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "device": args.device, "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "load_avg_before": [round(v, 2) for v in load_before],
            "load_avg_after": [round(v, 2) for v in load_after],
            "malloc": malloc_setting(),
        },
        "settings": {
            "teacher": "resnet20", "student": "resnet8", "batch": args.batch, "precision": "bf16 autocast",
            "input": "3x32x32 synthetic N(0,1), 10 classes", "seed": args.seed, "rounds": args.rounds,
            "steps_per_round": args.steps, "warmup": args.warmup, "statistic": "best of rounds (median too)",
            "cpu_time": "x_kd_cpu: median over rounds of this process's CPU seconds per step / KD's (time.process_time)",
            "dskd_options_from": str(RECIPE.relative_to(ROOT)), "sync_ops": list(SYNC_OPS),
        },
        "wall_s": round(time.perf_counter() - t_start, 1),
        "rows": table,
    }
    out = Path(args.out)
    runs: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        runs = json.loads(out.read_text()).get("runs", {})
    key = f"{args.device}/{args.label or 'latest'}"
    runs[key] = result
    from dskd import atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, {"benchmark": "step_cost", "runs": runs})
    print(f"wrote {out} [{key}] in {result['wall_s']} s")
    if args.docs:
        write_docs(runs)
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
