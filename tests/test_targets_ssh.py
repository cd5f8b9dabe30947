"""ssh-cpu end to end against a real sshd on 127.0.0.1, and the ways a device can fail."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deploy_targets import DeviceError, Protocol, get_target, measure
from deploy_targets.ssh import SshClient
from dskd.errors import UserError
from tests._sshd import Sshd, free_port, keygen, sshd_missing_reason

pytestmark = [
    pytest.mark.skipif(sshd_missing_reason() is not None, reason=str(sshd_missing_reason())),
    pytest.mark.timeout(300),  # a hang guard only: generous, so a 2x oversubscribed machine passes
]

# contention_retries=0: these tests check plumbing, not timing, so a busy machine need not rerun
FAST = Protocol(warmup_seconds=0.05, min_iters=20, min_seconds=0.2, contention_retries=0)


@pytest.fixture()
def remote_tmp(sshd: Sshd, tmp_path: Path) -> Path:
    """A temp base on the 'device' we can inspect for leftovers."""
    base = tmp_path / "device-tmp"
    base.mkdir()
    return base


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


@pytest.mark.slow
def test_ssh_cpu_matches_local_cpu_and_cleans_up(
    sshd: Sshd, tiny_fp32: dict, remote_tmp: Path
):
    remote = measure(
        tiny_fp32["onnx"], "ssh-cpu", eval_set=tiny_fp32["eval"], device=sshd.device,
        ssh=sshd.options(), remote_python=sys.executable, remote_tmp=str(remote_tmp),
        protocol=FAST, batch_sizes=(1, 4),
    )  # fmt: skip
    local = measure(
        tiny_fp32["onnx"], "cpu", eval_set=tiny_fp32["eval"], protocol=FAST, batch_sizes=(1, 4)
    )
    assert remote.where == sshd.device and local.where == "local"
    assert remote.environment["reached_over"] == "ssh"
    # same artifact, same runtime, same data: identical predictions, so identical accuracy
    assert remote.accuracy == local.accuracy
    assert remote.accuracy["agreement"] == 1.0
    assert remote.accuracy["n"] == tiny_fp32["n"]
    for entry in remote.latency:
        assert entry["iterations"] >= FAST.min_iters
        assert 0 < entry["p50_ms"] <= entry["p90_ms"] <= entry["p99_ms"]
    assert [e["batch_size"] for e in remote.latency] == [1, 4]
    assert list(remote_tmp.iterdir()) == []  # private folder removed


@pytest.mark.slow
def test_availability_probe_reports_versions_and_missing_runtime(sshd: Sshd, tmp_path: Path):
    ok, reason = get_target("ssh-cpu").availability(
        sshd.device, ssh=sshd.options(), remote_python=sys.executable
    )
    assert ok, reason
    assert "onnxruntime" in reason
    bare = _bare_python(tmp_path)
    ok, reason = get_target("ssh-cpu").availability(
        sshd.device, ssh=sshd.options(), remote_python=str(bare)
    )
    assert not ok
    assert "onnxruntime" in reason and "pip install" in reason


def _bare_python(tmp_path: Path) -> Path:
    """A real python without numpy/onnxruntime: a fresh venv without packages."""
    venv = tmp_path / "bare-venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    return venv / "bin" / "python"


@pytest.mark.slow
def test_remote_runtime_missing_is_one_line_and_cleans_up(
    sshd: Sshd, tiny_fp32: dict, remote_tmp: Path, tmp_path: Path
):
    bare = _bare_python(tmp_path)
    with pytest.raises(DeviceError) as err:
        measure(
            tiny_fp32["onnx"],
            "ssh-cpu",
            eval_set=tiny_fp32["eval"],
            device=sshd.device,
            ssh=sshd.options(),
            remote_python=str(bare),
            remote_tmp=str(remote_tmp),
            protocol=FAST,
        )
    msg = _one_line(err.value)
    assert msg.startswith(sshd.device)
    assert "missing runtime" in msg and "onnxruntime" in msg and "pip install" in msg
    assert list(remote_tmp.iterdir()) == []


@pytest.mark.slow
def test_remote_python_not_found(sshd: Sshd, tiny_fp32: dict, remote_tmp: Path):
    with pytest.raises(DeviceError) as err:
        measure(
            tiny_fp32["onnx"],
            "ssh-cpu",
            device=sshd.device,
            ssh=sshd.options(),
            remote_python="/nonexistent/python3",
            remote_tmp=str(remote_tmp),
            protocol=FAST,
        )
    assert "not found" in _one_line(err.value)
    assert list(remote_tmp.iterdir()) == []


@pytest.mark.slow
def test_remote_command_timeout_is_bounded_and_cleans_up(
    sshd: Sshd, tiny_fp32: dict, remote_tmp: Path
):
    slow = Protocol(warmup_seconds=0.0, min_iters=1, min_seconds=600, max_seconds=600)
    with pytest.raises(DeviceError) as err:
        measure(
            tiny_fp32["onnx"],
            "ssh-cpu",
            device=sshd.device,
            ssh=sshd.options(),
            remote_python=sys.executable,
            remote_tmp=str(remote_tmp),
            protocol=slow,
            timeout_s=3,
        )
    msg = _one_line(err.value)
    assert "did not finish within 3 s" in msg
    assert list(remote_tmp.iterdir()) == []
    assert _processes_working_in(remote_tmp) == []  # the runner was stopped, not left running


def _processes_working_in(folder: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cwd = os.readlink(proc / "cwd")
            except OSError:
                continue
            if cwd.startswith(str(folder)):
                found.append(proc.name)
    return found


def test_wrong_port_is_refused(sshd: Sshd, tiny_fp32: dict):
    device = f"{sshd.user}@127.0.0.1:{free_port()}"
    with pytest.raises(DeviceError) as err:
        measure(tiny_fp32["onnx"], "ssh-cpu", device=device, ssh=sshd.options(), protocol=FAST)
    msg = _one_line(err.value)
    assert msg.startswith(device) and "connection refused on port" in msg


def test_refused_key(sshd: Sshd, tiny_fp32: dict, tmp_path: Path):
    stranger = keygen(tmp_path / "id_stranger", "stranger")
    with pytest.raises(DeviceError) as err:
        measure(
            tiny_fp32["onnx"],
            "ssh-cpu",
            device=sshd.device,
            ssh=sshd.options(identity_file=stranger),
            protocol=FAST,
        )
    msg = _one_line(err.value)
    assert "login refused" in msg and "ssh-copy-id" in msg


def test_changed_host_key_is_never_accepted(sshd: Sshd, tiny_fp32: dict, tmp_path: Path):
    keygen(tmp_path / "other_host_key", "impostor")
    pub = (tmp_path / "other_host_key.pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {pub[0]} {pub[1]}\n")
    with pytest.raises(DeviceError) as err:
        measure(
            tiny_fp32["onnx"],
            "ssh-cpu",
            device=sshd.device,
            ssh=sshd.options(known_hosts_file=known),
            protocol=FAST,
        )
    msg = _one_line(err.value)
    assert "host key does not match" in msg and "ssh-keygen -R" in msg
    assert known.read_text().count("\n") == 1  # nothing was added


def test_unknown_host_key_is_never_accepted(sshd: Sshd, tmp_path: Path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    client = SshClient(sshd.device, sshd.options(known_hosts_file=empty))
    with pytest.raises(DeviceError) as err:
        client.run("true", timeout_s=30)
    assert "host key is not in" in _one_line(err.value)
    assert empty.read_text() == ""


@pytest.mark.slow
def test_workdir_is_private(sshd: Sshd, remote_tmp: Path):
    client = SshClient(sshd.device, sshd.options())
    with client.workdir(str(remote_tmp)) as (path, free_kib):
        assert Path(path).parent == remote_tmp
        assert (Path(path).stat().st_mode & 0o777) == 0o700
        assert free_kib is None or free_kib > 0
    assert not Path(path).exists()


def test_quoting_survives_shell_metacharacters(sshd: Sshd, tmp_path: Path):
    client = SshClient(sshd.device, sshd.options())
    tricky = "a b;$(echo pwned)'\"`x`"
    result = client.run(f"printf %s {shlex.quote(tricky)}", timeout_s=30)
    assert result.stdout == tricky


@pytest.fixture()
def tiny_disk(tmp_path: Path):
    """A 256 KiB tmpfs as the device's temp folder (root only; skipped where mount is denied)."""
    mnt = tmp_path / "tiny-disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({res.stderr.strip() or res.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)


