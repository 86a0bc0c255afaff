"""Readers and writers of the catalog's formats (npz, json, csv, png); no pickles.

Trigger samplers (MESA and point distributions) have their own module, tasks.pipeline.samplers.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

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


def save_grid(path: Path, triggers: Tensor, nrow: int = 8, scale: int = 8) -> None:
    """Save triggers (K, C, h, w) in [0, 1] as one PNG grid, each upscaled `scale` x."""
    from torchvision.utils import save_image

    big = torch.nn.functional.interpolate(triggers.detach().float().cpu(), scale_factor=scale,
                                          mode="nearest")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(big, str(path), nrow=nrow, padding=2, pad_value=0.5)
