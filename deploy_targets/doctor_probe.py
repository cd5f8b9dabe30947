"""The doctor's bash probes, and running one here or on the device over SSH.

One script asks a machine everything at once (python and its modules, trtexec, CUDA, the
Jetson board files) so the doctor logs in once; its answer is tagged lines (`TAG=value`,
`TAG|...`) that doctor_board and doctor_checks parse. `root` prefixes every file the probe
reads and its command search path: "" in production, a FAKE Jetson file system in tests.
"""

from __future__ import annotations

import shlex
import shutil

from .engine_build import probe_script
from .errors import DeviceError
from .registry import remote_python_command
from .ssh import DeviceSpec, SshClient, SshOptions, run_bounded

# Imported with the device's python to say what is there (one line per module).
_PY_CODE = """import importlib, platform, sys
print("PYTHON=" + platform.python_version() + " " + sys.executable)
for name in sys.argv[1:]:
    try:
        mod = importlib.import_module(name)
        print("MOD=" + name + " ok " + str(getattr(mod, "__version__", "?")).split()[0])
    except ImportError as exc:
        print("MOD=" + name + " missing " + " ".join(str(exc).split())[:160])
    except Exception as exc:
        print("MOD=" + name + " broken " + type(exc).__name__ + ": " + " ".join(str(exc).split())[:160])
"""


def _prefix_path(root: str) -> list[str]:
    """Look for commands under the root first (a fake Jetson in tests), then in sbin dirs too."""
    return [
        f"R={shlex.quote(root)}",
        'if [ -n "$R" ]; then PATH="$R/usr/local/bin:$R/usr/bin:$R/usr/sbin:$PATH"; fi',
        'PATH="$PATH:/usr/sbin:/sbin"; export PATH',
        'TO=""; if command -v timeout >/dev/null 2>&1; then TO="timeout -k 2 20"; fi',
    ]


def board_script(root: str = "") -> str:
    """bash: L4T release, JetPack, power mode, clock state and temperatures, as tagged lines."""
    return "\n".join([
        *_prefix_path(root),
        'if [ -r "$R/etc/nv_tegra_release" ]; then echo "TEGRA=$(head -n1 "$R/etc/nv_tegra_release")"; fi',
        "echo \"JETPACK=$(dpkg-query -W -f='${Version}' nvidia-jetpack 2>/dev/null || true)\"",
        "echo \"BOARD_MODEL=$(tr -d '\\000' <\"$R/proc/device-tree/model\" 2>/dev/null || true)\"",
        'if command -v nvpmodel >/dev/null 2>&1; then',
        '  $TO nvpmodel -q 2>&1 | sed "s/^/NVP|/"; echo "NVP_RC=${PIPESTATUS[0]}"',
        "fi",
        'grep -h "POWER_MODEL" "$R/etc/nvpmodel.conf" 2>/dev/null | sed "s/^/NVPCONF|/"',
        'if command -v jetson_clocks >/dev/null 2>&1; then',
        '  $TO jetson_clocks --show 2>&1 | sed "s/^/CLK|/"; echo "CLK_RC=${PIPESTATUS[0]}"',
        "fi",
        'for c in "$R"/sys/devices/system/cpu/cpu[0-9]*/cpufreq; do',
        '  [ -r "$c/scaling_max_freq" ] || continue',
        '  n="$(basename "$(dirname "$c")")"',
        '  echo "CPUFREQ|$n|$(cat "$c/scaling_min_freq" 2>/dev/null)|$(cat "$c/scaling_max_freq" 2>/dev/null)'
        '|$(cat "$c/cpuinfo_max_freq" 2>/dev/null)|$(cat "$c/scaling_cur_freq" 2>/dev/null)"',
        "done",
        'for d in "$R"/sys/class/devfreq/*; do',
        '  [ -r "$d/cur_freq" ] || continue',
        '  top="$(tr " " "\\n" <"$d/available_frequencies" 2>/dev/null | sort -n | tail -n1)"',
        '  echo "DEVFREQ|$(basename "$d")|$(cat "$d/min_freq" 2>/dev/null)|$(cat "$d/max_freq" 2>/dev/null)'
        '|$top|$(cat "$d/cur_freq" 2>/dev/null)"',
        "done",
        'for z in "$R"/sys/devices/virtual/thermal/thermal_zone*; do',
        '  [ -r "$z/temp" ] || continue',
        '  passive=""',
        '  for t in "$z"/trip_point_*_type; do',
        '    [ -r "$t" ] && [ "$(cat "$t")" = passive ] || continue',
        '    v="$(cat "${t%_type}_temp" 2>/dev/null)"',
        '    if [ -z "$passive" ] || [ "$v" -lt "$passive" ] 2>/dev/null; then passive="$v"; fi',
        "  done",
        '  echo "TZ|$(cat "$z/type" 2>/dev/null)|$(cat "$z/temp" 2>/dev/null)|$passive"',
        "done",
        "",
    ])


def doctor_script(modules: tuple[str, ...], python: str, root: str = "",
                  trtexec: str | None = None, tensorrt: bool = False) -> str:
    """bash: everything the doctor asks of a machine (python, modules, trtexec, CUDA, board)."""
    py = remote_python_command(python)
    lines = [
        *_prefix_path(root),
        'echo "HOST=$(uname -n 2>/dev/null)"',
        'TOPY=""; if [ -n "$TO" ]; then TOPY="timeout -k 2 90"; fi',
        f"$TOPY {py} -c {shlex.quote(_PY_CODE)} {' '.join(shlex.quote(m) for m in modules)} 2>&1 "
        '| sed "s/^/PY|/"; echo "PY_RC=${PIPESTATUS[0]}"',
    ]
    if tensorrt:
        # engine_build's own trtexec probe (TRTEXEC=, BANNER=, PYTRT=, DPKG=, GPU=) in a subshell
        lines += ["(", probe_script(trtexec, python), ")"]
        lines += [
            'v="$(sed -n \'s/.*"version" *: *"\\([0-9.]*\\)".*/\\1/p\' "$R/usr/local/cuda/version.json" '
            "2>/dev/null | head -n1)\"",
            'if [ -z "$v" ]; then v="$(sed -n \'s/^CUDA Version \\([0-9.]*\\).*/\\1/p\' '
            '"$R/usr/local/cuda/version.txt" 2>/dev/null | head -n1)"; fi',
            'if [ -z "$v" ] && command -v nvcc >/dev/null 2>&1; then '
            'v="$(nvcc --version 2>/dev/null | sed -n \'s/.*release \\([0-9.]*\\).*/\\1/p\')"; fi',
            'echo "CUDA=$v"',
        ]
    return "\n".join([*lines, board_script(root)])


def tagged(stdout: str, tag: str) -> list[str]:
    """The lines the probe printed as `TAG|...`, without the tag."""
    prefix = tag + "|"
    return [ln[len(prefix):] for ln in stdout.splitlines() if ln.startswith(prefix)]


def run_script(script: str, spec: DeviceSpec | None, ssh: SshOptions | None, timeout_s: float,
                what: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of bash `script` here or on the device; ssh failures raise."""
    if spec is None:
        if shutil.which("bash") is None:
            raise DeviceError("local", "bash is not installed: install bash")
        res = run_bounded(["bash", "-c", script], timeout_s)
    else:
        res = SshClient(spec, ssh).run(f"bash -c {shlex.quote(script)}", timeout_s=timeout_s, what=what)
    if res.timed_out:
        raise DeviceError(str(spec or "local"), f"{what} did not finish within {timeout_s:.0f} s: "
                          "check the device's load, then retry")
    return res.returncode, res.stdout, res.stderr
