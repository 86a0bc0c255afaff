"""Trigger search seconds with the classifier in PyTorch's default (contiguous) memory format and
in channels_last (mesa_lib.mesa.CHANNELS_LAST, which `frozen` applies to our own networks), on
random-weight models: the mask search (params.yaml's settings but the steps: fewer for the larger
networks) and, on a ResNet-8, the transform search at the settings of
benchmarks/results/transform_calibrated_look.md (grid 16, 150 steps, three families).

    python benchmarks/mask_memory_format.py --out benchmarks/results/mask_memory_format.md

Each search runs twice in each format, alternating (the first run of a process includes
warm-up), on 256 random reference images, every class. The first three classes' smallest sizes
(mask L1, transformation RMS) show that the two formats search alike up to float rounding.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.record import head, save  # noqa: E402
from mesa_lib import mesa  # noqa: E402
from mesa_lib.masksearch import MaskSearchConfig, mask_search  # noqa: E402
from mesa_lib.models import build_model  # noqa: E402
from mesa_lib.transformsearch import TransformSearchConfig, transform_search  # noqa: E402

RUNS = (("resnet8", "mask", 200), ("resnet20", "mask", 100), ("resnet18", "mask", 10),
        ("resnet8", "transform", 150))


def _search(kind: str, model: torch.nn.Module, images: torch.Tensor, steps: int) -> torch.Tensor:
    """One search of every class; the first three classes' smallest sizes."""
    cpu, classes = torch.device("cpu"), tuple(range(10))
    if kind == "mask":
        return mask_search(model, images, classes, MaskSearchConfig(steps=steps, batch_size=8),
                           cpu).l1[:3]
    return transform_search(model, images, classes, TransformSearchConfig(steps=steps, grid=16),
                            cpu).size[:3]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mask_memory_format.md"))
    ap.add_argument("--load-note", default="")
    args = ap.parse_args()
    started = datetime.now().astimezone()
    torch.manual_seed(0)
    images = (torch.rand(256, 3, 32, 32) * 255).to(torch.uint8)
    rows = ["| architecture | search | steps | contiguous s (run 1, 2) | channels_last s (run 1, "
            "2) | sizes of classes 0-2, contiguous | channels_last |",
            "|---|---|---|---|---|---|---|"]
    for name, kind, steps in RUNS:
        model = build_model(name, 10).eval()
        seconds: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
        sizes = {}
        for fmt in ("contiguous", "channels_last") * 2:
            mesa.CHANNELS_LAST = fmt == "channels_last"
            start = time.perf_counter()
            found = _search(kind, copy.deepcopy(model), images, steps)
            seconds[fmt].append(time.perf_counter() - start)
            sizes[fmt] = ", ".join(f"{v:.3g}" for v in found.tolist())
        rows.append(f"| {name} | {kind} | {steps} | " + " | ".join(
            ", ".join(f"{s:.1f}" for s in seconds[f]) for f in seconds)
            + f" | {sizes['contiguous']} | {sizes['channels_last']} |")
    lines = head("Trigger search seconds by memory format", "benchmarks/mask_memory_format.py",
                 started, "random-weight models, 256 random images, batch 8 per class")
    lines += [f"- load: {args.load_note or 'not stated'}", "", *rows, ""]
    save(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
