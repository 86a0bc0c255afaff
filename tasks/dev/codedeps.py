"""Which project source files a DVC stage's command runs: its import closure, read statically.

DVC reruns a stage only when a dependency changes, so every project module a stage command
imports, directly or through other modules, must be among its `deps` in dvc.yaml; otherwise a
change to, say, the one `stamp` in mesa_lib/triggers.py would leave every stamped result stale.
`stage_code_deps` walks the `import` statements (anywhere in a file, lazy imports included) from
the command's module; tests/test_dvc_deps.py checks every dvc.yaml against it, and

    python -m tasks.dev.codedeps dvc.yaml [reproduce/dvc.yaml ...]

rewrites the code deps (the `- mesa_lib/...`, `- tasks/...`, `- flows/...` lines) of each stage
in place, leaving every other line and comment as it is. The only files left out are those in
`RECORD_ONLY`: they only talk to MLflow and cannot change an output; the walk does not follow
their imports either (what only they import serves the recording too). The plug-ins a registry
loads by name (mesa_lib/plugins.py: pyproject.toml's entry points) are imports too: a closure
that reaches a registry's module holds every module its entry point group names.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

PACKAGES = ("mesa_lib", "tasks", "flows")
# Modules that only record (MLflow runs, registry versions, tags): editing them cannot change
# any output of a stage, so they may be left out of the stages' deps.
RECORD_ONLY = frozenset({"tasks/common/tracking.py", "tasks/pipeline/registry.py"})
# registry module -> the entry point group it loads plug-ins of (mesa_lib.plugins)
REGISTRIES = {"mesa_lib/detectors.py": "mesa_lib.detectors",
              "mesa_lib/poison.py": "mesa_lib.attacks"}


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


def plugin_modules(root: Path, group: str) -> set[str]:
    """Modules the project's entry points of `group` name (what its registry may import)."""
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    points = project.get("entry-points", {}).get(group, {})
    return {value.split(":")[0] for value in points.values()}


def _with_parents(module: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b', 'a.b.c']: importing a module runs its packages' __init__ too."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def closure(module: str, root: Path) -> set[Path]:
    """Every project source file importing `module` runs, relative to `root` (the imports of
    RECORD_ONLY files are not followed)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        for name in _with_parents(todo.pop()):
            path = module_file(name, root)
            if path is not None and path not in seen:
                seen.add(path)
                rel = path.relative_to(root).as_posix()
                if rel not in RECORD_ONLY:
                    todo += sorted(_imports(path))
                if rel in REGISTRIES:
                    todo += sorted(plugin_modules(root, REGISTRIES[rel]))
    return {p.relative_to(root) for p in seen}


def command_module(cmd: str) -> str:
    """The module a stage command runs: `python -m flows.train ...` -> 'flows.train'."""
    match = re.search(r"python3?\s+-m\s+([\w.]+)", cmd)
    if not match:
        raise ValueError(f"stage command {cmd!r} is not `python -m <module>`")
    return match.group(1)


def stage_code_deps(cmd: str, root: Path) -> list[str]:
    """The source files a stage's deps must list: the closure minus RECORD_ONLY, sorted.

    `python -m <package>` runs the package's `__main__` module.
    """
    module = command_module(cmd)
    path = module_file(module, root)
    if path is not None and path.name == "__init__.py":
        module += ".__main__"
    files = {p.as_posix() for p in closure(module, root)}
    return sorted(files - RECORD_ONLY)


def missing_deps(cmd: str, deps: list[str], root: Path) -> list[str]:
    """Files of the command's closure that no dep (file or folder) covers."""
    covered = [Path(d) for d in deps]
    return [f for f in stage_code_deps(cmd, root)
            if not any(Path(f) == d or d in Path(f).parents for d in covered)]


def rewrite(dvc_yaml: Path, root: Path) -> str:
    """dvc.yaml's text with each stage's code deps replaced by `stage_code_deps`.

    Stages may be plain or `foreach` (their body under `do:`); a `deps:` list at any indentation
    is rewritten, keeping its non-code entries.
    """
    import yaml

    text = dvc_yaml.read_text(encoding="utf-8")
    stages = yaml.safe_load(text)["stages"]
    out: list[str] = []
    stage, item = None, None  # the current stage, and the indent of its deps' items
    for line in text.splitlines():
        name = re.match(r"^  ([\w-]+):$", line)
        if name and name.group(1) in stages:
            stage = name.group(1)
        if item is not None and not line.startswith(item + "- "):
            body = stages[stage].get("do", stages[stage])
            out += [f"{item}- {d}" for d in stage_code_deps(body["cmd"], root)]
            item = None
        deps = re.match(r"^( +)deps:$", line)
        if deps:
            item = deps.group(1) + "  "
        elif item is not None and re.match(rf"^{item}- (mesa_lib|tasks|flows)/", line):
            continue
        out.append(line.rstrip() if deps else line)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Rewrite the code deps of the given dvc.yaml files (default: ./dvc.yaml)."""
    args = sys.argv[1:] if argv is None else argv
    for name in args or ["dvc.yaml"]:
        path = Path(name).resolve()
        root = Path.cwd().resolve()
        path.write_text(rewrite(path, root), encoding="utf-8")
        print(f"{name}: code deps rewritten")


if __name__ == "__main__":
    main()
