"""Run a DVC pipeline's missing stages in N parallel single-thread shards.

    python -m tasks.dev.shards zoo/dvc.yaml 2 [--match cal-]
    python -m tasks.dev.shards reproduce/dvc.yaml 2
    python -m tasks.dev.shards reproduce/dvc.yaml 2 --first tuned@0-9 tuned@1-9 tuned@2-9

`dvc repro` runs one stage at a time, and two `dvc repro` processes would fight over the repo
lock. This runs the stages DVC reports as changed, level by level of DVC's own graph (a stage
starts once everything it depends on is done), N at a time, each with the command DVC would run
and `OMP_NUM_THREADS=1` (two 2-thread torch jobs on 2 cores slow each other 8-10x), then records
it with `dvc commit`, retried while another shard holds the lock. An interrupted run resumes
where it stopped; `dvc status` stays true. Logs: <pipeline folder>/logs/<stage>.log.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LOCKED = "Unable to acquire lock"
BIN = str(Path(sys.executable).parent)  # this environment's dvc and python
ENV = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}


def _dvc(*args: str, retries: int = 120) -> subprocess.CompletedProcess:
    """A dvc command, retried while another process holds the repo lock."""
    for _ in range(retries):
        done = subprocess.run(["dvc", *args], capture_output=True, text=True, env=ENV)
        if LOCKED not in done.stderr:
            return done
        time.sleep(2)
    raise RuntimeError(f"dvc {' '.join(args)}: the repo stayed locked")


def levels(dvcfile: Path) -> list[list[tuple[str, str, str]]]:
    """The pipeline's stages as (address, command, working dir), grouped by depth in the graph."""
    import networkx as nx
    from dvc.repo import Repo

    target = dvcfile.resolve()
    with Repo(".") as repo:
        graph = repo.index.graph
        ours = [s for s in graph if hasattr(s, "cmd") and Path(s.dvcfile.path).resolve() == target]
        depth: dict = {}
        for stage in reversed(list(nx.topological_sort(graph))):  # dependencies first
            ups = [depth[u] for u in graph.successors(stage) if u in depth]
            depth[stage] = 1 + max(ups, default=-1)
        grouped: dict[int, list[tuple[str, str, str]]] = {}
        for stage in ours:
            grouped.setdefault(depth[stage], []).append((stage.addressing, stage.cmd,
                                                         stage.wdir))
    return [grouped[k] for k in sorted(grouped)]


def changed(address: str) -> bool:
    """True unless `dvc status` says the stage is up to date."""
    return _dvc("status", "-q", address).returncode != 0


def _say(message: str) -> None:
    """One timestamped line, written in one call so two shards' lines never interleave."""
    sys.stdout.write(f"{time.strftime('%H:%M:%S')} {message}\n")
    sys.stdout.flush()


def run_stage(address: str, cmd: str, wdir: str, logs: Path) -> bool:
    """The stage's command, then `dvc commit`; False (logged) if either fails."""
    name = address.split(":")[-1]
    env = {**ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    _say(f"start {name}: {cmd}")
    with (logs / f"{name}.log").open("w") as log:
        ok = subprocess.run(cmd, shell=True, cwd=wdir, env=env, stdout=log,
                            stderr=subprocess.STDOUT).returncode == 0
    if ok:
        commit = _dvc("commit", "-f", "-q", address)
        ok = commit.returncode == 0
        if not ok:
            print(commit.stderr, file=sys.stderr)
    _say(f"{'done' if ok else 'FAILED'} {name}")
    return ok


def _rank(address: str, first: list[str]) -> int:
    """Position of a stage in --first; stages not named keep their order after those named."""
    name = address.split(":")[-1]
    return first.index(name) if name in first else len(first)


def main(argv: list[str] | None = None) -> int:
    """Run every missing stage of the pipeline; exit 1 if any failed."""
    ap = argparse.ArgumentParser(prog="python -m tasks.dev.shards")
    ap.add_argument("dvcfile", type=Path)
    ap.add_argument("shards", type=int, nargs="?", default=2)
    ap.add_argument("--match", default="", help="only stages whose name contains this")
    ap.add_argument("--first", nargs="*", default=[],
                    help="stage names to run before the rest of their level, in this order "
                         "(a partial grid then covers seeds evenly rather than seed 0 first)")
    args = ap.parse_args(argv)
    logs = args.dvcfile.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    failed = 0
    for level in levels(args.dvcfile):
        todo = [s for s in level if args.match in s[0].split(":")[-1] and changed(s[0])]
        todo.sort(key=lambda s: _rank(s[0], args.first))
        if not todo:
            continue
        with ThreadPoolExecutor(args.shards) as pool:
            results = list(pool.map(lambda s: run_stage(*s, logs), todo))
        failed += results.count(False)
    print(f"{failed} stage(s) failed" if failed else "all stages up to date")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
