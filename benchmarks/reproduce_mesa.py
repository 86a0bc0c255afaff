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

Repair sweep: every sampler is repaired at --main-rate; the rates of --stamp-rates other than it
are run for the --sweep-methods only. --repair-eval-epochs adds clean accuracy / ASR checkpoints
during each repair (the epoch sweep, at no extra training cost).

Sharding (e.g. two CPU processes): run each with --only (a subset of the selected canonical
indices) and --tag, then combine their JSON records with --merge A.json B.json.
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
from mesa_lib.evaluate import accuracy, attack_success_rate
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
    p.add_argument("--width", type=int, default=1, help="resnet8 width multiplier")
    p.add_argument("--patterns", type=int, default=51, help="count, evenly spread over the 51")
    p.add_argument("--epochs", type=int, default=None, help="override every stage's epochs")
    p.add_argument("--clean-epochs", type=int, default=40)
    p.add_argument("--inject-epochs", type=int, default=10)
    p.add_argument("--mesa-epochs", type=int, default=10)
    p.add_argument("--point-epochs", type=int, default=10)
    p.add_argument("--repair-epochs", type=int, default=10)
    p.add_argument("--inject-prob", type=float, default=0.01, help="per-image poison prob")
    p.add_argument("--inject-lr", type=float, default=1e-3)
    p.add_argument("--mesa-lr", type=float, default=2e-4, help="Adam lr of generators and MINE")
    p.add_argument("--point-starts", type=int, default=10)
    p.add_argument("--point-repairs", type=int, default=None, help="starts repaired (all)")
    p.add_argument("--stamp-rates", default="0.5,0.01",
                   help="comma-separated repair stamp rates (0.5 ours, 0.01 authors')")
    p.add_argument("--main-rate", type=float, default=None,
                   help="rate at which every sampler is repaired (default: first of --stamp-rates)")
    p.add_argument("--sweep-methods", default="all",
                   help="comma-separated method names repaired at the other rates, or 'all'")
    p.add_argument("--repair-eval-epochs", default="",
                   help="comma-separated repair epochs with an extra acc/ASR checkpoint")
    p.add_argument("--variants", type=int, default=5, help="nearest other patterns evaluated")
    p.add_argument("--shifts", default="all",
                   help="colour-shifted variants kept (e.g. contrast0.2,tint_red), 'all' or ''")
    p.add_argument("--only", default="", help="run only these canonical indices (sharding)")
    p.add_argument("--tag", default="", help="suffix of the output file names (also --merge's)")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="combine the JSON records of shards into one results file; no run")
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
    kwargs = {"width": args.width} if args.width != 1 else {}
    model = build_model(args.model, 10, **kwargs)
    with timed("train clean"):
        train(model, train_set.images, train_set.labels,
              TrainConfig(epochs=args.clean_epochs, seed=args.seed), device)
    if args.clean_model is not None:
        save_model(model, args.clean_model,
                   Manifest(args.model, 10, train_set.classes, CIFAR10_MEAN, CIFAR10_STD,
                            arch_kwargs=kwargs))
    return model


def inject(model: nn.Module, trigger: torch.Tensor, train_set: ImageSet, args, device, seed: int):
    """The authors' injection: fine-tune with per-image poison probability (1% in the paper,
    --inject-prob), one random place per batch, SGD lr 1e-3 (--inject-lr), momentum 0.9."""
    attack = build_attack("finetune_injection", trigger=trigger, target=TARGET,
                          prob=args.inject_prob, seed=seed)
    cfg = TrainConfig(epochs=args.inject_epochs, lr=args.inject_lr, momentum=0.9, nesterov=False,
                      schedule="constant", seed=seed)
    with timed("inject backdoor"):
        return train(copy.deepcopy(model), train_set.images, train_set.labels, cfg, device,
                     attack.batch_hook())


