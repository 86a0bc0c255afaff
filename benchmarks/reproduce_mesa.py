"""Reproduce the MESA paper's CIFAR-10 repair experiment (Qiao, Yang, Li, NeurIPS 2019, Sec. 5).

Protocol (../shared/MESA.md): train (or load) a clean model; for each selected 3x3 pattern (evenly
spread over the 51 canonical ones) inject a backdoor by fine-tuning with per-image poison
probability 1% to target 0; split the test set 8000 (defender) / 2000 (evaluation); fit MESA
(betas 0.9/0.8/0.5, alpha 0.1) and the single-point baseline (K random starts) on the defender's
images; repair the backdoored model with each beta alone, the ensemble, each point start, no
trigger and the true trigger; report clean accuracy, ASR of the original trigger and of held-out
variants. Writes a markdown table and a JSON record into benchmarks/results/.

Tiny CPU check:
    .venv/bin/python benchmarks/reproduce_mesa.py --model resnet8 --patterns 1 --epochs 1 \
        --train-subset 10000 --point-starts 2 --threads 1
Paper scale (GPU): .venv/bin/python benchmarks/reproduce_mesa.py --model resnet18 --patterns 51
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mesa_lib.baselines import PointConfig, fit_point
from mesa_lib.data import ImageSet, load_cifar, split_defender
from mesa_lib.distribution import ConstantSampler, PointDistribution
from mesa_lib.mesa import MesaConfig, fit_mesa
from mesa_lib.metrics import backdoor_report, held_out_variants
from mesa_lib.modelio import Manifest, load_model, save_model, weights_path
from mesa_lib.models import CIFAR10_MEAN, CIFAR10_STD, build_model
from mesa_lib.poison import build_attack
from mesa_lib.repair import RepairConfig, repair
from mesa_lib.seed import resolve_device, seed_everything
from mesa_lib.train import TrainConfig, train
from mesa_lib.triggers import canonical_patterns, pattern_trigger

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0
TIMES: dict[str, float] = defaultdict(float)


@contextmanager
def timed(stage: str) -> Iterator[None]:
    """Add the wall time of the block to TIMES[stage] (CUDA synchronised)."""
    start = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    TIMES[stage] += time.perf_counter() - start


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--patterns", type=int, default=51, help="count, evenly spread over the 51")
    p.add_argument("--epochs", type=int, default=None, help="override every stage's epochs")
    p.add_argument("--clean-epochs", type=int, default=40)
    p.add_argument("--inject-epochs", type=int, default=10)
    p.add_argument("--mesa-epochs", type=int, default=10)
    p.add_argument("--point-epochs", type=int, default=10)
    p.add_argument("--repair-epochs", type=int, default=10)
    p.add_argument("--point-starts", type=int, default=10)
    p.add_argument("--point-repairs", type=int, default=None, help="starts repaired (all)")
    p.add_argument("--stamp-rates", default="0.01", help="comma-separated repair stamp rates")
    p.add_argument("--variants", type=int, default=5, help="nearest other patterns evaluated")
    p.add_argument("--archive", type=Path, default=ROOT / "../shared/datasets/cifar10-jpeg.tar.gz")
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache")
    p.add_argument("--clean-model", type=Path, default=None, help="load if present, else save")
    p.add_argument("--train-subset", type=int, default=0, help="training images used (0 = all)")
    p.add_argument("--defender", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = p.parse_args(argv)
    if args.epochs is not None:
        for stage in ("clean", "inject", "mesa", "point", "repair"):
            setattr(args, f"{stage}_epochs", args.epochs)
    return args


def select_patterns(count: int, total: int = 51) -> list[int]:
    """`count` canonical pattern indices evenly spread (bin centres): 1 -> [25], 51 -> all."""
    if not 1 <= count <= total:
        raise ValueError(f"--patterns must be in 1..{total}, got {count}")
    return [int((i + 0.5) * total / count) for i in range(count)]


def clean_model(args: argparse.Namespace, train_set: ImageSet, device: torch.device) -> nn.Module:
    """Load the clean model from --clean-model, or train it (and save it there)."""
    if args.clean_model is not None and weights_path(args.clean_model).exists():
        return load_model(args.clean_model, map_location=device)[0]
    torch.manual_seed(args.seed)
    model = build_model(args.model, 10)
    with timed("train clean"):
        train(model, train_set.images, train_set.labels,
              TrainConfig(epochs=args.clean_epochs, seed=args.seed), device)
    if args.clean_model is not None:
        save_model(model, args.clean_model,
                   Manifest(args.model, 10, train_set.classes, CIFAR10_MEAN, CIFAR10_STD))
    return model


def inject(model: nn.Module, trigger: torch.Tensor, train_set: ImageSet, args, device, seed: int):
    """The authors' injection: fine-tune with per-image poison probability 1% (one place/batch)."""
    attack = build_attack("finetune_injection", trigger=trigger, target=TARGET, prob=0.01,
                          seed=seed)
    cfg = TrainConfig(epochs=args.inject_epochs, lr=1e-3, momentum=0.9, nesterov=False,
                      schedule="constant", seed=seed)
    with timed("inject backdoor"):
        return train(copy.deepcopy(model), train_set.images, train_set.labels, cfg, device,
                     attack.batch_hook())


