"""Read-only views of an ONNX file: operator histogram, parameter count, metadata, I/O shape."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import numpy as np


def _load(path: str | os.PathLike, external_data: bool = True) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=external_data)


def _all_nodes(graph: Any) -> list[Any]:
    """Nodes of the graph and of any subgraphs (If/Loop bodies)."""
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                out.extend(_all_nodes(attr.g))
            for g in attr.graphs:
                out.extend(_all_nodes(g))
    return out


def onnx_op_histogram(path: str | os.PathLike) -> dict[str, int]:
    """{op_type: count} over all nodes ('domain::Op' for non-default domains), sorted by name."""
    counts = Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in _all_nodes(_load(path).graph)
    )
    return dict(sorted(counts.items()))


def onnx_param_count(path: str | os.PathLike) -> int:
    """Number of trainable-looking values: elements of floating-point initializers and
    Constant nodes. Integer tensors (shapes, axes, quantized zero points) are not parameters."""
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    model = _load(path)
    total = 0
    tensors = list(model.graph.initializer)
    for node in _all_nodes(model.graph):
        if node.op_type == "Constant":
            tensors.extend(a.t for a in node.attribute if a.name == "value")
    for t in tensors:
        if t.data_type in floats:
            total += int(np.prod(t.dims)) if len(t.dims) else 1
    return total


def onnx_quantized_weight_count(path: str | os.PathLike) -> int:
    """Elements of 8-bit initializers (the weights of a QDQ model)."""
    from onnx import TensorProto

    eight_bit = {TensorProto.INT8, TensorProto.UINT8}
    return sum(int(np.prod(t.dims)) for t in _load(path).graph.initializer
               if t.data_type in eight_bit and len(t.dims) > 1)


def onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """metadata_props as a dict; JSON-looking values are decoded."""
    out: dict[str, Any] = {}
    for prop in _load(path).metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except ValueError:
            out[prop.key] = prop.value
    return out


def onnx_io(path: str | os.PathLike, external_data: bool = True) -> dict[str, Any]:
    """Names, element types and shapes (symbolic dims as strings) of inputs and outputs.

    `external_data=False` reads the graph alone (an untrusted file's external-data references are
    never followed: `pipeline verify`)."""
    model = _load(path, external_data)

    def shape(v: Any) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "inputs": [{"name": v.name, "elem_type": v.type.tensor_type.elem_type, "shape": shape(v)}
                   for v in model.graph.input],
        "outputs": [{"name": v.name, "elem_type": v.type.tensor_type.elem_type, "shape": shape(v)}
                    for v in model.graph.output],
        "opset": opset,
    }
