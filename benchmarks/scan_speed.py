"""Scanning time per model: the scan service's check + MESA fit + decision, per phase.

Usage:
    python benchmarks/scan_speed.py --make             # train the two CPU demo models first
    python benchmarks/scan_speed.py [--models DIR] [--params params.yaml] [--chunks 1 2]
    python benchmarks/scan_speed.py --make --arch resnet18 --device cuda   # GPU, where lent

`--make` trains a BadNets-backdoored (demo 3x3 pattern at random places, target
`poison.target`) and a clean model of `--arch` on `--n-train` CIFAR-10 images (the offline copy
or $MESA_DATA_SOURCE) into DIR (default: <scan.state_folder>/demo_models). Each `*.safetensors`
+ `.json` pair in DIR is then scanned as the service does (tasks.scan: check_model, scan_chunk per
chunk of classes run one after the other here, the decision of tasks.scan_record), without
Prefect or MLflow in the timing. The defender's reference data is `scan.reference` (auto: the
pipeline's defender split, else decoded from the archive; its first load is timed apart).
Results go to benchmarks/results/scan_speed.md (and are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from mesa_lib.data import load_cifar
from mesa_lib.evaluate import accuracy, attack_success_rate
from mesa_lib.modelio import Manifest, save_model
from mesa_lib.models import CIFAR10_MEAN, CIFAR10_STD, build_model
from mesa_lib.poison import build_attack
from mesa_lib.seed import resolve_device, seed_everything
from mesa_lib.train import TrainConfig, train
from mesa_lib.triggers import DEMO_PATTERN, pattern_trigger
from tasks.common.env import CACHE_DIR, default_data_source
from tasks.common.io import seeded_subset
from tasks.common.params import Params, load_params
from tasks.scan.check import check_model, scan_chunk
from tasks.scan.discover import Candidate, model_key
from tasks.scan.record import verdict_of
from tasks.scan.reference import chunks, load_reference

ROOT = Path(__file__).resolve().parents[1]


def make_models(out: Path, params: Params, arch: str, n_train: int, epochs: int,
                device: torch.device) -> None:
    """Train the backdoored and the clean demo model into `out` (safe format)."""
    seed_everything(params.base.seed)
    data = load_cifar(default_data_source(ROOT), "cifar10", CACHE_DIR)
    keep = seeded_subset(n_train, len(data.train), params.base.seed)  # archives are by class
    x, y = data.train.images[keep], data.train.labels[keep]
    trigger, target = pattern_trigger(DEMO_PATTERN), params.poison.target
    for name, rate in (("backdoored", params.poison.rate), ("clean", 0.0)):
        attack = build_attack("badnets", trigger=trigger, target=target, rate=rate,
                              location="random", seed=params.base.seed)
        ps = attack.poison_dataset(x, y)
        model = build_model(arch, 10)
        cfg = TrainConfig(epochs=epochs, batch_size=256, lr=params.train.lr,
                          seed=params.base.seed)
        start = time.perf_counter()
        train(model, ps.images, ps.labels, cfg, device)
        seconds = time.perf_counter() - start
        test = data.test
        acc = accuracy(model, test.images, test.labels, device)
        asr = attack_success_rate(model, test.images, test.labels, trigger, target, device)
        extra = {"attack": "badnets" if rate else "none", "target": target, "rate": rate,
                 "clean_accuracy": round(acc, 4), "asr": round(asr, 4)}
        save_model(model.cpu(), out / name, Manifest(arch, 10, data.test.classes, CIFAR10_MEAN,
                                                      CIFAR10_STD, extra=extra))
        print(f"made {out / name}: {arch}, accuracy {acc:.3f}, ASR {asr:.3f}, "
              f"trained in {seconds:.0f} s")


def scan_one(stem: Path, params: Params, parts: int) -> dict:
    """Time one model through check, fit (chunks sequentially) and the decision."""
    files = [p for p in (stem.with_suffix(".safetensors"), stem.with_suffix(".json"))
             if p.is_file()]
    key, sha = model_key(files)
    cand = Candidate(key, "drop", f"file:{stem.name}", tuple(str(p) for p in files), sha)
    start = time.perf_counter()
    checked = check_model.fn(cand, params)
    fits = [scan_chunk.fn(checked, c, params) for c in chunks(checked.n_classes, parts)]
    verdict = verdict_of(checked, fits, params)
    return {"model": stem.name, "chunks": parts, "status": verdict["status"],
            "target": verdict["target"], "confidence": verdict["confidence"],
            "check_s": checked.seconds,
            "fit_s": sum(f.seconds for f in fits), "total_s": time.perf_counter() - start,
            "asr": {c: round(s["asr"], 3) for c, s in verdict["scores"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models", type=Path, default=None)
    ap.add_argument("--make", action="store_true", help="train the demo models first")
    ap.add_argument("--arch", default="resnet8")
    ap.add_argument("--n-train", type=int, default=12000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--device", default=None, help="overrides base.device")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1])
    ap.add_argument("--repeat", type=int, default=3, help="timed scans per row (median)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scan_speed.md")
    args = ap.parse_args()
    params = load_params(args.params)
    if args.device:
        params = params.model_copy(update={"base": params.base.model_copy(
            update={"device": args.device})})
    device = resolve_device(params.base.device)
    models = args.models or Path(params.scan.state_folder) / "demo_models"
    if args.make:
        make_models(models, params, args.arch, args.n_train, args.epochs, device)
    start = time.perf_counter()
    ref = load_reference(params)
    ref_s = time.perf_counter() - start
    stems = [w.with_suffix("") for w in sorted(models.glob("*.safetensors"))]
    scan_one(stems[0], params, 1)  # warm-up: first-call costs are not scanning time
    rows = []
    for parts in args.chunks:
        for stem in stems:
            runs = sorted((scan_one(stem, params, parts) for _ in range(args.repeat)),
                          key=lambda r: r["total_s"])
            rows.append(runs[len(runs) // 2])  # the median run
    s = params.scan
    hw = (torch.cuda.get_device_name(device) if device.type == "cuda"
          else platform.processor() or platform.machine())
    lines = [
        "# Scan time per model", "",
        f"`python benchmarks/scan_speed.py {' '.join(sys.argv[1:])}`, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, device {device} ({hw}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}).", "",
        f"Scan settings: scan.epochs {s.epochs}, scan.n_images {s.n_images} (eval "
        f"{s.eval_images}), beta {s.beta}, lr {s.lr}, recover.hidden {params.recover.hidden}, "
        f"batch {s.batch_size}. Reference data: {ref.source} "
        f"({len(ref.images)} images), loaded in {ref_s:.1f} s.", "",
        f"Each row: the median of {args.repeat} timed scans (after one warm-up scan), the "
        "chunks of classes fitted one after the other in this process.", "",
        "| model | chunks | verdict | target | confidence | check s | fit s | total s |",
        "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['chunks']} | {r['status']} | {r['target']} | "
                     f"{r['confidence']:.3f} | {r['check_s']:.1f} | {r['fit_s']:.1f} | "
                     f"{r['total_s']:.1f} |")
    lines += ["", "Per-class ASR of the recovered triggers:", "", "```",
              *[f"{r['model']}: {json.dumps(r['asr'])}" for r in rows], "```", ""]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
