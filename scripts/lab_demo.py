"""The backdoor laboratory end to end on CPU: load CIFAR-10, poison, train, report accuracy and ASR.

Usage: python scripts/lab_demo.py [--data PATH] [--model resnet8] [--epochs 6] [--rate 0.05]

`--data` defaults to $MESA_DATA_SOURCE, else the offline copy
../shared/datasets/cifar10-jpeg.tar.gz, else the canonical archive under data/
(downloaded by torchvision when the network allows).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mesa_lib.data import data_fingerprint, load_cifar
from mesa_lib.evaluate import accuracy, attack_success_rate
from mesa_lib.modelio import Manifest, save_model
from mesa_lib.models import CIFAR10_MEAN, CIFAR10_STD, build_model
from mesa_lib.poison import build_attack
from mesa_lib.seed import resolve_device, seed_everything
from mesa_lib.train import TrainConfig, train
from mesa_lib.triggers import DEMO_PATTERN, corner_location, pattern_trigger
from tasks.common.env import default_data_source

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data_source(ROOT))
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--out",
        type=Path,
        default=ROOT / "artifacts" / "lab_demo",
        help="folder for the model (safetensors + manifest) and metrics.json",
    )
    args = ap.parse_args()

    t0 = time.perf_counter()
    seed_everything(args.seed)
    device = resolve_device(args.device)
    data = load_cifar(args.data, "cifar10", cache_dir=ROOT / ".cache")
    t_load = time.perf_counter() - t0
    trigger = pattern_trigger(DEMO_PATTERN)
    attack = build_attack(
        "badnets", trigger=trigger, target=args.target, rate=args.rate, seed=args.seed
    )
    poisoned = attack.poison_dataset(data.train.images, data.train.labels)
    print(
        f"loaded {len(data.train)}+{len(data.test)} images from {args.data} in {t_load:.1f} s; "
        f"poisoned {len(poisoned.indices)} training images -> class {args.target}"
    )

    model = build_model(args.model, num_classes=len(data.train.classes))
    cfg = TrainConfig(epochs=args.epochs, batch_size=256, lr=0.2, seed=args.seed)
    bar = tqdm(total=args.epochs, desc=f"train {args.model}", unit="epoch")

    def report(_model: torch.nn.Module, s) -> None:
        bar.set_postfix(
            loss=f"{s.loss:.3f}", acc=f"{s.accuracy:.3f}", img_s=f"{s.images_per_second:.0f}"
        )
        bar.update()

    t1 = time.perf_counter()
    train(model, poisoned.images, poisoned.labels, cfg, device, callback=report)
    bar.close()
    t_train = time.perf_counter() - t1
    corner = corner_location((32, 32), tuple(trigger.shape[-2:]))
    test = data.test
    metrics = {
        "clean_accuracy": accuracy(model, test.images, test.labels, device),
        "asr_corner": attack_success_rate(
            model, test.images, test.labels, trigger, args.target, device, locations=corner
        ),
        "asr_random_location": attack_success_rate(
            model, test.images, test.labels, trigger, args.target, device, seed=args.seed
        ),
        "train_seconds": t_train,
        "total_seconds": time.perf_counter() - t0,
    }
    print(json.dumps(metrics, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(
        architecture=args.model,
        num_classes=len(test.classes),
        classes=test.classes,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        data_hash=data_fingerprint(data),
        extra={"attack": "badnets", "rate": args.rate, "target": args.target, "seed": args.seed},
    )
    save_model(model.cpu(), args.out / "model", manifest)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"model and metrics written to {args.out}")


if __name__ == "__main__":
    main()
