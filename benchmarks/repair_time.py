"""Seconds of one `mesa-scan --repair` of a backdoored model, as a user runs it (issue 22: a
repair within 3 minutes per ResNet-8 on the 2 cores).

Usage (nothing else running; say so in the record):
    .venv/bin/python -m tasks.zoo.build cal-r8-1 && .venv/bin/python -m tasks.zoo.build cal-inj-07
    .venv/bin/python benchmarks/repair_time.py zoo/models/calibration/cal-inj-07 --rounds 1 2

The model must be one the scan flags (a model it clears is not repaired: its row says so).
For each number of repair rounds, `mesa-scan PATH --format json --repair OUTDIR` runs in a fresh
process with the project's params.yaml (only `repair.rounds` replaced) and released calibration
on the offline CIFAR-10 copy; recorded: the process's wall seconds (imports, the scan, the repair
and its verification), the repair's own seconds from the JSON, the rounds it ran, its verdict.

Writes benchmarks/results/repair_time.md (`--out`): command, date, CPU, threads, load before and
after each run, one row per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.record import head, save  # noqa: E402
from tasks.common.params import apply_overrides  # noqa: E402


def repair_once(stem: Path, rounds: int, tmp: Path) -> dict:
    """`mesa-scan stem --repair` with `repair.rounds` = rounds, in a new process."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params = tmp / f"params-{rounds}.yaml"
    params.write_text(yaml.safe_dump(apply_overrides(raw, {"repair.rounds": rounds})))
    out = tmp / f"repaired-{rounds}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "tasks.scan.cli", str(stem), "--format", "json",
           "--params", str(params), "--repair", str(out)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    try:
        record = json.loads(done.stdout)[0]
    except (ValueError, IndexError) as err:
        raise RuntimeError(f"mesa-scan gave no JSON record (exit {done.returncode}, {err}): "
                           f"{done.stdout[-1000:]}{done.stderr[-1000:]}") from None
    rep = record.get("repair") or {}
    return {"wall": wall, "exit": done.returncode, "verdict": record.get("verdict", "?"),
            "repair_seconds": rep.get("seconds"), "rounds": rep.get("rounds"),
            "repair_verdict": rep.get("verdict", rep.get("error", "not repaired")),
            "load_before": load, "load_after": os.getloadavg()[0]}


def report(args: argparse.Namespace, rows: list[tuple[str, int, int, dict]],
           started: datetime) -> str:
    """The record as Markdown."""
    lines = head("mesa-scan --repair seconds", "benchmarks/repair_time.py", started,
                 "params.yaml (repair.rounds replaced), its released calibration")
    lines += [f"- model: {args.note}", f"- load: {args.load_note}", "",
              "| model | rounds asked | run | wall seconds (process) | repair seconds (JSON) | "
              "rounds run | scan verdict (exit) | repair verdict | load (1 min) before -> after |",
              "|---|---|---|---|---|---|---|---|---|"]
    for model, rounds, k, r in rows:
        secs = "-" if r["repair_seconds"] is None else f"{r['repair_seconds']:.1f}"
        lines.append(f"| {model} | {rounds} | {k} | {r['wall']:.1f} | {secs} | "
                     f"{r['rounds'] if r['rounds'] is not None else '-'} | {r['verdict']} "
                     f"({r['exit']}) | {r['repair_verdict']} | {r['load_before']:.2f} -> "
                     f"{r['load_after']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command line: repair each model at each number of rounds, write the record."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", type=Path, help="model stems (or .safetensors paths)")
    ap.add_argument("--rounds", nargs="+", type=int, default=[1])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--note", default="as given", help="where the models came from")
    ap.add_argument("--load-note", default="nothing else running",
                    help="what else ran, for the record")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/repair_time.md")
    args = ap.parse_args(argv)
    started = datetime.now().astimezone()
    rows = []
    with tempfile.TemporaryDirectory(prefix="repair_time-") as tmp:
        for stem in args.models:
            for rounds in args.rounds:
                for k in range(1, args.repeats + 1):
                    r = repair_once(stem, rounds, Path(tmp))
                    print(f"{stem.name} rounds {rounds} run {k}: {r['wall']:.1f} s wall, "
                          f"repair {r['repair_seconds']}, {r['repair_verdict']}", flush=True)
                    rows.append((stem.name, rounds, k, r))
    save(args.out, report(args, rows, started))


if __name__ == "__main__":
    main()
