"""The tuned profile's repair setting, chosen on the validation split of the selection cells.

    python -m tasks.reproduce.selection        # the `selection` stage of reproduce/dvc.yaml

`choose`: the (stamp rate, epochs) whose mean residual validation ASR (ASR minus the clean
model's own ASR) over the selection cells and the swept methods is lowest among those costing at
most `max_accuracy_drop` of validation accuracy; ties go to fewer epochs, then the lower rate.
The methods are weighed equally, so the choice does not favour MESA. Apart from the report (which
only reads selection.json and the select cells), nothing here is imported by a cell.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from tasks.common.io import write_json
from tasks.reproduce.params import ReproParams, load_repro_params
from tasks.reproduce.paths import SELECTION, cells_of


def _means(cells: list[dict[str, Any]], key: Callable[[dict[str, Any]], Hashable | None]
           ) -> dict[Any, dict[str, float]]:
    """key(row) -> mean residual ASR and accuracy drop over the sweep rows of every cell
    (rows whose key is None are left out), on the validation split."""
    acc: dict[Any, list[tuple[float, float]]] = defaultdict(list)
    for cell in cells:
        floor = cell["validation"]["clean"]["asr"]
        base_acc = cell["validation"]["backdoored"]["clean_acc"]
        for row in cell["sweep"]:
            if (k := key(row)) is not None:
                acc[k].append((row["asr"] - floor, base_acc - row["clean_acc"]))
    return {k: {"residual": sum(r for r, _ in v) / len(v), "drop": sum(d for _, d in v) / len(v),
                "n": len(v)} for k, v in acc.items()}


def sweep_table(cells: list[dict[str, Any]]) -> dict[tuple[float, int], dict[str, float]]:
    """(rate, epoch) -> mean residual ASR and accuracy drop over cells and methods."""
    return dict(sorted(_means(cells, lambda row: (row["rate"], row["epoch"])).items()))


def per_method(cells: list[dict[str, Any]], rate: float, epochs: int
               ) -> dict[str, dict[str, float]]:
    """Method -> mean residual ASR and accuracy drop at one setting (validation split).

    The choice averages over methods; this shows what each method contributes to that mean."""
    return _means(cells, lambda row: row["method"]
                  if (row["rate"], row["epoch"]) == (rate, epochs) else None)


def choose(cells: list[dict[str, Any]], max_drop: float) -> dict[str, Any]:
    """The tuned repair chosen on validation, with the table it was chosen from."""
    if not cells:
        raise ValueError("no selection cells: run `python -m tasks.reproduce.cell --profile "
                         "select ...` for the tuning grid first")
    table = sweep_table(cells)
    feasible = {k: v for k, v in table.items() if v["drop"] <= max_drop} or table
    rate, epochs = min(feasible, key=lambda k: (round(feasible[k]["residual"], 6), k[1], k[0]))
    return {"chosen": {"rate": rate, "epochs": epochs},
            "all_within_accuracy_budget": len(feasible) < len(table) or
            all(v["drop"] <= max_drop for v in table.values()),
            "cells": [f"{c['profile']}-s{c['seed']}-p{c['pattern']}" for c in cells],
            "table": [{"rate": r, "epochs": e, **v} for (r, e), v in table.items()]}


def selection_cells(params: ReproParams) -> list[dict[str, Any]]:
    """The tuning grid's select cells; exits naming the missing ones."""
    cells = cells_of("select")
    wanted = {(s, p) for s, p in params.cells("select")}
    missing = wanted - {(c["seed"], c["pattern"]) for c in cells}
    if missing:
        raise SystemExit(f"error: selection cells missing (seed, pattern): {sorted(missing)}")
    return [c for c in cells if (c["seed"], c["pattern"]) in wanted]


def run_selection(params: ReproParams) -> Path:
    """Choose the tuned profile's repair on the selection cells' validation figures."""
    write_json(SELECTION, choose(selection_cells(params), params.selection.max_accuracy_drop))
    return SELECTION


def main(argv: list[str] | None = None) -> None:
    """Command line: write reproduce/results/selection.json and print its path."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tasks.reproduce.selection")
    ap.add_argument("--params", default="reproduce/params.yaml")
    args = ap.parse_args(argv)
    print(run_selection(load_repro_params(args.params)))


if __name__ == "__main__":
    main()
