"""The results table over whatever report cells exist (the `report` stage).

    python -m tasks.reproduce.report

Per profile, each method's mean over the (pattern, seed) cells with a 95% bootstrap
interval (mesa_lib.stats), paired differences between MESA and the controls, the per-beta breadth
and the N = 1 vs N = 3 comparison, and the targets of the issue checked against the intervals.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mesa_lib.stats import Interval, bootstrap_mean, paired_difference
from tasks.common.io import read_json
from tasks.reproduce.params import ReproParams, load_repro_params
from tasks.reproduce.paths import REPORT, RESULTS, ROOT, SELECTION, cells_of
from tasks.reproduce.selection import per_method

POINTS = 100  # percentages in the tables

# Display order of the methods (those a cell lacks are skipped).
METHODS = ("no trigger", "true trigger", "uniform patch", "point mixture", "point start 0",
           "point start 1", "point start 2", "point start 3", "point start 4",
           "Neural Cleanse", "MESA beta=0.9", "MESA beta=0.8", "MESA beta=0.5", "MESA ensemble")
CONTROLS = ("point mixture", "uniform patch", "Neural Cleanse", "no trigger", "true trigger")


# --------------------------------------------------------------------------- report


def _fmt(iv: Interval, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return (f"{iv.mean * POINTS:{sign}.2f} [{iv.low * POINTS:{sign}.2f}, "
            f"{iv.high * POINTS:{sign}.2f}]")


def _by_method(cells: list[dict[str, Any]], key: str) -> dict[str, list[float]]:
    """method -> per-cell values of `key` (cells lacking the method are left out)."""
    out: dict[str, list[float]] = defaultdict(list)
    for cell in cells:
        for method, m in cell["evaluation"].items():
            if m.get(key) is not None:
                out[method].append(m[key])
    return out


def _residual(cells: list[dict[str, Any]], method: str) -> list[float]:
    return [c["evaluation"][method]["asr"] - c["evaluation"]["clean"]["asr"] for c in cells
            if method in c["evaluation"]]


def coverage(cells: list[dict[str, Any]]) -> str:
    """'coverage: P patterns x S seeds' (and the count if the grid is not full)."""
    patterns = sorted({c["pattern"] for c in cells})
    seeds = sorted({c["seed"] for c in cells})
    full = len(cells) == len(patterns) * len(seeds)
    extra = "" if full else f" ({len(cells)} of {len(patterns) * len(seeds)} cells)"
    return f"coverage: {len(patterns)} patterns x {len(seeds)} seeds{extra}"


def method_table(cells: list[dict[str, Any]]) -> list[str]:
    """Each method: clean accuracy, ASR, ASR minus floor, ASR of held-out variants (%)."""
    acc, asr = _by_method(cells, "clean_acc"), _by_method(cells, "asr")
    variants = _by_method(cells, "asr_variants")
    rows = ["| model | clean accuracy | ASR | ASR - floor | ASR, held-out variants |",
            "|---|---|---|---|---|"]
    for method in ("clean", "backdoored", *METHODS):
        if method not in asr:
            continue
        gap = "-" if method == "clean" else _fmt(bootstrap_mean(_residual(cells, method)), True)
        var = _fmt(bootstrap_mean(variants[method])) if variants.get(method) else "-"
        rows.append(f"| {method} | {_fmt(bootstrap_mean(acc[method]))} | "
                    f"{_fmt(bootstrap_mean(asr[method]))} | {gap} | {var} |")
    return rows


def paired(cells: list[dict[str, Any]], method: str, other: str, key: str) -> Interval | None:
    """Paired difference method - other of `key` over the cells holding both."""
    both = [c for c in cells if method in c["evaluation"] and other in c["evaluation"]
            and c["evaluation"][method].get(key) is not None]
    if not both:
        return None
    return paired_difference([c["evaluation"][method][key] for c in both],
                             [c["evaluation"][other][key] for c in both])


def paired_table(cells: list[dict[str, Any]]) -> list[str]:
    """MESA ensemble minus each control, paired over cells (negative ASR = MESA better)."""
    rows = ["| MESA ensemble minus | ASR (points) | ASR, held-out variants | clean accuracy |",
            "|---|---|---|---|"]
    best_beta = _best_single_beta(cells)
    for other in (*CONTROLS, *([best_beta] if best_beta else [])):
        cols = [paired(cells, "MESA ensemble", other, k) for k in
                ("asr", "asr_variants", "clean_acc")]
        if cols[0] is None:
            continue
        rows.append(f"| {other} | " + " | ".join("-" if iv is None else _fmt(iv, True)
                                                  for iv in cols) + " |")
    return rows


def _best_single_beta(cells: list[dict[str, Any]]) -> str | None:
    """The single sub-model (N = 1) with the lowest mean ASR."""
    asr = _by_method(cells, "asr")
    betas = [m for m in asr if m.startswith("MESA beta=")]
    return min(betas, key=lambda m: sum(asr[m]) / len(asr[m])) if betas else None


def breadth_table(cells: list[dict[str, Any]]) -> list[str]:
    """Per beta: k-NN entropy, mean pairwise distance, target probability; and its ASR."""
    asr = _by_method(cells, "asr")
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cell in cells:
        for beta, b in cell["fits"]["breadth"].items():
            for key, value in b.items():
                if value is not None:
                    per[beta][key].append(value)
    rows = ["| sub-model | entropy (nats) | mean pairwise distance | target probability | "
            "ASR after repair with it alone (N = 1) |", "|---|---|---|---|---|"]
    for beta, vals in per.items():
        def m(key: str, vals: dict = vals) -> str:
            return f"{sum(vals[key]) / len(vals[key]):.2f}" if vals[key] else "-"

        rep = asr.get(f"MESA {beta}")
        rows.append(f"| {beta} | {m('entropy')} | {m('mean_pairwise_distance')} | "
                    f"{m('target_prob')} | "
                    f"{_fmt(bootstrap_mean(rep)) if rep else '-'} |")
    if asr.get("MESA ensemble"):
        rows.append(f"| ensemble (N = 3) | - | - | - | "
                    f"{_fmt(bootstrap_mean(asr['MESA ensemble']))} |")
    return rows


def targets(cells: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each judged against its interval."""
    if not any("MESA ensemble" in c["evaluation"] for c in cells):
        return []
    gap = bootstrap_mean(_residual(cells, "MESA ensemble"))
    drop = paired(cells, "MESA ensemble", "backdoored", "clean_acc")
    lines = [f"- MESA's residual ASR within 0.5 points of the clean model's own ASR (upper end of "
             f"the interval): {_fmt(gap, True)} -> {'met' if gap.high <= 0.005 else 'NOT met'}"]
    if drop is not None:
        # The target is about cost: a repair may end above the backdoored model's accuracy
        # (fine-tuning on clean images wins back what the injection cost), never 0.5 below it.
        lines.append(f"- clean accuracy at most 0.5 points below the backdoored model's (lower "
                     f"end of the paired interval): {_fmt(drop, True)} -> "
                     f"{'met' if drop.low >= -0.005 else 'NOT met'}")
    for other in ("uniform patch", "point mixture"):
        iv = paired(cells, "MESA ensemble", other, "asr")
        if iv is not None:
            verdict = "MESA better" if iv.high < 0 else ("MESA worse" if iv.low > 0 else
                                                         "no difference shown")
            lines.append(f"- MESA vs {other} (paired ASR difference): {_fmt(iv, True)} -> "
                         f"{verdict}")
    return lines


