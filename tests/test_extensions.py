"""docs/design.md "How to add a model / a method": an extension is one new module (plus, inside
the repo, one import line), and everything downstream finds it by name.

The toy model here is declared in this module only, with `@register_model`, and goes through the
user's path end to end: `pipeline train` on digits for one epoch, then `pipeline export` to a
verified ONNX file that ONNX Runtime runs. The toy method's end-to-end test is
tests/test_trainer.py::test_a_method_registered_by_decorator_trains_through_its_own_contract
(not repeated here). The "touches at most two files" claim is checked on the repository itself:
the registries are the one list of names (no other code lists three model or method names), and
a model family or a method module is imported by exactly one other file.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dskd.methods import list_methods
from dskd.models import FeatureClassifier, list_models, register_model
from dskd.models.base import conv_bn_relu, init_weights
from dskd.models.registry import _REGISTRY
from tests.helpers.cli import run_main

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("dskd", "export", "deploy_targets", "pipeline")  # the library code a user runs
TOY = "toy_extension_net"

# Lines that still repeat the method names by hand; each makes adding a built-in method touch a
# third file (its help text goes stale). Remove an entry when that line derives from list_methods().
KNOWN_METHOD_LISTINGS: set[str] = set()


class _ToyNet(FeatureClassifier):
    """Two conv blocks and the shared head: the whole model contract (docs/design.md, Models)."""

    def __init__(self, num_classes: int, in_chans: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(in_chans, 8, 3, stride=2), conv_bn_relu(8, 16, 3))
        self.num_features = 16
        self.fc = nn.Linear(self.num_features, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@pytest.fixture
def toy_model() -> Iterator[str]:
    """Register the toy for one test only (test_models.py checks the zoo's exact list)."""

    @register_model
    def toy_extension_net(num_classes: int, in_chans: int = 3) -> _ToyNet:
        return _ToyNet(num_classes, in_chans)

    assert inspect.getsourcefile(toy_extension_net) == __file__  # declared here, nowhere else
    yield toy_extension_net.__name__
    _REGISTRY.pop(toy_extension_net.__name__)


@pytest.mark.slow
def test_a_model_registered_from_a_test_module_trains_and_exports_to_onnx(toy_model, tmp_path, capsys):
    import onnxruntime as ort

    from dskd.checkpoint import build_model
    from dskd.data import load_data, normalize

    assert toy_model == TOY and TOY in list_models()
    out = tmp_path / "train"
    code, _, err = run_main(["train", "--model", TOY, "--data", "digits", "--epochs", "1", "--input-size", "16",
                             "--in-chans", "1", "--limit-per-class", "40", "--batch-size", "32", "--device", "cpu",
                             "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == TOY and summary["method"] == "ce"
    model, meta = build_model(out / "model.pt")  # the checkpoint names the model; the registry builds it
    assert isinstance(model, _ToyNet) and meta["model"] == TOY

    code, _, err = run_main(["export", str(out / "model.pt"), "--out", str(tmp_path / "export"),
                             "--formats", "onnx", "--calib-data", "digits"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    (entry,) = [a for a in manifest["artifacts"] if a["format"] == "onnx"]
    assert entry["parity"]["top1_agreement"] == 1.0
    session = ort.InferenceSession(str(tmp_path / "export" / entry["path"]), providers=["CPUExecutionProvider"])
    data = load_data("digits", input_size=16, in_chans=1, progress=False)
    x = normalize(data.test_x[:16], data.mean, data.std)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    (got,) = session.run(["logits"], {"input": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_an_unregistered_model_is_one_error_line_naming_the_flag(capsys):
    """Without the registration (the fixture removes it again) the same command is bad usage."""
    assert TOY not in list_models()
    code, _, err = run_main(["train", "--model", TOY, "--data", "digits", "--epochs", "1"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and TOY in err


@functools.cache
def _library_sources() -> dict[str, str]:
    """{repo-relative path: text} of every library module."""
    paths = sorted(p for layer in LAYERS for p in (REPO / layer).rglob("*.py"))
    return {p.relative_to(REPO).as_posix(): p.read_text(encoding="utf-8") for p in paths}


def _listings(names: list[str], skip: str) -> dict[str, list[str]]:
    """Files (outside `skip`) with a line naming three or more of `names`: a second list of them."""
    words = [re.compile(rf"(?<![\w-]){re.escape(n)}(?![\w-])") for n in names]
    found: dict[str, list[str]] = {}
    for rel, text in _library_sources().items():
        if rel.startswith(skip):
            continue
        for line in text.splitlines():
            if sum(bool(w.search(line)) for w in words) >= 3:
                found.setdefault(rel, []).append(line.strip())
    return found


def test_the_model_registry_is_the_only_list_of_model_names():
    assert _listings(list_models(), skip="dskd/models/") == {}


def test_the_method_registry_is_the_only_list_of_method_names():
    found = _listings(list_methods(), skip="dskd/methods/")
    assert set(found) == KNOWN_METHOD_LISTINGS, found  # a new hand-written list, or one fixed: update above


@functools.cache
def _imports() -> dict[str, list[ast.Import | ast.ImportFrom]]:
    return {rel: [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Import | ast.ImportFrom)]
            for rel, text in _library_sources().items()}


def _importers(module: str) -> set[str]:
    """Library files that import `module` (or import it from its package)."""
    parent, _, leaf = module.rpartition(".")
    who = set()
    for rel, nodes in _imports().items():
        for node in nodes:
            if isinstance(node, ast.Import) and any(a.name == module for a in node.names):
                who.add(rel)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (
                    node.module == module or (node.module == parent and any(a.name == leaf for a in node.names))):
                who.add(rel)
    return who


@pytest.mark.parametrize("family", ["mobilenetv2", "resnet_cifar", "shufflenetv2", "vgg", "wrn"])
def test_a_model_family_module_is_imported_by_one_line_of_the_package(family):
    """Adding a family in the repo = its module + the import line in dskd/models/__init__.py."""
    assert _importers(f"dskd.models.{family}") == {"dskd/models/__init__.py"}


@pytest.mark.parametrize("module", ["logit_methods", "feature_methods"])
def test_a_method_module_is_imported_by_one_line_of_the_registry(module):
    """Adding a built-in method = its module + the import (and table-order) line in the registry."""
    assert _importers(f"dskd.methods.{module}") == {"dskd/methods/registry.py"}
