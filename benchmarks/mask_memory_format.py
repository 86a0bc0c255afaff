"""Mask search seconds with the classifier in PyTorch's default (contiguous) memory format and in
channels_last, on random-weight models: is the scan's mask search worth running channels_last?

    python benchmarks/mask_memory_format.py --out benchmarks/results/mask_memory_format.md

Each architecture is searched twice in each format, alternating (the first run of a process
includes warm-up), on 256 random reference images, every class, params.yaml's mask settings but
the steps (fewer for the larger networks). The smallest masks' L1 (first three classes) shows
that the two formats search the same masks up to float rounding, not the same bits.
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
from mesa_lib.masksearch import MaskSearchConfig, mask_search  # noqa: E402
from mesa_lib.models import build_model  # noqa: E402

RUNS = (("resnet8", 200), ("resnet20", 100), ("resnet18", 10))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mask_memory_format.md"))
    ap.add_argument("--load-note", default="")
    args = ap.parse_args()
    started = datetime.now().astimezone()
    torch.manual_seed(0)
    images = (torch.rand(256, 3, 32, 32) * 255).to(torch.uint8)
    rows = ["| architecture | steps | contiguous s (run 1, 2) | channels_last s (run 1, 2) | "
            "L1 of classes 0-2, contiguous | channels_last |", "|---|---|---|---|---|---|"]
    for name, steps in RUNS:
        model = build_model(name, 10).eval()
        config = MaskSearchConfig(steps=steps, batch_size=8)
        seconds: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
        l1 = {}
        for fmt in ("contiguous", "channels_last") * 2:
            m = copy.deepcopy(model)
            if fmt == "channels_last":
                m = m.to(memory_format=torch.channels_last)
            start = time.perf_counter()
            result = mask_search(m, images, tuple(range(10)), config, torch.device("cpu"))
            seconds[fmt].append(time.perf_counter() - start)
            l1[fmt] = ", ".join(f"{v:.2f}" for v in result.l1[:3].tolist())
        rows.append(f"| {name} | {steps} | " + " | ".join(
            ", ".join(f"{s:.1f}" for s in seconds[f]) for f in seconds)
            + f" | {l1['contiguous']} | {l1['channels_last']} |")
    lines = head("Mask search seconds by memory format", "benchmarks/mask_memory_format.py",
                 started, "random-weight models, 256 random images, batch 8 per class")
    lines += [f"- load: {args.load_note or 'not stated'}", "", *rows, ""]
    save(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
