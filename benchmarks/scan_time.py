"""Seconds of one `mesa-scan` per architecture, as a user runs it (issue 25: ResNet-18 <= 60 s).

Usage (nothing else running; say so in the record):
    .venv/bin/python benchmarks/scan_time.py                       # resnet8 resnet20 resnet18
    .venv/bin/python benchmarks/scan_time.py --archs resnet18 timm:mobilenetv2_100 --repeats 3

For each architecture a model is built with seeded random weights (the scan's work does not
depend on what the weights say: the mask search runs its fixed steps for every class) and saved
as a model pair in a scratch folder; then `mesa-scan PATH --format json` runs in a fresh process
with the project's params.yaml and released calibration, on the offline CIFAR-10 archive, and is
timed from process start to exit (imports, reading the reference, the scan, the report). The
JSON's own `seconds` (the scan alone) is recorded beside it. A model the calibration does not
cover gets `uncalibrated` (exit 4): its scores are still computed, so the time is the same work.

Writes benchmarks/results/scan_time.md (`--out`): command, date, CPU, torch threads, load average
before and after each run, one row per run.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.record import head, save  # noqa: E402
from mesa_lib.modelio import Manifest, save_model  # noqa: E402
from mesa_lib.models import CIFAR10_MEAN, CIFAR10_STD, build_model  # noqa: E402


def make_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """A seeded random-weight model pair of `arch` (10 classes, 32x32) in `folder`."""
    torch.manual_seed(seed)
    model = build_model(arch, 10)
    manifest = Manifest(arch, 10, tuple(f"class{k}" for k in range(10)), CIFAR10_MEAN,
                        CIFAR10_STD)
    stem = folder / arch.replace(":", "-")
    save_model(model, stem, manifest)
    return stem.with_suffix(".safetensors")


def scan_once(path: Path, reference: str | None) -> dict:
    """Run `mesa-scan` on `path` in a new process; wall seconds, exit code, verdict."""
    cmd = [sys.executable, "-m", "tasks.scan.cli", str(path), "--format", "json"]
    if reference:
        cmd += ["--reference", reference]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1, 4):  # clean, backdoored, uncalibrated
        raise RuntimeError(f"mesa-scan failed (exit {done.returncode}): {done.stderr[-2000:]}")
    try:
        record = json.loads(done.stdout)[0]  # one record per model scanned
    except (ValueError, IndexError) as err:
        raise RuntimeError(f"mesa-scan gave no JSON record ({err}): {done.stdout[-1000:]}"
                           f"{done.stderr[-1000:]}") from None
    return {"wall": wall, "exit": done.returncode, "verdict": record.get("verdict", "?"),
            "seconds": (record.get("seconds") or {}).get("total"), "load_before": load,
            "load_after": os.getloadavg()[0]}


def report(args: argparse.Namespace, rows: list[tuple[str, int, dict]], started: datetime
           ) -> str:
    """The record as Markdown."""
    lines = head("mesa-scan seconds per architecture", "benchmarks/scan_time.py", started,
                 "params.yaml, its released calibration; reference: "
                 f"{args.reference or 'params.yaml scan.reference (the offline CIFAR-10 copy)'}")
    lines += [f"- load: {args.load_note}", "",
              "| architecture | run | wall seconds (process) | scan seconds (JSON) | verdict "
              "(exit) | load (1 min) before -> after |", "|---|---|---|---|---|---|"]
    for arch, k, r in rows:
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {arch} | {k} | {r['wall']:.1f} | {secs} | {r['verdict']} ({r['exit']}) "
                     f"| {r['load_before']:.2f} -> {r['load_after']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command line: build, scan, write the record."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["resnet8", "resnet20", "resnet18"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--reference", help="passed to mesa-scan --reference")
    ap.add_argument("--load-note", default="nothing else running",
                    help="what else ran, for the record")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scan_time.md")
    args = ap.parse_args(argv)
    started = datetime.now().astimezone()
    rows = []
    with tempfile.TemporaryDirectory(prefix="scan_time-") as tmp:
        for arch in args.archs:
            path = make_model(arch, Path(tmp))
            for k in range(1, args.repeats + 1):
                r = scan_once(path, args.reference)
                print(f"{arch} run {k}: {r['wall']:.1f} s wall, scan {r['seconds']}, "
                      f"{r['verdict']}", flush=True)
                rows.append((arch, k, r))
    save(args.out, report(args, rows, started))


if __name__ == "__main__":
    main()
