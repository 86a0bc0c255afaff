"""Build the two tiny models the scan tests use: tests/fixtures/scan_models/{backdoored,clean}.

ResNet-8 (a registered architecture, so the safe model format accepts it) trained on the
synthetic 16x16 template task of `backdoor_fixture` (6 classes); the backdoored one with BadNets,
the demo 3x3 pattern at random places, target class 0. Training takes minutes on 2 CPU cores,
too long for every test run, so the files are built once and kept with the tests:

    python tests/make_scan_models.py        # rewrites tests/fixtures/scan_models/
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backdoor_fixture import (  # noqa: E402
    CLASSES,
    CPU,
    RATE,
    SIZE,
    TARGET,
    TRIGGER,
    synthetic_data,
)

from mesa_lib.evaluate import accuracy, attack_success_rate  # noqa: E402
from mesa_lib.modelio import Manifest, save_model  # noqa: E402
from mesa_lib.models import build_model  # noqa: E402
from mesa_lib.poison import build_attack  # noqa: E402
from mesa_lib.train import TrainConfig, train  # noqa: E402

OUT = Path(__file__).resolve().parent / "fixtures" / "scan_models"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
N_TRAIN, EPOCHS = 2000, 8


def manifest(backdoor: bool) -> Manifest:
    """The manifest of a tiny model: resnet8 width 1, 6 classes, 3x16x16 inputs."""
    extra = {"attack": "badnets", "target": TARGET, "rate": RATE} if backdoor else {}
    return Manifest("resnet8", CLASSES, tuple(f"class{k}" for k in range(CLASSES)), MEAN, STD,
                    input_shape=(3, SIZE, SIZE), extra=extra, arch_kwargs={"width": 1})


def build(backdoor: bool, seed: int = 0) -> torch.nn.Module:
    """Train one tiny ResNet-8, with a BadNets backdoor or clean."""
    x, y = synthetic_data(N_TRAIN, seed)
    if backdoor:
        attack = build_attack("badnets", trigger=TRIGGER, target=TARGET, rate=RATE,
                              location="random", seed=seed)
        poisoned = attack.poison_dataset(x, y)
        x, y = poisoned.images, poisoned.labels
    torch.manual_seed(seed)
    model = build_model("resnet8", CLASSES, MEAN, STD, width=1)
    cfg = TrainConfig(epochs=EPOCHS, batch_size=64, lr=0.05, augment=False, seed=seed)
    return train(model, x, y, cfg, CPU).eval()


def main() -> None:
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    tx, ty = synthetic_data(1024, 2)
    for name, backdoor in (("backdoored", True), ("clean", False)):
        model = build(backdoor)
        acc = accuracy(model, tx, ty, CPU)
        asr = attack_success_rate(model, tx, ty, TRIGGER, TARGET, CPU)
        save_model(model, OUT / name, manifest(backdoor))
        print(f"{name}: clean accuracy {acc:.3f}, ASR {asr:.3f} -> {OUT / name}.safetensors")


if __name__ == "__main__":
    main()
