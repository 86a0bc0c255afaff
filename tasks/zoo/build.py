"""`python -m tasks.zoo.build NAME`: train one zoo model and write its truth record.

The model goes to zoo/models/<zoo>/NAME.{safetensors,json} (a base model to zoo/models/<zoo>/bases/;
DVC cache, not git) in the safe format; its manifest says nothing about the attack (the scanner must
not be told). The truth record zoo/truth/<zoo>/NAME.json (in git) says what it is: clean or
backdoored with its target, the attack, its attack success rate (ASR) and clean accuracy, measured
on the test images the scanner never gets (`data.n_reference` of the test set are the scanner's
reference; the rest are for truth).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mesa_lib.data import ImageSet, load_cifar, seeded_subset, split_defender
from mesa_lib.evaluate import accuracy
from mesa_lib.modelio import Manifest, load_model, save_model
from mesa_lib.models import CIFAR10_MEAN, CIFAR10_STD, build_model
from mesa_lib.poison import Attack, attack_from
from mesa_lib.seed import derive_seed, resolve_device, seed_everything
from mesa_lib.train import TrainConfig, train
from tasks.common.env import CACHE_DIR, default_data_source
from tasks.common.io import write_json
from tasks.zoo.params import Backdoor, TrainSettings, ZooParams, load_zoo_params

MODELS = Path("zoo/models")
TRUTH = Path("zoo/truth")


def model_path(zoo: str, name: str, base: bool = False) -> Path:
    """Stem of a zoo model: one folder per zoo, so each zoo's consumers depend on it alone; the
    base models in a folder of their own, which every backdoor stage depends on (a DVC foreach
    stage cannot name each entry's own base: its deps are not per entry)."""
    return MODELS / zoo / "bases" / name if base else MODELS / zoo / name


def stem_of(params: ZooParams, name: str) -> Path:
    """Where model `name` of the zoo is."""
    kind, entry = params.entry(name)
    return model_path(entry.zoo, name, base=kind == "bases")


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


def attack_of(entry: Backdoor) -> Attack:
    """The entry's (first) attack from the registry: trigger and draws from its own seed."""
    return attacks_of(entry)[0]


def attacks_of(entry: Backdoor) -> list[Attack]:
    """Every attack the entry plants (two with `also`), each with a seed of its own."""
    return [attack_from(name, config, target,
                        derive_seed(entry.seed, "zoo_attack" if i == 0 else "zoo_attack_2"))
            for i, (name, config, target) in enumerate(entry.plants())]


def _chained(hooks: list[Any]) -> Any:
    """One batch hook applying each of `hooks` in turn (None if there is none)."""
    hooks = [h for h in hooks if h is not None]
    if len(hooks) < 2:
        return hooks[0] if hooks else None

    def hook(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        for each in hooks:
            x, y = each(x, y, index)
        return x, y

    return hook


def successes(entry: Backdoor, model: nn.Module, data: ZooData, device: torch.device
              ) -> list[float]:
    """Each planted trigger's attack success rate on the truth images, in `plants` order."""
    return [a.success(model, data.truth.images, data.truth.labels, device)
            for a in attacks_of(entry)]


def _train_set(params: ZooParams, data: ZooData, seed: int) -> ImageSet:
    return data.train.subset(seeded_subset(params.data.n_train, len(data.train),
                                           derive_seed(seed, "train_subset")))


def build(params: ZooParams, name: str, data: ZooData, device: torch.device
          ) -> tuple[nn.Module, dict[str, Any]]:
    """Train the model `name`; returns it with its truth record (ASR and accuracy unset).

    A base trains from scratch; a clean fine-tune fine-tunes its base; a backdoor poisons what
    its attack poisons (the data set, the batches, or both) while training a new `arch` from
    scratch or fine-tuning its `base`.
    """
    kind, entry = params.entry(name)
    seed_everything(entry.seed)
    train_set = _train_set(params, data, entry.seed)
    truth: dict[str, Any] = {"name": name, "zoo": entry.zoo, "kind": kind,
                             "seed": entry.seed, "backdoored": isinstance(entry, Backdoor)}
    base = getattr(entry, "base", None)
    if base is None:
        model, arch, settings = build_model(entry.arch, 10), entry.arch, params.train
    else:
        model, manifest = load_model(model_path(entry.zoo, base, base=True), map_location=device)
        arch, settings = manifest.architecture, params.finetune
    x, y, hook = train_set.images, train_set.labels, None
    if isinstance(entry, Backdoor):
        hooks = []
        for attack in attacks_of(entry):
            poisoned = attack.poison_dataset(x, y)
            x, y = poisoned.images, poisoned.labels
            hooks.append(attack.batch_hook())
        hook = _chained(hooks)
        truth |= {"target": entry.target, "targets": entry.targets,
                  "attack": {"name": entry.attack, **entry.settings}}
        if entry.also:
            truth["also"] = dict(entry.also)
    else:
        truth |= {"target": None, "attack": None}
    train(model, x, y, _config(settings, entry.seed, base is not None), device, hook)
    truth |= {"arch": arch, "base": base}
    return model.eval(), truth


def run(params: ZooParams, name: str) -> Path:
    """Build, measure and save model `name` and its truth record."""
    device, start = resolve_device("auto"), time.perf_counter()
    data = load_data(params)
    model, truth = build(params, name, data, device)
    seconds = time.perf_counter() - start
    _, entry = params.entry(name)
    truth["clean_accuracy"] = accuracy(model, data.truth.images, data.truth.labels, device)
    if truth["backdoored"]:  # asr: the first trigger's; asrs: each trigger's, in order
        truth["asrs"] = successes(entry, model, data, device)
        truth["asr"] = truth["asrs"][0]
    else:
        truth["asr"] = None
    truth["counts"] = (not truth["backdoored"]) or min(truth["asrs"]) >= params.min_asr
    truth["train_seconds"] = round(seconds, 1)
    manifest = Manifest(truth["arch"], 10, data.train.classes, CIFAR10_MEAN, CIFAR10_STD,
                        extra={"zoo_model": name})  # no word of the attack
    save_model(model.cpu(), stem_of(params, name), manifest)
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