def seconds_line(cells: Iterable[dict[str, Any]]) -> str:
    """Mean seconds per phase of a cell, and the threads it ran on."""
    cells = list(cells)
    phases: dict[str, list[float]] = defaultdict(list)
    for c in cells:
        for k, v in c["seconds"].items():
            phases[k].append(v)
    threads = sorted({c.get("threads", 0) for c in cells})
    return ("mean seconds per cell: " + ", ".join(f"{k} {sum(v) / len(v):.0f}"
                                                   for k, v in phases.items())
            + f" (torch threads per cell: {threads})")


def profile_section(name: str, cells: list[dict[str, Any]]) -> list[str]:
    """The tables of one profile."""
    if not cells:
        return [f"## Profile `{name}`", "", "coverage: no cells yet", ""]
    rep = cells[0]["repair"]
    return [f"## Profile `{name}`", "", coverage(cells), "",
            f"Repair: stamp rate {rep['rate']}, {rep['epochs']} epochs, same for every method. "
            "Mean over cells with 95% bootstrap intervals, in percent; the floor is the clean "
            "model's own ASR for the same trigger.", "", *method_table(cells), "",
            "Paired differences (negative ASR: MESA leaves less backdoor):", "",
            *paired_table(cells), "", "Breadth of each sub-model and the staircase (N = 1 vs 3):",
            "", *breadth_table(cells), "", "Targets:", "", *targets(cells), "",
            seconds_line(cells), ""]


