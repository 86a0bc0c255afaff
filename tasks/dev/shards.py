"""Run a DVC pipeline's missing stages in N parallel single-thread shards.

    python -m tasks.dev.shards zoo/dvc.yaml 2 [--match cal-]
    python -m tasks.dev.shards reproduce/dvc.yaml 2
    python -m tasks.dev.shards zoo/dvc.yaml 2 --match @ --first '*@cal-*' --skip '*@test-r18*'

`dvc repro` runs one stage at a time, and two `dvc repro` processes would fight over the repo
lock. This runs the stages DVC reports as changed, N at a time, each as soon as every stage of
the pipeline it depends on is done (not level by level: a long stage no longer holds back the
dependants of the short ones), each with the command DVC would run and `OMP_NUM_THREADS=1` (two
2-thread torch jobs on 2 cores slow each other 8-10x), then records it with `dvc commit`, retried
while another shard holds the lock. A stage whose upstream failed is skipped. An interrupted run
resumes where it stopped; `dvc status` stays true. Logs: <pipeline folder>/logs/<stage>.log.

A stage whose records resume model by model may name a helper in dvc.yaml (`meta: {helper:
"python -m tasks.zoo.repair select --reverse"}`: the same work from the other end). When a shard
is free and no stage is ready, the helper of a running stage takes it, and it is stopped when
its stage ends (both skip what the other has recorded; the model the helper was on is lost).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import NamedTuple

LOCKED = "Unable to acquire lock"
BIN = str(Path(sys.executable).parent)  # this environment's dvc and python
ENV = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}


class Stage(NamedTuple):
    """One stage of the pipeline: its DVC address, command, working dir and the addresses of
    the pipeline's stages it depends on, directly or through others."""

    address: str
    cmd: str
    wdir: str
    upstream: frozenset[str]
    helper: str = ""  # dvc.yaml `meta: {helper: CMD}`: a second process for the same work

    @property
    def name(self) -> str:
        return self.address.split(":")[-1]


def _dvc(*args: str, retries: int = 900) -> subprocess.CompletedProcess:
    """A dvc command, retried for up to half an hour while another process holds the repo
    lock (a `dvc repro` of one long stage holds it throughout)."""
    for _ in range(retries):
        done = subprocess.run(["dvc", *args], capture_output=True, text=True, env=ENV)
        if LOCKED not in done.stderr:
            return done
        time.sleep(2)
    raise RuntimeError(f"dvc {' '.join(args)}: the repo stayed locked")


def stages(dvcfile: Path) -> list[Stage]:
    """The pipeline's stages in DVC's order, each with its upstream stages in this pipeline."""
    import networkx as nx
    from dvc.repo import Repo

    target = dvcfile.resolve()
    with Repo(".") as repo:
        graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
        ours = [s for s in graph if hasattr(s, "cmd") and Path(s.dvcfile.path).resolve() == target]
        mine = set(ours)
        return [Stage(s.addressing, s.cmd, s.wdir,
                      frozenset(u.addressing for u in nx.descendants(graph, s) if u in mine),
                      str((s.meta or {}).get("helper", "")) if isinstance(s.meta, dict) else "")
                for s in ours]


def changed(dvcfile: Path) -> set[str]:
    """Addresses of the pipeline's stages that `dvc status` does not call up to date (one call
    for the whole pipeline: one per stage took 3 s each, five minutes for the zoo)."""
    import json

    done = _dvc("status", "--json", str(dvcfile))
    if done.returncode != 0:
        raise RuntimeError(f"dvc status {dvcfile}: {done.stderr.strip()}")
    return set(json.loads(done.stdout or "{}"))


def _say(message: str) -> None:
    """One timestamped line, written in one call so two shards' lines never interleave."""
    sys.stdout.write(f"{time.strftime('%H:%M:%S')} {message}\n")
    sys.stdout.flush()


