"""The results table over whatever report cells exist (the `report` stage).

    python -m tasks.reproduce.report

Per profile, each method's mean over the (pattern, seed) cells with a 95% bootstrap interval
(mesa_lib.stats; resampled by seed, then by cell, since a seed's cells share its clean model),
paired differences between MESA and the controls and each single sub-model, the per-beta breadth
and the N = 1 vs N = 3 comparison, whether Neural Cleanse reached its threshold, and the targets
of the issue checked against the intervals; then paper vs tuned as paired differences on the
cells both profiles ran. Nothing here chooses anything on the evaluation figures it reads.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from math import comb
from pathlib import Path
from typing import Any

from mesa_lib.stats import Interval, bootstrap_mean
from tasks.common.io import read_json
from tasks.reproduce import reruns, verdicts
from tasks.reproduce.params import ReproParams, load_repro_params
from tasks.reproduce.paths import (
    REPORT,
    RESULTS,
    ROOT,
    SELECTION,
    cells_of,
    ran_with,
    repair_plan,
)
from tasks.reproduce.selection import per_method

POINTS = 100  # percentages in the tables

BASE = ("clean", "backdoored")  # measured, not repaired
CONTROLS = ("point mixture", "point mixture 10x10", "uniform patch", "b/w patch",
            "Neural Cleanse", "no trigger", "true trigger")


def methods(cells: list[dict[str, Any]]) -> list[str]:
    """The repaired models the cells hold, in display order: the controls, the point starts, Neural
    Cleanse, MESA's sub-models (largest beta first), the ensemble. Read from the records, not
    listed here, so a grid with other betas or starts (`dvc exp run -S`) loses no row."""
    held = {m for c in cells for m in c["evaluation"]} - set(BASE)
    starts = sorted((m for m in held if m.startswith("point start ")),
                    key=lambda m: int(m.rsplit(" ", 1)[1]))
    betas = sorted((m for m in held if m.startswith("MESA beta=")),
                   key=lambda m: -float(m.split("=", 1)[1]))
    paper_points = sorted(m for m in held if m.startswith("point mixture ")
                          and m != "point mixture")
    order = ["no trigger", "true trigger", "uniform patch", "b/w patch", "point mixture",
             *starts, *paper_points, "Neural Cleanse", *betas, "MESA ensemble"]
    return [m for m in order if m in held] + sorted(held - set(order))


# --------------------------------------------------------------------------- report


def _fmt(iv: Interval, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return (f"{iv.mean * POINTS:{sign}.2f} [{iv.low * POINTS:{sign}.2f}, "
            f"{iv.high * POINTS:{sign}.2f}]")


def _value(cell: dict[str, Any], method: str, key: str) -> float | None:
    """A cell's figure `key` for one method, or None if the cell lacks it."""
    m = cell["evaluation"].get(method)
    return None if m is None else m.get(key)


def interval(cells: list[dict[str, Any]], value: Callable[[dict[str, Any]], float | None]
             ) -> Interval | None:
    """Mean of value(cell) over the cells that have it, with a 95% bootstrap interval.

    Cells of one seed share a clean model, so the resampling is by seed, then by cell within it
    (mesa_lib.stats); None if no cell has the value."""
    pairs = [(v, c["seed"]) for c in cells if (v := value(c)) is not None]
    if not pairs:
        return None
    return bootstrap_mean([v for v, _ in pairs], groups=[s for _, s in pairs])


def _cell_fmt(iv: Interval | None, signed: bool = False) -> str:
    return "-" if iv is None else _fmt(iv, signed)


def floor_gap(cell: dict[str, Any], method: str) -> float | None:
    """A cell's ASR after repair with `method` minus its clean model's own ASR (the floor)."""
    asr = _value(cell, method, "asr")
    return None if asr is None else asr - cell["evaluation"]["clean"]["asr"]


def residual(cells: list[dict[str, Any]], method: str) -> Interval | None:
    """ASR after repair minus the clean model's own ASR for the same trigger."""
    return interval(cells, lambda c: floor_gap(c, method))


