"""Which project source files a DVC stage's command runs: its import closure, read statically.

DVC reruns a stage only when a dependency changes, so every project module a stage command
imports, directly or through other modules, must be among its `deps` in dvc.yaml; otherwise a
change to, say, the one `stamp` in mesa_lib/triggers.py would leave every stamped result stale.
`stage_code_deps` walks the `import` statements (anywhere in a file, lazy imports included) from
the command's module; tests/test_dvc_deps.py checks dvc.yaml against it, and

    python -m tasks.common.codedeps [dvc.yaml]

prints the lists to paste. The only files left out are those in `RECORD_ONLY`: they only talk to
MLflow and cannot change an output.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

PACKAGES = ("mesa_lib", "tasks", "flows")
# Modules that only record (MLflow runs, registry versions, tags): editing them cannot change
# any output of a stage, so they may be left out of the stages' deps.
RECORD_ONLY = frozenset({"tasks/common/tracking.py", "tasks/pipeline/registry.py"})


def module_file(module: str, root: Path) -> Path | None:
    """The source file of a project module ('a.b' -> a/b.py or a/b/__init__.py), or None."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Modules named by the import statements of one file (`from a import b` gives a and a.b)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names}
    return out


def _with_parents(module: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b', 'a.b.c']: importing a module runs its packages' __init__ too."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def closure(module: str, root: Path) -> set[Path]:
    """Every project source file importing `module` runs, relative to `root`."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        for name in _with_parents(todo.pop()):
            path = module_file(name, root)
            if path is not None and path not in seen:
                seen.add(path)
                todo += sorted(_imports(path))
    return {p.relative_to(root) for p in seen}


def command_module(cmd: str) -> str:
    """The module a stage command runs: `python -m flows.train ...` -> 'flows.train'."""
    match = re.search(r"python3?\s+-m\s+([\w.]+)", cmd)
    if not match:
        raise ValueError(f"stage command {cmd!r} is not `python -m <module>`")
    return match.group(1)


def stage_code_deps(cmd: str, root: Path) -> list[str]:
    """The source files a stage's deps must list: the closure minus RECORD_ONLY, sorted."""
    files = {p.as_posix() for p in closure(command_module(cmd), root)}
    return sorted(files - RECORD_ONLY)


def missing_deps(cmd: str, deps: list[str], root: Path) -> list[str]:
    """Files of the command's closure that no dep (file or folder) covers."""
    covered = [Path(d) for d in deps]
    return [f for f in stage_code_deps(cmd, root)
            if not any(Path(f) == d or d in Path(f).parents for d in covered)]


def main(argv: list[str] | None = None) -> None:
    """Print every stage's code deps as YAML list items."""
    from tasks.common.dvcgraph import stages

    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]).resolve().parent if args else Path.cwd()
    for name, stage in stages(root).items():
        print(f"{name}:")
        for dep in stage_code_deps(stage.cmd, root):
            print(f"  - {dep}")


if __name__ == "__main__":
    main()
