"""The stage graph of the demo pipeline's dvc.yaml as DVC itself reads it (`dvc.repo.Repo`), never
re-parsed here. (The reproduction's reproduce/dvc.yaml is another pipeline of the same project.)

`flows/pipeline.py` runs the stages in `stage_order()`; the tracking module logs each stage's
params groups (`param_groups`); `data_md5` is the hash DVC recorded for `data/` in `data.dvc`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tasks.common.catalog import DATA_DVC


@dataclass(frozen=True)
class Stage:
    """One stage of dvc.yaml: command, dependency paths, params keys and written paths."""

    name: str
    cmd: str
    deps: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...]  # outs + metrics + plots
    upstream: tuple[str, ...]  # the stages whose outputs it depends on, directly


def _repo(root: Path):  # noqa: ANN202 - dvc is imported lazily: 0.3 s, only where needed
    from dvc.repo import Repo

    return Repo(str(root))


def _as_stage(stage, graph) -> Stage:  # noqa: ANN001
    from dvc.dependency.param import ParamsDependency

    params = tuple(k for d in stage.deps if isinstance(d, ParamsDependency) for k in d.params)
    deps = tuple(d.def_path for d in stage.deps if not isinstance(d, ParamsDependency))
    upstream = tuple(s.name for s in graph.successors(stage)
                     if hasattr(s, "name") and s.dvcfile.path == stage.dvcfile.path)
    return Stage(stage.name, stage.cmd, deps, params, tuple(o.def_path for o in stage.outs),
                 upstream)


@cache
def _load(root: Path) -> tuple[dict[str, Stage], tuple[str, ...]]:
    import networkx as nx

    dvcfile = root / "dvc.yaml"
    with _repo(root) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        named = [s for s in nx.topological_sort(graph.reverse())
                 if hasattr(s, "name") and Path(s.dvcfile.path).resolve() == dvcfile]
        stages = {s.name: _as_stage(s, graph) for s in named}
    return stages, tuple(stages)


def stages(root: Path = Path(".")) -> dict[str, Stage]:
    """The stages of `<root>/dvc.yaml` by name."""
    return dict(_load(Path(root).resolve())[0])


def stage_order(root: Path = Path(".")) -> list[str]:
    """A topological order of the stages (DVC's graph)."""
    return list(_load(Path(root).resolve())[1])


def param_groups(stage: str, root: Path = Path(".")) -> list[str]:
    """The params.yaml groups a stage reads (e.g. ['base', 'train'])."""
    groups = [key.split(".")[0] for key in stages(root)[stage].params]
    return list(dict.fromkeys(groups))


def data_md5(dvc_file: Path = DATA_DVC) -> str:
    """The md5 DVC recorded for data/ in data.dvc ('untracked' if there is none)."""
    if not Path(dvc_file).is_file():
        return "untracked"
    from dvc.dvcfile import load_file

    with _repo(Path(dvc_file).resolve().parent) as repo:
        (stage,) = load_file(repo, str(Path(dvc_file).resolve())).stages.values()
        hash_info = stage.outs[0].hash_info if stage.outs else None
        return str(hash_info.value) if hash_info and hash_info.value else "untracked"