def coverage(cells: list[dict[str, Any]]) -> str:
    """'coverage: P patterns x S seeds' (and the count if the grid is not full)."""
    patterns = sorted({c["pattern"] for c in cells})
    seeds = sorted({c["seed"] for c in cells})
    full = len(cells) == len(patterns) * len(seeds)
    extra = "" if full else f" ({len(cells)} of {len(patterns) * len(seeds)} cells)"
    return f"coverage: {len(patterns)} patterns x {len(seeds)} seeds{extra}"


def method_table(cells: list[dict[str, Any]]) -> list[str]:
    """Each method: clean accuracy, ASR, ASR minus floor, ASR of held-out variants, and the
    model's own floors: its target rate with no trigger and with a random pattern at the
    trigger's places (%; '-' for cells recorded before the floors were measured)."""
    rows = ["| model | clean accuracy | ASR | ASR - floor | ASR, held-out variants | own floor: "
            "no trigger | own floor: random pattern |", "|---|---|---|---|---|---|---|"]
    for method in (*BASE, *methods(cells)):
        asr = interval(cells, lambda c, m=method: _value(c, m, "asr"))
        if asr is None:
            continue
        acc = interval(cells, lambda c, m=method: _value(c, m, "clean_acc"))
        var = interval(cells, lambda c, m=method: _value(c, m, "asr_variants"))
        gap = "-" if method == "clean" else _cell_fmt(residual(cells, method), True)
        own = [_cell_fmt(interval(cells, lambda c, m=method, k=k: _value(c, m, k)))
               for k in ("floor_no_trigger", "floor_random_pattern")]
        rows.append(f"| {method} | {_cell_fmt(acc)} | {_fmt(asr)} | {gap} | {_cell_fmt(var)} | "
                    f"{own[0]} | {own[1]} |")
    return rows


def paired(cells: list[dict[str, Any]], method: str, other: str, key: str) -> Interval | None:
    """Paired difference method - other of `key` over the cells holding both."""
    def diff(c: dict[str, Any]) -> float | None:
        a, b = _value(c, method, key), _value(c, other, key)
        return None if a is None or b is None else a - b
    return interval(cells, diff)


def paired_table(cells: list[dict[str, Any]]) -> list[str]:
    """MESA ensemble minus each control and each single sub-model (negative ASR: MESA better).

    Every sub-model gets a row: picking the best one would be a choice made on evaluation."""
    rows = ["| MESA ensemble minus | ASR (points) | ASR, held-out variants | clean accuracy |",
            "|---|---|---|---|"]
    betas = [m for m in methods(cells) if m.startswith("MESA beta=")]
    for other in (*CONTROLS, *betas):
        cols = [paired(cells, "MESA ensemble", other, k) for k in
                ("asr", "asr_variants", "clean_acc")]
        if cols[0] is None:
            continue
        rows.append(f"| {other} | " + " | ".join(_cell_fmt(iv, True) for iv in cols) + " |")
    return rows


def breadth_table(cells: list[dict[str, Any]]) -> list[str]:
    """Per beta: k-NN entropy, mean pairwise distance, target probability; and its ASR."""
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cell in cells:
        for beta, b in cell["fits"]["breadth"].items():
            for key, value in b.items():
                if value is not None:
                    per[beta][key].append(value)
    rows = ["| sub-model | entropy (nats) | mean pairwise distance | target probability, last "
            "fit epoch | ASR after repair with it alone (N = 1) |", "|---|---|---|---|---|"]
    for beta, vals in per.items():
        def m(key: str, vals: dict = vals) -> str:
            return f"{sum(vals[key]) / len(vals[key]):.2f}" if vals[key] else "-"

        rep = interval(cells, lambda c, b=beta: _value(c, f"MESA {b}", "asr"))
        rows.append(f"| {beta} | {m('entropy')} | {m('mean_pairwise_distance')} | "
                    f"{m('target_prob')} | {_cell_fmt(rep)} |")
    ens = interval(cells, lambda c: _value(c, "MESA ensemble", "asr"))
    if ens is not None:
        rows.append(f"| ensemble (N = 3) | - | - | - | {_fmt(ens)} |")
    return rows


