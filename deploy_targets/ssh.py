"""Reach a device with the system OpenSSH client: bounded, quoted, host keys always checked.

We call `ssh`/`scp` rather than a Python SSH library so users' ~/.ssh/config, keys,
agents and jump hosts just work. Every call has a timeout and runs in its own process
group, which is killed on timeout, so a dead link never hangs the pipeline. BatchMode
means no password prompt ever waits on a terminal; StrictHostKeyChecking=yes means an
unknown or changed host key is an error, never silently accepted.

Arguments are never ambiguous: options come first and `--` ends them (ssh and scp both use
getopt), local paths are made absolute (so `-oProxyCommand=...onnx` or `host:file` in a file
name stays a file name: pathlib drops a leading `./`), and remote paths must be absolute and
of plain characters (we only ever create them: `mktemp` folders and fixed names in them).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dskd.errors import UserError

from .errors import DeviceError

_USER = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,63}")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_SAFE_REMOTE_DIR = re.compile(r"/[A-Za-z0-9._/-]*dskd-bench\.[A-Za-z0-9]+")
REMOTE_DIR_PREFIX = "dskd-bench."
_SUBDIR = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_PLAIN_REMOTE_PATH = re.compile(r"(/[A-Za-z0-9._][A-Za-z0-9._-]*)+/?")


def local_operand(path: str | os.PathLike) -> str:
    """An absolute local path: never read as an option (`-o...`) or a remote (`host:path`)."""
    return os.path.abspath(os.fspath(path))


def remote_operand(path: str) -> str:
    """A remote path checked to be absolute and plain (no shell, glob or option characters)."""
    if not _PLAIN_REMOTE_PATH.fullmatch(path) or "/../" in f"{path}/" or "/./" in f"{path}/":
        raise UserError(f"remote path {path!r}: must be absolute and use only letters, digits, '.', '_', "
                        "'-' (not first) and '/'; choose another remote_tmp")
    return path


@dataclass(frozen=True)
class DeviceSpec:
    """`user@host[:port]` as given on the command line (user and port optional)."""

    host: str
    user: str | None = None
    port: int | None = None

    @property
    def destination(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" if self.user else host

    @property
    def ssh_destination(self) -> str:
        """ssh takes IPv6 addresses bare (the port goes to -p)."""
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        return f"{self.destination}:{self.port}" if self.port else self.destination

    def command_hint(self, tool: str = "ssh") -> str:
        """How the user would type it (ssh takes the port as -p, not host:port)."""
        return (
            f"{tool} -p {self.port} {self.destination}"
            if self.port
            else f"{tool} {self.destination}"
        )


def parse_device(spec: str) -> DeviceSpec:
    """Validate `user@host[:port]` (also `host`, an ~/.ssh/config alias, or `user@[v6]:port`)."""
    text = str(spec).strip()
    fix = "expected user@host[:port], e.g. nvidia@192.168.1.20 or nvidia@jetson.local:2222"
    user = None
    if "@" in text:
        user, _, text = text.rpartition("@")
        if not _USER.fullmatch(user):
            raise UserError(f"--device {spec!r}: bad user name {user!r}: {fix}")
    port_text = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not _IPV6.fullmatch(host) or (rest and not rest.startswith(":")):
            raise UserError(f"--device {spec!r}: bad IPv6 address: {fix}")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
    if not host or not _HOST.fullmatch(host) and not _IPV6.fullmatch(host):
        raise UserError(f"--device {spec!r}: bad host name {host!r}: {fix}")
    if host.startswith("-"):
        raise UserError(f"--device {spec!r}: a host cannot start with '-': {fix}")
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise UserError(f"--device {spec!r}: port must be 1..65535, got {port_text!r}: {fix}")
        port = int(port_text)
    return DeviceSpec(host=host, user=user, port=port)


@dataclass(frozen=True)
class SshOptions:
    """Client settings; None means 'whatever ~/.ssh/config says'."""

    connect_timeout_s: int = 10
    server_alive_interval_s: int = 5
    server_alive_count_max: int = 3
    known_hosts_file: Path | None = None  # an explicit known_hosts instead of ~/.ssh/known_hosts
    identity_file: Path | None = None
    config_file: Path | None = None  # -F: replaces ~/.ssh/config (tests, CI)
    jump_host: str | None = None  # -J user@bastion
    ssh_binary: str = "ssh"
    scp_binary: str = "scp"
    scp_legacy: bool = False  # scp -O: the old protocol, for devices without an SFTP server

    def common_args(self) -> list[str]:
        """Options shared by ssh and scp (port is spelled differently, so not here)."""
        args: list[str] = []
        if self.config_file is not None:
            args += ["-F", str(self.config_file)]
        args += [
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"ConnectTimeout={int(self.connect_timeout_s)}",
            "-o", f"ServerAliveInterval={int(self.server_alive_interval_s)}",
            "-o", f"ServerAliveCountMax={int(self.server_alive_count_max)}",
            "-o", "LogLevel=ERROR",
        ]  # fmt: skip
        if self.known_hosts_file is not None:
            args += ["-o", f"UserKnownHostsFile={self.known_hosts_file}"]
        if self.identity_file is not None:
            args += ["-i", str(self.identity_file), "-o", "IdentitiesOnly=yes"]
        if self.jump_host:
            parse_device(self.jump_host)  # same validation: no option injection
            args += ["-J", self.jump_host]
        return args


@dataclass
class CommandResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False


def run_bounded(args: Sequence[str], timeout_s: float) -> CommandResult:
    """Run an argument list (no shell) with a hard timeout; kill its process group on expiry."""
    try:
        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            text=True,
            errors="replace",
        )
    except FileNotFoundError as exc:
        raise UserError(
            f"{args[0]} is not installed: install the OpenSSH client (apt install openssh-client)"
        ) from exc
    try:
        out, err = proc.communicate(timeout=timeout_s)
        return CommandResult(proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        return CommandResult(
            proc.returncode if proc.returncode is not None else -9, out, err, timed_out=True
        )
    except BaseException:
        _kill_group(proc)
        proc.communicate()
        raise


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def classify_ssh_failure(stderr: str, device: DeviceSpec, options: SshOptions) -> str:
    """Turn OpenSSH's stderr into one actionable sentence (without the host prefix)."""
    text = " ".join(stderr.split())
    low = text.lower()
    port = device.port or 22
    known = options.known_hosts_file or "~/.ssh/known_hosts"
    if "remote host identification has changed" in low or (
        "host key for" in low and "has changed" in low
    ):
        return (
            f"host key does not match the one in {known} (possible man-in-the-middle, or the device "
            f"was reinstalled): verify the new fingerprint, then run ssh-keygen -R {device.host} "
            f"and connect once by hand"
        )
    if "host key is known for" in low or "host key verification failed" in low:
        return (
            f"host key is not in {known}: connect once by hand ({device.command_hint()}) and check the "
            "fingerprint, or pass a known_hosts file that lists it"
        )
    if "could not resolve hostname" in low or "name or service not known" in low:
        return "host name not known: check the spelling or add a Host entry to ~/.ssh/config"
    if "connection refused" in low:
        return f"connection refused on port {port}: check the host and port and that sshd runs on the device"
    if "permission denied" in low or "too many authentication failures" in low:
        return (
            f"login refused for {device.user or 'your user'}: install your public key on the device "
            f"({device.command_hint('ssh-copy-id')}) or pass the right key (-i / IdentityFile); "
            "passwords are not used"
        )
    if "no route to host" in low or "network is unreachable" in low:
        return "no route to host: check the network/VPN and the address"
    if "timed out" in low or "operation timed out" in low:
        return (
            f"no answer on port {port} within {options.connect_timeout_s} s: check that the device is "
            "on, the address and port, the network/VPN or firewall"
        )
    if "no space left" in low:
        return "disk full on the device: free space in its temp folder or choose another with remote_tmp"
    if (
        "connection closed" in low
        or "closed by remote host" in low
        or "connection reset" in low
        or "broken pipe" in low
        or "not responding" in low
    ):
        return "connection lost: check the device's power and network, then retry"
    last = text[-300:] if text else "no message"
    return f"ssh failed ({last}): check that '{device.command_hint()}' works by hand"


