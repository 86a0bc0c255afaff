"""The shard runner's scheduler: a stage starts as soon as its own upstream is done, in the
order asked for, and nothing downstream of a failure runs."""

from __future__ import annotations

import threading
import time

from tasks.dev.shards import Stage, prioritised, runnable, schedule


def _stage(name: str, *upstream: str, helper: str = "") -> Stage:
    return Stage(f"p/dvc.yaml:{name}", f"run {name}", ".",
                 frozenset(f"p/dvc.yaml:{u}" for u in upstream), helper)


class _Recorder:
    """A fake stage runner: records start and end order; named stages fail or take longer."""

    def __init__(self, slow: dict[str, float] | None = None, fail: set[str] = frozenset()):
        self.slow, self.fail = slow or {}, fail
        self.events: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, stage: Stage) -> bool:
        with self._lock:
            self.events.append(f"start {stage.name}")
        time.sleep(self.slow.get(stage.name, 0.01))
        with self._lock:
            self.events.append(f"end {stage.name}")
        return stage.name not in self.fail


def test_a_dependant_starts_while_a_long_stage_of_the_level_above_still_runs() -> None:
    # long and short are both bases; child needs only short. Level by level, child would wait
    # for long; here it runs beside it.
    todo = [_stage("long"), _stage("short"), _stage("child", "short")]
    run = _Recorder(slow={"long": 0.5})
    assert schedule(todo, 2, run) == (0, 0)
    assert run.events.index("start child") < run.events.index("end long")
    assert run.events.index("start child") > run.events.index("end short")


def test_every_stage_runs_after_all_of_its_upstream() -> None:
    todo = [_stage("a"), _stage("b", "a"), _stage("c", "a", "b"), _stage("d")]
    run = _Recorder()
    assert schedule(todo, 2, run) == (0, 0)
    for stage in todo:
        for up in stage.upstream:
            up_name = up.split(":")[-1]
            assert run.events.index(f"end {up_name}") < run.events.index(f"start {stage.name}")
    assert sorted(e for e in run.events if e.startswith("start")) == [
        "start a", "start b", "start c", "start d"]


def test_downstream_of_a_failure_is_skipped_and_the_rest_runs() -> None:
    todo = [_stage("bad"), _stage("child", "bad"), _stage("grandchild", "child"),
            _stage("other")]
    run = _Recorder(fail={"bad"})
    assert schedule(todo, 2, run) == (1, 2)
    assert "start child" not in run.events and "start grandchild" not in run.events
    assert "end other" in run.events


def test_upstream_already_up_to_date_does_not_hold_a_stage_back() -> None:
    # "base" is not in todo (dvc status: up to date), so its dependant is ready at once.
    run = _Recorder()
    assert schedule([_stage("child", "base")], 1, run) == (0, 0)
    assert run.events == ["start child", "end child"]


def test_first_patterns_order_the_ready_stages() -> None:
    todo = [_stage("base@test-1"), _stage("base@cal-1"), _stage("backdoor@cal-2"),
            _stage("other")]
    order = [s.name for s in prioritised(todo, ["*@cal-*", "other"])]
    assert order == ["base@cal-1", "backdoor@cal-2", "other", "base@test-1"]
    run = _Recorder()
    schedule(prioritised(todo, ["*@cal-*"]), 1, run)
    assert [e for e in run.events if e.startswith("start")][:2] == [
        "start base@cal-1", "start backdoor@cal-2"]


def test_a_stage_whose_stale_upstream_is_not_run_is_held_back() -> None:
    # base is stale but skipped: child would build on a base about to change, grandchild on
    # child; other's upstream (done) is up to date.
    todo = [_stage("child", "base"), _stage("grandchild", "child", "base"), _stage("other", "done")]
    stale = {"p/dvc.yaml:base", "p/dvc.yaml:child", "p/dvc.yaml:grandchild", "p/dvc.yaml:other"}
    ready, held = runnable(todo, stale)
    assert [s.name for s in ready] == ["other"]
    assert [s.name for s in held] == ["child", "grandchild"]
    assert runnable(todo + [_stage("base")], stale)[1] == []


class _Helper:
    """A fake helper: records when it starts and whether it was stopped by its stage's end."""

    def __init__(self, events: list[str], lock: threading.Lock) -> None:
        self.events, self._lock = events, lock

    def __call__(self, stage: Stage, stop: threading.Event) -> None:
        with self._lock:
            self.events.append(f"helper {stage.name}")
        stopped = stop.wait(5)
        with self._lock:
            self.events.append(f"helper {stage.name} {'stopped' if stopped else 'timed out'}")


def test_a_free_shard_runs_the_helper_of_a_running_stage_until_it_ends() -> None:
    # short is ready at once, so it goes first; then the free shard helps long (which has a
    # helper), and the helper is stopped when long ends; child waits for long itself.
    todo = [_stage("long", helper="help long"), _stage("short"), _stage("child", "long")]
    run = _Recorder(slow={"long": 0.5})
    helper = _Helper(run.events, run._lock)
    assert schedule(todo, 2, run, helper) == (0, 0)
    ev = run.events
    assert ev.index("end short") < ev.index("helper long") < ev.index("end long")
    assert ev.index("end long") < ev.index("helper long stopped")
    assert ev.count("helper long") == 1 and ev.index("start child") > ev.index("end long")


def test_a_helper_never_takes_a_shard_a_ready_stage_could_use() -> None:
    todo = [_stage("long", helper="help long"), _stage("a"), _stage("b")]
    run = _Recorder(slow={"long": 0.3, "a": 0.05, "b": 0.05})
    helper = _Helper(run.events, run._lock)
    assert schedule(todo, 2, run, helper) == (0, 0)
    assert run.events.index("helper long") > run.events.index("end b")
    assert schedule([_stage("solo", helper="h")], 1, _Recorder(), helper) == (0, 0)  # no shard
    assert "helper solo" not in run.events