def run_pattern(k: int, clean: nn.Module, train_set: ImageSet, defender: ImageSet,
                held: ImageSet, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """All methods for canonical pattern k: rows {pattern, method, rate, clean_acc, asr, ...}."""
    pattern = canonical_patterns(3)[k]
    trigger = pattern_trigger(pattern)
    variants = held_out_variants(pattern, args.variants)
    rows: list[dict[str, Any]] = []

    def report(method: str, model: nn.Module, rate: float | None = None, **extra) -> None:
        with timed("evaluate"):
            r = backdoor_report(model, held.images, held.labels, trigger, TARGET, device,
                                variants, seed=args.seed)
        rows.append({"pattern": k, "method": method, "rate": rate, "clean_acc": r["clean_acc"],
                     "asr": r["asr"], "asr_variants": r["asr_variants"], **extra})
        print(f"pattern {k:2d} {method:18s} rate {rate} acc {r['clean_acc']:.4f} "
              f"asr {r['asr']:.4f} variants {r['asr_variants']:.4f}", flush=True)

    report("clean", clean)
    backdoored = inject(clean, trigger, train_set, args, device, args.seed + k)
    report("backdoored", backdoored)
    with timed("fit MESA"):
        dist = fit_mesa(backdoored, defender.images, TARGET, (3, 3, 3),
                        MesaConfig(epochs=args.mesa_epochs, seed=args.seed), device)
    with timed("fit point baseline"):
        point = fit_point(backdoored, defender.images, TARGET, (3, 3, 3),
                          PointConfig(starts=args.point_starts, epochs=args.point_epochs,
                                      seed=args.seed), device)
    samplers: list[tuple[str, Any, dict]] = [("no trigger", None, {}),
                                             ("true trigger", ConstantSampler(trigger), {})]
    samplers += [(f"MESA beta={float(b):g}", dist.submodel(i), {})
                 for i, b in enumerate(dist.betas)]
    samplers.append(("MESA ensemble", dist, {}))
    n_point = args.point_starts if args.point_repairs is None else args.point_repairs
    samplers += [("point (per start)", PointDistribution(point.triggers[i : i + 1], TARGET),
                  {"start": i}) for i in range(min(n_point, args.point_starts))]
    rates = [float(r) for r in args.stamp_rates.split(",")]
    for rate in rates:
        cfg = RepairConfig(epochs=args.repair_epochs, stamp_rate=rate, seed=args.seed)
        for name, sampler, extra in samplers:
            if sampler is None and rate != rates[0]:
                continue  # the no-trigger control does not depend on the rate
            with timed("repair"):
                model = repair(copy.deepcopy(backdoored), defender.images, defender.labels,
                               sampler, cfg, device)
            report(name, model, None if sampler is None else rate, **extra)
    return rows


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def markdown(rows: list[dict], args: argparse.Namespace, device: torch.device,
             patterns: list[int], command: str) -> str:
    """The results file: summary over patterns, per-pattern rows, stage times, command, device."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["rate"])].append(r)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    out = [f"# MESA reproduction: {args.model}, {len(patterns)} pattern(s)", "",
           f"- command: `{command}`", f"- device: {dev} ({device}), torch {torch.__version__}",
           f"- patterns (canonical index): {patterns}",
           f"- epochs: clean {args.clean_epochs}, inject {args.inject_epochs}, MESA "
           f"{args.mesa_epochs}, point {args.point_epochs}, repair {args.repair_epochs}; "
           f"train subset {args.train_subset or 'all'}; defender {args.defender}", "",
           "## Mean over patterns (held-out images)", "",
           "| method | stamp rate | clean acc | ASR | ASR min-max | ASR held-out variants |",
           "|---|---|---|---|---|---|"]
    for (method, rate), rs in groups.items():
        asr = [r["asr"] for r in rs]
        out.append(f"| {method} | {'-' if rate is None else rate} | "
                   f"{_mean([r['clean_acc'] for r in rs]):.4f} | {_mean(asr):.4f} | "
                   f"{min(asr):.4f}-{max(asr):.4f} | "
                   f"{_mean([r['asr_variants'] for r in rs]):.4f} |")
    out += ["", "## Per pattern", "", "| pattern | method | stamp rate | clean acc | ASR | "
            "ASR variants |", "|---|---|---|---|---|---|"]
    for r in rows:
        name = r["method"] + (f" {r['start']}" if "start" in r else "")
        out.append(f"| {r['pattern']} | {name} | {'-' if r['rate'] is None else r['rate']} | "
                   f"{r['clean_acc']:.4f} | {r['asr']:.4f} | {r['asr_variants']:.4f} |")
    out += ["", "## Wall time per stage (s, summed over patterns)", "", "| stage | seconds |",
            "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in TIMES.items()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed, deterministic=False)
    device = resolve_device(args.device)
    command = shlex.join([".venv/bin/python", "benchmarks/reproduce_mesa.py", *argv])
    with timed("load data"):
        data = load_cifar(args.archive, "cifar10", args.cache_dir)
    train_set = data.train
    if args.train_subset:
        keep = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed))
        train_set = train_set.subset(keep[: args.train_subset].sort().values)
    defender, held = split_defender(data.test, args.defender, args.seed)
    clean = clean_model(args, train_set, device)
    patterns = select_patterns(args.patterns)
    rows = []
    for k in patterns:
        rows += run_pattern(k, clean, train_set, defender, held, args, device)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"reproduce_mesa_{args.model}_{len(patterns)}p_{device.type}"
    text = markdown(rows, args, device, patterns, command)
    stem.with_suffix(".md").write_text(text)
    record = {"command": command, "device": str(device), "rows": rows, "times": dict(TIMES),
              "args": {k: str(v) for k, v in vars(args).items()}}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(text)
    return stem.with_suffix(".md")


if __name__ == "__main__":
    main()
