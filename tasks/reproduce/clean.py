"""`python -m tasks.reproduce.clean --seed S`: the clean model every cell of a seed starts from.

Trained on the 50,000 training images (the attacker's side; the defender never touches them)
with reproduce/params.yaml `model.*`, saved in the safe format under reproduce/models/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from mesa_lib.data import ImageSet
from mesa_lib.modelio import Manifest, save_model
from mesa_lib.models import CIFAR10_MEAN, CIFAR10_STD, build_model
from mesa_lib.seed import resolve_device, seed_everything
from mesa_lib.train import TrainConfig, train
from tasks.reproduce.data import load_data
from tasks.reproduce.params import ReproParams, load_repro_params
from tasks.reproduce.paths import clean_path


def train_clean(params: ReproParams, train_set: ImageSet, seed: int,
                device: torch.device) -> nn.Module:
    """The seed's clean model: `model.*` settings on the whole training set."""
    m = params.model
    seed_everything(seed)
    model = build_model(m.arch, 10, **({"width": m.width} if m.arch == "resnet8" else {}))
    cfg = TrainConfig(epochs=m.epochs, batch_size=m.batch_size, lr=m.lr, seed=seed)
    return train(model, train_set.images, train_set.labels, cfg, device)


def run_clean(params: ReproParams, seed: int) -> Path:
    """Train and save the clean model of `seed` (+ seed_offset)."""
    s = seed + params.seed_offset
    data = load_data(params)
    start = time.perf_counter()
    model = train_clean(params, data.train, s, resolve_device("auto"))
    m = params.model
    manifest = Manifest(m.arch, 10, data.train.classes, CIFAR10_MEAN, CIFAR10_STD,
                        arch_kwargs={"width": m.width} if m.arch == "resnet8" else {},
                        extra={"seed": s, "epochs": m.epochs,
                               "train_seconds": round(time.perf_counter() - start, 1)})
    return save_model(model.cpu(), clean_path(seed), manifest)


def main(argv: list[str] | None = None) -> None:
    """Command line: validate reproduce/params.yaml, train, save."""
    ap = argparse.ArgumentParser(prog="python -m tasks.reproduce.clean")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--params", default="reproduce/params.yaml")
    args = ap.parse_args(argv)
    print(run_clean(load_repro_params(args.params), args.seed))


if __name__ == "__main__":
    main()
