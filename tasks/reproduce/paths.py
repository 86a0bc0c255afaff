"""Where the reproduction keeps every file (reproduce/dvc.yaml names the same paths)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.common.io import read_json

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
