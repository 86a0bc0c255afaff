"""A tiny ONNX classifier made with onnx.helper (no exporter, no torch involved)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper, save


def onnx_net(path: Path, side: int = 32, classes: int = 10) -> Path:
    """(N, 3, side, side) -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm ->
    (N, classes), the batch dimension symbolic; written to `path`."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("cw", (8, 3, 3, 3)), ("cb", (8,)), ("fw", (classes, 8)),
                          ("fb", (classes,)))]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], inits)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path
