"""Trainer behaviour on the embedded digits data: learning, resume, DDP, NaN safety, distillation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dskd.checkpoint import build_model, load_model_file, torch_load
from dskd.errors import UserError
from dskd.methods import (
    METHODS,
    Distiller,
    Opt,
    create_distiller,
    register_method,
    resolve_method_options,
)
from dskd.models import create_model
from dskd.trainer import NonFiniteLoss, TrainConfig, make_optimizer, train

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(data="digits", input_size=16, in_chans=1, batch_size=64, lr=0.05, device="cpu")


def cfg(**kw) -> TrainConfig:
    base = dict(model="resnet8", epochs=2, **SMALL)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    train(cfg(model="resnet14", epochs=10), out)
    return out


@pytest.mark.slow
def test_ce_learns_and_writes_files(teacher_dir: Path):
    summary = json.loads((teacher_dir / "summary.json").read_text())
    for key in ("model", "method", "epochs", "params", "top1", "train_seconds", "macs"):
        assert key in summary
    assert summary["top1"] > 80.0, summary["top1"]  # chance is 10 %
    lines = (teacher_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == list(range(1, 11))
    sd, meta = load_model_file(teacher_dir / "model.pt")
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert set(sd) == set(create_model("resnet14", 10, in_chans=1).state_dict())


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path: Path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg(), full)
    assert train(cfg(), part, stop_after_epoch=1) == {"stopped_after_epoch": 1}
    assert not (part / "model.pt").exists() and (part / "last.pt").exists()
    train(cfg(), part, resume=True)
    a, _ = load_model_file(full / "model.pt")
    b, _ = load_model_file(part / "model.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_refuses_changed_settings(tmp_path: Path):
    train(cfg(), tmp_path, stop_after_epoch=1)
    with pytest.raises(UserError, match="was written with lr"):
        train(cfg(lr=0.1), tmp_path, resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path):
    train(cfg(epochs=3), tmp_path, stop_after_epoch=1)
    before = torch_load(tmp_path / "last.pt")["epoch"]
    with pytest.raises(NonFiniteLoss, match="loss term ce became NaN/inf"):
        train(cfg(epochs=3, lr=1e30), tmp_path / "x")
    with pytest.raises(NonFiniteLoss):
        train(cfg(epochs=3, lr=1e30), tmp_path, resume=False)
    assert not (tmp_path / "model.pt").exists()
    assert before == 1


def test_bad_config_fields():
    for kw, field in [({"epochs": 0}, "epochs"), ({"precision": "int4"}, "precision"),
                      ({"method": "kd"}, "teacher"), ({"lr": -1.0}, "lr")]:
        with pytest.raises(UserError, match=f"'{field}'"):
            cfg(**kw).validate()


def test_fp16_on_cpu_is_a_clear_error(tmp_path: Path):
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        train(cfg(precision="fp16"), tmp_path)


def test_bf16_autocast_trains(tmp_path: Path):
    s = train(cfg(precision="bf16", epochs=1), tmp_path)
    assert s["precision"] == "bf16" and s["top1"] == s["top1"]  # finite


@pytest.mark.slow
def test_dskd_student_loads_into_plain_student(tmp_path: Path, teacher_dir: Path):
    s = train(cfg(method="dskd", teacher=str(teacher_dir), epochs=4), tmp_path)
    assert s["method"] == "dskd" and s["options"] == resolve_method_options("dskd", {})
    assert s["top1"] > 20.0, s["top1"]  # chance is 10 %
    assert s["training_only_params"] > 0
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_ce", "loss_kd", "loss_diff", "loss_lsh", "loss_adapt"} <= set(lines[0])
    model, meta = build_model(tmp_path / "model.pt")  # strict load into a plain resnet8
    assert meta["method"] == "dskd"
    assert set(model.state_dict()) == set(create_model("resnet8", 10, in_chans=1).state_dict())


@pytest.mark.slow
def test_teacher_with_other_classes_is_refused(tmp_path: Path, teacher_dir: Path):
    from dskd.checkpoint import save_model

    sd, meta = load_model_file(teacher_dir / "model.pt")
    meta = dict(meta, class_names=[f"c{i}" for i in range(10)])
    save_model(tmp_path / "other.pt", sd, meta)
    with pytest.raises(UserError, match="teacher classes"):
        train(cfg(method="kd", teacher=str(tmp_path / "other.pt")), tmp_path / "out")


def _torchrun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CI="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "pipeline", "train", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path: Path):
    out = tmp_path / "ddp"
    proc = _torchrun(["--model=resnet8", "--data=digits", "--epochs=8", "--input-size=16", "--in-chans=1",
                      f"--out={out}", "--device=cpu", "--batch-size=32"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 8  # rank 0 alone writes
    single = train(cfg(epochs=8, batch_size=64), tmp_path / "single")  # same global batch
    assert summary["top1"] > 60.0, summary["top1"]
    assert abs(summary["top1"] - single["top1"]) < 15.0, (summary["top1"], single["top1"])


def test_more_cuda_ranks_than_gpus_is_one_clear_error(monkeypatch: pytest.MonkeyPatch):
    """NCCL cannot put two ranks on one GPU; the error must say what to pass instead (not 'Duplicate GPU')."""
    from dskd import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda *a, **k: pytest.fail("must refuse before joining the group"))
    with pytest.raises(UserError, match="--nproc_per_node 1"):
        distributed.init_distributed("cuda")


@pytest.mark.parametrize("kind", ["chosen", "foreach"])
def test_sgd_update_equals_the_per_parameter_loop(kind):
    """The trainer's SGD (fused where torch has it, else foreach: one op for all parameters) makes the
    same update as the per-parameter loop it replaced, momentum and weight decay included."""
    torch.manual_seed(0)
    models = [create_model("resnet8", 10, in_chans=1) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    c = cfg(weight_decay=5e-4, momentum=0.9)
    loop = torch.optim.SGD(models[0].parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                           foreach=False)
    if kind == "chosen":
        fast = make_optimizer(list(models[1].parameters()), c)
        assert fast.defaults.get("fused") or fast.defaults.get("foreach")
    else:
        fast = torch.optim.SGD(models[1].parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                               foreach=True)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    for _ in range(3):  # momentum buffers come into play from the second step
        for model, opt in zip(models, (loop, fast), strict=True):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(models[0].fc.weight, create_model("resnet8", 10, in_chans=1).fc.weight)


class _SelfHead(Distiller):
    """A toy method registered from this module: CE plus an auxiliary head on the pooled student
    features (forward_head(pre_logits=True)); it needs no teacher though its name is not `ce`."""

    name = "toy_selfhead"
    needs_teacher = False
    OPTIONS = {"w_aux": Opt(0.5, float, "auxiliary head weight", low=0.0)}

    def __init__(self, student, teacher, options):
        super().__init__(student, teacher, options)
        self.aux = nn.Linear(student.num_features, student.fc.out_features)

    def forward(self, x, y, progress=1.0):
        feats = self.student.forward_features(x)
        pooled = self.student.forward_head(feats, pre_logits=True)
        logits = self.student.fc(pooled)
        return logits, {"ce": F.cross_entropy(logits, y), "aux": self.options["w_aux"] * F.cross_entropy(self.aux(pooled), y)}


@pytest.fixture
def toy_method():
    cls = register_method(_SelfHead)
    assert register_method(_SelfHead) is cls  # registering the same class again is a no-op
    yield cls
    METHODS.pop(cls.name)


def test_a_method_registered_by_decorator_trains_through_its_own_contract(toy_method, tmp_path, monkeypatch):
    """register_method adds a method; the trainer honours needs_teacher (no teacher asked for) and
    uses the Distiller's own resume_state_dict() and count_training_only_params()."""
    from dskd.methods import list_methods

    assert list_methods()[-1] == "toy_selfhead" and list_methods()[:2] == ["ce", "kd"]
    d = create_distiller("toy_selfhead", create_model("resnet8", 10, in_chans=1), None, {"w_aux": 0.25})
    assert d.options == {"w_aux": 0.25}
    with pytest.raises(ValueError, match="registered twice"):
        register_method(type("Other", (_SelfHead,), {}))
    calls = []
    for method in ("resume_state_dict", "count_training_only_params"):
        base = getattr(Distiller, method)
        monkeypatch.setattr(toy_method, method, lambda self, m=method, b=base: calls.append(m) or b(self))
    s = train(cfg(method="toy_selfhead", epochs=1, limit_per_class=30), tmp_path)
    assert set(calls) == {"resume_state_dict", "count_training_only_params"}
    assert s["training_only_params"] == sum(p.numel() for p in nn.Linear(64, 10).parameters())
    state = torch_load(tmp_path / "last.pt")
    assert any(k.startswith("aux.") for k in state["distiller"]) and s["teacher"] is None
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_ce", "loss_aux"} <= set(lines[0])
