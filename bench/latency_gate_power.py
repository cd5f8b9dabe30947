"""Power of the latency regression gate: false alarms on unchanged artifacts, catches of real slowdowns.

For the `cpu` (ONNX Runtime) and `intel-cpu` (OpenVINO) targets, every trial is one gate
decision made exactly as `pipeline run --baseline` makes it: pipeline.latency_ab.interleaved_ab
(the same function the deploy stage calls: for these local targets, chunks of interleaved A/B
rounds timed in one runner process, deploy_targets.measure_pair, each side with the recipe's
default protocol shortened for rounds, regression_stats.round_protocol; more chunks while the
rule is undecided, within `gates.regression_budget_s`) and the gate row
(pipeline.gates.paired_latency_row) with the tolerance and `gates.regression_inconclusive` policy.

Conditions per target, interleaved trial by trial:
- A/A: the baseline ONNX against a byte-identical copy (as a re-run of unchanged code gives);
  a trial that does not PASS is a false alarm (FAIL, or INCONCLUSIVE counted as fail).
- A/B at 5 %, 10 %, 20 %: the candidate is the same network plus a side branch of k extra
  3x3 convolutions whose result is added to the logits (scaled by 1e-6, so it is computed
  and kept by every runtime): proportionally more real work, no sleeping. k is calibrated
  per target, and the slowdown each k really causes is MEASURED separately (in-process,
  interleaved, many rounds) and stated as `effect_measured`; a trial that does not PASS is
  a catch.

Writes bench/results/latency_gate_power.json after every decision (resumable: a rerun with the
same settings continues where it stopped). Run (quiet machine, about an hour):
    .venv/bin/python bench/latency_gate_power.py
Smoke run: --trials 2 --max-minutes 10. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from deploy_targets import Protocol, get_target, measure  # noqa: E402
from deploy_targets.remote import runner  # noqa: E402
from dskd.atomic import write_json  # noqa: E402
from pipeline import regression_stats as rs  # noqa: E402
from pipeline.gates import paired_latency_row  # noqa: E402
from pipeline.latency_ab import interleaved_ab, round_protocol_of  # noqa: E402
from pipeline.recipe import GateConfig, TargetConfig  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "latency_gate_power.json"
TARGETS = ("cpu", "intel-cpu")
LEVELS = (0.05, 0.10, 0.20)
AA = "A/A"
FORMAT = 5  # 2: rounds kept by regression_stats.paired_usable; 3: k corrected on a clear interval;
# 4: the gate's rounds are paired in one runner process (pipeline.latency_ab); 5: runner v5, the two
# sides of a round interleaved in X Y Y X blocks (format-4 results: latency_gate_power_runner_v4.json)
SIDE_SCALE = 1e-6  # the side branch's weight in the logits: tiny, but not zero (never optimized away)


# --------------------------------------------------------------------------- artifacts
def _model(units: int, seed: int) -> Any:
    """resnet8x4 (the latency_noise bench's model) plus `units` extra 3x3 convs on a side branch."""
    import torch
    from torch import nn

    from dskd.models import create_model

    class WithSideWork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = create_model("resnet8x4", 10)
            self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1) if units else None
            self.side = nn.Sequential(*[nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
                                        for _ in range(units)])

        def forward(self, x: Any) -> Any:
            logits = self.net(x)
            if self.stem is None:
                return logits
            side = self.side(self.stem(x)).mean(dim=(1, 2, 3))
            return logits + SIDE_SCALE * side[:, None]

    torch.manual_seed(seed)  # the same resnet8x4 weights for every k
    model = WithSideWork()
    torch.manual_seed(seed + 1 + units)
    for m in model.side.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.05)
    return model.eval()


