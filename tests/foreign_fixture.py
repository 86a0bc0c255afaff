"""Models that are not ours, made in the tests: a tiny ONNX classifier (onnx.helper, no exporter)
and a Hugging Face / timm folder."""

from __future__ import annotations

import json
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


def hf_folder(path: Path, config: dict) -> Path:
    """A timm-style folder at `path`: config.json (`config`, naming a timm architecture and its
    num_classes) + model.safetensors of a fresh network of that architecture."""
    from safetensors.torch import save_file

    from mesa_lib.models import build_model

    path.mkdir(parents=True)
    net = build_model(f"timm:{config['architecture']}", config["num_classes"])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path
