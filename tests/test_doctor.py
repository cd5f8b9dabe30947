"""`pipeline doctor`: one line per check, exit 0/1/2, end to end against a real sshd on 127.0.0.1.

The 'Jetson' is a FAKE file system (tests/fakes/jetson.py: /etc/nv_tegra_release, nvpmodel.conf,
thermal zones, cpufreq/devfreq, and FAKE nvpmodel / jetson_clocks / trtexec scripts) and FAKE
python packages that only carry versions. What is real: ssh, sshd, bash, the probe script, the
parsing and every decision the doctor takes from what it reads. Nothing here proves anything about
a real Jetson, which has not been available to this project.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from deploy_targets.doctor import (
    attach_board_state,
    clocks_gate,
    max_power_mode,
    parse_jetson_clocks,
    parse_power_modes,
    parse_sysfs_clocks,
    parse_thermal,
    run_doctor,
)
from dskd.errors import UserError
from export.torch_trt import check_versions
from tests._sshd import Sshd, free_port, keygen
from tests.fakes.device import fake_python, needs_sshd
from tests.fakes.jetson import make_fake_jetson, set_state, write_fake_python_lib

pytestmark = pytest.mark.timeout(180)


def statuses(rep) -> dict[str, str]:
    return {c.name: c.status for c in rep.checks}


def line(rep, name: str) -> str:
    return next(c.line() for c in rep.checks if c.name == name)


# --------------------------------------------------------------------------- parsing (no I/O)
def test_jetson_clocks_show_parsing():
    locked = ["cpu0: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=1",
              "GPU MinFreq=1300500000 MaxFreq=1300500000 CurrentFreq=1300500000",
              "EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1"]
    assert parse_jetson_clocks(locked) == {"locked": True, "source": "jetson_clocks --show", "unlocked": []}
    loose = [locked[0], "GPU MinFreq=306000000 MaxFreq=1300500000 CurrentFreq=306000000"]
    assert parse_jetson_clocks(loose)["unlocked"] == ["GPU"]
    assert parse_jetson_clocks(["Error: Run jetson_clocks as root"]) is None


def test_sysfs_clocks_parsing():
    assert parse_sysfs_clocks(["cpu0|2201600|2201600|2201600|2201600"],
                              ["17000000.gpu|1300500000|1300500000|1300500000|1300500000"])["locked"] is True
    # the floor is at the ceiling, but the ceiling was lowered below the hardware maximum: not max
    capped = parse_sysfs_clocks(["cpu0|1000000|1000000|2201600|1000000"], [])
    assert capped["locked"] is False and capped["unlocked"] == ["cpu0"]
    assert parse_sysfs_clocks([], ["other.device|1|2|2|1"]) is None


def test_power_modes_and_thermal():
    modes = parse_power_modes(["< POWER_MODEL ID=0 NAME=15W >", "< POWER_MODEL ID=1 NAME=7W >",
                               "< POWER_MODEL ID=2 NAME=MAXN_SUPER >"])
    assert max_power_mode(modes) == {"id": 2, "name": "MAXN_SUPER"}  # Orin Nano, JetPack 6.2
    assert max_power_mode(modes[:2]) == {"id": 0, "name": "15W"}
    assert max_power_mode([]) is None
    t = parse_thermal(["cpu-thermal|52500|99000", "gpu-thermal|95000|99000", "dead|-256000|"])
    assert t["max_temp_c"] == 95.0 and t["hottest_zone"] == "gpu-thermal"
    assert t["throttling"] is True and t["throttling_zones"] == ["gpu-thermal"]
    assert len(t["zones"]) == 2  # a disabled sensor (-256 °C) is ignored
    assert parse_thermal(["cpu|40000|99000"])["throttling"] is False


def test_torch_tensorrt_version_rules():
    """The pairs of the torch-tensorrt release notes (sources in docs/export.md)."""
    assert check_versions("2.6.0+cu124", "2.6.0", "10.7.0.post1").status == "PASS"
    torch_off = check_versions("2.5.1", "2.6.0", "10.7.0")
    assert torch_off.status == "FAIL" and "needs torch 2.6" in torch_off.detail
    trt_off = check_versions("2.6.0", "2.6.0", "10.3.0")
    assert trt_off.status == "WARN" and "built for TensorRT 10.7" in trt_off.warning
    assert check_versions("2.8.0", "2.8.0", "10.12.0.36").status == "PASS"  # x86-64 / SBSA wheels
    # Jetson Orin (JetPack 6.2): torch-tensorrt 2.8 with torch 2.8 over JetPack's TensorRT 10.3
    assert check_versions("2.8.0", "2.8.0", "10.3.0", tegra=True).status == "PASS"
    assert check_versions("2.8.0", "2.8.0", "10.3.0").status == "WARN"  # not the x86 pin
    assert check_versions("2.7.0", "2.8.0", "10.3.0", tegra=True).status == "FAIL"
    assert check_versions("2.13.0", "2.13.0", "11.0.0").status == "PASS"  # TensorRT 11 from 2.13
    assert check_versions("2.14.1", "2.14.1", "11.1.0", tegra=True).status == "PASS"
    assert check_versions("2.16.0", "2.16.0", "11.4.0").status == "WARN"  # newer than the table
    assert check_versions("2.7.0", "2.7.0", "10.9.0").status == "WARN"  # no cited pin: untested
    assert check_versions(None, "2.6.0", "10.7.0").status == "FAIL"


def test_board_state_flags_a_measurement_below_max_clocks():
    at_max = {"at_max_clocks": True, "power_mode": {"name": "MAXN"}, "clocks": {"locked": True},
              "power_mode_is_max": True, "thermal": {"max_temp_c": 50.0, "throttling": False}}
    result: dict = {"environment": {}, "warnings": []}
    attach_board_state(result, at_max, at_max)
    state = result["environment"]["board_state"]
    assert state["at_max_clocks"] is True and result["warnings"] == []
    assert state["before"]["power_mode"] == "MAXN" and state["after"]["max_temp_c"] == 50.0
    low = dict(at_max, at_max_clocks=False, thermal={"max_temp_c": 97.0, "throttling": True})
    result = {"environment": {}, "warnings": []}
    attach_board_state(result, at_max, low)  # clocks dropped during the run
    assert result["environment"]["board_state"]["at_max_clocks"] is False
    assert any("not at maximum clocks" in w for w in result["warnings"])
    assert any("throttling" in w for w in result["warnings"])
    report = {"target": {"environment": result["environment"]}}
    assert clocks_gate(report)[0] is False
    assert clocks_gate({"target": {"environment": {"board_state": {"at_max_clocks": True}}}})[0] is True
    assert clocks_gate({"target": {"environment": {}}})[0] is None  # not a Jetson: nothing to gate


def test_require_max_clocks_gate_row():
    from pipeline.gates import evaluate_gates
    from pipeline.recipe import GateConfig

    report = {"artifacts": [], "target": {"name": "jetson-orin",
                                          "environment": {"board_state": {"at_max_clocks": False}}}}
    row = next(r for r in evaluate_gates(report, GateConfig(require_max_clocks=True))
               if r.name == "require_max_clocks")
    assert row.passed is False and "jetson_clocks" in row.note
    assert not [r for r in evaluate_gates(report, GateConfig()) if r.name == "require_max_clocks"]


# --------------------------------------------------------------------------- local targets and the CLI
def test_local_cpu_target_passes_and_cli_exit_codes(capsys: pytest.CaptureFixture):
    from pipeline.cli import main

    rep = run_doctor("cpu")
    assert rep.ok and rep.where == "local"
    assert statuses(rep) == {"python": "PASS", "numpy": "PASS", "onnxruntime": "PASS", "temp folder": "PASS"}
    assert f"({sys.executable})" in line(rep, "python")
    assert main(["doctor", "--target", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "doctor: target cpu on local" and out.strip().endswith("a run can proceed")
    assert main(["doctor", "--target", "cpux"]) == 2
    assert main(["doctor", "--target", "cpu", "--device", "me@box"]) == 2  # runs locally: bad usage
    assert main(["doctor", "--target", "cpu", "--trt-builder", "tf"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 3 and "export.trt_builder 'tf'" in err
    with pytest.raises(UserError, match="this machine is not one: pass --device"):
        run_doctor("jetson-orin")


def test_unreachable_device_fails_fast_with_cli_exit_1(capsys: pytest.CaptureFixture):
    from pipeline.cli import main

    t0 = time.monotonic()
    assert main(["doctor", "--target", "ssh-cpu", "--device", f"nobody@127.0.0.1:{free_port()}"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  reachable       connection refused on port" in out and "-> fix:" in out
    assert "SKIP  host key" in out and out.strip().endswith("fix the FAIL lines")
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_run_stops_before_training_when_the_device_fails(tmp_path: Path):
    from deploy_targets.errors import DeviceError
    from pipeline.preflight import training_ahead
    from pipeline.recipe import load_recipe
    from pipeline.run import execute

    device = f"nobody@127.0.0.1:{free_port()}"
    recipe = load_recipe("digits-smoke", {"target.name": "ssh-cpu", "target.device": device})
    assert training_ahead(recipe, tmp_path / "run", []) is True
    with pytest.raises(DeviceError, match=r"doctor: reachable: connection refused .*nothing was trained"):
        execute(recipe, tmp_path / "run")
    assert not (tmp_path / "run" / "stages").exists()  # no teacher was trained


# --------------------------------------------------------------------------- the FAKE Jetson over SSH
@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("fake-jetson")
    make_fake_jetson(root / "ok")
    make_fake_jetson(root / "no-trtexec", trtexec_banner=None)
    libs = {name: write_fake_python_lib(root / f"lib-{name}", **kw) for name, kw in {
        "good": {}, "trt-mismatch": {"tensorrt": "10.7.0"}, "old-torch": {"torch": "2.7.0"},
        "no-pycuda": {"pycuda": None}}.items()}
    return {"root": root / "ok", "bare": root / "no-trtexec",
            "python": {k: fake_python(v) for k, v in libs.items()}}


@pytest.fixture()
def jetson(board: dict) -> dict:
    set_state(board["root"])  # every test starts from a healthy board
    return board


def _doctor(sshd: Sshd, board: dict, python: str = "good", **kw):
    kw.setdefault("root", str(board["root"]))
    return run_doctor("jetson-orin", sshd.device, ssh=sshd.options(), remote_python=board["python"][python], **kw)


@pytest.mark.slow
@needs_sshd
def test_healthy_fake_jetson_passes_every_check(sshd: Sshd, jetson: dict, tmp_path: Path):
    rep = _doctor(sshd, jetson, remote_tmp=str(tmp_path))
    assert rep.ok, rep.lines()
    assert set(statuses(rep).values()) == {"PASS"}
    assert list(statuses(rep)) == ["reachable", "host key", "python", "numpy", "tensorrt", "pycuda", "torch",
                                   "torch-tensorrt", "trtexec", "TensorRT", "CUDA", "torch↔TRT", "L4T/JetPack",
                                   "power mode", "clocks", "temperature", "temp folder"]
    assert "L4T 36.4.3, JetPack 6.2 (from the L4T version)" in line(rep, "L4T/JetPack")
    assert "MAXN (id 0)" in line(rep, "power mode")
    assert "CUDA 12.6.68" in line(rep, "CUDA") and "TensorRT 10.3.0" in line(rep, "trtexec")
    assert "locked at maximum (jetson_clocks --show)" in line(rep, "clocks")
    assert "max 45.0 °C (cpu-thermal)" in line(rep, "temperature")
    assert rep.board["at_max_clocks"] is True
    assert list(tmp_path.iterdir()) == []  # the temp folder the doctor made is gone


@pytest.mark.slow
@needs_sshd
def test_board_below_max_clocks_warns_or_fails_on_request(sshd: Sshd, jetson: dict):
    # 15 W mode, clocks scaling, 97 °C, and jetson_clocks refusing a non-root user (sysfs is read instead)
    set_state(jetson["root"], power_mode=1, clocks_locked=False, temp_c=97.0, jetson_clocks_needs_root=True)
    rep = _doctor(sshd, jetson)
    assert rep.ok  # latency would be pessimistic, not wrong: WARN
    s = statuses(rep)
    assert (s["power mode"], s["clocks"], s["temperature"]) == ("WARN", "WARN", "WARN")
    assert line(rep, "power mode").endswith("-> fix: sudo nvpmodel -m 0 (MAXN)")
    assert "sysfs cpufreq/devfreq" in line(rep, "clocks") and line(rep, "clocks").endswith("sudo jetson_clocks")
    assert "97.0 °C" in line(rep, "temperature")
    strict = _doctor(sshd, jetson, require_max_clocks=True)
    assert not strict.ok and [c.name for c in strict.failures()] == ["power mode", "clocks"]


@pytest.mark.slow
@needs_sshd
def test_unknown_host_key_and_refused_login_fail_with_their_fix(sshd: Sshd, jetson: dict, tmp_path: Path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    rep = run_doctor("jetson-orin", sshd.device, ssh=sshd.options(known_hosts_file=empty),
                     remote_python=jetson["python"]["good"], root=str(jetson["root"]))
    assert not rep.ok and [c.name for c in rep.failures()] == ["host key"]
    assert statuses(rep)["reachable"] == "PASS"
    assert "connect once by hand" in line(rep, "host key")
    stranger = keygen(tmp_path / "id_stranger", "not-authorized")  # a key the device does not know
    rep = run_doctor("jetson-orin", sshd.device, ssh=sshd.options(identity_file=stranger),
                     remote_python=jetson["python"]["good"], root=str(jetson["root"]))
    assert [c.name for c in rep.failures()] == ["login"] and "ssh-copy-id" in line(rep, "login")


@pytest.mark.slow
@needs_sshd
def test_device_problems_each_fail_with_their_fix(sshd: Sshd, jetson: dict):
    rep = _doctor(sshd, jetson, python="trt-mismatch")  # trtexec 10.3 beside python's tensorrt 10.7
    assert [c.name for c in rep.failures()] == ["TensorRT"]
    assert "does not load in the other" in line(rep, "TensorRT")
    rep = _doctor(sshd, jetson, python="no-pycuda")
    assert [c.name for c in rep.failures()] == ["pycuda"] and "-m pip install pycuda" in line(rep, "pycuda")
    rep = _doctor(sshd, jetson, root=str(jetson["bare"]))  # no trtexec anywhere
    assert [c.name for c in rep.failures()] == ["trtexec"] and "target.trtexec" in line(rep, "trtexec")
    rep = _doctor(sshd, jetson, python="old-torch")  # torch 2.7 under torch-tensorrt 2.8
    assert rep.ok and statuses(rep)["torch↔TRT"] == "WARN"  # onnx builder: torch-tensorrt not used
    rep = _doctor(sshd, jetson, python="old-torch", builder="torch-tensorrt")
    assert [c.name for c in rep.failures()] == ["torch↔TRT"] and "needs torch 2.8" in line(rep, "torch↔TRT")
    rep = run_doctor("jetson-orin", sshd.device, ssh=sshd.options(), remote_python="/nonexistent/python3",
                     root=str(jetson["root"]))
    assert "python" in [c.name for c in rep.failures()] and "not found" in line(rep, "python")
    rep = _doctor(sshd, jetson, remote_tmp="/nonexistent/tmp")
    assert [c.name for c in rep.failures()] == ["temp folder"] and "/nonexistent/tmp" in line(rep, "temp folder")


@pytest.mark.slow
@needs_sshd
def test_not_a_jetson_and_ssh_cpu(sshd: Sshd, jetson: dict):
    rep = _doctor(sshd, jetson, root="")  # the sshd host itself: no /etc/nv_tegra_release
    assert statuses(rep)["L4T/JetPack"] == "WARN" and statuses(rep)["power mode"] == "SKIP"
    rep = run_doctor("ssh-cpu", sshd.device, ssh=sshd.options(), remote_python=sys.executable)
    assert rep.ok and list(statuses(rep)) == ["reachable", "host key", "python", "numpy", "onnxruntime",
                                              "temp folder"]


@pytest.mark.slow
@needs_sshd
def test_jetson_measurement_records_the_board_before_and_after(sshd: Sshd, jetson: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    """A real measurement over the sshd (the runner with a FAKE tensorrt engine) on the FAKE Jetson:
    its record carries power mode, clock state and temperature before and after; a board below its
    maximum clocks is flagged in the measurement's warnings and fails `gates.require_max_clocks`."""
    import json

    import numpy as np

    from deploy_targets import Protocol, doctor_board_state, measure, write_eval_npz
    from tests.fakes.trt_runtime import write_fake_tensorrt_lib

    monkeypatch.setattr(doctor_board_state, "BOARD_ROOT", str(jetson["root"]))
    lib = write_fake_tensorrt_lib(tmp_path / "lib")
    engine = tmp_path / "model.fp16.engine"
    engine.write_text(json.dumps({"w": [[1.0], [-1.0]], "chw": [1, 4, 4], "max_batch": 8}))  # FAKE engine
    x = np.random.default_rng(0).integers(0, 256, (12, 1, 4, 4), dtype=np.uint8)
    ev = write_eval_npz(tmp_path / "eval.npz", x, np.zeros(12, np.int64), [0.5], [0.25])
    fast = Protocol(warmup_seconds=0.02, min_iters=10, min_seconds=0.05, contention_retries=0)

    def run() -> dict:
        m = measure(engine, "jetson-orin", eval_set=ev, device=sshd.device, precision="fp16", ssh=sshd.options(),
                    remote_python=fake_python(lib), protocol=fast, batch_sizes=(1,), remote_tmp=str(tmp_path))
        return {"environment": m.environment, "warnings": m.warnings}

    healthy = run()
    state = healthy["environment"]["board_state"]
    board_warnings = [w for w in healthy["warnings"] if "clocks" in w or "throttling" in w]  # (not CoV noise)
    assert state["at_max_clocks"] is True and board_warnings == []
    for when in ("before", "after"):
        assert state[when]["power_mode"] == "MAXN" and state[when]["clocks_locked"] is True
        assert state[when]["max_temp_c"] == 45.0 and state[when]["throttling"] is False
    assert clocks_gate({"target": {"environment": healthy["environment"]}})[0] is True
    set_state(jetson["root"], power_mode=1, clocks_locked=False, temp_c=97.0)  # 15 W, scaling, hot
    slow = run()
    state = slow["environment"]["board_state"]
    assert state["at_max_clocks"] is False and state["before"]["power_mode"] == "15W"
    assert state["after"]["max_temp_c"] == 97.0 and state["throttling"] is True
    assert any("not at maximum clocks" in w for w in slow["warnings"])
    assert any("throttling" in w for w in slow["warnings"])
    assert clocks_gate({"target": {"environment": slow["environment"]}})[0] is False