def build_artifact(folder: Path, units: int, seed: int) -> Path:
    """The model with `units` extra convolutions as ONNX (dynamic batch), built once per k."""
    import torch

    path = folder / f"resnet8x4_plus{units}.onnx"
    if path.is_file():
        return path
    torch.set_num_threads(1)
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_model(units, seed), (torch.zeros(1, 3, 32, 32),), str(tmp), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False, opset_version=17)
    os.replace(tmp, path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- effect sizes
def _effect(target: str, base: Path, cand: Path, rounds: int, protocol: Protocol) -> dict[str, Any]:
    """The slowdown of `cand` over `base`: in-process, alternating order, one fresh p50 per side
    per round; median ratio with its sign-test interval (no tolerance: an estimate, not a gate)."""
    tgt = get_target(target)
    runner.require_modules(tgt.runtime)
    import numpy as np

    images = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    backends = {p: runner.load_backend(tgt.runtime, str(p), "fp32", tgt.threads or 1) for p in (base, cand)}
    c, b, kept = [], [], []
    for i in range(rounds):
        got, seen = {}, {}
        for p in ((cand, base) if i % 2 == 0 else (base, cand)):
            e = runner.measure_latency(backends[p], images, 1, protocol)
            got[p], seen[p] = e["p50_ms"], e
        c.append(got[cand])
        b.append(got[base])
        kept.append(rs.paired_usable(seen[cand], seen[base]))  # the gate's rule for a usable round
    use = kept if sum(kept) >= rs.rounds_needed() else None  # too few quiet rounds: use all, and say so
    d = rs.paired_ratio_decision(c, b, 1.0, keep=use)
    # the fastest p50 of each side: what the extra work costs with the least interference
    fastest = min(c) / min(b) - 1
    return {"slowdown": round(d.estimate - 1, 4), "low": round(d.low - 1, 4), "high": round(d.high - 1, 4),
            "fastest_ratio_slowdown": round(fastest, 4),
            "coverage": round(d.coverage, 4), "rounds": rounds, "contended_rounds": rounds - sum(kept),
            "contended_used": use is None and not all(kept), "baseline_p50_ms": round(statistics.median(b), 5)}


def _macs(units: int, seed: int) -> int:
    from dskd.models.profile import count_macs

    return int(count_macs(_model(units, seed)))


def calibrate(target: str, folder: Path, seed: int, rounds: int, state: dict[str, Any], save: Any) -> None:
    """k (extra convolutions) per slowdown level for `target`, and the slowdown each k really causes.

    k starts proportional to the work (multiply-accumulates: resnet8x4 ~177 M, one extra
    convolution ~2.4 M); the slowdown it causes is then measured, and when that measurement is
    clean (at least the 6 uncontended rounds a 95 % interval needs) and off by more than a
    quarter of the level (or its interval, clean or not, lies wholly outside level +- 25 %), k is
    corrected once and measured again. What is stated is always
    the last measurement, whatever it says.
    """
    quick = Protocol(warmup_seconds=0.2, min_iters=50, min_seconds=0.5)
    base = build_artifact(folder, 0, seed)
    cal = state.setdefault("calibration", {}).setdefault(target, {})
    if "macs_per_unit" not in cal:
        base_macs = _macs(0, seed)
        cal["base_macs"], cal["macs_per_unit"] = base_macs, _macs(2, seed) - _macs(1, seed)
    effects = cal.setdefault("effects", {})
    for level in LEVELS:
        key = f"{level:.2f}"
        if key in effects:
            continue
        units = max(1, round(level * cal["base_macs"] / cal["macs_per_unit"]))
        e = _effect(target, base, build_artifact(folder, units, seed), rounds, quick)
        clean = e["rounds"] - e["contended_rounds"] >= rs.rounds_needed()
        off = e["low"] > 1.25 * level or e["high"] < 0.75 * level  # even a busy machine's interval says so
        if e["slowdown"] > 0 and (off or (clean and abs(e["slowdown"] - level) > 0.25 * level)):
            units = max(1, round(units * level / e["slowdown"]))
            e = _effect(target, base, build_artifact(folder, units, seed), rounds, quick)
        effects[key] = {"units": units, **e}
        save()
        print(f"  {target}: {key} -> {units} extra convs, measured slowdown {100 * e['slowdown']:.1f} % "
              f"[{100 * e['low']:.1f}, {100 * e['high']:.1f}] ({e['contended_rounds']} of {e['rounds']} rounds "
              f"contended)", flush=True)


# --------------------------------------------------------------------------- gate decisions
def decide(target: str, cand: Path, base: Path, gates: GateConfig, protocol: Protocol) -> dict[str, Any]:
    """One gate decision, as `pipeline run --baseline` makes it (same rounds, same rule, same row)."""
    def one_side(path: Path) -> Any:  # device targets only; cpu and intel-cpu pair in one process
        return measure(path, target, protocol=round_protocol_of(protocol), batch_sizes=[1], hint="latency")

    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    rec = interleaved_ab(cand, base, target, "fp32", protocol, gates.max_latency_regression,
                         gates.regression_budget_s, measure_side=one_side)
    seconds = time.monotonic() - t0
    row = paired_latency_row({"runtime": get_target(target).runtime, "precision": "fp32",
                              "baseline_comparison": rec}, gates)
    if row is None:
        raise RuntimeError("the gate gave no row for a complete interleaved record")
    d = row.decision or {}
    return {"status": row.status, "passed": row.passed, "estimate": d.get("estimate"), "low": d.get("low"),
            "high": d.get("high"), "rounds": rec["rounds"], "kept": sum(rec["kept"]), "stopped": rec["stopped"],
            "seconds": round(seconds, 2), "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
            "ratios": [round(c / b, 5) for c, b in zip(rec["candidate_p50_ms"], rec["baseline_p50_ms"], strict=True)],
            "kept_rounds": rec["kept"], "sides": rec.get("sides"), "mode": rec.get("mode")}


def summarize(state: dict[str, Any], targets: list[str]) -> dict[str, Any]:
    """The issue's schema per target from the trials done so far."""
    out: dict[str, Any] = {}
    for target in targets:
        trials = [t for t in state["trials"] if t["target"] == target]
        by = {cond: [t for t in trials if t["condition"] == cond] for cond in (AA, *[f"{lv:.2f}" for lv in LEVELS])}
        effects = (state.get("calibration", {}).get(target) or {}).get("effects", {})
        out[target] = {
            "trials": min(len(v) for v in by.values()),
            "false_alarms": sum(not t["passed"] for t in by[AA]),
            "caught": {k: sum(not t["passed"] for t in v) for k, v in by.items() if k != AA},
            "effect_measured": {k: e["slowdown"] for k, e in effects.items()},
            "seconds_per_decision": round(statistics.mean(t["seconds"] for t in trials), 1) if trials else None,
        }
    return out


def details(state: dict[str, Any], targets: list[str]) -> dict[str, Any]:
    """Per target and condition: verdict counts, rounds, time, and the trials' own effect estimate."""
    out: dict[str, Any] = {}
    for target in targets:
        per: dict[str, Any] = {}
        for cond in (AA, *[f"{lv:.2f}" for lv in LEVELS]):
            ts = [t for t in state["trials"] if t["target"] == target and t["condition"] == cond]
            if not ts:
                continue
            per[cond] = {
                "trials": len(ts),
                "verdicts": {s: sum(t["status"] == s for t in ts) for s in ("PASS", "FAIL", "INCONCLUSIVE")},
                "median_estimate": round(statistics.median(t["estimate"] for t in ts if t["estimate"] is not None), 4)
                if any(t["estimate"] is not None for t in ts) else None,
                "rounds": {"median": statistics.median(t["rounds"] for t in ts), "max": max(t["rounds"] for t in ts)},
                "seconds": {"median": round(statistics.median(t["seconds"] for t in ts), 1),
                            "max": round(max(t["seconds"] for t in ts), 1)},
                "contended_rounds": sum(t["rounds"] - t["kept"] for t in ts),
            }
        out[target] = {"conditions": per, "calibration": (state.get("calibration") or {}).get(target)}
    return out


def machine(state: dict[str, Any]) -> dict[str, Any]:
    m = dict(state.get("machine") or {})
    m.setdefault("cpu_model", runner.cpu_model())
    m.setdefault("cores", os.cpu_count())
    m.setdefault("load_average_before", [round(v, 2) for v in os.getloadavg()])
    m["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    m["python"] = sys.version.split()[0]
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: cpu, intel-cpu")
    p.add_argument("--trials", type=int, default=10, help="decisions per condition and target (A/A, 5, 10, 20 %%)")
    p.add_argument("--tolerance", type=float, default=0.05, help="gates.max_latency_regression to judge with")
    p.add_argument("--policy", default="fail", choices=("fail", "pass"), help="gates.regression_inconclusive")
    p.add_argument("--budget-s", type=float, default=GateConfig().regression_budget_s,
                   help="gates.regression_budget_s: seconds of A/B rounds per decision")
    p.add_argument("--effect-rounds", type=int, default=20, help="interleaved rounds measuring each effect size")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop starting decisions after this (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--work", default="", help="folder for the ONNX files (default: TMPDIR/latency_gate_power_work, "
                                              "removed when the run is complete)")
    p.add_argument("--conditions", default="",
                   help="free text stored in the JSON: how the machine was run (load, priorities)")
    p.add_argument("--fresh", action="store_true", help="discard a previous (partial) result instead of resuming")
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in targets:
        if t not in TARGETS:
            print(f"error: --targets {t}: choose from {', '.join(TARGETS)}", file=sys.stderr)
            return 2
    if args.trials < 1 or args.tolerance <= 0 or args.budget_s <= 0 or args.effect_rounds < 6:
        print("error: --trials >= 1, --tolerance > 0, --budget-s > 0 and --effect-rounds >= 6 are required",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "latency_gate_power_work"
    work.mkdir(parents=True, exist_ok=True)
    settings = {"tolerance": args.tolerance, "policy": args.policy, "budget_s": args.budget_s,
                "seed": args.seed, "effect_rounds": args.effect_rounds, "format": FORMAT,
                "round_protocol": rs.round_protocol(TargetConfig().min_iters, TargetConfig().min_seconds)}
    state: dict[str, Any] = {}
    if out.is_file() and not args.fresh:
        old = json.loads(out.read_text())
        if old.get("settings") == settings:
            state = old.get("state") or {}
            print(f"resuming: {len(state.get('trials', []))} decisions already in {out}", flush=True)
        else:
            print(f"{out} was made with other settings: starting afresh (it is replaced)", flush=True)
    state.setdefault("trials", [])
    state["machine"] = machine(state)
    gates = GateConfig(max_latency_regression=args.tolerance, regression_inconclusive=args.policy,
                       regression_budget_s=args.budget_s)
    protocol = round_protocol_of(TargetConfig().protocol())  # the recipe's default, shortened as the deploy stage does
    command = " ".join([".venv/bin/python", "bench/latency_gate_power.py", *(argv if argv is not None else sys.argv[1:])])

    def save(complete: bool = False) -> None:
        state["machine"] = machine(state)
        doc = {"targets": summarize(state, targets), "machine": state["machine"],
               "seeds": {"model": args.seed, "condition_order": args.seed, "effect_images": 0},
               "command": command, "tolerance": args.tolerance, "regression_inconclusive": args.policy,
               "regression_budget_s": args.budget_s, "protocol": {"warmup_seconds": protocol.warmup_seconds,
                                                                   "min_iters": protocol.min_iters,
                                                                   "min_seconds": protocol.min_seconds},
               "conditions": args.conditions,
               "complete": complete, "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "details": details(state, targets), "settings": settings, "state": state}
        write_json(out, doc)

    start = time.monotonic()

    def out_of_time() -> bool:
        return bool(args.max_minutes) and time.monotonic() - start > 60 * args.max_minutes

    for target in targets:
        calibrate(target, work, args.seed, args.effect_rounds, state, save)
    base = build_artifact(work, 0, args.seed)
    same = work / "resnet8x4_plus0_copy.onnx"
    if not same.is_file():
        shutil.copyfile(base, same)
    conds = [AA, *[f"{lv:.2f}" for lv in LEVELS]]
    done = {(t["target"], t["condition"], t["trial"]) for t in state["trials"]}
    stopped_early = False
    for trial in range(args.trials):
        for target in targets:
            order = conds[:]
            random.Random(f"{args.seed}/{trial}/{target}").shuffle(order)
            for cond in order:
                if (target, cond, trial) in done:
                    continue
                if out_of_time():
                    stopped_early = True
                    break
                units = 0 if cond == AA else state["calibration"][target]["effects"][cond]["units"]
                cand = same if cond == AA else build_artifact(work, units, args.seed)
                r = decide(target, cand, base, gates, protocol)
                state["trials"].append({"target": target, "condition": cond, "trial": trial, "units": units,
                                        "candidate_sha256": sha256(cand), **r})
                save()
                print(f"  trial {trial} {target} {cond}: {r['status']} ({'pass' if r['passed'] else 'not passed'}) "
                      f"est {r['estimate']} [{r['low']}, {r['high']}] {r['rounds']} rounds ({r['kept']} kept) "
                      f"{r['seconds']:.0f} s, load {r['load_before']}", flush=True)
    complete = not stopped_early and all((t, c, i) in {(x["target"], x["condition"], x["trial"])
                                                       for x in state["trials"]}
                                         for t in targets for c in conds for i in range(args.trials))
    save(complete)
    if complete and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"targets": summarize(state, targets), "complete": complete}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
