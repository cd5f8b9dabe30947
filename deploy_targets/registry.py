"""Deployment targets as small declarative entries: what runs, in which precision, and where.

Adding a target = adding one entry; the runner, the SSH path and the table read these
fields and know nothing target-specific. A target names the export formats it ships; what
they are (runtime, precision, artifact kind) comes from the format registry, export/formats.py.
"""

from __future__ import annotations

import difflib
import importlib
import platform
import shlex
from dataclasses import dataclass
from pathlib import Path

from dskd.errors import UserError
from export.formats import FORMATS, FormatSpec

from .errors import DeviceError
from .remote.runner import RUNTIME_MODULES
from .ssh import DeviceSpec, SshClient, SshOptions, parse_device

REACH_LOCAL, REACH_SSH, REACH_LOCAL_OR_SSH = "local", "ssh", "local-or-ssh"
JETSON_RELEASE_FILE = Path("/etc/nv_tegra_release")


@dataclass(frozen=True)
class Target:
    """One deployment target.

    `ships` names the export formats it ships (export/formats.py), in order of preference (the
    first one's precision is the default); the runtime, the precisions and the artifact kinds
    are derived from those entries. `also_reads` lists other runtimes whose artifacts its
    runtime can read too (OpenVINO reads ONNX; a TensorRT target runs Torch-TensorRT programs).
    `threads` is the runtime's thread count for the latency numbers: the CPU targets on
    this machine (`cpu`, `intel-cpu`) use 1, because a development or CI machine is shared
    and one thread keeps a regression gate stable; `ssh-cpu` uses 0 = all physical cores of
    the device, what a dedicated deployment runs (docs/benchmarks.md, "Latency fidelity",
    has the measurements). None: a GPU target (no CPU threads). `hint` "latency" measures
    latency only (one request, one stream, inputs bound once); "throughput" also reports
    images/s at the largest batch size with `streams` streams (0: the runtime's choice).
    Every measurement records the values used (Measurement.runtime_config).
    Adding a target on an existing runtime = one entry in TARGETS
    (tests/test_format_registry.py adds one).
    """

    name: str
    ships: tuple[str, ...]
    reach: str
    threads: int | None
    description: str
    also_reads: tuple[str, ...] = ()
    # None: no pinning, because core numbering (big/little, SMT siblings) is device-specific
    cpu_affinity: tuple[int, ...] | None = None
    hint: str = "latency"
    streams: int = 0

    def _specs(self) -> list[FormatSpec]:
        try:
            return [FORMATS[n] for n in self.ships]
        except KeyError as exc:
            raise ValueError(f"target {self.name}: format {exc.args[0]!r} is not in export/formats.py") from None

    @property
    def runtime(self) -> str:
        return self._specs()[0].runtime

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(s.precision for s in self._specs())

    @property
    def export_formats(self) -> tuple[tuple[str, str], ...]:
        """(precision, export format name) pairs."""
        return tuple((s.precision, s.name) for s in self._specs())

    @property
    def formats(self) -> tuple[tuple[str, str], ...]:
        """(precision, artifact kind) pairs."""
        return tuple((s.precision, s.kind) for s in self._specs())

    @property
    def accepts(self) -> tuple[str, ...]:
        """Every artifact kind its runtime reads: its own runtime's, then those of `also_reads`."""
        runtimes = (self.runtime, *self.also_reads)
        specs = sorted((s for s in FORMATS.values() if s.runtime in runtimes),
                       key=lambda s: runtimes.index(s.runtime))
        return tuple(dict.fromkeys(s.kind for s in specs))

    def artifact_format(self, precision: str) -> str:
        return dict(self.formats)[precision]

    def export_format(self, precision: str) -> str:
        return dict(self.export_formats)[precision]

    def availability(
        self,
        device: str | DeviceSpec | None = None,
        ssh: SshOptions | None = None,
        remote_python: str = "python3",
        probe: bool = True,
    ) -> tuple[bool, str]:
        """(can it run here, why / why not). With a device, probe it over SSH when `probe`."""
        if device is not None and self.reach == REACH_LOCAL:
            return False, "runs locally only: drop --device (use ssh-cpu for a remote CPU)"
        if device is not None:
            spec = parse_device(device) if isinstance(device, str) else device
            if not probe:
                return True, f"device {spec} given (not probed)"
            return probe_device(spec, self.runtime, ssh, remote_python)
        if self.reach == REACH_SSH:
            return False, "no --device given: pass --device user@host[:port]"
        if self.reach == REACH_LOCAL_OR_SSH and not is_jetson():
            return (
                False,
                "no --device given and this machine is not a Jetson: pass --device user@jetson",
            )
        return local_availability(self)


