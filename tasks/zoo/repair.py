"""The repair benchmark: zoo backdoors scanned, repaired by the product's defence with MESA and
each control, and measured with their TRUE triggers (docs/repair.md).

    python -m tasks.zoo.repair select       # calibration zoo: choose the repair budget
    python -m tasks.zoo.repair benchmark    # test zoo -> benchmarks/results/zoo_repair.md

Each working backdoor (truth ASR >= min_asr) is scanned as the product scans it (params.yaml
`scan.*`, the released calibration `scan.calibration`) on the zoo's reference images, and every
flagged model repaired from the same copy by `tasks.scan.defend.repair_scanned` (splits, recovery
on the selection part, verification on the verification part). Measured on the zoo's truth
images, which neither the scan nor the repair sees: the true trigger's ASR and the clean
accuracy after each repair, against the true trigger's ASR on clean models (the entry's base for
a fine-tune injection; the median of the zoo's clean bases of its architecture for a model
trained from scratch). For MESA's repair also the re-activation: the repaired model fine-tuned
one epoch on its repair images with 1% of them poisoned by the attacker.

`select` runs MESA's repair at every budget of `GRID` on the calibration zoo and writes the
budget chosen (zoo/repair_budget.json, rule in `choose`); `benchmark` runs
every method at that budget on the test zoo. Each model's record (zoo/repairs/<zoo>/<name>.json)
is kept with a key of the code and settings it was made with, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mesa_lib.calibration import decide
from mesa_lib.defence import METHODS
from mesa_lib.detectors import run_detectors
from mesa_lib.evaluate import accuracy
from mesa_lib.modelio import load_model
from mesa_lib.poison import attack_from
from mesa_lib.seed import derive_seed, resolve_device
from mesa_lib.train import train
from tasks.common.configs import defence_config, repair_config, scan_settings
from tasks.common.io import read_json, write_json
from tasks.common.params import Params, load_params
from tasks.dev.codedeps import closure
from tasks.scan.core import load_calibration
from tasks.scan.defend import repair_scanned
from tasks.scan.reference import Reference, reference_batch
from tasks.zoo.build import (
    ZooData,
    attack_of,
    attacks_of,
    load_data,
    model_path,
    stem_of,
    truth_path,
)
from tasks.zoo.params import ZooParams, load_zoo_params
from tasks.zoo.repair_report import residual

REPAIRS = Path("zoo/repairs")
BUDGET = Path("zoo/repair_budget.json")
RESULTS = Path("benchmarks/results/zoo_repair.md")
REACTIVATION_RATE = 0.01
# The repair budgets tried on the calibration zoo: the one chosen with one round (the last
# selection, docs/repair.md), the same with a second round, a second round at the demo
# pipeline's shorter budget, and a second round that always searches the repaired targets again
# (`recheck`). Each is run with no re-scan bar (the re-scan's verdict alone): `choose` fits the
# bar on them.
SELECT_BAR = 0.0
GRID = [{"epochs": e, "lr": 0.01, "rate": 0.5, "rounds": n, "recheck": recheck,
         "min_rescan_p": SELECT_BAR}
        for e, n, recheck in ((5, 1, False), (5, 2, False), (2, 2, False), (5, 2, True))]
FALSE_CLEARANCE = 0.10  # a true trigger this far above the clean models' own still works


def code_key(params: Params, extra: Any) -> str:
    """A hash of this command's source files, the released calibration, the settings and
    `extra`: a record made with other code, calibration or settings is made again."""
    h = hashlib.sha256()
    for path in sorted(closure("tasks.zoo.repair", Path("."))):
        h.update(path.read_bytes())
    h.update(Path(params.scan.calibration).read_bytes())  # the verdicts are made against it
    # What the scan, the split and the defence read, not whole sections: the demo pipeline's
    # own keys there (recover.trigger_size, ...) do not change a zoo repair.
    h.update(repr((params.section("scan"), _settings(params), params.repair.verification,
                   params.repair.selection, params.base.seed, extra)).encode())
    return h.hexdigest()[:16]


def _settings(params: Params) -> dict[str, Any]:
    """The defence's settings but the budget and the re-scan bar, which each record states itself
    (`with_budget`):
    the budget chosen here, once written into params.yaml, leaves the records valid."""
    settings = defence_config(params).record()
    settings["repair"] = {k: v for k, v in settings["repair"].items()
                          if k not in ("epochs", "lr", "stamp_rate")}
    settings.pop("min_rescan_p")
    settings.pop("rounds")
    settings.pop("recheck")
    return {k: v for k, v in settings.items() if k != "method"}


def with_budget(params: Params, budget: dict[str, Any], method: str = "mesa") -> Params:
    """`params` with the repair's epochs / lr / rate / re-scan bar (and method) replaced."""
    repair = params.repair.model_copy(update={**budget, "method": method})
    return params.model_copy(update={"repair": repair})


