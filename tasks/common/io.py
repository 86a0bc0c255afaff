"""Readers and writers of the catalog's formats (npz, sampler, json, csv, png); no pickles."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mesa_lib.distribution import PointDistribution, TriggerDistribution
from mesa_lib.fileio import atomic_write


def save_npz(path: Path, arrays: Mapping[str, Tensor | np.ndarray]) -> None:
    """Write tensors / arrays as an uncompressed npz, atomically."""
    plain = {k: v.cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
             for k, v in arrays.items()}

    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.savez(fh, **plain)

    atomic_write(Path(path), write)


def load_npz(path: Path) -> dict[str, Tensor | np.ndarray]:
    """Read an npz written by `save_npz` (never unpickles); numeric arrays become tensors."""
    with np.load(path, allow_pickle=False) as npz:
        return {k: torch.from_numpy(npz[k].copy()) if npz[k].dtype.kind in "biuf" else npz[k]
                for k in npz.files}


def write_json(path: Path, value: Any) -> None:
    """Pretty JSON, atomically."""
    text = json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: Path) -> Any:
    """Parse a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


class CsvLog:
    """A CSV file (DVC plot) written row by row; the header comes from the first row."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self.fields: list[str] | None = None

    def append(self, row: Mapping[str, Any]) -> None:
        """Add one row (same keys every time)."""
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fields or list(row))
            if self.fields is None:
                self.fields = list(row)
                writer.writeheader()
            writer.writerow(dict(row))


def write_csv(path: Path, rows: list[Mapping[str, Any]]) -> None:
    """Write all rows at once (header from the first row)."""
    log = CsvLog(path)
    for row in rows:
        log.append(row)


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


def save_grid(path: Path, triggers: Tensor, nrow: int = 8, scale: int = 8) -> None:
    """Save triggers (K, C, h, w) in [0, 1] as one PNG grid, each upscaled `scale` x."""
    from torchvision.utils import save_image

    big = torch.nn.functional.interpolate(triggers.detach().float().cpu(), scale_factor=scale,
                                          mode="nearest")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(big, str(path), nrow=nrow, padding=2, pad_value=0.5)
