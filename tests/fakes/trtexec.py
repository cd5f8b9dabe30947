"""FAKE `trtexec` executables for tests (NOT NVIDIA's trtexec).

- `fake_trtexec_build(path, mode)`: what a build kit's build_trtexec.sh runs. It prints trtexec's
  version banner (TensorRT 10.3.0), checks the TensorRT 10.x build flags the script passes and
  writes a FAKE engine (JSON that the FAKE `tensorrt` of tests/fakes/trt_runtime.py runs:
  logits = global-average-pool(x) @ w.T, `w` drawn from the ONNX file's sha256). Modes: "ok",
  "fail" (an unsupported-operator error, exit 1) and "slow" (sleeps 120 s).
- `fake_trtexec_measure(path, times, summary)`: what the runner runs with --loadEngine. It writes
  the given --exportTimes sample and prints the given summary.
- `fake_trtexec_recorder(path)`: a bash stand-in that appends its arguments to `$FAKE_LOG` and
  writes a placeholder engine, for checking the command lines a script passes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.fakes import write_exe

BANNER_VERSION = "10.3.0"  # what the FAKE build trtexec's banner says (TensorRT v100300)

_BUILD = '''#!{python}
"""FAKE trtexec for tests (NOT NVIDIA's). Mode: {mode}.
Prints the version banner trtexec prints first, checks the build flags of TensorRT 10.x
and writes a FAKE engine: JSON that the FAKE tensorrt module runs (logits = GAP(x) @ w.T)."""
import hashlib, json, os, random, sys, time
print("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # " + " ".join(sys.argv), flush=True)
if "--help" in sys.argv:
    print("=== Build Options ===")
    sys.exit(0)
mode = {mode!r}
if mode == "fail":
    print("[E] [TRT] ModelImporter.cpp:771: ERROR: No importer registered for op: FakeOp")
    print("&&&& FAILED TensorRT.trtexec [TensorRT v100300]")
    sys.exit(1)
if mode == "slow":
    time.sleep(120)
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
flags = sorted(a for a in sys.argv[1:] if "=" not in a)
onnx = args["onnx"]
int8 = onnx.endswith(".qdq.onnx")
assert ("--int8" in flags) == int8 and "--fp16" in flags and "--skipInference" in flags, sys.argv
assert args["memPoolSize"].startswith("workspace:") and args["timingCacheFile"], sys.argv
import onnx as onnx_lib
model = onnx_lib.load(onnx)
classes = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
dims = [int(d) for d in args["maxShapes"].split(":")[1].split("x")]
blob = open(onnx, "rb").read()
rng = random.Random(hashlib.sha256(blob).hexdigest() + str(int8))
w = [[rng.gauss(0.0, 1.0) for _ in range(dims[1])] for _ in range(classes)]
json.dump({{"w": w, "chw": dims[1:], "max_batch": dims[0], "fake_engine_from": os.path.basename(onnx),
            "onnx_sha256": hashlib.sha256(blob).hexdigest(), "flags": flags}}, open(args["saveEngine"], "w"))
print("[I] Engine built in 0.01 sec.")
print("&&&& PASSED TensorRT.trtexec [TensorRT v100300]")
'''

_MEASURE = '''#!{python}
"""FAKE trtexec for tests (NOT NVIDIA's): writes the constructed --exportTimes sample and
prints the constructed summary, after checking the flags the runner passes."""
import sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
flags = [a for a in sys.argv[1:] if "=" not in a]
assert "loadEngine" in args and "shapes" in args and "--useSpinWait" in flags, sys.argv
open(args["exportTimes"], "w").write({times!r})
sys.stdout.write({summary!r})
'''

_RECORDER = """#!/usr/bin/env bash
# FAKE trtexec for tests (NOT NVIDIA's): records its arguments in $FAKE_LOG, writes a placeholder engine
echo "$@" >> "$FAKE_LOG"
for a in "$@"; do case "$a" in --saveEngine=*) echo fake-engine > "${a#--saveEngine=}";; esac; done
"""


def fake_trtexec_build(path: Path, mode: str = "ok") -> Path:
    """The FAKE build trtexec at `path` (an executable named trtexec), in mode ok / fail / slow."""
    if mode not in ("ok", "fail", "slow"):
        raise ValueError(f"FAKE trtexec mode {mode!r}")
    return write_exe(path, _BUILD.format(python=sys.executable, mode=mode))


def fake_trtexec_measure(path: Path, times: str, summary: str) -> Path:
    """The FAKE measuring trtexec at `path`: --exportTimes gets `times`, stdout gets `summary`."""
    return write_exe(path, _MEASURE.format(python=sys.executable, times=times, summary=summary))


def fake_trtexec_recorder(path: Path) -> Path:
    """The FAKE argument-recording trtexec at `path` (bash; logs to $FAKE_LOG)."""
    return write_exe(path, _RECORDER)


_NVIDIA_SMI = """#!/bin/sh
# FAKE nvidia-smi for tests (NOT NVIDIA's): answers the GPU-name query only.
echo "FAKE GPU 3000"
"""


def fake_nvidia_smi(path: Path) -> Path:
    """A FAKE `nvidia-smi` at `path` that names the GPU "FAKE GPU 3000"."""
    return write_exe(path, _NVIDIA_SMI)