def cleanse_line(cells: list[dict[str, Any]]) -> str:
    """How many Neural Cleanse fits reached their ASR threshold (a miss repairs with a weak
    mask: its patience counts from the first epoch, reached or not)."""
    fits = [(c["fits"]["cleanse"], c["settings"]["cleanse"]["asr_threshold"]) for c in cells
            if "cleanse" in c.get("fits", {})]
    if not fits:
        return ""
    reached = sum(f["asr"] >= threshold for f, threshold in fits)
    l1 = sum(f["l1"] for f, _ in fits) / len(fits)
    return (f"Neural Cleanse's kept mask reached its ASR threshold on the fit images in "
            f"{reached} of {len(fits)} cells (mean mask L1 {l1:.1f}).")


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


def seeds_caveat(cells: list[dict[str, Any]]) -> str:
    """How far a seed-first bootstrap can be trusted with this few seeds."""
    n = len({c["seed"] for c in cells})
    return (f"The intervals resample {n} seeds, which allows only {comb(2 * n - 1, n)} distinct "
            "draws of seeds: their 95% is nominal, and the spread between seeds (different "
            "clean models and injections) is measured only roughly.")


def profile_section(name: str, cells: list[dict[str, Any]], planned: int) -> list[str]:
    """The tables of one profile, `planned` its number of cells in reproduce/params.yaml."""
    if not cells:
        return [f"## Profile `{name}`", "", "coverage: no cells yet", ""]
    rep = cells[0]["repair"]
    partial = ([f"**Partial grid: {len(cells)} of the {planned} planned cells.** A bootstrap "
                "over so few cells and seeds understates the uncertainty; read these figures "
                "as provisional.", ""] if len(cells) < planned else [])
    return [f"## Profile `{name}`", "", coverage(cells), "", *partial, seeds_caveat(cells), "",
            f"Repair: stamp rate {rep['rate']}, {rep['epochs']} epochs, same for every method. "
            "Mean over cells with 95% bootstrap intervals (resampling seeds, then cells within "
            "a seed: the cells of a seed share its clean model), in percent; the floor is the "
            "clean model's own ASR for the same trigger.", "", *method_table(cells), "",
            "Paired differences (negative ASR: MESA leaves less backdoor):", "",
            *paired_table(cells), "", "Breadth of each sub-model and the staircase (N = 1 vs 3):",
            "", *breadth_table(cells), "", cleanse_line(cells), "",
            "Staircase: did each sub-model reach its beta, and MINE converge?", "",
            *verdicts.staircase(cells), "",
            *verdicts.table(cells), "", seconds_line(cells), ""]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'inject': {'lr': 0.01}} -> {'inject.lr': 0.01}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _settings(cell: dict[str, Any]) -> dict[str, Any]:
    """A cell's settings, flat, with the repair setting it actually used (not 'selected')."""
    flat = _flat(cell["settings"])
    flat.update({f"repair.{k}": v for k, v in cell["repair"].items()})
    return flat


def deviations(paper: dict[str, Any], tuned: dict[str, Any]) -> str:
    """The settings where the tuned profile departs from the paper's, e.g. 'inject.lr 0.001 ->
    0.01'."""
    a, b = _settings(paper), _settings(tuned)
    return "; ".join(f"{k} {a.get(k)} -> {b.get(k)}" for k in sorted(a.keys() | b.keys())
                     if a.get(k) != b.get(k))


COMPARED = ("no trigger", "true trigger", "uniform patch", "point mixture", "Neural Cleanse",
            "MESA ensemble")


