"""Models that are not ours, built without running anyone's code; mesa_lib.modelfiles routes
its `hf-folder` and `onnx` formats here, and mesa_lib.models builds registry names with it.

- An architecture named in a registry the project pins: `torchvision:<name>` (torchvision's
  `get_model`, weights=None) or `timm:<name>` (`timm.create_model`, pretrained=False), in our
  own manifest or a folder's config. The library builds it; its weights come from a
  safetensors file through mesa_lib.modelio's checks, never a pickle.
- A Hugging Face / timm folder: `config.json` (`architecture` or `architectures[0]`,
  `num_classes` or `num_labels`, input size / mean / std as timm's `pretrained_cfg`) +
  `model.safetensors` (`read_folder`).
- An ONNX file through onnx2torch (`read_onnx`), only if every node is a standard ONNX operator
  on the allow-list and no tensor lives in an external file (a path the file names could point
  anywhere); sized and counted before any conversion.

Refusals name the file and what was refused (ValueError; ModelFileError from the readers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mesa_lib import modelfiles
from mesa_lib.modelio import (
    MAX_PARAMETERS,
    Manifest,
    ModelFileError,
    load_weights_checked,
    manifest_from_dict,
)

from mesa_lib.models import FOREIGN_REGISTRIES as REGISTRIES
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


def _normalise(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: pixels in [0, 1] -> the standardised input the network was made for."""
    return ((args[0] - module.mesa_mean) / module.mesa_std, *args[1:])


def build_normalised(spec: str, num_classes: int, mean: Sequence[float], std: Sequence[float],
                     **kwargs: Any) -> nn.Module:
    """`build_architecture`, taking images in [0, 1] like the project's own models.

    The standardisation is a forward pre-hook reading non-persistent buffers, so the state dict
    stays the library's own: a checkpoint exported from torchvision or timm loads as it is.
    """
    if kwargs:
        raise ValueError(f"architecture {spec!r} takes no arch_kwargs, got {kwargs}")
    if len(mean) != len(std) or min(std) <= 0:
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} must match, std > 0")
    net = build_architecture(spec, num_classes)
    for name, values in (("mesa_mean", mean), ("mesa_std", std)):
        net.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1),
                            persistent=False)
    net.register_forward_pre_hook(_normalise)
    return net


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


_MAX_CONFIG_BYTES = 1 << 20


def _read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict; a missing, oversize, unreadable or too deeply nested one refused."""
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ValueError(f"{path}: larger than {_MAX_CONFIG_BYTES} bytes; refused unread")
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: no readable config ({err})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply; refused") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


def folder_manifest(folder: Path) -> Manifest:
    """The manifest of a Hugging Face / timm folder, read from its config.json: the timm
    architecture (`architecture` or `architectures[0]`), the class count (`num_classes` or
    `num_labels`), class names (`label_names` or `id2label`, else "0", "1", ...), and the
    input size, mean and std (`pretrained_cfg`, as timm writes them, or top-level keys).

    Raises:
        ValueError: naming config.json and the key that is missing or wrong.
    """
    path = Path(folder) / "config.json"
    config = _read_config(path)
    cfg = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    names = config.get("architectures") or [config.get("architecture")]
    name = names[0] if isinstance(names, list) and names else None
    classes = config.get("num_classes", config.get("num_labels"))
    if not isinstance(name, str) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"{path}: needs 'architecture' (or 'architectures') and "
                         f"'num_classes' (or 'num_labels'); got {name!r}, {classes!r}")
    labels = config.get("label_names") or [
        (config.get("id2label") or {}).get(str(i), str(i)) for i in range(classes)]
    raw = {"architecture": f"timm:{name}", "num_classes": classes,
           "classes": [str(c) for c in labels]}
    for key in ("input_size", "mean", "std"):
        value = cfg.get(key, config.get(key))
        if value is None:
            raise ValueError(f"{path}: needs {key!r} (in 'pretrained_cfg', as timm writes "
                             "it, or at the top level): the scanner feeds pixels in [0, 1]")
        raw["input_shape" if key == "input_size" else key] = value
    try:
        return manifest_from_dict(raw, path)
    except ModelFileError as err:
        raise ValueError(str(err)) from None


def read_folder(folder: Path, map_location: str | torch.device = "cpu",
                **limits: Any) -> tuple[nn.Module, Manifest]:
    """A Hugging Face / timm folder as (model, manifest), its model.safetensors through every
    check of mesa_lib.modelio (sized on the meta device first, header, NaN/Inf).

    Raises:
        ModelFileError: naming the file and what was refused.
    """
    folder = Path(folder)
    try:
        manifest = folder_manifest(folder)
    except ValueError as err:
        raise ModelFileError(str(err)) from None
    model = load_weights_checked(folder / "model.safetensors", manifest, folder / "config.json",
                                 map_location, **limits)
    return model, manifest


def load_folder(folder: Path) -> nn.Module:
    """A Hugging Face / timm folder's model (`read_folder`)."""
    return read_folder(folder)[0]


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


def _static_dims(value_info: Any) -> list[int]:
    """The dims of an ONNX graph input or output; 0 where one is symbolic."""
    return [d.dim_value for d in value_info.type.tensor_type.shape.dim]


def read_onnx(path: Path, map_location: str | torch.device = "cpu",
              max_parameters: int = MAX_PARAMETERS, **_: Any) -> tuple[nn.Module, Manifest]:
    """An ONNX classifier as (model, manifest): its graph takes (N, C, H, W) pixels in [0, 1]
    (any standardisation is inside the graph: the manifest's mean 0, std 1) and gives
    (N, classes) logits; C, H, W and the class count are read from the graph, the class names
    are "0", "1", ... The file is sized and its tensors counted before any conversion.

    Raises:
        ModelFileError: naming the file and what was refused.
    """
    import onnx

    path = modelfiles.main_file(path, modelfiles.ONNX)  # a stem or the file
    if not path.is_file():
        raise ModelFileError(f"{path}: model file is missing")
    if path.stat().st_size > 4 * 1.5 * max_parameters:
        raise ModelFileError(f"{path}: larger than 1.5 x 4 bytes x max_parameters="
                             f"{max_parameters}; refused unread")
    why = onnx_problem(path)
    if why:
        raise ModelFileError(f"{path}: {why}")
    graph = onnx.load(str(path), load_external_data=False).graph
    count = sum(int(torch.Size(t.dims).numel()) for t in graph.initializer)
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    shape = _static_dims(inputs[0]) if len(inputs) == 1 else []
    out = _static_dims(graph.output[0]) if len(graph.output) == 1 else []
    if count > max_parameters:
        raise ModelFileError(f"{path}: {count} parameters, more than max_parameters="
                             f"{max_parameters}")
    if len(shape) != 4 or min(shape[1:]) < 1 or len(out) != 2 or out[1] < 1:
        raise ModelFileError(f"{path}: needs one input (N, C, H, W) and one output (N, classes) "
                             f"with C, H, W and classes fixed; got {shape} -> {out}")
    try:
        model = load_onnx(path)
    except ValueError as err:
        raise ModelFileError(str(err)) from None
    bad = [k for k, v in model.state_dict().items()
           if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelFileError(f"{path}: non-finite (NaN/Inf) values in {bad[:5]}")
    channels = shape[1]
    manifest = Manifest("onnx", out[1], tuple(str(i) for i in range(out[1])),
                        (0.0,) * channels, (1.0,) * channels, tuple(shape[1:]))
    return model.to(map_location).eval(), manifest


modelfiles.register_reader(modelfiles.HF_FOLDER, read_folder)
modelfiles.register_reader(modelfiles.ONNX, read_onnx)