def register_target(target: Target, replace: bool = False) -> Target:
    """Add a target (its formats must be registered, and share one runtime)."""
    if target.name in TARGETS and not replace:
        raise ValueError(f"target {target.name!r} is already registered")
    runtimes = {s.runtime for s in target._specs()}
    if len(runtimes) != 1 or len(set(target.precisions)) != len(target.ships):
        raise ValueError(f"target {target.name!r}: its formats must share one runtime and differ in precision")
    if target.runtime not in RUNTIME_MODULES:
        raise ValueError(f"target {target.name!r}: runtime {target.runtime!r} has no runner backend")
    TARGETS[target.name] = target
    return target


_TRT = ("tensorrt-fp16", "tensorrt-int8")
TARGETS: dict[str, Target] = {}
for _target in (
    Target("cpu", ("onnx", "onnx-int8"), REACH_LOCAL, 1, "ONNX Runtime on this machine's CPU"),
    Target("intel-cpu", ("openvino", "openvino-int8"), REACH_LOCAL, 1,
           "OpenVINO CPU, FP32 as true f32 (no bf16), INT8 from NNCF", also_reads=("onnxruntime",)),
    # a Torch-TensorRT ExportedProgram (.ep) is measured through torch_tensorrt.load (runtime torch-tensorrt)
    Target("x86-gpu", _TRT, REACH_LOCAL, None, "TensorRT on a local NVIDIA GPU", also_reads=("torch-tensorrt",)),
    Target("jetson-orin", _TRT, REACH_LOCAL_OR_SSH, None,
           "TensorRT on a Jetson AGX Orin / Orin NX (engine built on the device)", also_reads=("torch-tensorrt",)),
    Target("jetson-orin-nano", _TRT, REACH_LOCAL_OR_SSH, None,
           "TensorRT on a Jetson Orin Nano (engine built on the device)", also_reads=("torch-tensorrt",)),
    Target("ssh-cpu", ("onnx", "onnx-int8"), REACH_SSH, 0,
           "ONNX Runtime on a remote Linux machine over SSH (all physical cores)"),
):
    register_target(_target)


def unregister_target(name: str) -> None:
    """Remove a registered target (a test's toy target, when the test ends)."""
    TARGETS.pop(name, None)


def list_targets() -> list[Target]:
    """Every target, in registry order."""
    return list(TARGETS.values())


def get_target(name: str, where: str = "--target") -> Target:
    """The named target; UserError with the closest names otherwise (`where` names the field)."""
    target = TARGETS.get(str(name).strip().lower())
    if target is None:
        close = difflib.get_close_matches(str(name), list(TARGETS), n=2, cutoff=0.4)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UserError(f"{where} {name!r} is not known: {hint}choose one of {', '.join(TARGETS)}")
    return target


def is_jetson(release_file: Path | None = None) -> bool:
    """NVIDIA's L4T writes this file on every Jetson."""
    return (release_file or JETSON_RELEASE_FILE).is_file()


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError:
        return f"{module} not importable (pip install {module})"
    except Exception as exc:  # installed but broken, e.g. missing CUDA libraries
        return f"{module} fails to import: {' '.join(str(exc).split())[:120]}"
    return None


def _nvidia_gpu_visible() -> bool:
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/version").exists()