def profiles_table(paper: list[dict[str, Any]], tuned: list[dict[str, Any]]) -> list[str]:
    """Paper vs tuned on the (seed, pattern) cells both profiles ran: the same clean model and
    trigger, so `tuned - paper` is a paired difference and measures what the deviations do."""
    by_key = {(c["seed"], c["pattern"]): c for c in tuned}
    pairs = [{"seed": c["seed"], "paper": c, "tuned": by_key[(c["seed"], c["pattern"])]}
             for c in paper if (c["seed"], c["pattern"]) in by_key]
    if not pairs:
        return []
    figures: list[tuple[str, Callable[[dict[str, Any]], float | None], bool]] = [
        ("backdoored: ASR", lambda c: _value(c, "backdoored", "asr"), False),
        ("backdoored: clean accuracy", lambda c: _value(c, "backdoored", "clean_acc"), False)]
    for method in COMPARED:
        figures.append((f"{method}: ASR - floor", lambda c, m=method: floor_gap(c, m), True))
    figures.append(("MESA ensemble: clean accuracy",
                    lambda c: _value(c, "MESA ensemble", "clean_acc"), False))
    rows = ["| figure | paper | tuned | tuned - paper |", "|---|---|---|---|"]
    for label, value, signed in figures:
        ivs = [interval(pairs, lambda p, s=side, v=value: v(p[s])) for side in ("paper", "tuned")]
        diff = interval(pairs, lambda p, v=value: (
            None if (a := v(p["tuned"])) is None or (b := v(p["paper"])) is None else a - b))
        if diff is None:
            continue
        rows.append(f"| {label} | {_cell_fmt(ivs[0], signed)} | {_cell_fmt(ivs[1], signed)} | "
                    f"{_fmt(diff, True)} |")
    n_patterns = len({p["paper"]["pattern"] for p in pairs})
    n_seeds = len({p["seed"] for p in pairs})
    return ["## Paper vs tuned", "", f"Cells both profiles ran: {len(pairs)} ({n_patterns} "
            f"patterns, {n_seeds} seeds), each with the same clean model and trigger in both, "
            "so every difference is paired. Settings the tuned profile "
            f"changes: {deviations(pairs[0]['paper'], pairs[0]['tuned'])}. In percent, 95% "
            "bootstrap intervals as above.", "", *rows, ""]


# --------------------------------------------------------------------------- commands


def edge_note(params: ReproParams, rate: float, epochs: int) -> str:
    """Say so when the choice sits on the border of the swept grid: the best setting may lie
    beyond it, and the sweep cannot tell."""
    s, edges = params.selection, []
    for value, swept, top, bottom in ((rate, s.rates, "largest stamp rate", "smallest stamp rate"),
                                      (epochs, s.checkpoints, "most repair epochs",
                                       "fewest repair epochs")):
        if len(set(swept)) > 1 and value in (min(swept), max(swept)):
            edges.append(f"the {top if value == max(swept) else bottom} swept ({value})")
    return ("" if not edges else "The choice lies on the border of the sweep, at " +
            " and ".join(edges) + ": a wider sweep might choose beyond it.")


