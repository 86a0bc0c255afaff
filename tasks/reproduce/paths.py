"""Where the reproduction keeps every file (reproduce/dvc.yaml names the same paths)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.common.io import read_json

if TYPE_CHECKING:
    from tasks.reproduce.params import ReproParams

ROOT = Path("reproduce")
RESULTS = ROOT / "results"


def clean_path(seed: int) -> Path:
    """Stem of a seed's clean model (DVC-cached, not in git)."""
    return ROOT / "models" / f"clean-s{seed}"


def cell_path(profile: str, seed: int, pattern: int) -> Path:
    """A cell's JSON record (committed: the report needs no model to be rebuilt). One folder
    per profile, so the selection depends on the select cells only and the report on the rest."""
    return RESULTS / profile / f"s{seed}-p{pattern}.json"


def cells_of(profile: str) -> list[dict[str, Any]]:
    """Every cell record of a profile that exists, in (seed, pattern) order."""
    paths = sorted((RESULTS / profile).glob("s*-p*.json"),
                   key=lambda p: tuple(int(x[1:]) for x in p.stem.split("-")))
    return [read_json(p) for p in paths]


SELECTION = RESULTS / "selection.json"
REPORT = RESULTS / "report.md"


def repair_plan(params: ReproParams, profile: str) -> dict[str, Any] | None:
    """{'rate', 'epochs'} of a report cell's repair: the profile's own, or what selection.json
    chose where the profile says `selected` (None while no selection exists)."""
    r = params.profiles[profile].repair
    if "selected" in (r.rate, r.epochs):
        if not SELECTION.is_file():
            return None
        chosen = read_json(SELECTION)["chosen"]
    rate = chosen["rate"] if r.rate == "selected" else r.rate
    epochs = chosen["epochs"] if r.epochs == "selected" else r.epochs
    return {"rate": float(rate), "epochs": int(epochs)}


def ran_with(params: ReproParams) -> dict[str, Any]:
    """The settings outside its profile that shape a cell, as its record stores them (JSON)."""
    return json.loads(json.dumps({"seed_offset": params.seed_offset,
                                  "data": params.data.model_dump(),
                                  "model": params.model.model_dump(),
                                  "evaluate": params.evaluate.model_dump(),
                                  "target": params.grid.target}))
