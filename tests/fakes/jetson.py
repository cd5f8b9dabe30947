"""A FAKE Jetson file system for the doctor's tests (NOT an NVIDIA board, NOT NVIDIA's tools).

`make_fake_jetson(root)` writes, under `root`, what the doctor reads on a real Jetson:
/etc/nv_tegra_release, /etc/nvpmodel.conf, thermal zones and cpufreq/devfreq in /sys, CUDA's
version.json, and FAKE `nvpmodel`, `jetson_clocks` and `trtexec` scripts in usr/sbin and
usr/bin (the doctor searches `root`'s bin folders first). It also writes FAKE python modules
(tensorrt, pycuda, torch, torch_tensorrt) that only carry a version, for `PYTHONPATH=`.
The board's state (power mode, clocks locked, temperature) is set with `set_state`.
"""

from __future__ import annotations

from pathlib import Path

from tests.fakes import write_exe as _exe
from tests.fakes import write_text as _write

RELEASE = ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
           "DATE: Wed Jan  8 01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\n")
POWER_MODES = ((0, "MAXN"), (1, "15W"), (2, "30W"), (3, "50W"))  # as on an AGX Orin 64GB
CPU_MIN, CPU_MAX = 729600, 2201600
GPU_MIN, GPU_MAX = 306000000, 1300500000

FAKE_NVPMODEL = """#!/bin/sh
# FAKE nvpmodel for tests (NOT NVIDIA's): answers -q from the fake board's state file.
[ "$1" = "-q" ] || { echo "FAKE nvpmodel: only -q" >&2; exit 2; }
read id name < "{state}/power_mode"
echo "NV Power Mode: $name"
echo "$id"
"""

FAKE_JETSON_CLOCKS = """#!/bin/sh
# FAKE jetson_clocks for tests (NOT NVIDIA's): --show prints the fake board's clocks.
[ "$1" = "--show" ] || { echo "FAKE jetson_clocks: only --show" >&2; exit 2; }
if [ -f "{state}/needs_root" ]; then echo "Error: Run jetson_clocks as root" >&2; exit 1; fi
read locked < "{state}/clocks"
lo={cpu_min}; glo={gpu_min}
if [ "$locked" = locked ]; then lo={cpu_max}; glo={gpu_max}; fi
echo "SOC family:tegra234  Machine:FAKE Jetson AGX Orin"
echo "Online CPUs: 0-1"
for c in 0 1; do
  echo "cpu$c: Online=1 Governor=schedutil MinFreq=$lo MaxFreq={cpu_max} CurrentFreq=$lo IdleStates: WFI=1 c7=1"
done
echo "GPU MinFreq=$glo MaxFreq={gpu_max} CurrentFreq=$glo"
echo "EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=0"
read id name < "{state}/power_mode"
echo "NV Power Mode: $name"
"""

FAKE_TRTEXEC_BANNER = """#!/bin/sh
# FAKE trtexec for tests (NOT NVIDIA's): prints the version banner only.
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{banner}] # trtexec $*"
echo "=== Model Options ==="
"""

FAKE_MODULE = '"""FAKE {name} for tests (NOT the real package): carries a version only."""\n__version__ = "{version}"\n'