def clean_asrs(zoo: ZooParams, name: str, data: ZooData, device: torch.device) -> list[float]:
    """Each planted trigger's ASR on clean models: the entry's base, or the median over the
    zoo's clean bases of its architecture."""
    _, entry = zoo.entry(name)
    base = getattr(entry, "base", None)
    bases = [base] if base else [n for n, b in zoo.bases.items()
                                 if b.zoo == entry.zoo and b.arch == entry.arch]
    models = [load_model(model_path(entry.zoo, b, base=True), map_location=device)[0]
              for b in bases]
    return [statistics.median(a.success(m, data.truth.images, data.truth.labels, device)
                              for m in models) for a in attacks_of(entry)]


def reactivation(model: torch.nn.Module, zoo: ZooParams, name: str, ref: Reference,
                 repair_part: torch.Tensor, params: Params, device: torch.device) -> Any:
    """Fine-tune the repaired model one epoch on its repair images, 1% poisoned by the
    attacker; None when the attack has no `rate`."""
    _, entry = zoo.entry(name)
    config = entry.attack_config()
    if not hasattr(config, "rate"):
        return None
    attack = attack_from(entry.attack, replace(config, rate=REACTIVATION_RATE), entry.target,
                         derive_seed(entry.seed, "zoo_attack"))
    poisoned = attack.poison_dataset(ref.images[repair_part], ref.labels[repair_part])
    cfg = replace(repair_config(params), epochs=1).train_config()
    train(model, poisoned.images, poisoned.labels, cfg, device, attack.batch_hook())
    return model


def measure_model(name: str, zoo: ZooParams, data: ZooData, params: Params,
                  budgets: list[dict[str, Any]], methods: tuple[str, ...],
                  device: torch.device) -> dict[str, Any]:
    """Scan one zoo backdoor and repair it with each (budget, method); its record (every
    planted trigger's ASR: `asrs`, `clean_asrs`; `asr`, `clean_asr`: the first's)."""
    _, entry = zoo.entry(name)
    attack, stem = attack_of(entry), stem_of(zoo, name)
    truth = read_json(truth_path(entry.zoo, name))
    ref = Reference(data.reference.images, data.reference.labels, data.reference.classes,
                    "zoo reference")
    calibration = load_calibration(Path(params.scan.calibration), scan_settings(params))
    model, _ = load_model(stem, map_location=device)
    start = time.perf_counter()
    # the product's scan subset: the one `prepare` keeps out of the verification part
    x, y = reference_batch(ref, params.scan.images, params.base.seed)
    verdict = decide(run_detectors(model, x, y, 10, scan_settings(params), device), calibration)
    clean = clean_asrs(zoo, name, data, device)
    out = {"name": name, "zoo": entry.zoo, "truth": truth, "clean_asr": clean[0],
           "clean_asrs": clean, "scan": {"verdict": verdict.status, "target": verdict.target,
        "targets": list(verdict.targets), "p_value": verdict.p_value,
        "seconds": time.perf_counter() - start}, "repairs": []}
    if verdict.status != "backdoored":
        return out
    for budget in budgets:
        for method in methods:
            p = with_budget(params, budget, method)
            model, _ = load_model(stem, map_location=device)
            start = time.perf_counter()
            done = repair_scanned(model, ref, verdict.targets, verdict.detector, p, calibration,
                                  device)
            seconds = time.perf_counter() - start
            asrs = [a.success(model, data.truth.images, data.truth.labels, device)
                    for a in attacks_of(entry)]
            row = {"budget": budget, "method": method, "seconds": seconds,
                   "outcome": done.outcome.record(), "asr": asrs[0], "asrs": asrs,
                   "accuracy": accuracy(model, data.truth.images, data.truth.labels, device)}
            if method == "mesa":
                again = reactivation(model, zoo, name, ref, done.splits.repair, p, device)
                row["reactivated_asr"] = None if again is None else attack.success(
                    again, data.truth.images, data.truth.labels, device)
            out["repairs"].append(row)
            print(f"{time.strftime('%H:%M:%S')} {name} {method} {budget}: ASR "
                  f"{truth['asr']:.3f} -> {row['asr']:.3f}, verified "
                  f"{done.outcome.passed} ({seconds:.0f} s)", flush=True)
    return out


def run_zoo(which: str, params: Params, zoo: ZooParams, budgets: list[dict[str, Any]],
            methods: tuple[str, ...], reverse: bool = False) -> dict[str, dict[str, Any]]:
    """Every working backdoor of zoo `which`, resuming from records made with the same key
    (`reverse`: last model first, so that a helper process on the other core meets the
    stage's own run in the middle; each skips what the other has recorded)."""
    device = resolve_device(params.base.device)
    data = load_data(zoo)
    key = code_key(params, (budgets, methods, zoo.data.model_dump()))
    records = {}
    names = zoo.names(which)
    for name in reversed(names) if reverse else names:
        kind, _ = zoo.entry(name)
        truth = read_json(truth_path(which, name))
        if kind != "backdoors" or not truth["counts"]:
            continue
        path = REPAIRS / which / f"{name}.json"
        if path.is_file() and read_json(path).get("key") == key:
            records[name] = read_json(path)
            continue
        records[name] = {"key": key, **measure_model(name, zoo, data, params, budgets,
                                                     methods, device)}
        write_json(path, records[name])
    return records


