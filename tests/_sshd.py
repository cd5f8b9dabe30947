"""A real OpenSSH server on 127.0.0.1 for tests: own host key, own client key, own config.

Nothing in the real ~/.ssh is read or written: the client gets `-F <tmp ssh_config>`,
an explicit key and an explicit known_hosts file.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from deploy_targets.ssh import SshOptions

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = "ssh-keygen"
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")


def sshd_missing_reason() -> str | None:
    """Why the real-sshd tests cannot run here, or None."""
    if not SSHD.exists():
        return "/usr/sbin/sshd is absent: apt-get install openssh-server"
    for tool in ("ssh", "scp", SSH_KEYGEN):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"{tool} is absent: apt-get install openssh-client"
    return None


@dataclass(frozen=True)
class Sshd:
    port: int
    user: str
    root: Path
    client_key: Path
    known_hosts: Path
    ssh_config: Path
    pid: int  # the listening sshd (its per-connection children are the sessions)

    @property
    def device(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def options(self, **overrides: object) -> SshOptions:
        base = SshOptions(
            connect_timeout_s=5,
            server_alive_interval_s=2,
            server_alive_count_max=3,
            known_hosts_file=self.known_hosts,
            identity_file=self.client_key,
            config_file=self.ssh_config,
        )
        return replace(base, **overrides)


def keygen(path: Path, comment: str) -> Path:
    """A fresh ed25519 key pair without passphrase; returns the private key path."""
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, deadline_s: float = 10.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def sshd_server(root: Path) -> Iterator[Sshd]:
    """Start `sshd -D -e` on a free port of 127.0.0.1; stop it (only it) afterwards."""
    root.mkdir(parents=True, exist_ok=True)
    host_key = keygen(root / "ssh_host_ed25519_key", "test-host")
    client_key = keygen(root / "id_client", "test-client")
    (root / "authorized_keys").write_text((root / "id_client.pub").read_text())
    ssh_config = root / "ssh_config"
    ssh_config.write_text("# empty on purpose: keeps ~/.ssh/config out of the tests\n")
    user = getpass.getuser()
    if os.geteuid() == 0:
        # sshd's privilege-separation directory (normally created by the service unit).
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    subsystem = (
        f"Subsystem sftp {SFTP_SERVER}" if SFTP_SERVER.exists() else "Subsystem sftp internal-sftp"
    )
    last_err = ""
    for _attempt in range(3):  # the free port can be taken between probe and bind
        port = free_port()
        config = root / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {host_key}",
                    f"PidFile {root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {root / 'authorized_keys'}",
                    "StrictModes no",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "PermitRootLogin prohibit-password",
                    "MaxStartups 100",
                    "LogLevel VERBOSE",
                    subsystem,
                    "",
                ]
            )
        )
        log = open(root / "sshd.log", "ab")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        if _wait_listening(port, proc):
            break
        proc.kill()
        proc.wait(timeout=10)
        log.close()
        last_err = (root / "sshd.log").read_text(errors="replace")[-500:]
    else:
        raise RuntimeError(f"sshd did not start: {last_err}")
    host_pub = (root / "ssh_host_ed25519_key.pub").read_text().split()
    known_hosts = root / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    try:
        yield Sshd(port, user, root, client_key, known_hosts, ssh_config, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