class SshClient:
    """Run quoted commands and copy files to one device; every failure is a DeviceError."""

    def __init__(self, device: DeviceSpec | str, options: SshOptions | None = None):
        self.device = parse_device(device) if isinstance(device, str) else device
        self.options = options or SshOptions()

    # -- command lines (pure: unit-tested) ---------------------------------------------
    def ssh_args(self, remote_command: str) -> list[str]:
        args = [self.options.ssh_binary, *self.options.common_args()]
        if self.device.port:
            args += ["-p", str(self.device.port)]
        return [*args, "--", self.device.ssh_destination, remote_command]

    def scp_base(self) -> list[str]:
        args = [
            self.options.scp_binary,
            "-q",
            *(["-O"] if self.options.scp_legacy else []),
            *self.options.common_args(),
        ]
        if self.device.port:
            args += ["-P", str(self.device.port)]
        return args

    def scp_upload_args(self, local_paths: Sequence[str | Path], remote_dir: str) -> list[str]:
        return [
            *self.scp_base(),
            "--",
            *(local_operand(p) for p in local_paths),
            f"{self.device.destination}:{remote_operand(remote_dir)}/",
        ]

    def scp_download_args(self, remote_path: str, local_path: str | Path) -> list[str]:
        return [*self.scp_base(), "--", f"{self.device.destination}:{remote_operand(remote_path)}",
                local_operand(local_path)]

    # -- execution ----------------------------------------------------------------------
    def _fail(self, result: CommandResult, what: str, timeout_s: float) -> DeviceError:
        if result.timed_out:
            return DeviceError(
                str(self.device),
                f"{what} did not finish within {timeout_s:.0f} s and was stopped: check the link, "
                "or raise the timeout",
            )
        reason = classify_ssh_failure(result.stderr, self.device, self.options)
        if reason.startswith("ssh failed"):
            reason = f"{what} failed: {reason}"
        return DeviceError(str(self.device), reason)

    def run(
        self, remote_command: str, *, timeout_s: float, what: str = "remote command"
    ) -> CommandResult:
        """Run a shell command on the device; ssh-level failures (exit 255, timeout) raise.

        The command's own non-zero exit is returned for the caller to interpret.
        """
        result = run_bounded(self.ssh_args(remote_command), timeout_s)
        if result.timed_out or result.returncode == 255:
            raise self._fail(result, what, timeout_s)
        return result

    def upload(
        self, local_paths: Sequence[str | Path], remote_dir: str, *, timeout_s: float
    ) -> None:
        result = run_bounded(self.scp_upload_args(local_paths, remote_dir), timeout_s)
        if result.timed_out or result.returncode != 0:
            raise self._fail(result, "copying files to the device", timeout_s)

    def download(self, remote_path: str, local_path: str | Path, *, timeout_s: float) -> None:
        result = run_bounded(self.scp_download_args(remote_path, local_path), timeout_s)
        if result.timed_out or result.returncode != 0:
            raise self._fail(result, "fetching the result", timeout_s)

    # -- private temp folder --------------------------------------------------------------
    def make_workdir(
        self, base: str | None = None, *, subdirs: Sequence[str] = (), timeout_s: float = 60.0
    ) -> tuple[str, int | None]:
        """mktemp -d (0700) on the device, with `subdirs` made inside it in the same login (a
        paired A/B puts the baseline in one, so files of the same name cannot collide);
        return (path, free KiB there or None)."""
        base_expr = shlex.quote(base) if base else '"${TMPDIR:-/tmp}"'
        inside = "".join(f' && mkdir -m 700 "$d"/{_subdir_name(s)}' for s in subdirs)
        cmd = (
            f'umask 077 && d=$(mktemp -d {base_expr}/{REMOTE_DIR_PREFIX}XXXXXXXX) && chmod 700 "$d"{inside} '
            f'&& echo "DIR=$d" && (df -Pk "$d" 2>/dev/null | tail -n 1)'
        )
        result = self.run(cmd, timeout_s=timeout_s, what="creating a temp folder")
        return parse_workdir_output(result, str(self.device), base)

    def remove_workdir(self, path: str, *, timeout_s: float = 60.0) -> bool:
        """rm -rf the folder we created; best effort (returns False if it failed)."""
        if not _SAFE_REMOTE_DIR.fullmatch(path):
            return False
        try:
            result = self.run(
                f"rm -rf -- {shlex.quote(path)}", timeout_s=timeout_s, what="cleaning up"
            )
        except DeviceError:
            return False
        return result.returncode == 0

    @contextlib.contextmanager
    def workdir(
        self, base: str | None = None, *, subdirs: Sequence[str] = (), timeout_s: float = 60.0
    ) -> Iterator[tuple[str, int | None]]:
        """A private temp folder on the device (with `subdirs` in it) that is always removed afterwards."""
        path, free_kib = self.make_workdir(base, subdirs=subdirs, timeout_s=timeout_s)
        try:
            yield path, free_kib
        finally:
            self.remove_workdir(path, timeout_s=timeout_s)


