"""The stage graph, read from `dvc.yaml`: declared once, used by DVC and by the Prefect pipeline.

`flows/pipeline.py` runs the stages in `stage_order()`; the tracking module tags each stage run
with `stage_hash()`, a digest of what DVC writes into the stage's `dvc.lock` entry (command, md5 of
every dependency, values of every parameter), computed before the stage runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tasks.catalog import DATA_DIR, DATA_DVC

DVC_YAML = Path("dvc.yaml")


@dataclass(frozen=True)
class Stage:
    """One stage of dvc.yaml: command, dependency paths, params keys and written paths."""

    name: str
    cmd: str
    deps: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...]  # outs + metrics + plots


def _paths(entries: list[Any] | None) -> tuple[str, ...]:
    """dvc.yaml lists hold `path` or `{path: {options}}`."""
    out = []
    for entry in entries or []:
        out += list(entry) if isinstance(entry, dict) else [entry]
    return tuple(out)


def _params(entries: list[Any] | None) -> tuple[str, ...]:
    out = []
    for entry in entries or []:
        if isinstance(entry, dict):  # {params-file: [keys]}; we keep one params file
            for keys in entry.values():
                out += list(keys or [])
        else:
            out.append(entry)
    return tuple(out)


@cache
def _load(path: Path) -> dict[str, Stage]:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    stages = {}
    for name, body in (raw.get("stages") or {}).items():
        outs = _paths(body.get("outs")) + _paths(body.get("metrics")) + _paths(body.get("plots"))
        stages[name] = Stage(name, body["cmd"], _paths(body.get("deps")),
                             _params(body.get("params")), outs)
    return stages


def stages(path: Path = DVC_YAML) -> dict[str, Stage]:
    """All stages of dvc.yaml by name, in file order."""
    return _load(Path(path).resolve())


def _inside(a: str, b: str) -> bool:
    """Is path a equal to, or inside, path b?"""
    pa, pb = Path(a).parts, Path(b).parts
    return pa[: len(pb)] == pb


def upstream(stage: Stage, all_stages: dict[str, Stage]) -> list[str]:
    """Names of the stages whose outputs `stage` depends on."""
    return [s.name for s in all_stages.values() if s.name != stage.name
            and any(_inside(d, o) or _inside(o, d) for d in stage.deps for o in s.outs)]


def stage_order(path: Path = DVC_YAML) -> list[str]:
    """A topological order of the stages (ties keep dvc.yaml's order)."""
    all_stages = stages(path)
    before = {name: set(upstream(s, all_stages)) for name, s in all_stages.items()}
    order: list[str] = []
    while len(order) < len(all_stages):
        ready = [n for n in all_stages if n not in order and before[n] <= set(order)]
        if not ready:
            raise ValueError(f"dvc.yaml has a cycle among {sorted(set(all_stages) - set(order))}")
        order.append(ready[0])
    return order


def param_groups(stage: str, path: Path = DVC_YAML) -> list[str]:
    """The params.yaml groups a stage reads (e.g. ['base', 'train'])."""
    groups = [key.split(".")[0] for key in stages(path)[stage].params]
    return list(dict.fromkeys(groups))


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_md5() -> str:
    """The md5 DVC recorded for data/ in data.dvc ('untracked' if there is none)."""
    if not DATA_DVC.is_file():
        return "untracked"
    outs = yaml.safe_load(DATA_DVC.read_text(encoding="utf-8")).get("outs") or [{}]
    return str(outs[0].get("md5", "untracked"))


def dep_md5(dep: str) -> str:
    """md5 of a dependency: a file's content; data/ from data.dvc; other folders file by file."""
    p = Path(dep)
    if _inside(dep, str(DATA_DIR)):
        return data_md5()
    if p.is_file():
        return _md5(p)
    if p.is_dir():
        listing = [(f.relative_to(p).as_posix(), _md5(f)) for f in sorted(p.rglob("*"))
                   if f.is_file() and "__pycache__" not in f.parts]
        return hashlib.md5(json.dumps(listing).encode()).hexdigest()
    return "missing"


def stage_hash(stage: str, params: dict[str, dict[str, Any]], path: Path = DVC_YAML) -> str:
    """sha256 of (cmd, md5 of each dep, value of each param key) of a stage."""
    s = stages(path)[stage]
    values = {}
    for key in s.params:
        group, _, sub = key.partition(".")
        values[key] = params[group][sub] if sub else params[group]
    record = {"cmd": s.cmd, "deps": {d: dep_md5(d) for d in s.deps}, "params": values}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
