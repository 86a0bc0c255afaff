"""Training throughput (images/s) and time-to-accuracy for each model, on CPU or GPU.

Usage:
    python benchmarks/train_speed.py --models resnet8 resnet20 resnet18 --throughput-only
    python benchmarks/train_speed.py --models resnet18 --epochs 30 --target-acc 0.92   # on a GPU

Throughput: forward+backward+SGD step of `--steps` batches after `--warmup` batches, on real
CIFAR-10 batches. Time-to-accuracy: a one-cycle run of `--epochs`, test accuracy after every
epoch; reports the training seconds (evaluation excluded) when `--target-acc` is first reached.
Appends one markdown row per model to `--out` (benchmarks/results/train_speed.md by default).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mesa_lib.data import load_cifar
from mesa_lib.evaluate import accuracy
from mesa_lib.models import build_model
from mesa_lib.seed import resolve_device, seed_everything
from mesa_lib.train import TrainConfig, augment, train
from tasks.common.env import default_data_source

ROOT = Path(__file__).resolve().parents[1]


def throughput(
    name: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    batch: int,
    warmup: int,
    steps: int,
) -> float:
    """Training images per second of model `name` over `steps` timed batches."""
    model = build_model(name).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x_all = images[: batch * (warmup + steps)].to(device)
    y_all = labels[: batch * (warmup + steps)].to(device)
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize() if cuda else None
            start = time.perf_counter()
        x = augment(x_all[i * batch : (i + 1) * batch].float() / 255, gen)
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(model(x), y_all[i * batch : (i + 1) * batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.cuda.synchronize() if cuda else None
    return batch * steps / (time.perf_counter() - start)


def time_to_accuracy(
    name: str, data, device: torch.device, epochs: int, target: float, batch: int, lr: float
) -> tuple[float | None, float, float]:
    """(seconds to reach `target` test accuracy or None, final accuracy, total train seconds)."""
    model = build_model(name)
    elapsed, reached = 0.0, None
    final = 0.0

    def on_epoch(m, s) -> None:
        nonlocal elapsed, reached, final
        elapsed += s.seconds
        final = accuracy(m, data.test.images, data.test.labels, device)
        m.train()
        print(f"  {name} epoch {s.epoch}/{s.epochs}: {elapsed:.1f} s, test acc {final:.4f}")
        if reached is None and final >= target:
            reached = elapsed

    cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=lr, label_smoothing=0.1)
    train(model, data.train.images, data.train.labels, cfg, device, callback=on_epoch)
    return reached, final, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet8", "resnet20", "resnet18"])
    ap.add_argument("--data", type=Path, default=default_data_source(ROOT))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--throughput-only", action="store_true")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--target-acc", type=float, default=0.92)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_speed.md")
    args = ap.parse_args()

    seed_everything(0, deterministic=False)
    device = resolve_device(args.device)
    data = load_cifar(args.data, "cifar10", cache_dir=ROOT / ".cache")
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (
            f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        )
    )
    rows = []
    for name in args.models:
        ips = throughput(
            name, data.train.images, data.train.labels, device, args.batch, args.warmup, args.steps
        )
        row = f"| {name} | {where} | {args.batch} | {ips:,.0f} |"
        if not args.throughput_only:
            reached, final, total = time_to_accuracy(
                name, data, device, args.epochs, args.target_acc, args.batch, args.lr
            )
            hit = f"{reached:.1f} s" if reached is not None else "not reached"
            row += f" {args.epochs} | {final:.4f} | {total:.1f} s | {args.target_acc} in {hit} |"
        else:
            row += " - | - | - | - |"
        print(row)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new = not args.out.exists()
    with args.out.open("a") as f:
        if new:
            f.write(
                "| model | device | batch | train img/s | epochs | final test acc | "
                "train time | time to target |\n|---|---|---|---|---|---|---|---|\n"
            )
        f.write("\n".join(rows) + "\n")
    print(f"command: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
