"""`python -m tasks.reproduce.cell --profile paper|tuned|select --seed S --pattern K`: one cell.

Runs the protocol (tasks.reproduce.protocol) for one (profile, seed, pattern) and writes the
cell's JSON record under reproduce/results/<profile>/. Every cell is a plain process, not a
Prefect flow: dozens of cells of half an hour to an hour each run side by side in the background
(scripts/reproduce.sh), and a Prefect API per process, or one shared SQLite one, would only add
start-up and lock contention to work DVC already orders and caches.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from mesa_lib.metrics import evaluation_triggers
from mesa_lib.modelio import load_model
from mesa_lib.seed import resolve_device, seed_everything
from mesa_lib.triggers import build_trigger
from tasks.common.io import write_json
from tasks.reproduce import protocol as C
from tasks.reproduce.data import load_data
from tasks.reproduce.params import ReproParams, load_repro_params
from tasks.reproduce.paths import SELECTION, cell_path, clean_path, ran_with, repair_plan


def _device() -> torch.device:
    return resolve_device("auto")


def _cell_start(params: ReproParams, profile: str, seed: int, pattern: int,
                seconds: dict[str, float]) -> tuple[Any, ...]:
    """What every cell does first: data, trigger, the clean model, the injection, the fits."""
    s = seed + params.seed_offset
    cs, target, device = C.cell_seed(s, pattern), params.grid.target, _device()
    seed_everything(cs)
    settings = params.profiles["tuned" if profile == "select" else profile]
    with C.timed(seconds, "load"):
        data = load_data(params)
        clean, _ = load_model(clean_path(seed), map_location=device)
    trigger = build_trigger(f"pattern:{pattern}")
    triggers = evaluation_triggers(trigger, params.evaluate.variants, params.evaluate.shifts)
    with C.timed(seconds, "inject"):
        backdoored = C.inject(clean, trigger, data.train, settings, target, cs, device)
    with C.timed(seconds, "fit"):
        samplers, fits = C.fit_samplers(backdoored, data.fit, settings, target, cs, device)
    return data, clean, backdoored, C.add_true_trigger(samplers, trigger), fits, triggers, \
        settings, cs


def run_cell(params: ReproParams, profile: str, seed: int, pattern: int) -> Path:
    """A report cell (paper | tuned) or a selection cell (select); writes its JSON record."""
    plan = None if profile == "select" else repair_plan(params, profile)
    if profile != "select" and plan is None:  # before the half hour of injection and fitting
        raise SystemExit(f"error: {SELECTION} missing: the {profile} profile's repair is "
                         "'selected'; run the selection stage first")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    data, clean, backdoored, samplers, fits, triggers, settings, cs = _cell_start(
        params, profile, seed, pattern, seconds)
    record: dict[str, Any] = {"profile": profile, "seed": seed, "pattern": pattern,
                              "seed_offset": params.seed_offset, "cell_seed": cs,
                              "ran_with": ran_with(params),
                              "settings": settings.model_dump(), "fits": fits,
                              "split": {"fit": len(data.fit), "validation": len(data.validation),
                                        "evaluation": len(data.evaluation)}}
    target, device = params.grid.target, _device()
    if profile == "select":
        with C.timed(seconds, "repair+validate"):
            record["sweep"] = C.sweep(backdoored, data, samplers, settings, params, triggers,
                                      target, cs, device)
        base = {"clean": clean, "backdoored": backdoored}
        record["validation"] = {k: C.measure(m, data.validation, triggers, target, device, cs)
                                for k, m in base.items()}
    else:
        record["repair"] = plan
        rate, epochs = plan["rate"], plan["epochs"]
        models = {"clean": clean, "backdoored": backdoored}
        with C.timed(seconds, "repair"):
            for name, sampler in samplers.items():
                config = C.repair_config(settings, rate, epochs, cs)
                models[name] = C.repaired(backdoored, data.fit, sampler, config, device)
        with C.timed(seconds, "evaluate"):
            record["evaluation"] = C.evaluate_cell(models, data.evaluation, triggers, target,
                                                   device, cs)
    seconds["total"] = time.perf_counter() - start
    record["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    record["threads"] = torch.get_num_threads()
    path = cell_path(profile, seed, pattern)
    write_json(path, record)
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line: validate reproduce/params.yaml, run the cell, print its record's path."""
    ap = argparse.ArgumentParser(prog="python -m tasks.reproduce.cell")
    ap.add_argument("--profile", choices=("paper", "tuned", "select"), required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--pattern", type=int, required=True)
    ap.add_argument("--params", default="reproduce/params.yaml")
    args = ap.parse_args(argv)
    print(run_cell(load_repro_params(args.params), args.profile, args.seed, args.pattern))


if __name__ == "__main__":
    main()
