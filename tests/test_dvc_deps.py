"""DVC deps that cannot go stale: every stage lists the import closure of its command."""

from __future__ import annotations

from pathlib import Path

import yaml

from tasks.dev.codedeps import RECORD_ONLY, closure, missing_deps, stage_code_deps

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PIPELINES = ("dvc.yaml", "reproduce/dvc.yaml", "zoo/dvc.yaml")


def _bodies(dvcfile: str) -> dict[str, dict]:
    """Each stage's body (a foreach stage's `do`), by name."""
    stages = yaml.safe_load((ROOT / dvcfile).read_text())["stages"]
    return {name: body.get("do", body) for name, body in stages.items()}
# The stages whose results depend on the one `stamp` (poisoning, MESA, the baselines, repair,
# evaluation); data and validate never stamp.
STAMPING = {"poison", "train", "recover", "baseline", "repair", "evaluate"}


def test_every_stage_of_every_pipeline_lists_its_whole_import_closure() -> None:
    for dvcfile in PIPELINES:
        for name, body in _bodies(dvcfile).items():
            assert missing_deps(body["cmd"], body["deps"], ROOT) == [], f"{dvcfile}:{name}"


def test_removing_a_dep_is_caught() -> None:
    deps = [d for d in STAGES["train"]["deps"] if d != "mesa_lib/triggers.py"]
    assert missing_deps(STAGES["train"]["cmd"], deps, ROOT) == ["mesa_lib/triggers.py"]
    deps = [d for d in STAGES["evaluate"]["deps"] if not d.startswith("mesa_lib/")]
    assert "mesa_lib/detect.py" in missing_deps(STAGES["evaluate"]["cmd"], deps, ROOT)


def test_a_folder_dep_covers_its_files() -> None:
    deps = ["mesa_lib", "tasks", "flows"]
    assert missing_deps(STAGES["train"]["cmd"], deps, ROOT) == []


def test_editing_stamp_reruns_every_stage_that_stamps() -> None:
    with_stamp = {name for name, body in STAGES.items()
                  if "mesa_lib/triggers.py" in body["deps"]}
    assert with_stamp >= STAMPING


def test_the_walk_follows_lazy_imports_and_package_inits() -> None:
    files = {p.as_posix() for p in closure("flows.train", ROOT)}
    assert {"flows/__init__.py", "tasks/__init__.py", "tasks/pipeline/__init__.py",
            "mesa_lib/triggers.py", "tasks/common/tracking.py"} <= files
    # tasks.scan.reference resolves the raw archive as the data stage does, from tasks/common
    assert "tasks/common/rawdata.py" in {p.as_posix() for p in closure("tasks.scan.reference",
                                                                       ROOT)}


def test_a_stage_that_can_load_plug_ins_by_name_lists_their_modules() -> None:
    """Registries import entry-point plug-ins by name (mesa_lib.plugins): a zoo model built with
    a whole-image attack runs mesa_lib/globalattacks.py though nothing imports it."""
    files = {p.as_posix() for p in closure("tasks.zoo.build", ROOT)}
    assert {"mesa_lib/plugins.py", "mesa_lib/globalattacks.py"} <= files
    assert "mesa_lib/transformsearch.py" not in files  # a detector: only the scan loads it
    assert "mesa_lib/transformsearch.py" in {p.as_posix() for p in closure("tasks.zoo.scan",
                                                                           ROOT)}


def test_only_record_only_modules_are_exempt() -> None:
    assert RECORD_ONLY == {"tasks/common/tracking.py", "tasks/pipeline/registry.py"}
    for dvcfile in PIPELINES:
        for name, body in _bodies(dvcfile).items():
            code = [d for d in body["deps"] if d.endswith(".py")]
            assert code == stage_code_deps(body["cmd"], ROOT), name  # exact and sorted


def test_stage_commands_find_the_projects_interpreter_without_activation() -> None:
    """`.venv/bin/dvc repro` from a shell without the venv on PATH: the stages' `python` is
    still the project's (scripts/setup.sh's .pth line), so `import torch` works in them."""
    import subprocess
    import sys

    stage = "import subprocess; subprocess.run(['python', '-c', 'import torch'], check=True)"
    done = subprocess.run([sys.executable, "-c", stage], env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
