"""Target registry, availability table, device specs, ssh command lines and error wording."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

import deploy_targets
from deploy_targets import get_target, list_targets, parse_device, targets_table
from deploy_targets.artifacts import artifact_format, detected_precision
from deploy_targets.measure import interpret_exit, resolve_where, runner_args
from deploy_targets.registry import is_jetson, remote_python_command
from deploy_targets.remote.runner import Protocol
from deploy_targets.ssh import (
    CommandResult,
    DeviceSpec,
    SshClient,
    SshOptions,
    classify_ssh_failure,
    parse_df_available_kib,
    parse_workdir_output,
    run_bounded,
)
from dskd.errors import UserError


def test_registry_has_the_required_targets():
    names = [t.name for t in list_targets()]
    assert names == ["cpu", "intel-cpu", "x86-gpu", "jetson-orin", "jetson-orin-nano", "ssh-cpu"]
    cpu = get_target("cpu")
    assert (cpu.runtime, cpu.precisions, cpu.reach) == ("onnxruntime", ("fp32", "int8"), "local")
    assert cpu.artifact_format("int8") == "onnx-qdq" and cpu.export_format("int8") == "onnx-int8"
    ov = get_target("intel-cpu")
    assert ov.runtime == "openvino" and ov.artifact_format("fp32") == "openvino-ir"
    for name in ("x86-gpu", "jetson-orin", "jetson-orin-nano"):
        t = get_target(name)
        assert (
            t.runtime == "tensorrt"
            and t.precisions == ("fp16", "int8")
            and t.accepts == ("trt-engine", "torch-trt-ep")
        )
    assert get_target("jetson-orin").reach == "local-or-ssh"
    assert get_target("ssh-cpu").reach == "ssh"
    for t in list_targets():
        assert set(dict(t.formats)) == set(t.precisions) == set(dict(t.export_formats))


def test_every_target_documents_its_thread_and_stream_defaults():
    """Issue 20: the default that changes the number by 1.5x is explicit per target."""
    for t in list_targets():
        assert t.hint == "latency" and t.streams == 0
        if t.runtime == "tensorrt":
            assert t.threads is None  # no CPU threads for a GPU engine
        else:
            assert isinstance(t.threads, int) and t.threads >= 0
    assert get_target("cpu").threads == get_target("intel-cpu").threads == 1  # shared machines
    assert get_target("ssh-cpu").threads == 0  # a dedicated device: all physical cores


def test_unknown_target_suggests_a_name():
    with pytest.raises(UserError, match="did you mean jetson-orin"):
        get_target("jetson-orn")


def test_table_rows_and_reasons():
    rows = {r["target"]: r for r in targets_table()}
    assert rows["cpu"]["ok"] is True and "onnxruntime" in rows["cpu"]["reason"]
    assert rows["intel-cpu"]["ok"] is True
    assert rows["ssh-cpu"]["ok"] is False and rows["ssh-cpu"]["reason"].startswith(
        "no --device given"
    )
    if not is_jetson():
        assert (
            rows["jetson-orin"]["ok"] is False and "not a Jetson" in rows["jetson-orin"]["reason"]
        )
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert rows["x86-gpu"]["reason"] == "tensorrt not importable (pip install tensorrt)"
    text = deploy_targets.format_targets_table()
    lines = text.splitlines()
    assert lines[0].split() == ["target", "runtime", "precisions", "reached", "here", "reason"]
    assert len(lines) == 2 + len(list_targets())


def test_local_target_refuses_a_device():
    ok, reason = get_target("cpu").availability("me@host")
    assert not ok and "drop --device" in reason
    with pytest.raises(UserError, match="runs on this machine"):
        resolve_where(get_target("cpu"), "me@host")
    with pytest.raises(UserError, match="needs a device"):
        resolve_where(get_target("ssh-cpu"), None)
    assert resolve_where(get_target("ssh-cpu"), "me@host:2200") == DeviceSpec("host", "me", 2200)
    ok, reason = get_target("ssh-cpu").availability("me@host", probe=False)
    assert ok and "not probed" in reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nvidia@192.168.1.20", DeviceSpec("192.168.1.20", "nvidia", None)),
        ("nvidia@jetson.local:2222", DeviceSpec("jetson.local", "nvidia", 2222)),
        ("jetson", DeviceSpec("jetson", None, None)),
        ("me@[fe80::1]:22", DeviceSpec("fe80::1", "me", 22)),
    ],
)
def test_parse_device_accepts(text: str, expected: DeviceSpec):
    assert parse_device(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "me@",
        "@host",
        "me@host:0",
        "me@host:70000",
        "me@host:x",
        "-oProxyCommand=sh",
        "me@ho st",
        "a;b@h",
        "me@h:1:2",
    ],
)
def test_parse_device_rejects_with_one_line(text: str):
    with pytest.raises(UserError) as err:
        parse_device(text)
    assert "\n" not in str(err.value) and "user@host[:port]" in str(err.value)


def test_ssh_and_scp_command_lines():
    opts = SshOptions(
        connect_timeout_s=7,
        known_hosts_file=Path("/k/known"),
        identity_file=Path("/k/id"),
        config_file=Path("/k/cfg"),
        jump_host="me@bastion:2022",
    )
    client = SshClient("nvidia@jetson:2200", opts)
    args = client.ssh_args("echo 'hi there'")
    assert args[0] == "ssh" and args[-2:] == ["nvidia@jetson", "echo 'hi there'"]
    joined = " ".join(args)
    for piece in (
        "-F /k/cfg",
        "BatchMode=yes",
        "StrictHostKeyChecking=yes",
        "ConnectTimeout=7",
        "ServerAliveInterval=5",
        "ServerAliveCountMax=3",
        "UserKnownHostsFile=/k/known",
        "-i /k/id",
        "IdentitiesOnly=yes",
        "-J me@bastion:2022",
        "-p 2200",
    ):
        assert piece in joined
    up = client.scp_upload_args([Path("/a/m.onnx"), "/a/e.npz"], "/tmp/dskd-bench.X")
    assert up[0] == "scp" and "-P" in up and up[up.index("-P") + 1] == "2200"
    assert up[-3:] == ["/a/m.onnx", "/a/e.npz", "nvidia@jetson:/tmp/dskd-bench.X/"]
    assert "-O" not in up
    assert SshClient("h", SshOptions(scp_legacy=True)).scp_base()[:3] == ["scp", "-q", "-O"]
    down = client.scp_download_args("/tmp/dskd-bench.X/result.json", "/l/r.json")
    assert down[-2:] == ["nvidia@jetson:/tmp/dskd-bench.X/result.json", "/l/r.json"]
    # default: nothing overrides the user's ~/.ssh/config, keys or known_hosts
    plain = " ".join(SshClient("jetson").ssh_args("true"))
    assert "-F" not in plain and "UserKnownHostsFile" not in plain and "-i " not in plain
    assert "StrictHostKeyChecking=yes" in plain
    with pytest.raises(UserError):
        SshOptions(jump_host="-oProxyCommand=x").common_args()


def test_remote_python_is_quoted():
    assert remote_python_command("python3") == "python3"
    assert remote_python_command("'/opt/my env/bin/python' -I") == "'/opt/my env/bin/python' -I"
    assert remote_python_command("python3;reboot") == "'python3;reboot'"
    with pytest.raises(UserError):
        remote_python_command("  ")


def test_runner_args_round_trip_through_the_runner_parser():
    from deploy_targets.remote.runner import build_parser

    args = runner_args(
        artifact="m.onnx",
        runtime="onnxruntime",
        precision="int8",
        threads=2,
        batch_sizes=[1, 8],
        protocol=Protocol(0.5, 30, 1.5, 9.0, 0.1, 0.75, 4, 0.5),
        out="r.json",
        eval_path="e.npz",
        trtexec=None,
        timeout_s=60,
        hint="throughput",
        streams=3,
        image_path="frame.jpg",
    )
    ns = build_parser().parse_args(args)
    assert (ns.hint, ns.streams, ns.image_path) == ("throughput", 3, "frame.jpg")
    assert (ns.artifact, ns.runtime, ns.precision, ns.threads, ns.batch_sizes) == (
        "m.onnx",
        "onnxruntime",
        "int8",
        2,
        (1, 8),
    )
    got = Protocol.from_json(ns.protocol)  # the protocol travels as one JSON document
    assert got == Protocol(0.5, 30, 1.5, 9.0, 0.1, 0.75, 4, 0.5)
    assert ns.eval_path == "e.npz" and ns.out == "r.json"


# Constructed from OpenSSH 9.x client messages.
SSH_ERRORS = {
    "ssh: connect to host 10.0.0.9 port 22: Connection refused": "connection refused on port 2222",
    "ssh: connect to host 10.0.0.9 port 22: Connection timed out": "no answer on port 2222 within 10 s",
    "ssh: Could not resolve hostname jetsn: Name or service not known": "host name not known",
    "nvidia@10.0.0.9: Permission denied (publickey).": "login refused for nvidia",
    "@@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n@@@@@@\nHost key verification failed.": "host key does not match",
    "No ED25519 host key is known for [10.0.0.9]:2222 and you have requested strict checking.\nHost key verification failed.": "host key is not in",
    'scp: write remote "/tmp/x/m.onnx": No space left on device': "disk full",
    "client_loop: send disconnect: Broken pipe": "connection lost",
    "Timeout, server 10.0.0.9 not responding.": "connection lost",
    "Connection to 10.0.0.9 closed by remote host.": "connection lost",
    "ssh: connect to host 10.0.0.9 port 22: No route to host": "no route to host",
    "kex_exchange_identification: weird": "ssh failed (kex_exchange_identification: weird)",
}


@pytest.mark.parametrize(("stderr", "expected"), list(SSH_ERRORS.items()))
def test_ssh_failures_are_classified(stderr: str, expected: str):
    msg = classify_ssh_failure(stderr, DeviceSpec("10.0.0.9", "nvidia", 2222), SshOptions())
    assert expected in msg and "\n" not in msg


def test_runner_exit_codes_become_one_line_errors():
    e = interpret_exit(
        "me@h",
        3,
        "Traceback\nrunner-error: missing-module: /usr/bin/python3 lacks onnxruntime: install\n",
        "python3",
        60,
    )
    assert str(e) == "me@h: missing runtime: /usr/bin/python3 lacks onnxruntime: install"
    assert "did not finish within 60 s" in str(interpret_exit("me@h", 124, "", "python3", 60))
    assert "killed by signal 9" in str(interpret_exit("local", -9, "", "python3", 60))
    assert "'py9' not found" in str(interpret_exit("me@h", 127, "sh: py9: not found", "py9", 60))
    assert "disk full" in str(
        interpret_exit(
            "me@h", 5, "runner-error: runtime: OSError: [Errno 28] No space left on device", "p", 60
        )
    )
    bad = interpret_exit(
        "me@h", 4, "runner-error: bad-input: eval set e.npz lacks y: rebuild it", "p", 60
    )
    assert type(bad) is UserError and str(bad) == "me@h: eval set e.npz lacks y: rebuild it"


def test_workdir_output_and_df_parsing():
    out = "DIR=/tmp/dskd-bench.Ab12Cd34\n/dev/sda1  1000000  400000  512000  44% /\n"
    assert parse_workdir_output(CommandResult(0, out, ""), "h", None) == (
        "/tmp/dskd-bench.Ab12Cd34",
        512000,
    )
    assert parse_df_available_kib("garbage") is None
    with pytest.raises(UserError, match="disk full"):
        parse_workdir_output(
            CommandResult(1, "", "mktemp: failed: No space left on device"), "h", None
        )
    with pytest.raises(UserError, match="cannot create a temp folder in /nope"):
        parse_workdir_output(CommandResult(1, "", "mktemp: failed: No such file"), "h", "/nope")
    with pytest.raises(UserError, match="unexpected temp folder"):
        parse_workdir_output(CommandResult(0, "DIR=/tmp/dskd-bench.a;b\n", ""), "h", None)
    # never remove anything we did not create
    assert SshClient("h").remove_workdir("/") is False
    assert SshClient("h").remove_workdir("/home/me") is False


def test_run_bounded_kills_the_whole_process_group():
    marker = f"{os.getpid()}.{time.monotonic_ns() % 10**6}"
    # the grandchild inherits the group; it must die with the timeout too
    res = run_bounded(["sh", "-c", f"sleep 30 & echo {marker}; wait"], timeout_s=0.5)
    assert res.timed_out and marker in res.stdout
    assert subprocess.run(["pgrep", "-f", f"echo {marker}"], capture_output=True).returncode == 1
    ok = run_bounded(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout_s=10)
    assert (ok.returncode, ok.stdout, ok.stderr, ok.timed_out) == (3, "out\n", "err\n", False)


def test_artifact_format_checks(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        artifact_format(tmp_path / "none.onnx")
    (tmp_path / "m.xml").write_text('<net><layers><layer type="FakeQuantize"/></layers></net>')
    with pytest.raises(UserError, match="needs m.bin"):
        artifact_format(tmp_path / "m.xml")
    (tmp_path / "m.bin").write_bytes(b"\0")
    assert artifact_format(tmp_path / "m.xml") == "openvino-ir"
    assert detected_precision(tmp_path / "m.xml", "openvino-ir") == "int8"
    (tmp_path / "m.engine").write_bytes(b"\0")
    assert artifact_format(tmp_path / "m.engine") == "trt-engine"
    assert detected_precision(tmp_path / "m.engine", "trt-engine") is None
    (tmp_path / "m.pt").write_bytes(b"\0")
    with pytest.raises(UserError, match="unknown format .pt"):
        artifact_format(tmp_path / "m.pt")


def test_measure_rejects_wrong_artifact_and_precision(tmp_path: Path):
    (tmp_path / "m.engine").write_bytes(b"\0")
    with pytest.raises(
        UserError,
        match="target cpu needs onnx, onnx-qdq, got trt-engine: export with --formats onnx, onnx-int8",
    ):
        deploy_targets.measure(tmp_path / "m.engine", "cpu")
    with pytest.raises(UserError, match="--precision fp32: target x86-gpu ships fp16, int8"):
        deploy_targets.measure(tmp_path / "m.engine", "x86-gpu", precision="fp32")
    for bad in ([0], "1,x", "", 1.5):
        with pytest.raises(UserError, match="--batch-sizes"):
            deploy_targets.measure(tmp_path / "m.engine", "x86-gpu", batch_sizes=bad)


def test_batch_sizes_accept_cli_spellings():
    from deploy_targets.measure import _batch_sizes

    assert _batch_sizes("1,8") == [1, 8] and _batch_sizes("16") == [16] and _batch_sizes(4) == [4]
    assert _batch_sizes((8, 1, 8)) == [8, 1]
