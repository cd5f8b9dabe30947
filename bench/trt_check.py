"""Prepared check of the TensorRT engine paths, for whenever the code runs on a CUDA machine.

    python bench/trt_check.py --work /tmp/trt_check --results bench/results/trt_check.json

Why it exists: TensorRT and torch-tensorrt cannot run on this project's machines, so their paths
are tested with fakes only. On a CUDA machine this script runs each path that can run there and
records, for each, either what happened (engine built, loaded by the runner, measured, top-1
agreement with PyTorch on random images) or that it could not run and why (module absent, no GPU).
Each check is independent and is written to the results JSON as soon as it ends.

Checks:
- environment: torch / CUDA / GPU, and whether tensorrt, torch_tensorrt, pycuda, trtexec exist;
- onnx-builder: a random resnet8 student -> ONNX -> TensorRT FP16 engine through the Python API
  (export.tensorrt_build) -> measured by the runner (target x86-gpu);
- torch-tensorrt-builder: the same student -> the device build kit (export.torch_trt) ->
  build_torch_trt.py --precision fp16 -> measured by the runner;
- torch-tensorrt-ep: build_torch_trt.py --ep -> the Torch-TensorRT ExportedProgram measured by the
  runner through torch_tensorrt.load.

Nothing here has run yet (no CUDA machine with TensorRT or torch-tensorrt was available): when it
does, its JSON is the first record of those paths on real hardware, to be cited in the README.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import platform
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _module(name: str) -> dict[str, Any]:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - absent or broken: both are results
        return {"present": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
    return {"present": True, "version": str(getattr(mod, "__version__", "?"))}


def environment() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": cuda,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "modules": {m: _module(m) for m in ("tensorrt", "torch_tensorrt", "pycuda", "modelopt")},
            "trtexec": shutil.which("trtexec") or next(
                (p for p in ("/usr/src/tensorrt/bin/trtexec",) if Path(p).exists()), None)}


def _student(work: Path) -> Path:
    import torch

    from dskd.checkpoint import save_model
    from dskd.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_chans=3)
    path = work / "student" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, model.state_dict(), {"model": "resnet8", "num_classes": 10, "class_names": list("abcdefghij"),
                                          "input_size": 32, "in_chans": 3, "mean": [0.5] * 3, "std": [0.25] * 3})
    return path


def _measure(engine: Path, work: Path) -> dict[str, Any]:
    import numpy as np

    from deploy_targets import Protocol, measure, write_eval_npz
    from dskd.checkpoint import build_model

    model, _ = build_model(_student(work))
    x = np.random.default_rng(0).integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    xn = (x / 255.0 - 0.5) / 0.25
    ref = model(__import__("torch").from_numpy(xn.astype(np.float32))).argmax(1).numpy()
    ev = write_eval_npz(work / "eval.npz", x, ref, [0.5] * 3, [0.25] * 3, ref_pred=ref)
    m = measure(engine, "x86-gpu", eval_set=ev, precision="fp16", batch_sizes=(1, 8),
                protocol=Protocol(warmup_seconds=0.5, min_iters=100, min_seconds=1.0))
    return {"p50_ms_batch1": m.latency_at(1)["p50_ms"], "agreement_with_pytorch": m.accuracy.get("agreement"),
            "runtime_version": m.environment.get("runtime_version"), "gpu": m.environment.get("gpu")}


def onnx_builder(work: Path, env: dict[str, Any]) -> dict[str, Any]:
    if not (env["cuda_available"] and env["modules"]["tensorrt"]["present"] and env["modules"]["pycuda"]["present"]):
        return {"ran": False, "why": "needs CUDA, tensorrt and pycuda here (see environment)"}
    from export.api import export_all
    from export.tensorrt_build import build_engine

    manifest = export_all(_student(work), work / "onnx", formats=["onnx"])
    onnx = work / "onnx" / manifest.artifacts[0].path
    engine = work / "onnx" / "model.fp16.engine"
    info = build_engine(onnx, engine, "fp16", (3, 32, 32), batches=(1, 8, 64))
    return {"ran": True, "build": info, **_measure(engine, work)}


def torch_trt_builder(work: Path, env: dict[str, Any]) -> dict[str, Any]:
    if not (env["cuda_available"] and env["modules"]["torch_tensorrt"]["present"]):
        return {"ran": False, "why": "needs CUDA and torch_tensorrt here (see environment)"}
    from export.torch_trt import build_command, parse_result, write_kit

    kit = work / "torch_trt_kit"
    write_kit(_student(work), kit, ["fp16"], batches=(1, 8, 64), device="cuda")
    proc = subprocess.run(build_command(sys.executable, "fp16"), cwd=kit, capture_output=True, text=True,
                          timeout=1800, check=False)
    if proc.returncode != 0:
        return {"ran": True, "ok": False, "exit": proc.returncode, "stderr_tail": proc.stderr[-2000:]}
    return {"ran": True, "ok": True, "build": parse_result(proc.stdout),
            **(_measure(kit / "model.fp16.engine", work) if env["modules"]["pycuda"]["present"] else
               {"measured": False, "why": "pycuda absent: the runner's TensorRT backend needs it"})}


def torch_trt_ep(work: Path, env: dict[str, Any]) -> dict[str, Any]:
    if not (env["cuda_available"] and env["modules"]["torch_tensorrt"]["present"]):
        return {"ran": False, "why": "needs CUDA and torch_tensorrt here (see environment)"}
    import numpy as np

    from deploy_targets import Protocol, measure, write_eval_npz
    from dskd.checkpoint import build_model
    from export.torch_trt import build_command, ep_file, write_kit

    kit = work / "torch_trt_kit"
    write_kit(_student(work), kit, ["fp16"], batches=(1, 8, 64), device="cuda")
    proc = subprocess.run(build_command(sys.executable, "fp16", ep=True), cwd=kit, capture_output=True, text=True,
                          timeout=1800, check=False)
    if proc.returncode != 0 or not (kit / ep_file("fp16")).is_file():
        return {"ran": True, "ok": False, "exit": proc.returncode, "stderr_tail": proc.stderr[-2000:]}
    model, _ = build_model(_student(work))
    x = np.random.default_rng(0).integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    ref = model(__import__("torch").from_numpy(((x / 255.0 - 0.5) / 0.25).astype(np.float32))).argmax(1).numpy()
    ev = write_eval_npz(work / "eval.npz", x, ref, [0.5] * 3, [0.25] * 3, ref_pred=ref)
    m = measure(kit / ep_file("fp16"), "x86-gpu", eval_set=ev, precision="fp16", batch_sizes=(1, 8),
                protocol=Protocol(warmup_seconds=0.5, min_iters=100, min_seconds=1.0))
    return {"ran": True, "ok": True, "runtime": m.runtime, "p50_ms_batch1": m.latency_at(1)["p50_ms"],
            "agreement_with_pytorch": m.accuracy.get("agreement"),
            "runtime_version": m.environment.get("runtime_version")}


def main() -> int:
    from dskd import atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/trt_check")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "trt_check.json"))
    args = ap.parse_args()
    work, results = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "host": platform.node(), "checks": {}}
    env = environment()
    report["environment"] = env
    checks: dict[str, Callable[[Path, dict[str, Any]], dict[str, Any]]] = {
        "onnx-builder": onnx_builder, "torch-tensorrt-builder": torch_trt_builder, "torch-tensorrt-ep": torch_trt_ep}
    for name, fn in checks.items():
        try:
            report["checks"][name] = fn(work / name, env)
        except Exception as exc:  # noqa: BLE001 - recorded, the next check still runs
            report["checks"][name] = {"ran": True, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500],
                                      "traceback": traceback.format_exc()[-3000:]}
        atomic.write_json(results, report)
        print(name, json.dumps(report["checks"][name])[:300], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
