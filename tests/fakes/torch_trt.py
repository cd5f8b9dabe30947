"""FAKE torch_tensorrt, tensorrt and modelopt packages (NOT NVIDIA's) for the torch-tensorrt builder
and the runner's `.ep` measurement (`torch_tensorrt.load`).

They run on this CPU machine with the REAL torch: the build script's torch.export runs for real,
and the FAKE `convert_exported_program_to_serialized_trt_engine` checks what it was given (an
ExportedProgram with a dynamic batch, the Input profile, the precisions) and returns a FAKE
"engine": JSON bytes recording that, plus the exported program's outputs at the profile's min and
max batch (so a test can check that the exported graph computes what the student computes).
The FAKE `compile` + `save` write the REAL `torch.export.save` of the exported graph (no TensorRT)
as the `.ep`, and the FAKE `load` reads it back with `torch.export.load`, so the runner's
`torch_tensorrt.load` path can measure it. The FAKE ModelOpt `mtq.quantize` only records that it
was called with a calibration loop.
"""

from __future__ import annotations

from pathlib import Path

from tests.fakes import write_text as _write

FAKE_TORCH_TENSORRT = '''"""FAKE torch_tensorrt for tests (NOT the real package)."""
__version__ = "{version}"
from . import dynamo  # noqa: E402,F401


class Input:
    def __init__(self, min_shape=None, opt_shape=None, max_shape=None, dtype=None, **kw):
        self.min_shape, self.opt_shape, self.max_shape, self.dtype = min_shape, opt_shape, max_shape, dtype


def save(module, path, output_format="exported_program", arg_inputs=None, **kw):
    """FAKE: the REAL torch.export.save of `module` (no TensorRT inside), dynamic batch as compiled."""
    import torch
    assert output_format == "exported_program", output_format
    inp = getattr(module, "_fake_trt_input", None)
    dyn = None
    if inp is not None and inp.max_shape[0] > inp.min_shape[0]:
        dyn = ({{0: torch.export.Dim("batch", min=inp.min_shape[0], max=inp.max_shape[0])}},)
    with torch.no_grad():
        program = torch.export.export(module, tuple(arg_inputs), dynamic_shapes=dyn)
    torch.export.save(program, path)


def load(path, **kw):
    """FAKE: the REAL torch.export.load (what save above wrote)."""
    import torch
    return torch.export.load(path)
'''

FAKE_DYNAMO = '''"""FAKE torch_tensorrt.dynamo for tests (NOT the real package)."""
import json

import torch


def convert_exported_program_to_serialized_trt_engine(exported_program, arg_inputs=None, enabled_precisions=None,
                                                      workspace_size=0, min_block_size=5, **kwargs):
    assert isinstance(exported_program, torch.export.ExportedProgram), type(exported_program)
    (inp,) = arg_inputs
    module = exported_program.module()
    outs = {{}}
    for name in ("min_shape", "max_shape"):
        shape = tuple(getattr(inp, name))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(*shape, generator=gen)
        outs[name] = [shape[0], module(x).detach().tolist()]
    # what the FAKE tensorrt of tests/test_targets_trtexec.py runs: logits = GAP(x) @ w.T
    classes = len(outs["min_shape"][1][0])
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(classes, inp.min_shape[1], generator=gen).tolist()
    record = {{"w": w, "chw": list(inp.min_shape[1:]), "max_batch": inp.max_shape[0], "fake_engine": True, "precisions": sorted(str(p) for p in (enabled_precisions or ())),
              "shapes": [list(inp.min_shape), list(inp.opt_shape), list(inp.max_shape)],
              "workspace_size": workspace_size, "min_block_size": min_block_size, "outputs": outs,
              "extra_kwargs": sorted(kwargs)}}
    return json.dumps(record).encode()


def compile(exported_program, arg_inputs=None, **kwargs):
    module = exported_program.module()  # FAKE: no TensorRT, the exported graph itself
    module._fake_trt_input = arg_inputs[0] if arg_inputs else None
    return module
'''

FAKE_MODELOPT_Q = '''"""FAKE modelopt.torch.quantization for tests (NOT NVIDIA ModelOpt): records the call only."""
INT8_DEFAULT_CFG = {{"fake": "int8"}}
CALLS = []


def quantize(model, config, forward_loop=None):
    forward_loop(model)  # the calibration images go through the model, as with the real one
    CALLS.append(config)
    model._fake_quantized = True
    return model
'''

FAKE_MODELOPT_UTILS = '''"""FAKE modelopt utils for tests."""
import contextlib


def export_torch_mode():
    return contextlib.nullcontext()
'''


def write_fake_torch_trt_lib(lib: Path, *, torch_tensorrt: str, tensorrt: str | None = "10.14.1",
                             modelopt: bool = True) -> Path:
    """FAKE torch_tensorrt (+ dynamo), tensorrt (None: leave it to another fake) and optionally
    modelopt under `lib` (for PYTHONPATH)."""
    _write(lib / "torch_tensorrt" / "__init__.py", FAKE_TORCH_TENSORRT.format(version=torch_tensorrt))
    _write(lib / "torch_tensorrt" / "dynamo.py", FAKE_DYNAMO.format())
    if tensorrt is not None:
        _write(lib / "tensorrt" / "__init__.py", f'"""FAKE tensorrt for tests."""\n__version__ = "{tensorrt}"\n')
    if modelopt:
        _write(lib / "modelopt" / "__init__.py", '"""FAKE modelopt for tests."""\n')
        _write(lib / "modelopt" / "torch" / "__init__.py", "")
        _write(lib / "modelopt" / "torch" / "quantization" / "__init__.py", FAKE_MODELOPT_Q.format())
        _write(lib / "modelopt" / "torch" / "quantization" / "utils.py", FAKE_MODELOPT_UTILS)
    return lib