@pytest.mark.slow
def test_full_disk_is_reported_before_copying(
    sshd: Sshd, tiny_fp32: dict, tiny_disk: Path
):
    with pytest.raises(DeviceError) as err:
        measure(tiny_fp32["onnx"], "ssh-cpu", eval_set=tiny_fp32["eval"], device=sshd.device,
                ssh=sshd.options(), remote_python=sys.executable, remote_tmp=str(tiny_disk), protocol=FAST)  # fmt: skip
    msg = _one_line(err.value)
    assert "disk full" in msg and "MiB free" in msg and "remote_tmp" in msg
    assert list(tiny_disk.iterdir()) == []


@pytest.mark.slow
def test_lost_connection_is_one_line_not_a_hang(
    sshd: Sshd, tiny_fp32: dict, remote_tmp: Path
):
    """Kill the server side of the session mid-measurement: the client must give up cleanly."""
    slow = Protocol(warmup_seconds=0.0, min_iters=1, min_seconds=300, max_seconds=300)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            measure(tiny_fp32["onnx"], "ssh-cpu", device=sshd.device, ssh=sshd.options(),
                    remote_python=sys.executable, remote_tmp=str(remote_tmp), protocol=slow, timeout_s=120)  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    while not _processes_working_in(remote_tmp) and time.monotonic() < deadline:
        time.sleep(0.1)
    runners = _processes_working_in(remote_tmp)
    assert runners, "the remote runner never started"
    sessions = subprocess.run(
        ["pgrep", "-P", str(sshd.pid)], capture_output=True, text=True
    ).stdout.split()
    for pid in sessions:  # the per-connection sshd processes of our own server
        os.kill(int(pid), signal.SIGKILL)
    worker.join(timeout=60)
    for pid in runners:  # the orphaned runner we started; the remote `timeout` would end it later
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    assert not worker.is_alive()
    err = outcome.get("error")
    assert isinstance(err, DeviceError), err
    assert "connection lost" in _one_line(err)
    assert list(remote_tmp.iterdir()) == []  # cleanup reconnected and removed the folder


