"""The end of the main job: one short table a person reads at a glance, then where to look next.

    python -m tasks.pipeline.summary      # printed by scripts/run_pipeline.sh after `dvc repro`

One row per model (backdoored, MESA-repaired, point-repaired) from the evaluate stage's metrics
and scan verdicts: clean accuracy, ASR of the attacker's trigger, mean ASR of the held-out
variants, the scan's verdict, and whether the repair passed its own verification (on defender
images, before any held-out figure). `dvc metrics show` still lists every metric.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tasks.common import catalog
from tasks.common.io import read_json

ROWS = (("backdoored", "backdoored"), ("mesa", "MESA-repaired"), ("baseline", "point-repaired"))
VERIFICATION = {"mesa": "repair_verification", "baseline": "baseline_verification"}


def _verification(key: str) -> str:
    """The repair's own verification (before any held-out number): passed, or why not."""
    path = catalog.path(VERIFICATION[key]) if key in VERIFICATION else None
    if path is None or not path.is_file():
        return "-"
    record = read_json(path)
    if record["verdict"] == "clean":
        return "passed"
    return "not repaired" if record["verdict"] == "not repaired" else "FAILED: " + record["reason"]


def _verdict(scan: dict[str, Any], key: str) -> str:
    v = scan.get(key)
    if not v:
        return "not scanned"
    target = f", target {v['target']}" if v.get("target") is not None else ""
    return f"{v['status']}{target} (p = {v['p_value']:.3f})" if "p_value" in v else \
        f"{v['status']}{target}"


def table(metrics: dict[str, Any], scan: dict[str, Any]) -> Table:
    """The summary table of the evaluate stage's outputs."""
    out = Table(title="MESA pipeline: held-out results", title_justify="left")
    left = ("model", "scan verdict", "repair verification")
    for column in ("model", "clean accuracy", "ASR, trigger", "ASR, held-out variants",
                   "scan verdict", "repair verification"):
        out.add_column(column, justify="left" if column in left else "right")
    for key, label in ROWS:
        m = metrics.get(key)
        if m is None:
            continue
        out.add_row(label, f"{m['clean_accuracy']:.1%}", f"{m['asr']:.1%}",
                    f"{m['asr_variants_mean']:.1%}", _verdict(scan, key), _verification(key))
    return out


def where_to_look(root: Path, tracking_uri: str) -> list[str]:
    """Lines naming the MLflow UI command, the plots and the data docs."""
    docs = catalog.path("raw_data_docs") / "index.html"
    return [
        f"MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {tracking_uri}"
        "  (then http://127.0.0.1:5000)",
        "Plots:       .venv/bin/dvc plots show  (writes dvc_plots/index.html)",
        f"Data docs:   {(root / docs).as_posix()}",
        "All metrics: .venv/bin/dvc metrics show",
    ]


def main(argv: list[str] | None = None) -> None:
    """Print the table and the pointers; exit 1 if the evaluate stage has not run."""
    args = sys.argv[1:] if argv is None else argv
    uri = args[0] if args else f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    path = catalog.metrics_path("evaluate")
    if not path.is_file():
        sys.exit(f"no {path}: run the pipeline first (scripts/run_pipeline.sh)")
    scan = read_json(catalog.path("scan")) if catalog.path("scan").is_file() else {}
    console = Console(width=110)
    console.print(table(read_json(path), scan))
    for line in where_to_look(Path.cwd(), uri):
        console.print(line, highlight=False, soft_wrap=True)


if __name__ == "__main__":
    main()
