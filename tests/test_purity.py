"""The core stays pure: mesa_lib imports no orchestration, tracking or config library and reads
no environment variable or deployment path (STYLE habit 1)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"prefect", "mlflow", "dvc", "yaml", "pydantic", "great_expectations", "tasks",
             "flows", "prefect_dask", "dask"}


def _imported_roots(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_mesa_lib_imports_nothing_but_the_numeric_stack() -> None:
    for path in sorted((ROOT / "mesa_lib").glob("*.py")):
        assert not _imported_roots(path) & FORBIDDEN, path.name


def test_mesa_lib_knows_no_environment_or_deployment_path() -> None:
    for path in sorted((ROOT / "mesa_lib").glob("*.py")):
        text = path.read_text()
        for needle in ("os.environ", "getenv", "shared/datasets", "MESA_"):
            assert needle not in text, f"{path.name} mentions {needle}"


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\ndef f():\n    from prefect import flow\n")
    assert _imported_roots(bad) & FORBIDDEN == {"prefect"}