def make_fake_jetson(root: Path, *, trtexec_banner: str | None = "100300", cuda: str = "12.6.68") -> Path:
    """Write the FAKE Jetson under `root` (at MAXN, clocks locked, 45 °C); returns `root`."""
    state = root / "fake-state"
    state.mkdir(parents=True, exist_ok=True)
    _write(root / "etc" / "nv_tegra_release", RELEASE)
    _write(root / "etc" / "nvpmodel.conf", "".join(
        f"< POWER_MODEL ID={i} NAME={n} >\nCPU_ONLINE CORE_0 1\n" for i, n in POWER_MODES))
    _write(root / "proc" / "device-tree" / "model", "FAKE Jetson AGX Orin Developer Kit\0")
    _write(root / "usr" / "local" / "cuda" / "version.json",
           f'{{\n   "cuda" : {{\n      "name" : "CUDA SDK",\n      "version" : "{cuda}"\n   }},\n'
           '   "libcublas" : {\n      "version" : "12.6.1.4"\n   }\n}\n')
    fmt = dict(state=state, cpu_min=CPU_MIN, cpu_max=CPU_MAX, gpu_min=GPU_MIN, gpu_max=GPU_MAX)
    _exe(root / "usr" / "sbin" / "nvpmodel", FAKE_NVPMODEL.replace("{state}", str(state)))
    text = FAKE_JETSON_CLOCKS
    for key, value in fmt.items():
        text = text.replace("{" + key + "}", str(value))
    _exe(root / "usr" / "bin" / "jetson_clocks", text)
    if trtexec_banner is not None:
        _exe(root / "usr" / "bin" / "trtexec", FAKE_TRTEXEC_BANNER.replace("{banner}", trtexec_banner))
    set_state(root)
    return root


def set_state(root: Path, *, power_mode: int = 0, clocks_locked: bool = True, temp_c: float = 45.0,
              jetson_clocks_needs_root: bool = False) -> None:
    """Put the FAKE board in a state: power mode id, clocks locked or not, temperature of zone 0."""
    state = root / "fake-state"
    name = dict(POWER_MODES)[power_mode]
    (state / "power_mode").write_text(f"{power_mode} {name}\n")
    (state / "clocks").write_text("locked\n" if clocks_locked else "unlocked\n")
    (state / "needs_root").unlink(missing_ok=True)
    if jetson_clocks_needs_root:
        (state / "needs_root").write_text("")
    lo, glo = (CPU_MAX, GPU_MAX) if clocks_locked else (CPU_MIN, GPU_MIN)
    for cpu in (0, 1):
        d = root / "sys" / "devices" / "system" / "cpu" / f"cpu{cpu}" / "cpufreq"
        for key, value in (("scaling_min_freq", lo), ("scaling_max_freq", CPU_MAX),
                           ("cpuinfo_max_freq", CPU_MAX), ("scaling_cur_freq", lo)):
            _write(d / key, f"{value}\n")
    gpu = root / "sys" / "class" / "devfreq" / "17000000.gpu"
    for key, value in (("min_freq", glo), ("max_freq", GPU_MAX), ("cur_freq", glo),
                       ("available_frequencies", f"{GPU_MIN} 612000000 {GPU_MAX}")):
        _write(gpu / key, f"{value}\n")
    zones = (("cpu-thermal", temp_c, 99.0), ("gpu-thermal", min(temp_c, 40.0), 99.0))
    for i, (kind, temp, passive) in enumerate(zones):
        z = root / "sys" / "devices" / "virtual" / "thermal" / f"thermal_zone{i}"
        _write(z / "type", kind + "\n")
        _write(z / "temp", f"{int(temp * 1000)}\n")
        _write(z / "trip_point_0_type", "passive\n")
        _write(z / "trip_point_0_temp", f"{int(passive * 1000)}\n")
        _write(z / "trip_point_1_type", "critical\n")
        _write(z / "trip_point_1_temp", "104500\n")


def write_fake_python_lib(lib: Path, *, tensorrt: str | None = "10.3.0", torch: str | None = "2.8.0",
                          torch_tensorrt: str | None = "2.8.0", pycuda: str | None = "2024.1") -> Path:
    """FAKE importable packages (version only) for the device's `PYTHONPATH`; None leaves one out
    (so the real one, if any, or nothing is found)."""
    for name, version in (("tensorrt", tensorrt), ("torch", torch), ("torch_tensorrt", torch_tensorrt),
                          ("pycuda", pycuda)):
        if version is not None:
            _write(lib / name / "__init__.py", FAKE_MODULE.format(name=name, version=version))
    return lib
