"""TEST DOUBLES for what cannot run on this project's machines (NVIDIA tools, a Jetson board).

Everything here is a fake and named as one; no test that uses them proves anything about
real TensorRT, torch-tensorrt or Jetson hardware, only about our code around them.

- `trt_runtime`: FAKE `tensorrt` + `pycuda` python packages (numpy underneath);
- `trtexec`: FAKE `trtexec` executables (engine build, measurement, argument recorder);
- `torch_trt`: FAKE `torch_tensorrt` (build, save and the runner's `load`), `tensorrt` (version
  only) and ModelOpt packages;
- `jetson`: a FAKE Jetson file system with FAKE `nvpmodel` / `jetson_clocks` / `trtexec`;
- `device`: the shared set-up of the device tests (a REAL loopback sshd, the FAKE tools above).
"""

from __future__ import annotations

import stat
from pathlib import Path


def write_text(path: Path, text: str) -> Path:
    """Write `text` to `path`, making its folder first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_exe(path: Path, text: str) -> Path:
    """Write an executable script (a FAKE tool) to `path`."""
    write_text(path, text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path
