"""Which raw archive under data/ a product reads: the data stage, the flows and the scan
service's `reference: auto` all resolve it here, so they read the same file."""

from __future__ import annotations

from pathlib import Path

from mesa_lib.data import ARCHIVE_SUFFIXES, DataError
from tasks.common.env import DATA_SOURCE_ENV

CANONICAL = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


def archives_in(data_dir: Path) -> list[Path]:
    """The archives and folders in `data_dir` (hidden files left out), sorted."""
    if not data_dir.is_dir():
        return []
    return sorted(p for p in data_dir.iterdir() if not p.name.startswith(".")
                  and (p.is_dir() or p.name.lower().endswith(ARCHIVE_SUFFIXES)))


def resolve_archive(data_dir: Path, archive: str, name: str) -> Path:
    """The archive the data stage reads: `data.archive` inside data/, or the only one there."""
    if archive != "auto":
        path = data_dir / archive
        if not path.exists():
            raise DataError(f"data.archive: {path} does not exist")
        return path
    found = archives_in(data_dir)
    canonical = [p for p in found if p.name == CANONICAL[name]]
    if canonical:
        return canonical[0]
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(f"{data_dir}/ holds no data archive; run scripts/run_pipeline.sh (or "
                        f"set {DATA_SOURCE_ENV}=path/to/archive and run `python -m flows.fetch`)")
    raise DataError(f"{data_dir}/ holds several archives {[p.name for p in found]}; name one "
                    "in params.yaml data.archive")