# --------------------------------------------------------------------------- commands


def _selection_lines() -> list[str]:
    if not SELECTION.is_file():
        return ["No selection yet: the tuned profile has no repair setting."]
    sel = read_json(SELECTION)
    rate, epochs = sel["chosen"]["rate"], sel["chosen"]["epochs"]
    rows = sorted(sel["table"], key=lambda r: (r["residual"], r["epochs"], r["rate"]))[:8]
    cells = [c for c in cells_of("select") if f"select-s{c['seed']}-p{c['pattern']}"
             in sel["cells"]]
    return [f"Chosen on validation (selection cells {', '.join(sel['cells'])}): stamp rate "
            f"**{rate}**, **{epochs}** repair epochs. "
            "Residual ASR (ASR minus the clean model's own) and accuracy drop: means over those "
            "cells and the swept methods, validation split, in percent (best 8 settings):", "",
            "| rate | epochs | residual ASR | accuracy drop |", "|---|---|---|---|",
            *[f"| {r['rate']} | {r['epochs']} | {100 * r['residual']:+.2f} | "
              f"{100 * r['drop']:+.2f} |" for r in rows], "",
            "Each swept method at the chosen setting (validation split, mean over the "
            "selection cells, in percent):", "",
            "| method | cells | residual ASR | accuracy drop |", "|---|---|---|---|",
            *[f"| {m} | {v['n']} | {100 * v['residual']:+.2f} | {100 * v['drop']:+.2f} |"
              for m, v in per_method(cells, rate, epochs).items()]]


def run_report(params: ReproParams) -> Path:
    """Merge whatever report cells exist into reproduce/results/report.md; log it to MLflow."""
    lines = ["# MESA reproduction: repair on CIFAR-10, CPU scale", "",
             "Written by `python -m tasks.reproduce.report` (the `report` stage of "
             "reproduce/dvc.yaml) from the cell records in reproduce/results/; protocol and "
             "commands: docs/reproduction.md.", "",
             f"Model: {params.model.arch} x{params.model.width}, {params.model.epochs} clean "
             f"epochs; target class {params.grid.target}; evaluation part: "
             f"{10000 - params.data.n_defender} test images never used to fit, repair or "
             "choose anything.", "", "## Selection (tuned profile)", "", *_selection_lines(), ""]
    for profile in ("tuned", "paper"):
        wanted = set(params.cells(profile))
        cells = [c for c in cells_of(profile) if (c["seed"], c["pattern"]) in wanted]
        lines += profile_section(profile, cells)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    write_text = "\n".join(lines).rstrip() + "\n"
    REPORT.write_text(write_text, encoding="utf-8")
    _track(params)
    return REPORT


def _track(params: ReproParams) -> None:
    """One MLflow run per report: the table, the selection and every cell record."""
    from tasks.common import tracking

    run = tracking.start_run("reproduction report", {"mesa.role": "reproduction"},
                             experiment="mesa-reproduce")
    try:
        files = [REPORT, ROOT / "params.yaml"] + ([SELECTION] if SELECTION.is_file() else [])
        tracking.log_artifacts(run, files + [RESULTS / p for p in ("tuned", "paper", "select")
                                             if (RESULTS / p).is_dir()], "reproduction")
        tracking.end_run(run)
    except BaseException:
        tracking.end_run(run, "FAILED")
        raise


def main(argv: list[str] | None = None) -> None:
    """Command line: write reproduce/results/report.md and print its path."""
    import argparse

    from tasks.common.env import apply_defaults

    apply_defaults()  # before mlflow is imported by the tracking of the report
    ap = argparse.ArgumentParser(prog="python -m tasks.reproduce.report")
    ap.add_argument("--params", default="reproduce/params.yaml")
    args = ap.parse_args(argv)
    print(run_report(load_repro_params(args.params)))


if __name__ == "__main__":
    main()
