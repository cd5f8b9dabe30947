"""PyTorch student -> one self-contained ONNX file with the metadata consumers need.

Opset: 18 by default. It is the dynamo exporter's own opset (torch 2.13; lower opsets
go through onnx's version converter, which fails on ReduceMean's axes input), ONNX
Runtime's static INT8 quantizer accepts ≤ 20, TensorRT 10 (JetPack 6.1/6.2) parses it,
and OpenVINO reads it. 19 and 20 also use the dynamo exporter. 13–17 are produced by
the TorchScript exporter (deprecated in torch, kept for TensorRT 8.6 on JetPack 5/6.0,
whose parser stops at 17). Anything above 20 is refused: ORT's static QDQ quantizer and
TensorRT 10's parser do not take it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from dskd.atomic import atomic_path
from dskd.errors import UserError
from export.errors import ExportError
from export.versions import have

DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 13, 20
DYNAMO_MIN_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
ONNX_FORMAT_TAG = "dskd-onnx/1"


def check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(
            f"--opset {opset!r}: choose {MIN_OPSET}..{MAX_OPSET} (18 is the default; 17 for "
            "TensorRT 8.6; ORT static INT8 and TensorRT 10 parse at most 20)"
        )
    return opset


def onnx_metadata_props(meta: dict[str, Any], source_sha256: str, precision: str = "fp32"
                        ) -> dict[str, str]:
    """String key/values for ModelProto.metadata_props (lists as JSON)."""
    return {
        "format": ONNX_FORMAT_TAG,
        "model": str(meta["model"]),
        "method": str(meta.get("method", "unknown")),
        "num_classes": str(int(meta["num_classes"])),
        "class_names": json.dumps(list(meta["class_names"])),
        "mean": json.dumps([float(v) for v in meta["mean"]]),
        "std": json.dumps([float(v) for v in meta["std"]]),
        "input_size": str(int(meta["input_size"])),
        "in_chans": str(int(meta["in_chans"])),
        "source_sha256": source_sha256,
        "precision": precision,
        "input_layout": "NCHW float32, normalized: (x/255 - mean)/std",
    }


def set_metadata(model_proto: Any, props: dict[str, str]) -> None:
    """Replace metadata_props; drop per-node exporter metadata (stack traces with local paths)."""
    del model_proto.metadata_props[:]
    for key, value in props.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    for node in model_proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    model_proto.graph.doc_string = ""
    model_proto.doc_string = ""


def _torch_export(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> str:
    """Write the raw export to `path`; returns which exporter was used."""
    sink = io.StringIO()
    quiet = logging.getLogger("torch.onnx")  # e.g. "torchvision is not installed. Skipping ..."
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        try:
            return _run_exporter(model, example, path, opset)
        finally:
            quiet.setLevel(level)


def _run_exporter(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> str:
    if opset >= DYNAMO_MIN_OPSET:
        torch.onnx.export(
            model, (example,), str(path), dynamo=True, external_data=False,
            opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )
        return "torch.onnx dynamo"
    torch.onnx.export(
        model, (example,), str(path), dynamo=False, opset_version=opset,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )
    return "torch.onnx torchscript"


def _simplify(model_proto: Any) -> Any:
    import onnxslim

    with contextlib.redirect_stdout(io.StringIO()):
        return onnxslim.slim(model_proto)


def export_onnx(model: torch.nn.Module, meta: dict[str, Any], out_path: str | os.PathLike,
                source_sha256: str, opset: int = DEFAULT_OPSET, simplify: bool | None = None
                ) -> dict[str, Any]:
    """Export, tag, optionally slim, check; the file appears only once it passed `verify_onnx`.

    simplify: None = use onnxslim when installed, True = require it (the recipe default:
    onnxslim is a core dependency, so `pip install .` has it), False = skip.
    Returns details for the manifest (exporter, opset, simplified).
    """
    import onnx

    check_opset(opset)
    if simplify and not have("onnxslim"):  # a core dependency: missing only from a partial install
        raise UserError("export.simplify (--simplify) needs onnxslim, a core dependency missing here: "
                        "pip install onnxslim, or set export.simplify = false (--simplify false)")
    size, chans = int(meta["input_size"]), int(meta["in_chans"])
    example = torch.zeros(2, chans, size, size)  # batch 2: 0/1 would be specialised
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=".onnx") as tmp:
        try:
            exporter = _torch_export(model.eval(), example, tmp, opset)
        except Exception as exc:  # noqa: BLE001 - any exporter failure is reported in one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"{out_path.name}: torch.onnx.export failed at opset {opset} "
                              f"({first[:200]}); try another --opset") from None
        proto = onnx.load(str(tmp))
        simplified = False
        if simplify or (simplify is None and have("onnxslim")):
            proto = _simplify(proto)
            simplified = True
        set_metadata(proto, onnx_metadata_props(meta, source_sha256))
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        verify_onnx(tmp, opset=opset)
    return {"exporter": exporter, "opset": opset, "simplified": simplified,
            "onnxslim": simplified}


def verify_onnx(path: str | os.PathLike, opset: int | None = None) -> None:
    """Full onnx.checker pass plus the contract: names, dynamic batch, opset, no external data."""
    import onnx

    from export.onnx_inspect import onnx_io

    name = Path(path).name
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - checker raises several types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"{name}: onnx.checker rejected the export ({first[:200]})") from None
    proto = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in proto.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"{name}: weights stored outside the file ({external[0]}, ...)")
    io_info = onnx_io(path)
    ins, outs = io_info["inputs"], io_info["outputs"]
    if [i["name"] for i in ins] != [INPUT_NAME] or [o["name"] for o in outs] != [OUTPUT_NAME]:
        raise ExportError(f"{name}: I/O names are {[i['name'] for i in ins]} -> "
                          f"{[o['name'] for o in outs]}, expected ['input'] -> ['logits']")
    if not isinstance(ins[0]["shape"][0], str) or not isinstance(outs[0]["shape"][0], str):
        raise ExportError(f"{name}: the batch axis is not dynamic ({ins[0]['shape']})")
    if opset is not None and io_info["opset"] != opset:
        raise ExportError(f"{name}: exported opset {io_info['opset']} instead of {opset}")