def _selection_lines(params: ReproParams) -> list[str]:
    if not SELECTION.is_file():
        return ["No selection yet: the tuned profile has no repair setting."]
    sel = read_json(SELECTION)
    rate, epochs = sel["chosen"]["rate"], sel["chosen"]["epochs"]
    budget = params.selection.max_accuracy_drop
    within = [r for r in sel["table"] if r["drop"] <= budget]
    pool, among = (within, f"the {len(within)} settings within the budget") if within else \
        (sel["table"], f"all {len(sel['table'])} settings (none kept the budget)")
    rows = sorted(pool, key=lambda r: (r["residual"], r["epochs"], r["rate"]))[:8]
    cells = [c for c in cells_of("select") if f"select-s{c['seed']}-p{c['pattern']}"
             in sel["cells"]]
    verdict = ("yes" if sel["all_within_accuracy_budget"] else
               "NO: no setting was, and the one with the lowest residual was taken")
    return [f"Chosen on validation (selection cells {', '.join(sel['cells'])}): stamp rate "
            f"**{rate}**, **{epochs}** repair epochs; within the accuracy budget "
            f"(a drop of at most {budget:.1%}): {verdict}. {edge_note(params, rate, epochs)}", "",
            "Residual ASR (ASR minus the clean model's own) and accuracy drop (the backdoored "
            "model's validation accuracy minus the repaired one's; negative: the repair gained "
            "accuracy): means over those cells and the swept methods, validation split, in "
            f"percent; the {len(rows)} lowest residuals of {among}:", "",
            "| rate | epochs | residual ASR | accuracy drop |", "|---|---|---|---|",
            *[f"| {r['rate']} | {r['epochs']} | {100 * r['residual']:+.2f} | "
              f"{100 * r['drop']:+.2f} |" for r in rows], "",
            "Each swept method at the chosen setting (validation split, mean over the "
            "selection cells, in percent):", "",
            "| method | cells | residual ASR | accuracy drop |", "|---|---|---|---|",
            *[f"| {m} | {v['n']} | {100 * v['residual']:+.2f} | {100 * v['drop']:+.2f} |"
              for m, v in per_method(cells, rate, epochs).items()]]


def stale_reasons(cell: dict[str, Any], params: ReproParams, profile: str,
                  repair: dict[str, Any] | None) -> list[str]:
    """Where a cell record departs from the current params (empty: the cell is current).

    A cell is rerun by DVC when its params change, but `dvc repro -s report` merges whatever
    records exist: without this check an old cell would be averaged in under the new label."""
    settings = json.loads(json.dumps(params.profiles[profile].model_dump()))  # tuples -> lists
    wants = ran_with(params)
    has = cell.get("ran_with", {})
    checks = {"settings": (cell.get("settings"), settings), "repair": (cell.get("repair"), repair),
              **{key: (has.get(key), value) for key, value in wants.items()}}
    return [name for name, (got, want) in checks.items() if got != want]


def current_cells(params: ReproParams, profile: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The profile's records that belong to the grid and ran with the current settings, and a
    'sS-pP (what differs)' note for each record in the grid left out."""
    wanted, repair = set(params.cells(profile)), repair_plan(params, profile)
    kept, stale = [], []
    for cell in cells_of(profile):
        if (cell["seed"], cell["pattern"]) not in wanted:
            continue
        reasons = stale_reasons(cell, params, profile, repair)
        if reasons:
            stale.append(f"s{cell['seed']}-p{cell['pattern']} ({', '.join(reasons)})")
        else:
            kept.append(cell)
    return kept, stale


def run_report(params: ReproParams) -> Path:
    """Merge whatever report cells exist into reproduce/results/report.md; log it to MLflow."""
    lines = [f"# MESA reproduction: repair on CIFAR-10, {params.model.arch}", "",
             "Written by `python -m tasks.reproduce.report` (the `report` stage of "
             "reproduce/dvc.yaml) from the cell records in reproduce/results/; protocol and "
             "commands: docs/reproduction.md.", "",
             f"Model: {params.model.arch} x{params.model.width}, {params.model.epochs} clean "
             f"epochs; target class {params.grid.target}; evaluation part: "
             f"{10000 - params.data.n_defender} test images never used to fit, repair or "
             "choose anything.", "", "## Selection (tuned profile)", "",
             *_selection_lines(params), ""]
    cells: dict[str, list[dict[str, Any]]] = {}
    for profile in ("tuned", "paper"):
        cells[profile], stale = current_cells(params, profile)
        lines += profile_section(profile, cells[profile], len(params.cells(profile)))
        lines += [*reruns.table(profile, cells[profile]), ""]
        if stale:
            lines += [f"Left out, run with settings other than the current params (rerun them "
                      f"with `dvc repro reproduce/dvc.yaml`): {'; '.join(stale)}.", ""]
    lines += profiles_table(cells["paper"], cells["tuned"])
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
