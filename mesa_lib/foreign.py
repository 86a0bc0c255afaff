"""Models that are not ours, built without running anyone's code (issue 25; the scanner's model
format seam, mesa_lib.modelfiles, does not route to this module yet).

- An architecture named in a registry the project pins: `torchvision:<name>` (torchvision's
  `get_model`, weights=None) or `timm:<name>` (`timm.create_model`, pretrained=False). The
  library builds it; its weights come from a safetensors file (`load_weights`), never a pickle.
- A Hugging Face / timm folder: `config.json` (`architecture` or `architectures[0]`,
  `num_classes` or `num_labels`) + `model.safetensors` (`load_folder`).
- An ONNX file through onnx2torch (`load_onnx`), only if every node is a standard ONNX operator
  on the allow-list and no tensor lives in an external file (a path the file names could point
  anywhere). The graph is checked before any conversion.

Every refusal is a ValueError that names the file and what was refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

REGISTRIES = ("torchvision", "timm")
# Standard operators of image classifiers (CNNs, MobileNets, ViTs); anything else is refused.
ONNX_OPS = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv", "Div", "Dropout", "Erf", "Expand", "Flatten", "Gather", "Gemm",
    "GlobalAveragePool", "HardSigmoid", "HardSwish", "Identity", "LayerNormalization",
    "MatMul", "MaxPool", "Mul", "Pad", "Pow", "ReduceMean", "Relu", "Reshape", "Shape",
    "Sigmoid", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose",
    "Unsqueeze",
})


def build_architecture(spec: str, num_classes: int) -> nn.Module:
    """The untrained network `registry:name` with `num_classes` outputs.

    Raises:
        ValueError: an unknown registry or a name the registry does not list.
    """
    registry, _, name = spec.partition(":")
    if registry == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"architecture {spec!r}: torchvision has no model {name!r}")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if registry == "timm":
        import timm

        if name not in timm.list_models():
            raise ValueError(f"architecture {spec!r}: timm has no model {name!r}")
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    raise ValueError(f"architecture {spec!r}: not 'registry:name' with a registry of "
                     f"{REGISTRIES}")


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load a safetensors state dict into `model` (every key, exact shapes).

    Raises:
        ValueError: the file is missing, not safetensors, or does not fit the network.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[:3]
        raise ValueError(f"{path}: weights do not fit the architecture: "
                         f"{' '.join(first)[:400]}") from None
    return model.eval()


def load_folder(folder: Path) -> nn.Module:
    """A Hugging Face / timm folder: config.json + model.safetensors, built by timm.

    Raises:
        ValueError: a missing or unreadable config, no architecture or class count, an unknown
            architecture, or weights that do not fit.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_path}: no readable config ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a JSON object")
    names = config.get("architectures") or [config.get("architecture")]
    name = names[0] if isinstance(names, list) and names else None
    classes = config.get("num_classes", config.get("num_labels"))
    if not isinstance(name, str) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"{config_path}: needs 'architecture' (or 'architectures') and "
                         f"'num_classes' (or 'num_labels'); got {name!r}, {classes!r}")
    try:
        model = build_architecture(f"timm:{name}", classes)
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from None
    return load_weights(model, folder / "model.safetensors")


def onnx_problem(path: Path) -> str:
    """Why the ONNX file may not be loaded ('' if it may): unreadable, external tensors, a
    non-standard domain or an operator off the allow-list (subgraphs included)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - onnx raises several kinds for a bad file
        return f"not a readable ONNX file ({type(err).__name__})"
    nodes, tensors, graphs = [], [], [proto.graph]
    while graphs:  # every graph, subgraphs too; every tensor in it, attributes included
        graph = graphs.pop()
        tensors += list(graph.initializer)
        tensors += [t for s in graph.sparse_initializer for t in (s.values, s.indices)]
        for node in graph.node:
            nodes.append(node)
            for a in node.attribute:
                graphs += [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                tensors += [a.t] if a.type == onnx.AttributeProto.TENSOR else list(a.tensors)
                sparse = [a.sparse_tensor] if a.type == onnx.AttributeProto.SPARSE_TENSOR \
                    else list(a.sparse_tensors)
                tensors += [t for s in sparse for t in (s.values, s.indices)]
    outside = [t.name or "(unnamed)" for t in tensors
               if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data)]
    if outside:
        return f"tensors stored outside the file are refused: {outside[:3]}"
    bad = sorted({f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                  for n in nodes if n.domain not in ("", "ai.onnx") or n.op_type not in ONNX_OPS})
    if bad:
        return f"operators off the allow-list: {bad[:5]}"
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        return f"not a valid ONNX model ({str(err).splitlines()[0][:200]})"
    return ""


def load_onnx(path: Path) -> nn.Module:
    """An ONNX classifier as a torch module (onnx2torch), after `onnx_problem` finds nothing.

    Raises:
        ValueError: naming the file and why it is refused.
    """
    import onnx
    from onnx2torch import convert

    path = Path(path)
    why = onnx_problem(path)
    if why:
        raise ValueError(f"{path}: {why}")
    try:
        return convert(onnx.load(str(path), load_external_data=False)).eval()
    except Exception as err:  # noqa: BLE001 - a converter gap is a refusal, not a crash
        raise ValueError(f"{path}: onnx2torch cannot convert it ({type(err).__name__}: "
                         f"{str(err)[:200]})") from None
