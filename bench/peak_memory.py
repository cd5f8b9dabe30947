"""Peak memory of CIFAR-10 training, measured with /usr/bin/time -v, checked against a stated limit.

    python bench/peak_memory.py [--data ../shared/data/cifar10-jpg.tar.gz] [--train-subset 0.2]
                                [--limit-mib 1536] [--out bench/results/peak_memory.json]

Each phase is a fresh `python -m pipeline train` process under `/usr/bin/time -v`:
  decode+train  cold decode cache: all 60,000 JPEGs decoded (2 worker processes), then one
                epoch of resnet20 on a class-balanced subset of the training split and
                evaluation on the whole test split.
  cached+train  the same with the decode cache warm (what every later run does).
  distill       DSKD, resnet8 student from that teacher, one epoch, cache warm.
`time -v` reports the largest resident set of any one process of the tree (its
"Maximum resident set size"); the decode workers are separate processes, so the script also
samples the summed PSS (proportional set size: shared pages counted once) of the whole tree
every 50 ms. Exit status 1 when a phase exceeds --limit-mib (either number), 2 on setup errors.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TIME = Path("/usr/bin/time")

from deploy_targets.remote.runner import cpu_model  # noqa: E402
from dskd.atomic import write_json  # noqa: E402


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeSampler(threading.Thread):
    """Peak of the summed PSS of a process and all its descendants, sampled every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak_kib, self.peak_procs = pid, interval, 0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            procs = _tree(self.pid)
            total = sum(_pss_kib(p) for p in procs)
            if total > self.peak_kib:
                self.peak_kib, self.peak_procs = total, len(procs)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def measure(name: str, args: list[str], env: dict[str, str], work: Path) -> dict:
    cmd = [str(TIME), "-v", sys.executable, "-m", "pipeline", "train", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    sampler.stop()
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    if proc.returncode != 0 or not m:
        sys.stderr.write(err[-3000:])
        raise SystemExit(f"phase {name} failed (exit {proc.returncode})")
    top1 = re.search(r"top1 \(%\)\s+([\d.]+)", out)
    row = {
        "phase": name,
        "command": ("python -m pipeline train " + " ".join(args)).replace(str(work), "$WORK"),
        "max_rss_mib": round(int(m.group(1)) / 1024, 1),
        "tree_pss_peak_mib": round(sampler.peak_kib / 1024, 1),
        "processes_at_peak": sampler.peak_procs,
        "wall_s": round(wall, 1),
        "top1": float(top1.group(1)) if top1 else None,
    }
    print(f"{name:13s} max RSS {row['max_rss_mib']:8.1f} MiB   tree PSS peak {row['tree_pss_peak_mib']:8.1f} MiB"
          f"   ({row['wall_s']} s)", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"))
    ap.add_argument("--train-subset", type=float, default=0.2, help="fraction of the 50,000 training images")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit-mib", type=float, default=1536.0, help="the stated peak for every phase")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "peak_memory.json"))
    a = ap.parse_args()
    if not TIME.exists():
        print(f"{TIME} is missing: apt-get install time", file=sys.stderr)
        return 2
    if not Path(a.data).exists():
        print(f"{a.data}: CIFAR-10 archive not found", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="dskd-peakmem-"))
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": str(a.threads), "DSKD_CACHE": str(work / "cache")}
    common = [f"--data={a.data}", "--epochs=1", f"--train-subset={a.train_subset}", f"--batch-size={a.batch_size}",
              "--device=cpu"]
    try:
        teacher = work / "teacher"
        rows = [
            measure("decode+train", ["--model=resnet20", f"--out={teacher}", *common], env, work),
            measure("cached+train", ["--model=resnet20", f"--out={work / 'teacher2'}", *common], env, work),
            measure("distill", ["--model=resnet8", "--method=dskd", f"--teacher={teacher}",
                                f"--out={work / 'student'}", *common], env, work),
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch

    worst = max(max(r["max_rss_mib"], r["tree_pss_peak_mib"]) for r in rows)
    result = {
        "what": "peak memory of CIFAR-10 training (pipeline train), per phase",
        "limit_mib": a.limit_mib,
        "within_limit": worst <= a.limit_mib,
        "worst_mib": worst,
        "settings": {"data": Path(a.data).name, "train_subset": a.train_subset, "batch_size": a.batch_size,
                     "threads": a.threads, "epochs": 1},
        "phases": rows,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    write_json(a.out, result)
    print(f"worst {worst:.1f} MiB vs stated limit {a.limit_mib:.0f} MiB: "
          f"{'within' if result['within_limit'] else 'OVER'}; wrote {a.out}")
    return 0 if result["within_limit"] else 1


if __name__ == "__main__":
    sys.exit(main())
