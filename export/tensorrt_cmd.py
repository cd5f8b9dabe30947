"""TensorRT version handling and `trtexec` command lines, without needing TensorRT.

What changes between versions (and is unit-tested):
- 8.x and 10.x are "weakly typed": precision comes from flags (`--fp16`, `--int8`,
  `--best`); an INT8 build from a Q/DQ ONNX uses `--int8` (plus `--fp16` so layers
  without Q/DQ may run in FP16). 10.x also takes `--stronglyTyped` (precision from the
  graph alone).
- 11.x removed every precision flag and the calibrator (`--int8`, `--calib`, `--fp16`,
  `--best`): all networks are strongly typed. INT8 therefore comes only from the Q/DQ
  ONNX, and FP16 needs an FP16 ONNX made beforehand (ModelOpt AutoCast).
- `--memPoolSize=workspace:N` exists from 8.4 (earlier: `--workspace=N`, MiB); 10.x and
  later take a unit suffix (`1024M`).
- Build without running: `--skipInference` from 8.6, `--buildOnly` before.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from dskd.errors import UserError

INT8_MODES = ("qdq", "calibrator")


@dataclass(frozen=True, order=True)
class TrtVersion:
    major: int
    minor: int = 0
    patch: int = 0

    @classmethod
    def parse(cls, text: str | int) -> TrtVersion:
        """'10.3.0', '8.6.1.6', '10.3.0.30-1+cuda12.5', 'TensorRT v100300', 'v8601', 100300."""
        s = str(text).strip()
        m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", s)
        if m:
            return cls(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
        m = re.search(r"v?(\d{4,6})\b", s)
        if m:  # NV_TENSORRT_VERSION: 8601 (8.6.1) before 10, 100300 (10.3.0) from 10 on
            n = int(m.group(1))
            if n >= 10000:
                return cls(n // 10000, (n // 100) % 100, n % 100)
            return cls(n // 1000, (n // 100) % 10, n % 100)
        m = re.fullmatch(r"(\d+)", s)
        if m:
            return cls(int(m.group(1)))
        raise UserError(f"TensorRT version '{text}' not understood; expected e.g. 10.3.0")

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @property
    def strongly_typed_only(self) -> bool:
        return self.major >= 11

    @property
    def has_precision_flags(self) -> bool:
        return self.major < 11

    @property
    def has_calibrator(self) -> bool:
        return self.major < 11

    @property
    def has_strongly_typed_flag(self) -> bool:
        return self.major >= 10

    @property
    def has_mem_pool_size(self) -> bool:
        return (self.major, self.minor) >= (8, 4)

    @property
    def has_skip_inference(self) -> bool:
        return (self.major, self.minor) >= (8, 6)


@dataclass(frozen=True)
class BuildPlan:
    """What a build of one precision needs on one TensorRT version (API and trtexec alike)."""

    precision: str  # fp16 | int8
    builder_flags: tuple[str, ...]  # names in trt.BuilderFlag
    strongly_typed: bool
    needs_fp16_onnx: bool  # 11.x: FP16 must be in the graph (ModelOpt AutoCast)
    uses_calibrator: bool
    notes: str


def plan_build(version: TrtVersion, precision: str, int8_mode: str = "qdq",
               strongly_typed: bool = False) -> BuildPlan:
    if precision not in ("fp16", "int8"):
        raise UserError(f"TensorRT precision '{precision}': choose fp16 or int8")
    if int8_mode not in INT8_MODES:
        raise UserError(f"--trt-int8-mode '{int8_mode}': choose {', '.join(INT8_MODES)}")
    if strongly_typed and not (version.has_strongly_typed_flag or version.strongly_typed_only):
        raise UserError(f"--trt-strongly-typed needs TensorRT 10 or later (found {version})")
    if version.strongly_typed_only:
        if precision == "int8" and int8_mode == "calibrator":
            raise UserError(f"TensorRT {version} removed INT8 calibration; use --trt-int8-mode qdq")
        if precision == "fp16":
            return BuildPlan("fp16", (), True, True, False,
                             "TensorRT 11+: strongly typed; FP16 comes from an AutoCast FP16 ONNX")
        return BuildPlan("int8", (), True, False, False,
                         "TensorRT 11+: strongly typed; INT8 from the Q/DQ nodes")
    if strongly_typed:
        if precision == "fp16":
            return BuildPlan("fp16", (), True, True, False,
                             "strongly typed: FP16 comes from an FP16 ONNX")
        if int8_mode == "calibrator":
            raise UserError("--trt-strongly-typed cannot use the INT8 calibrator; use qdq")
        return BuildPlan("int8", (), True, False, False, "strongly typed Q/DQ network")
    if precision == "fp16":
        return BuildPlan("fp16", ("FP16",), False, False, False, "weakly typed, FP16 allowed")
    if int8_mode == "calibrator":
        return BuildPlan("int8", ("INT8", "FP16"), False, False, True,
                         "implicit INT8 with an entropy calibrator (deprecated in 10)")
    return BuildPlan("int8", ("INT8", "FP16"), False, False, False,
                     "explicit INT8 from Q/DQ nodes; FP16 allowed where there are none")


def shape_arg(input_name: str, batch: int, chw: tuple[int, int, int]) -> str:
    return f"{input_name}:{batch}x{chw[0]}x{chw[1]}x{chw[2]}"


def trtexec_command(version: TrtVersion, onnx: str, engine: str, precision: str,
                    chw: tuple[int, int, int], batches: tuple[int, int, int] = (1, 16, 64),
                    input_name: str = "input", timing_cache: str | None = "timing.cache",
                    workspace_mib: int = 1024, int8_mode: str = "qdq",
                    calib_cache: str | None = None, strongly_typed: bool = False,
                    best: bool = False, trtexec: str = "trtexec") -> list[str]:
    """argv of the trtexec build equivalent to `build_engine` for this version."""
    lo, opt, hi = batches
    if not 1 <= lo <= opt <= hi:
        raise UserError(f"TensorRT batch profile {batches}: need 1 <= min <= opt <= max")
    plan = plan_build(version, precision, int8_mode, strongly_typed)
    if best and not version.has_precision_flags:
        raise UserError(f"--best was removed in TensorRT {version.major}; build a strongly typed "
                        "network from a Q/DQ or AutoCast ONNX instead")
    if plan.uses_calibrator and not calib_cache:
        raise UserError("the INT8 calibrator build needs a calibration cache file (--calib)")
    argv = [trtexec, f"--onnx={onnx}", f"--saveEngine={engine}",
            f"--minShapes={shape_arg(input_name, lo, chw)}",
            f"--optShapes={shape_arg(input_name, opt, chw)}",
            f"--maxShapes={shape_arg(input_name, hi, chw)}"]
    if best:
        argv.append("--best")
    else:
        argv += [f"--{flag.lower()}" for flag in plan.builder_flags]
    if plan.uses_calibrator:
        argv.append(f"--calib={calib_cache}")
    if plan.strongly_typed and version.has_strongly_typed_flag and not version.strongly_typed_only:
        argv.append("--stronglyTyped")
    if timing_cache:
        argv.append(f"--timingCacheFile={timing_cache}")
    if version.major >= 10:
        argv.append(f"--memPoolSize=workspace:{workspace_mib}M")
    elif version.has_mem_pool_size:
        argv.append(f"--memPoolSize=workspace:{workspace_mib}")
    else:
        argv.append(f"--workspace={workspace_mib}")
    argv.append("--skipInference" if version.has_skip_inference else "--buildOnly")
    return argv


def command_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


# One representative version per branch of the generated script.
SCRIPT_BRANCHES: tuple[tuple[str, TrtVersion, str], ...] = (
    ("8.[0-5]|8.[0-5].*", TrtVersion(8, 5, 0), "TensorRT 8.0-8.5"),
    ("8.*", TrtVersion(8, 6, 1), "TensorRT 8.6 (JetPack 6.0)"),
    ("9.*|10.*", TrtVersion(10, 3, 0), "TensorRT 9/10 (JetPack 6.1/6.2)"),
    ("*", TrtVersion(11, 0, 0), "TensorRT 11 and later: strongly typed only"),
)


def engine_name(precision: str) -> str:
    return f"model.{precision}.engine"


def build_script(precisions: list[str], chw: tuple[int, int, int], onnx_fp32: str,
                 onnx_qdq: str | None, checksums: dict[str, str],
                 batches: tuple[int, int, int] = (1, 16, 64), workspace_mib: int = 1024,
                 calib_cache: str | None = None, title: str = "model") -> str:
    """A bash script that builds the same engines with trtexec on the device, choosing the
    flags for the TensorRT version it finds there. Files are relative to the script."""
    lines = [
        "#!/usr/bin/env bash",
        f"# Build the TensorRT engines of {title} on this device (engines are device-specific).",
        "# Usage: bash build_trtexec.sh [fp16] [int8]     (default: every precision listed)",
        "# Env: TRTEXEC=/path/to/trtexec  TRT_VERSION=10.3.0 (detected when unset)",
        "# Written by `python -m pipeline export`; the same flags as export.tensorrt_build.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        "if [ -z \"${TRT_VERSION:-}\" ]; then",
        "  TRT_VERSION=\"$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null"
        " || dpkg-query -W -f='${Version}' tensorrt 2>/dev/null || true)\"",
        "fi",
        'if [ -z "$TRT_VERSION" ]; then',
        '  echo "cannot tell the TensorRT version; run again with TRT_VERSION=10.3.0 (say)" >&2',
        "  exit 2",
        "fi",
        "sha256sum -c --quiet - <<'SUMS'",
        *[f"{sha}  {name}" for name, sha in checksums.items()],
        "SUMS",
        "write_info() {  # engine precision: record what built it, beside it",
        "  local gpu",
        "  gpu=\"$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)\"",
        "  [ -n \"$gpu\" ] || gpu=\"$(tr -d '\\000' 2>/dev/null </proc/device-tree/model || echo unknown)\"",
        "  printf '{\"tensorrt_version\": \"%s\", \"gpu_name\": \"%s\", \"precision\": \"%s\", "
        "\"built_by\": \"build_trtexec.sh\", \"built_utc\": \"%s\"}\\n' "
        "\"$TRT_VERSION\" \"${gpu//\\\"/}\" \"$2\" \"$(date -u +%FT%TZ)\" >\"$1.json\"",
        "}",
        'case "$TRT_VERSION" in',
    ]
    for pattern, version, label in SCRIPT_BRANCHES:
        lines.append(f"  {pattern})  # {label}")
        for precision in precisions:
            lines.append(f"    build_{precision}() {{")
            lines += [f"      {cmd}" for cmd in _branch_commands(
                version, precision, chw, onnx_fp32, onnx_qdq, batches, workspace_mib,
                calib_cache)]
            lines.append("    }")
        lines.append("    ;;")
    lines += [
        "esac",
        f'for p in ${{*:-{" ".join(precisions)}}}; do',
        '  case "$p" in',
        *[f"    {p}) build_{p}; write_info {engine_name(p)} {p} ;;" for p in precisions],
        '    *) echo "unknown precision $p (have: ' + " ".join(precisions) + ')" >&2; exit 2 ;;',
        "  esac",
        "done",
        "",
    ]
    return "\n".join(lines)


def _branch_commands(version: TrtVersion, precision: str, chw: tuple[int, int, int],
                     onnx_fp32: str, onnx_qdq: str | None, batches: tuple[int, int, int],
                     workspace_mib: int, calib_cache: str | None) -> list[str]:
    cmds = []
    if precision == "int8":
        if onnx_qdq is None:
            raise UserError("the int8 TensorRT build needs the Q/DQ ONNX")
        use_calib = calib_cache is not None and version.has_calibrator
        argv = trtexec_command(
            version, onnx_fp32 if use_calib else onnx_qdq, engine_name("int8"), "int8", chw,
            batches, workspace_mib=workspace_mib,
            int8_mode="calibrator" if use_calib else "qdq", calib_cache=calib_cache)
    else:
        plan = plan_build(version, "fp16")
        source = onnx_fp32
        if plan.needs_fp16_onnx:
            source = onnx_fp32.removesuffix(".onnx") + ".fp16.onnx"
            cmds.append("python3 -m modelopt.onnx.autocast "
                        f"--onnx_path {shlex.quote(onnx_fp32)} --output_path {shlex.quote(source)}")
        argv = trtexec_command(version, source, engine_name("fp16"), "fp16", chw, batches,
                               workspace_mib=workspace_mib)
    cmds.append('"$TRTEXEC" ' + command_line(argv[1:]))
    return cmds
