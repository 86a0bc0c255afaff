"""The catalog's `sampler` format: a trigger distribution as safetensors tensors + JSON config.

`<stem>.safetensors` holds `to_tensors()` and `<stem>.json` the `config()` of a
`TriggerDistribution` (MESA) or a `PointDistribution` (the point baseline); nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mesa_lib.distribution import PointDistribution, TriggerDistribution
from mesa_lib.fileio import atomic_write
from tasks.common.io import read_json, write_json


def save_sampler(stem: Path, sampler: TriggerDistribution | PointDistribution) -> None:
    """`<stem>.safetensors` (tensors) + `<stem>.json` (config) of a trigger sampler."""
    stem = Path(stem)
    tensors = sampler.to_tensors()
    atomic_write(stem.with_suffix(".safetensors"), lambda tmp: save_file(tensors, str(tmp)))
    write_json(stem.with_suffix(".json"), sampler.config())


def load_sampler(stem: Path, device: torch.device | str = "cpu"
                 ) -> TriggerDistribution | PointDistribution:
    """Inverse of `save_sampler`."""
    stem = Path(stem)
    config = read_json(stem.with_suffix(".json"))
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    cls = {"mesa": TriggerDistribution, "point": PointDistribution}.get(config.get("kind"))
    if cls is None:
        raise ValueError(f"{stem}.json: unknown sampler kind {config.get('kind')!r}")
    return cls.from_tensors(tensors, config, device)