ONE_THREAD = {**ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_stage(stage: Stage, logs: Path) -> bool:
    """The stage's command, then `dvc commit`; False (logged) if either fails."""
    env = ONE_THREAD
    _say(f"start {stage.name}: {stage.cmd}")
    with (logs / f"{stage.name}.log").open("w") as log:
        ok = subprocess.run(stage.cmd, shell=True, cwd=stage.wdir, env=env, stdout=log,
                            stderr=subprocess.STDOUT).returncode == 0
    if ok:
        try:
            commit = _dvc("commit", "-f", "-q", stage.address)
        except RuntimeError as err:  # built but not recorded: `dvc commit` it by hand
            commit = subprocess.CompletedProcess([], 1, "", str(err))
        ok = commit.returncode == 0
        if not ok:
            print(commit.stderr, file=sys.stderr)
    _say(f"{'done' if ok else 'FAILED'} {stage.name}")
    return ok


def run_helper(stage: Stage, stop: threading.Event, logs: Path) -> None:
    """The stage's helper command until it ends or `stop` is set (its stage has ended)."""
    _say(f"helper of {stage.name}: {stage.helper}")
    with (logs / f"{stage.name}.helper.log").open("w") as log:
        proc = subprocess.Popen(stage.helper, shell=True, cwd=stage.wdir, env=ONE_THREAD,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            if stop.wait(5):  # the stage is done: the helper's last model is not needed
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
    _say(f"helper of {stage.name} ended ({'stopped' if stop.is_set() else proc.returncode})")


def prioritised(todo: list[Stage], first: list[str]) -> list[Stage]:
    """`todo` ordered by the first --first pattern (fnmatch) each name matches; stages matching
    none keep DVC's order after the rest."""
    def rank(stage: Stage) -> int:
        hits = [i for i, pattern in enumerate(first) if fnmatch.fnmatchcase(stage.name, pattern)]
        return min(hits, default=len(first))
    return sorted(todo, key=rank)


def runnable(todo: list[Stage], stale: set[str]) -> tuple[list[Stage], list[Stage]]:
    """(the stages of `todo` that can run now, those held back): a stage is held back while
    a stale stage it depends on is not in `todo` (skipped or not matched), directly or through
    one held back. Run anyway, it would build on outputs about to change, or on none."""
    held: set[str] = set()
    while True:
        ready = {s.address for s in todo} - held
        more = {s.address for s in todo if s.address not in held and (s.upstream & stale) - ready}
        if not more:
            return [s for s in todo if s.address not in held], \
                [s for s in todo if s.address in held]
        held |= more


def schedule(todo: list[Stage], shards: int, run: Callable[[Stage], bool],
             helper: Callable[[Stage, threading.Event], None] | None = None) -> tuple[int, int]:
    """Run `todo` on `shards` threads, in its order, each stage once its upstream stages in
    `todo` are done; a shard no stage can use yet runs the `helper` of a running stage that
    has one (stopped through its event when that stage ends). Returns (failed, skipped): a
    stage is skipped when an upstream one failed."""
    waiting = {s.address for s in todo}
    pending, done, lost = list(todo), set(), set()
    running: dict[Future, Stage | None] = {}  # None: a helper
    stops: dict[str, threading.Event] = {}  # the helpers started, by their stage's address
    skipped = 0
    with ThreadPoolExecutor(shards) as pool:
        while pending or running:
            for stage in list(pending):
                blockers = stage.upstream & waiting
                if blockers & lost:
                    pending.remove(stage)
                    lost.add(stage.address)
                    skipped += 1
                    _say(f"skipped {stage.name}: {sorted(blockers & lost)[0]} failed")
                elif blockers <= done and len(running) < shards:
                    pending.remove(stage)
                    running[pool.submit(run, stage)] = stage
            for stage in [s for s in running.values() if s is not None and s.helper]:
                if helper is not None and len(running) < shards and stage.address not in stops:
                    stops[stage.address] = threading.Event()
                    running[pool.submit(helper, stage, stops[stage.address])] = None
            if not running:
                continue  # only skips happened in this pass; look again
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                stage = running.pop(future)
                if stage is None:
                    if future.exception() is not None:
                        _say(f"a helper failed: {future.exception()}")
                    continue
                (done if future.result() else lost).add(stage.address)
                if stage.address in stops:
                    stops[stage.address].set()
    return len(lost) - skipped, skipped


def main(argv: list[str] | None = None) -> int:
    """Run every missing stage of the pipeline; exit 1 if any failed."""
    ap = argparse.ArgumentParser(prog="python -m tasks.dev.shards")
    ap.add_argument("dvcfile", type=Path)
    ap.add_argument("shards", type=int, nargs="?", default=2)
    ap.add_argument("--match", default="", help="only stages whose name contains this")
    ap.add_argument("--skip", nargs="*", default=[],
                    help="stage names or fnmatch patterns not to run this time (e.g. a stage "
                         "longer than the time left before the machine goes away)")
    ap.add_argument("--first", nargs="*", default=[],
                    help="stage names or fnmatch patterns to start before the rest, in this "
                         "order, as soon as what they depend on is done (a partial grid then "
                         "covers seeds evenly rather than seed 0 first)")
    ap.add_argument("--dry-run", action="store_true",
                    help="list what would run, in order, and what is held back; run nothing")
    args = ap.parse_args(argv)
    logs = args.dvcfile.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stale = changed(args.dvcfile)
    todo = [s for s in stages(args.dvcfile) if args.match in s.name and s.address in stale
            and not any(fnmatch.fnmatchcase(s.name, pattern) for pattern in args.skip)]
    todo, held = runnable(todo, stale)
    for stage in held:
        _say(f"held back {stage.name}: it depends on a stale stage not run this time")
    if args.dry_run:
        print("\n".join(s.name for s in prioritised(todo, args.first)))
        return 0
    failed, skipped = schedule(prioritised(todo, args.first), args.shards,
                               lambda s: run_stage(s, logs),
                               lambda s, stop: run_helper(s, stop, logs))
    if failed or skipped:
        print(f"{failed} stage(s) failed, {skipped} skipped")
        return 1
    print("all stages up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