# ---------------------------------------------------------------- hostile file names and external data
HOSTILE_NAMES = {
    "option": "-oProxyCommand=touch X.onnx",  # scp used to read it as an option and run `touch`
    "shell": "we ird 'single' \"double\" $(touch PWNED) `touch TICK` ;x.onnx",
    "remote-looking": "host:path.onnx",  # a colon before any '/' makes scp treat it as remote
}


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "legacy"), [("option", False), ("option", True), ("shell", False),
                                              ("shell", True), ("remote-looking", False)])
def test_hostile_file_names_are_copied_as_names_and_nothing_runs(
    kind: str, legacy: bool, sshd: Sshd, tiny_fp32: dict, remote_tmp: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
):
    """Relative paths as a user types them (`./-o...`: pathlib drops the `./`), through SFTP-mode
    scp and legacy scp (-O, where the device's shell sees the target). Success proves the names
    arrived literally: the runner hashes the file it opened, and measure() compares the sha256."""
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    name, eval_name = HOSTILE_NAMES[kind], f"-e $(touch EVAL) '{kind}'.npz"
    shutil.copy(tiny_fp32["onnx"], work / name)
    shutil.copy(tiny_fp32["eval"], work / eval_name)
    monkeypatch.chdir(work)
    m = measure(f"./{name}", "ssh-cpu", eval_set=f"./{eval_name}", device=sshd.device,
                ssh=sshd.options(scp_legacy=legacy), remote_python=sys.executable, remote_tmp=str(remote_tmp),
                protocol=FAST)  # fmt: skip
    assert m.where == sshd.device and m.accuracy["agreement"] == 1.0 and m.accuracy["n"] == tiny_fp32["n"]
    assert sorted(p.name for p in work.iterdir()) == sorted([name, eval_name])  # no X.onnx, PWNED, TICK, EVAL
    assert list(remote_tmp.iterdir()) == []


