"""`python -m tasks.zoo.build NAME`: train one zoo model and write its truth record.

The model goes to zoo/models/<zoo>/NAME.{safetensors,json} (DVC cache, not git) in the safe
format; its manifest says nothing about the attack (the scanner must not be told). The truth
record zoo/truth/<zoo>/NAME.json (in git) says what it is: clean or backdoored with its target,
the attack, its attack success rate (ASR) and clean accuracy, measured on the test images the
scanner never gets (`data.n_reference` of the test set are the scanner's reference; the rest
are for truth).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mesa_lib.data import ImageSet, load_cifar, seeded_subset, split_defender
from mesa_lib.evaluate import accuracy, predict
from mesa_lib.modelio import Manifest, load_model, save_model
from mesa_lib.models import CIFAR10_MEAN, CIFAR10_STD, build_model
from mesa_lib.poison import build_attack, place
from mesa_lib.seed import derive_seed, resolve_device, seed_everything
from mesa_lib.train import TrainConfig, train
from mesa_lib.triggers import build_trigger, stamp
from tasks.common.env import CACHE_DIR, default_data_source
from tasks.common.io import write_json
from tasks.zoo.params import Attack, Badnets, Injection, TrainSettings, ZooParams, load_zoo_params

MODELS = Path("zoo/models")
TRUTH = Path("zoo/truth")


def model_path(zoo: str, name: str) -> Path:
    """Stem of a zoo model: one folder per zoo, so each zoo's consumers depend on it alone."""
    return MODELS / zoo / name


def truth_path(zoo: str, name: str) -> Path:
    """A zoo model's truth record."""
    return TRUTH / zoo / f"{name}.json"


@dataclass(frozen=True)
class ZooData:
    """Training set, the scanner's reference part of the test set and the truth part."""

    train: ImageSet
    reference: ImageSet
    truth: ImageSet


def load_data(params: ZooParams) -> ZooData:
    """CIFAR-10 cut into the zoo's parts (the same for every model)."""
    d = params.data
    data = load_cifar(default_data_source() if d.archive == "auto" else Path(d.archive),
                      "cifar10", CACHE_DIR)
    reference, truth = split_defender(data.test, d.n_reference,
                                      derive_seed(d.split_seed, "defender_split"))
    return ZooData(data.train, reference, truth)


def _config(settings: TrainSettings, seed: int, finetune: bool) -> TrainConfig:
    if finetune:  # constant lr, as the authors' injection
        return TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size,
                           lr=settings.lr, nesterov=False, schedule="constant", seed=seed)
    return TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                       seed=seed)


def trigger_of(attack: Attack) -> Tensor:
    """The attack's trigger (3, size, size), drawn from its own seed."""
    return build_trigger(attack.trigger, attack.size, 3, derive_seed(attack.seed, "zoo_attack"))


def attack_success(model: nn.Module, part: ImageSet, attack: Attack, device: torch.device
                   ) -> float:
    """ASR over the non-target images, the trigger placed (and blended) as in training."""
    keep = part.labels != attack.target
    x = part.images[keep]
    trigger = trigger_of(attack)
    gen = torch.Generator().manual_seed(derive_seed(attack.seed, "zoo_attack"))
    loc = place(attack.location, len(x), tuple(x.shape[-2:]), tuple(trigger.shape[-2:]), gen)
    stamped = stamp(x, trigger, loc, attack.alpha)  # uint8 in, uint8 out
    return float((predict(model, stamped, device) == attack.target).float().mean())


def _train_set(params: ZooParams, data: ZooData, seed: int) -> ImageSet:
    return data.train.subset(seeded_subset(params.data.n_train, len(data.train),
                                           derive_seed(seed, "train_subset")))


def build(params: ZooParams, name: str, data: ZooData, device: torch.device
          ) -> tuple[nn.Module, dict[str, Any]]:
    """Train the model `name`; returns it with its truth record (ASR and accuracy unset)."""
    kind, entry = params.entry(name)
    seed_everything(entry.seed)
    train_set = _train_set(params, data, entry.seed)
    truth: dict[str, Any] = {"name": name, "zoo": entry.zoo, "kind": kind,
                             "seed": entry.seed, "backdoored": isinstance(entry, Attack)}
    if kind in ("bases", "badnets"):
        model = build_model(entry.arch, 10)
        x, y = train_set.images, train_set.labels
        if isinstance(entry, Badnets):
            attack = build_attack("badnets", trigger=trigger_of(entry), target=entry.target,
                                  rate=entry.rate, location=entry.location, alpha=entry.alpha,
                                  seed=derive_seed(entry.seed, "zoo_attack"))
            poisoned = attack.poison_dataset(x, y)
            x, y = poisoned.images, poisoned.labels
        train(model, x, y, _config(params.train, entry.seed, False), device)
        truth |= {"arch": entry.arch, "base": None}
    else:
        model, manifest = load_model(model_path(entry.zoo, entry.base), map_location=device)
        hook = None
        if isinstance(entry, Injection):
            attack = build_attack("finetune_injection", trigger=trigger_of(entry),
                                  target=entry.target, prob=entry.rate, location=entry.location,
                                  alpha=entry.alpha, seed=derive_seed(entry.seed, "zoo_attack"))
            hook = attack.batch_hook()
        train(model, train_set.images, train_set.labels,
              _config(params.finetune, entry.seed, True), device, hook)
        truth |= {"arch": manifest.architecture, "base": entry.base}
    if isinstance(entry, Attack):
        truth |= {"target": entry.target, "attack": {
            "planted": "injection" if isinstance(entry, Injection) else "badnets",
            "trigger": entry.trigger, "size": entry.size, "location": entry.location,
            "rate": entry.rate, "alpha": entry.alpha}}
    else:
        truth |= {"target": None, "attack": None}
    return model.eval(), truth


def run(params: ZooParams, name: str) -> Path:
    """Build, measure and save model `name` and its truth record."""
    device, start = resolve_device("auto"), time.perf_counter()
    data = load_data(params)
    model, truth = build(params, name, data, device)
    seconds = time.perf_counter() - start
    _, entry = params.entry(name)
    truth["clean_accuracy"] = accuracy(model, data.truth.images, data.truth.labels, device)
    truth["asr"] = attack_success(model, data.truth, entry, device) if truth["backdoored"] \
        else None
    truth["counts"] = (not truth["backdoored"]) or truth["asr"] >= params.min_asr
    truth["train_seconds"] = round(seconds, 1)
    manifest = Manifest(truth["arch"], 10, data.train.classes, CIFAR10_MEAN, CIFAR10_STD,
                        extra={"zoo_model": name})  # no word of the attack
    save_model(model.cpu(), model_path(entry.zoo, name), manifest)
    write_json(truth_path(entry.zoo, name), truth)
    return truth_path(entry.zoo, name)


def main(argv: list[str] | None = None) -> None:
    """Command line: validate zoo/params.yaml, build one model."""
    ap = argparse.ArgumentParser(prog="python -m tasks.zoo.build")
    ap.add_argument("name")
    ap.add_argument("--params", default=str(Path("zoo/params.yaml")))
    args = ap.parse_args(argv)
    print(run(load_zoo_params(args.params), args.name))


if __name__ == "__main__":
    main()