def local_availability(target: Target) -> tuple[bool, str]:
    """Can the runner run this target's runtime in this Python, on this machine?"""
    for module in RUNTIME_MODULES[target.runtime]:
        problem = _import_error(module)
        if problem:
            return False, problem
    if target.runtime == "openvino" and platform.machine().lower() not in (
        "x86_64",
        "amd64",
        "aarch64",
        "arm64",
    ):
        return False, f"OpenVINO CPU does not support {platform.machine()}"
    if target.name == "x86-gpu":
        if is_jetson():
            return False, "this is a Jetson: use jetson-orin or jetson-orin-nano"
        if not _nvidia_gpu_visible():
            return False, "no NVIDIA GPU visible (/dev/nvidia0 missing)"
    version = str(
        getattr(importlib.import_module(RUNTIME_MODULES[target.runtime][0]), "__version__", "")
    )
    version = version.split("-")[0]  # openvino: 2026.4.1-22982-<hash>-releases/...
    where = "this Jetson" if target.reach == REACH_LOCAL_OR_SSH else "here"
    return True, f"{target.runtime} {version} {where}".replace("  ", " ")


_PROBE_CODE = """import importlib
missing, versions = [], []
for name in {modules!r}:
    try:
        mod = importlib.import_module(name)
        versions.append(name + " " + str(getattr(mod, "__version__", "")))
    except Exception:
        missing.append(name)
print("MISSING=" + ",".join(missing))
print("VERSIONS=" + ", ".join(versions))
"""


def remote_python_command(remote_python: str) -> str:
    """The device's python as a quoted shell word list (it may carry flags, e.g. 'python3 -I')."""
    parts = shlex.split(remote_python)
    if not parts:
        raise UserError("remote python is empty: give a path such as python3 or /usr/bin/python3")
    return " ".join(shlex.quote(p) for p in parts)


def probe_device(
    device: DeviceSpec, runtime: str, ssh: SshOptions | None, remote_python: str = "python3"
) -> tuple[bool, str]:
    """Log in once and import the runtime with the device's python."""
    modules = ("numpy", *RUNTIME_MODULES[runtime])
    client = SshClient(device, ssh)
    cmd = f"{remote_python_command(remote_python)} -c {shlex.quote(_PROBE_CODE.format(modules=modules))}"
    try:
        result = client.run(
            cmd, timeout_s=client.options.connect_timeout_s + 30, what="probing the device"
        )
    except DeviceError as exc:
        return False, str(exc)
    if result.returncode in (126, 127):
        return (
            False,
            f"{device}: python {remote_python!r} not found there: install python3 or set the remote python",
        )
    missing = next(
        (line[8:] for line in result.stdout.splitlines() if line.startswith("MISSING=")), None
    )
    if result.returncode != 0 or missing is None:
        return (
            False,
            f"{device}: {remote_python!r} failed: {' '.join(result.stderr.split())[-200:]}",
        )
    if missing:
        return False, (
            f"{device}: {remote_python} lacks {missing.replace(',', ', ')}: "
            f"install with '{remote_python} -m pip install {missing.replace(',', ' ')}'"
        )
    versions = next(
        (line[9:] for line in result.stdout.splitlines() if line.startswith("VERSIONS=")), ""
    )
    return True, f"{device} reachable; {versions}"


def targets_table(
    device: str | None = None,
    ssh: SshOptions | None = None,
    remote_python: str = "python3",
    probe: bool = True,
) -> list[dict[str, object]]:
    """Rows of the `targets` table: target, runtime, precisions, reach, can run here, reason.

    A device is only probed for targets that are reached over SSH.
    """
    rows = []
    for t in list_targets():
        dev = device if device is not None and t.reach != REACH_LOCAL else None
        ok, reason = t.availability(dev, ssh=ssh, remote_python=remote_python, probe=probe)
        rows.append(
            {
                "target": t.name,
                "runtime": t.runtime,
                "precisions": ",".join(t.precisions),
                "reach": t.reach,
                "ok": ok,
                "reason": reason,
            }
        )
    return rows


def format_targets_table(
    device: str | None = None,
    ssh: SshOptions | None = None,
    remote_python: str = "python3",
    probe: bool = True,
) -> str:
    """The table as aligned plain text (what `python -m pipeline targets` prints)."""
    rows = targets_table(device, ssh, remote_python, probe)
    header = ("target", "runtime", "precisions", "reached", "here", "reason")
    lines = [
        (
            r["target"],
            r["runtime"],
            r["precisions"],
            r["reach"],
            "yes" if r["ok"] else "no",
            r["reason"],
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*map(str, line)) for line in lines]
    return "\n".join(out)