def test_scp_arguments_end_options_and_use_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from deploy_targets.ssh import SshOptions

    monkeypatch.chdir(tmp_path)
    client = SshClient("me@host:2222", SshOptions())
    up = client.scp_upload_args(["-oProxyCommand=x.onnx", Path("a:b.npz")], "/tmp/dskd-bench.abc")
    operands = up[up.index("--") + 1:]
    assert operands == [str(tmp_path / "-oProxyCommand=x.onnx"), str(tmp_path / "a:b.npz"),
                        "me@host:/tmp/dskd-bench.abc/"]
    down = client.scp_download_args("/tmp/dskd-bench.abc/result.json", "out.json")
    assert down[down.index("--") + 1:] == ["me@host:/tmp/dskd-bench.abc/result.json", str(tmp_path / "out.json")]
    ssh = client.ssh_args("true")
    assert ssh[-3:] == ["--", "me@host", "true"]
    for bad in ("relative/dir", "/tmp/$(x)", "/tmp/a b", "/tmp/../etc", "/tmp/-o"):
        with pytest.raises(UserError, match="remote path"):
            client.scp_upload_args(["x"], bad)


def _external_data_model(folder: Path, source: Path) -> Path:
    """The tiny model with its weights in `w.bin` beside it (ONNX external data)."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(source))
    path = folder / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0)
    assert (folder / "w.bin").is_file()
    return path


def _set_location(path: Path, location: str) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))


@pytest.mark.parametrize("fault", ["symlink", "outside", "fifo"])
def test_external_data_is_checked_locally_before_any_upload(
    fault: str, tiny_fp32: dict, tmp_path: Path
):
    """A link (scp would send what it points to, e.g. a private key), a path out of the model's
    folder, or a FIFO: refused here. The device is unreachable: contacting it would be a DeviceError."""
    path = _external_data_model(tmp_path / "model", tiny_fp32["onnx"])
    weights = path.parent / "w.bin"
    if fault == "symlink":
        secret = tmp_path / "secret"
        weights.rename(secret)
        weights.symlink_to(secret)
        expect = "'w.bin' is a symbolic link"
    elif fault == "outside":
        weights.rename(tmp_path / "w.bin")
        _set_location(path, "../w.bin")
        expect = "'../w.bin' is not a file name beside the model"
    else:
        weights.unlink()
        os.mkfifo(weights)
        expect = "'w.bin' is not a regular file"
    with pytest.raises(UserError) as err:
        measure(path, "ssh-cpu", device=f"nobody@127.0.0.1:{free_port()}", protocol=FAST)
    assert not isinstance(err.value, DeviceError)
    msg = _one_line(err.value)
    assert str(path) in msg and expect in msg, msg


@pytest.mark.slow
def test_external_data_beside_the_model_is_copied_and_measured(
    sshd: Sshd, tiny_fp32: dict, remote_tmp: Path, tmp_path: Path
):
    path = _external_data_model(tmp_path / "model", tiny_fp32["onnx"])
    m = measure(path, "ssh-cpu", eval_set=tiny_fp32["eval"], device=sshd.device, ssh=sshd.options(),
                remote_python=sys.executable, remote_tmp=str(remote_tmp), protocol=FAST)
    assert m.accuracy["agreement"] == 1.0
    assert list(remote_tmp.iterdir()) == []