def variant_triggers(pattern: torch.Tensor, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Held-out variants: the --variants nearest other patterns and the --shifts colour shifts."""
    variants = held_out_variants(pattern, args.variants)
    if args.shifts == "all":
        return variants
    keep = {s for s in args.shifts.split(",") if s}
    return {k: v for k, v in variants.items() if k.startswith("pattern") or k in keep}


def run_pattern(k: int, clean: nn.Module, train_set: ImageSet, defender: ImageSet,
                held: ImageSet, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """All methods for canonical pattern k: rows {pattern, method, rate, clean_acc, asr, ...}."""
    pattern = canonical_patterns(3)[k]
    trigger = pattern_trigger(pattern)
    variants = variant_triggers(pattern, args)
    rows: list[dict[str, Any]] = []

    def report(method: str, model: nn.Module, rate: float | None = None, **extra) -> None:
        with timed("evaluate"):
            r = backdoor_report(model, held.images, held.labels, trigger, TARGET, device,
                                variants, seed=args.seed)
        rows.append({"pattern": k, "method": method, "rate": rate, "clean_acc": r["clean_acc"],
                     "asr": r["asr"], "asr_variants": r["asr_variants"],
                     "asr_per_variant": {n: r[f"asr_{n}"] for n in variants}, **extra})
        print(f"pattern {k:2d} {method:18s} rate {rate} acc {r['clean_acc']:.4f} "
              f"asr {r['asr']:.4f} variants {r['asr_variants']:.4f} {extra.get('curve', '')}",
              flush=True)

    report("clean", clean)
    backdoored = inject(clean, trigger, train_set, args, device, args.seed + k)
    report("backdoored", backdoored)

    mesa_log: list[dict] = []

    def mesa_cb(st) -> None:
        mesa_log.append({"epoch": st.epoch, "target_prob": st.target_prob,
                         "mutual_info": st.mutual_info, "seconds": st.seconds})
        print(f"pattern {k:2d} MESA epoch {st.epoch}: s {[round(v, 3) for v in st.target_prob]}"
              f" MI {[round(v, 3) for v in st.mutual_info]} {st.seconds:.0f}s", flush=True)

    with timed("fit MESA"):
        dist = fit_mesa(backdoored, defender.images, TARGET, (3, 3, 3),
                        MesaConfig(epochs=args.mesa_epochs, lr=args.mesa_lr, seed=args.seed),
                        device, mesa_cb)
    with timed("fit point baseline"):
        point = fit_point(backdoored, defender.images, TARGET, (3, 3, 3),
                          PointConfig(starts=args.point_starts, epochs=args.point_epochs,
                                      seed=args.seed), device)
    with timed("evaluate"):  # how strongly the recovered triggers fire (first 1,000 held out)
        gen = torch.Generator().manual_seed(args.seed)
        few = held.subset(torch.arange(min(1000, len(held))))

        def fire_asr(t: torch.Tensor, seed: int) -> float:
            return attack_success_rate(backdoored, few.images, few.labels, t.cpu(), TARGET,
                                       device, seed=seed)

        fire = {f"MESA beta={float(b):g}": _mean([fire_asr(t, args.seed + j) for j, t in
                                                  enumerate(dist.sample_submodel(i, 4, gen))])
                for i, b in enumerate(dist.betas)}
        fire.update({f"point start {i}": fire_asr(point.triggers[i], args.seed)
                     for i in range(args.point_starts)})
    print(f"pattern {k:2d} ASR of recovered triggers on the backdoored model: {fire}", flush=True)

    samplers: list[tuple[str, Any, dict]] = [("no trigger", None, {}),
                                             ("true trigger", ConstantSampler(trigger), {})]
    samplers += [(f"MESA beta={float(b):g}", dist.submodel(i), {})
                 for i, b in enumerate(dist.betas)]
    samplers.append(("MESA ensemble", dist, {}))
    n_point = args.point_starts if args.point_repairs is None else args.point_repairs
    samplers += [("point (per start)", PointDistribution(point.triggers[i : i + 1], TARGET),
                  {"start": i}) for i in range(min(n_point, args.point_starts))]
    rates = [float(r) for r in args.stamp_rates.split(",")]
    main_rate = rates[0] if args.main_rate is None else args.main_rate
    rates = [main_rate] + [r for r in rates if r != main_rate]
    sweep = None if args.sweep_methods == "all" else set(args.sweep_methods.split(","))
    checkpoints = {int(e) for e in args.repair_eval_epochs.split(",") if e}
    for rate in rates:
        cfg = RepairConfig(epochs=args.repair_epochs, stamp_rate=rate, seed=args.seed)
        for name, sampler, extra in samplers:
            if rate != main_rate and (sampler is None or (sweep is not None and not any(
                    name.startswith(m) for m in sweep)) or extra.get("start", 0) > 0):
                continue  # no-trigger does not depend on the rate; sweep only what was asked
            curve: list[dict] = []

            def checkpoint(model: nn.Module, st, curve: list = curve) -> None:
                if st.epoch not in checkpoints or st.epoch == st.epochs:
                    return
                start = time.perf_counter()
                curve.append({"epoch": st.epoch,
                              "clean_acc": accuracy(model, held.images, held.labels, device),
                              "asr": attack_success_rate(model, held.images, held.labels,
                                                         trigger, TARGET, device,
                                                         seed=args.seed)})
                spent = time.perf_counter() - start
                TIMES["repair"] -= spent
                TIMES["evaluate"] += spent

            with timed("repair"):
                model = repair(copy.deepcopy(backdoored), defender.images, defender.labels,
                               sampler, cfg, device, checkpoint)
            report(name, model, None if sampler is None else rate, curve=curve, **extra)
    rows.append({"pattern": k, "method": "_fit", "mesa_log": mesa_log, "fire": fire})
    return rows


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _curve_text(rs: list[dict]) -> str:
    """Mean ASR at each repair checkpoint, e.g. 'e1 0.512'."""
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for r in rs:
        for c in r.get("curve", []):
            by_epoch[c["epoch"]].append(c["asr"])
    return ", ".join(f"e{e} {_mean(v):.4f}" for e, v in sorted(by_epoch.items())) or "-"


def _variant_labels(row: dict) -> dict[str, float]:
    """Per-variant ASRs keyed by pattern-independent labels ('nearest 1', ..., shift names)."""
    out, j = {}, 0
    for name, v in row["asr_per_variant"].items():
        if name.startswith("pattern"):
            j += 1
            name = f"nearest {j}"
        out[name] = v
    return out


def markdown(rows: list[dict], header: list[str], times: dict[str, float], title: str) -> str:
    """The results file: summary over patterns, per-pattern rows, stage times, header lines."""
    fits = [r for r in rows if r["method"] == "_fit"]
    rows = [r for r in rows if r["method"] != "_fit"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["rate"])].append(r)
    floor = {r["pattern"]: r["asr"] for r in rows if r["method"] == "clean"}
    out = [f"# {title}", "", *header, "",
           "## Mean over patterns (held-out images)", "",
           "ASR - floor: residual ASR minus the clean model's own ASR for the same trigger "
           "(mean; max over patterns). ASR at earlier repair epochs: the epoch sweep.", "",
           "| method | stamp rate | clean acc | ASR | ASR min-max | ASR - floor (mean; max) | "
           "ASR at earlier repair epochs | ASR held-out variants |",
           "|---|---|---|---|---|---|---|---|"]
    for (method, rate), rs in groups.items():
        asr = [r["asr"] for r in rs]
        gap = [r["asr"] - floor[r["pattern"]] for r in rs]
        out.append(f"| {method} | {'-' if rate is None else rate} | "
                   f"{_mean([r['clean_acc'] for r in rs]):.4f} | {_mean(asr):.4f} | "
                   f"{min(asr):.4f}-{max(asr):.4f} | {_mean(gap):+.4f}; {max(gap):+.4f} | "
                   f"{_curve_text(rs)} | {_mean([r['asr_variants'] for r in rs]):.4f} |")
    out += ["", "## Per pattern", "", "| pattern | method | stamp rate | clean acc | ASR | "
            "ASR at earlier repair epochs | ASR variants |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["method"] + (f" {r['start']}" if "start" in r else "")
        out.append(f"| {r['pattern']} | {name} | {'-' if r['rate'] is None else r['rate']} | "
                   f"{r['clean_acc']:.4f} | {r['asr']:.4f} | {_curve_text([r])} | "
                   f"{r['asr_variants']:.4f} |")
    if rows and rows[0].get("asr_per_variant"):
        names = list(_variant_labels(rows[0]))
        out += ["", "## ASR per held-out variant (mean over patterns)", "",
                "nearest j: the j-th nearest other canonical pattern of each attacked pattern.", "",
                "| method | stamp rate | " + " | ".join(names) + " |",
                "|---|---|" + "---|" * len(names)]
        for (method, rate), rs in groups.items():
            out.append(f"| {method} | {'-' if rate is None else rate} | " + " | ".join(
                f"{_mean([_variant_labels(r)[n] for r in rs]):.4f}" for n in names) + " |")
    if fits:
        out += ["", "## Recovered triggers", "",
                "Mean target probability s per MESA sub-model in its last fitting epoch, and the "
                "ASR on the first 1,000 held-out images of the backdoored model of 4 samples per "
                "sub-model "
                "(mean) and of each point-baseline trigger.", "",
                "| pattern | MESA s per beta (last epoch) | ASR of recovered triggers |",
                "|---|---|---|"]
        for f in fits:
            s = f["mesa_log"][-1]["target_prob"] if f["mesa_log"] else []
            out.append(f"| {f['pattern']} | {', '.join(f'{v:.3f}' for v in s)} | "
                       + ", ".join(f"{n}: {v:.3f}" for n, v in f["fire"].items()) + " |")
    out += ["", "## Wall time per stage (s, summed over patterns and shards)", "",
            "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in times.items()]
    return "\n".join(out) + "\n"


def header_lines(args: argparse.Namespace, device: str, patterns: list[int],
                 command: str) -> list[str]:
    """The run description at the top of the results file."""
    return [f"- command: `{command}`", f"- device: {device}, torch {torch.__version__}",
            f"- model: {args.model}" + (f" width {args.width}" if int(args.width) != 1 else ""),
            f"- patterns (canonical index): {patterns}",
            f"- epochs: clean {args.clean_epochs}, inject {args.inject_epochs}, MESA "
            f"{args.mesa_epochs}, point {args.point_epochs}, repair {args.repair_epochs}; "
            f"train subset {args.train_subset or 'all'}; defender {args.defender}",
            f"- injection: per-image poison probability {args.inject_prob}, SGD lr "
            f"{args.inject_lr}; MESA Adam lr {args.mesa_lr}; point starts {args.point_starts}; "
            f"repair stamp rates "
            f"{args.stamp_rates} (every method at {args.main_rate or 'the first'}, the others for "
            f"{args.sweep_methods}); held-out variants: {args.variants} nearest patterns + "
            f"shifts {args.shifts}"]


def merge(paths: list[Path], out: Path, tag: str = "") -> Path:
    """Combine shard records (rows concatenated, stage times summed) into one results file."""
    recs = [json.loads(p.read_text()) for p in paths]
    rows = [r for rec in recs for r in rec["rows"]]
    times: dict[str, float] = defaultdict(float)
    for rec in recs:
        for k, v in rec["times"].items():
            times[k] += v
    patterns = sorted({r["pattern"] for r in rows})
    a = recs[0]["args"]
    args = argparse.Namespace(**{k: a[k] for k in a})
    header = [f"- shard {i}: `{rec['command']}` ({rec['device']}, wall {rec.get('wall_s', 0):.0f}"
              " s)" for i, rec in enumerate(recs)]
    header += [f"- merged by: `.venv/bin/python benchmarks/reproduce_mesa.py --merge "
               f"{' '.join(str(p) for p in paths)}" + (f" --tag {tag}" if tag else "") + "`"]
    header += header_lines(args, recs[0]["device"], patterns, "see shards")[1:]
    stem = out / (f"reproduce_mesa_{a['model']}_{len(patterns)}p_{recs[0]['device_type']}"
                  + (f"_{tag}" if tag else ""))
    text = markdown(rows, header, dict(times), f"MESA reproduction: {a['model']}, "
                    f"{len(patterns)} pattern(s)")
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(
        {"shards": recs, "rows": rows, "times": dict(times)}, indent=1))
    print(text)
    return stem.with_suffix(".md")


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.tag)
    wall = time.perf_counter()
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
    if args.only:
        only = [int(k) for k in args.only.split(",")]
        if not set(only) <= set(patterns):
            raise ValueError(f"--only {only} must be among the selected patterns {patterns}")
        patterns = only
    rows = []
    for k in patterns:
        rows += run_pattern(k, clean, train_set, defender, held, args, device)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (f"reproduce_mesa_{args.model}_{len(patterns)}p_{device.type}"
                       + (f"_{args.tag}" if args.tag else ""))
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    dev = f"{dev} ({device}), {torch.get_num_threads()} thread(s)"
    text = markdown(rows, header_lines(args, dev, patterns, command), dict(TIMES),
                    f"MESA reproduction: {args.model}, {len(patterns)} pattern(s)")
    stem.with_suffix(".md").write_text(text)
    record = {"command": command, "device": dev, "device_type": device.type, "rows": rows,
              "times": dict(TIMES), "wall_s": time.perf_counter() - wall,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(text)
    return stem.with_suffix(".md")


if __name__ == "__main__":
    main()
