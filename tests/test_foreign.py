"""Models that are not ours (mesa_lib.foreign, issue 25): built by torchvision or timm by name,
weights only from safetensors, Hugging Face / timm folders, and ONNX files through onnx2torch
only when every operator is on the allow-list; every refusal names the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper, save
from safetensors.torch import save_file

from mesa_lib.foreign import build_architecture, load_folder, load_onnx, load_weights

X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec", ["torchvision:mobilenet_v3_small", "timm:vgg11",
                                  "timm:mobilenetv3_small_050"])
def test_an_architecture_of_a_pinned_registry_is_built_by_name(spec: str) -> None:
    model = build_architecture(spec, 10).eval()
    with torch.no_grad():
        assert model(X).shape == (2, 10)


@pytest.mark.parametrize("spec", ["torchvision:not_a_net", "timm:not_a_net", "hub:resnet18",
                                  "resnet18"])
def test_an_unknown_architecture_is_refused_by_name(spec: str) -> None:
    with pytest.raises(ValueError, match="architecture"):
        build_architecture(spec, 10)


def test_weights_come_from_safetensors_and_must_fit(tmp_path: Path) -> None:
    source = build_architecture("timm:mobilenetv3_small_050", 10).eval()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(tmp_path / "w.safetensors"))
    model = load_weights(build_architecture("timm:mobilenetv3_small_050", 10),
                         tmp_path / "w.safetensors")
    with torch.no_grad():
        assert torch.equal(model(X), source(X))
    with pytest.raises(ValueError, match="w.safetensors: weights do not fit"):
        load_weights(build_architecture("timm:mobilenetv3_small_050", 7),
                     tmp_path / "w.safetensors")
    (tmp_path / "p.safetensors").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="p.safetensors: not a readable safetensors file"):
        load_weights(model, tmp_path / "p.safetensors")


def test_a_hugging_face_folder_is_built_from_its_config(tmp_path: Path) -> None:
    source = build_architecture("timm:mobilenetv3_small_050", 4).eval()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    # mean 0 and std 1: the loaded model's standardisation changes nothing here
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "mobilenetv3_small_050", "num_classes": 4, "pretrained_cfg": {
            "input_size": [3, 32, 32], "mean": [0, 0, 0], "std": [1, 1, 1]}}))
    with torch.no_grad():
        assert torch.equal(load_folder(tmp_path)(X), source(X))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "mobilenetv3_small_050"}))
    with pytest.raises(ValueError, match="config.json: needs 'architecture'"):
        load_folder(tmp_path)


def _onnx(tmp: Path, op: str = "Relu", domain: str = "") -> tuple[Path, np.ndarray]:
    """A tiny ONNX classifier: Flatten -> Gemm -> `op`; its path and Gemm weight."""
    w = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("Gemm", ["f", "w"], ["g"], transB=1),
             helper.make_node(op, ["g"], ["y"], domain=domain)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, 2, 2])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 5])], [numpy_helper.from_array(w, "w")])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    path = tmp / f"{op}.onnx"
    save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path, w


def test_an_onnx_classifier_of_allowed_operators_runs_as_torch(tmp_path: Path) -> None:
    path, w = _onnx(tmp_path)
    x = torch.rand(1, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = load_onnx(path)(x)
    expected = np.maximum(x.flatten(1).numpy() @ w.T, 0)
    assert np.allclose(got.numpy(), expected, atol=1e-5)


def test_an_onnx_file_with_other_operators_or_outside_tensors_is_refused(tmp_path: Path) -> None:
    path, _ = _onnx(tmp_path, "Relu", domain="com.evil")
    with pytest.raises(ValueError, match=r"Relu.onnx: operators off the allow-list: "
                                         r"\['com.evil:Relu'\]"):
        load_onnx(path)
    path, _ = _onnx(tmp_path, "Celu")
    with pytest.raises(ValueError, match=r"Celu.onnx: operators off the allow-list"):
        load_onnx(path)
    (tmp_path / "junk.onnx").write_bytes(b"\x80\x04not onnx")
    with pytest.raises(ValueError, match="junk.onnx: not a readable ONNX file"):
        load_onnx(tmp_path / "junk.onnx")
    import onnx

    path, _ = _onnx(tmp_path)
    proto = onnx.load(str(path))
    onnx.save(proto, str(tmp_path / "ext.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.bin", size_threshold=0)
    with pytest.raises(ValueError, match="ext.onnx: tensors stored outside the file"):
        load_onnx(tmp_path / "ext.onnx")
    # a Constant node's tensor pointing outside the file (not an initializer) is refused too
    proto = onnx.load(str(path))
    const = onnx.numpy_helper.from_array(np.ones(5, dtype=np.float32), "c")
    const.data_location = onnx.TensorProto.EXTERNAL
    const.ClearField("raw_data")
    const.external_data.add(key="location", value="../secret.json")
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["k"], value=const))
    onnx.save(proto, str(tmp_path / "const.onnx"))
    with pytest.raises(ValueError, match="const.onnx: tensors stored outside the file"):
        load_onnx(tmp_path / "const.onnx")