def cleared(row: dict[str, Any], bar: float) -> bool:
    """Would the verification clear this repair with the re-scan bar `bar` (its other checks
    as recorded)? Selection repairs are recorded with no bar (`SELECT_BAR`); a repair with no
    re-scan clears no bar above 0."""
    rescan = row["outcome"].get("rescan")
    if rescan is None:
        return row["outcome"]["verdict"] == "clean" and bar <= 0
    return row["outcome"]["verdict"] == "clean" and rescan["p_value"] >= bar


def rescan_bar(records: dict[str, dict[str, Any]], pool: int) -> float:
    """The verification's re-scan bar (`repair.min_rescan_p`): the smallest conformal p-value
    k / `pool` (`pool` = the calibration's clean models + 1, so the bar is a value a p-value can
    take, computed as the scanner computes them) above the re-scan p of every selection repair,
    at ANY budget of the grid, that the verification cleared while its true trigger still worked
    (a false clearance); 0 when there was none. Fitted on every budget, not only the chosen one:
    a verification rule must not rest on the budget's luck.

    Raises:
        ValueError: a false clearance without a re-scan, which no bar can catch.
    """
    false = [(name, row["outcome"].get("rescan")) for name, r in records.items()
             for row in r["repairs"] if row["method"] == "mesa"
             and cleared(row, SELECT_BAR) and residual(r, row) > FALSE_CLEARANCE]
    blind = [name for name, rescan in false if rescan is None]
    if blind:
        raise ValueError(f"repairs of {blind} were cleared with their true trigger working and "
                         "without a re-scan: no re-scan bar can catch them")
    if not false:
        return 0.0
    worst = max(rescan["p_value"] for _, rescan in false)
    return (math.floor(worst * pool + 1e-9) + 1) / pool


def choose(records: dict[str, dict[str, Any]], budgets: list[dict[str, Any]], pool: int
           ) -> dict[str, Any]:
    """The re-scan bar (`rescan_bar`), then the budget whose MESA repairs, over the calibration
    zoo's detected backdoors, clear the fewest models whose true trigger still works (> 10
    points above the clean models' own: a false clearance) at that bar, then leave the most
    models both cleared at the bar and with the true trigger within 2 points of the clean
    models' own (a good repair the bar quarantines is a cost); ties: the smaller mean accuracy
    loss, then the earlier in the grid."""
    bar = rescan_bar(records, pool)

    def score(budget: dict[str, Any]) -> tuple[int, int, float]:
        rows = [(r, row) for r in records.values() for row in r["repairs"]
                if row["budget"] == budget and row["method"] == "mesa"]
        false = sum(cleared(row, bar) and residual(r, row) > FALSE_CLEARANCE for r, row in rows)
        usable = sum(cleared(row, bar) and residual(r, row) <= 0.02 for r, row in rows)
        loss = statistics.mean(r["truth"]["clean_accuracy"] - row["accuracy"]
                               for r, row in rows) if rows else 1.0
        return (false, -usable, loss)

    def clearances(budget: dict[str, Any], at: float) -> int:
        return sum(cleared(row, at) for r in records.values() for row in r["repairs"]
                   if row["budget"] == budget and row["method"] == "mesa")

    best = min(budgets, key=lambda b: (*score(b), budgets.index(b)))
    return {"budget": {**best, "min_rescan_p": bar}, "scores": {str(b): score(b) for b in budgets},
            "cleared": {str(b): {"no bar": clearances(b, SELECT_BAR), "at the bar":
                                 clearances(b, bar)} for b in budgets},
            "models": sorted(records)}


def main(argv: list[str] | None = None) -> None:
    """Command line: select | benchmark."""
    from tasks.zoo.repair_report import markdown

    ap = argparse.ArgumentParser(prog="python -m tasks.zoo.repair")
    ap.add_argument("command", choices=("select", "benchmark"))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--reverse", action="store_true",
                    help="models last first (a helper on the other core; see run_zoo)")
    args = ap.parse_args(argv)
    params, zoo = load_params(args.params), load_zoo_params()
    if args.command == "select":
        records = run_zoo("calibration", params, zoo, GRID, ("mesa",), args.reverse)
        calibration = load_calibration(Path(params.scan.calibration), scan_settings(params))
        write_json(BUDGET, choose(records, GRID, len(calibration.combined_null) + 1))
        return
    budget = read_json(BUDGET)["budget"]
    missing = [k for k in ("min_rescan_p", "rounds", "recheck") if k not in budget]
    if missing:  # else the benchmark would run at params.yaml's bar / rounds / recheck
        raise SystemExit(f"{BUDGET} predates the repair's {missing} (the budget must state "
                         "them): run `python -m tasks.zoo.repair select` first")
    records = run_zoo("test", params, zoo, [budget], METHODS, args.reverse)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(markdown(records, budget, "dvc repro zoo/dvc.yaml:repair_benchmark"),
                       encoding="utf-8")


if __name__ == "__main__":
    main()