def _subdir_name(name: str) -> str:
    """A folder name we create inside the temp folder: plain, one level, never an option."""
    if not _SUBDIR.fullmatch(name):
        raise ValueError(f"temp sub-folder {name!r}: letters, digits, '.', '_', '-' only, not first")
    return name


def parse_workdir_output(
    result: CommandResult, where: str, base: str | None
) -> tuple[str, int | None]:
    """Read `DIR=...` and the df line printed by make_workdir."""
    m = re.search(r"^DIR=(\S+)$", result.stdout, re.MULTILINE)
    if result.returncode != 0 or not m:
        err = " ".join(result.stderr.split())[-200:]
        low = err.lower()
        if "no space left" in low:
            raise DeviceError(
                where,
                "disk full: free space in the device's temp folder or choose another with remote_tmp "
                "(recipe target.remote_tmp)",
            )
        folder = base or "$TMPDIR or /tmp"
        raise DeviceError(
            where,
            f"cannot create a temp folder in {folder} ({err or 'mktemp failed'}): "
            "check that it exists and is writable, or choose another with remote_tmp",
        )
    path = m.group(1)
    if not _SAFE_REMOTE_DIR.fullmatch(path):
        raise DeviceError(
            where, f"unexpected temp folder {path!r}: use a remote_tmp path of plain characters"
        )
    return path, parse_df_available_kib(result.stdout)


def parse_df_available_kib(text: str) -> int | None:
    """Available KiB from the last line of `df -Pk` (columns: fs, size, used, avail, use%, mount)."""
    for line in reversed(text.strip().splitlines()):
        fields = line.split()
        if len(fields) >= 6 and fields[3].isdigit() and fields[4].endswith("%"):
            return int(fields[3])
    return None
