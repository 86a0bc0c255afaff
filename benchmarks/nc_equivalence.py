"""Neural Cleanse, the mask search and the point baseline of an older tree against this one's,
on a tiny backdoored model trained here: every output tensor must be equal to the bit.

    git worktree add /tmp/before cb81348
    .venv/bin/python benchmarks/nc_equivalence.py /tmp/before

(The older tree's mesa_lib/baselines.py held Neural Cleanse; the refactor of issue 21 moved it
into mesa_lib/masksearch.py beside the scanner's schedule, sharing their objective.)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from backdoor_fixture import CPU, build_lab  # noqa: E402

from mesa_lib import baselines, masksearch  # noqa: E402


def load(name: str, path: Path) -> ModuleType:
    """A module of the older tree under its own name (its imports resolve to this tree)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def same(a: object, b: object, fields: tuple[str, ...]) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields)


def main(before: Path) -> None:
    old_b = load("old_baselines", before / "mesa_lib" / "baselines.py")
    old_m = load("old_masksearch", before / "mesa_lib" / "masksearch.py")
    lab = build_lab(backdoor=True, seed=0, n_train=1200, epochs=4)
    x = lab.defender_x[:256]
    nc = dict(epochs=4, batch_size=64, patience=2)
    a = old_b.neural_cleanse(lab.model, x, 6, old_b.CleanseConfig(**nc), CPU)
    b = masksearch.neural_cleanse(lab.model, x, 6, masksearch.CleanseConfig(**nc), CPU)
    print("neural_cleanse identical:",
          same(a, b, ("masks", "patterns", "l1", "asr", "anomaly", "history"))
          and (a.flagged, a.epochs) == (b.flagged, b.epochs))
    c = old_m.mask_search(lab.model, x, tuple(range(6)), old_m.MaskSearchConfig(steps=60), CPU)
    d = masksearch.mask_search(lab.model, x, tuple(range(6)),
                               masksearch.MaskSearchConfig(steps=60), CPU)
    print("mask_search identical:", same(c, d, ("masks", "patterns", "l1", "asr")))
    point = dict(starts=2, epochs=1, batch_size=64)
    e = old_b.fit_point(lab.model, x, 0, (3, 3, 3), old_b.PointConfig(**point), CPU)
    f = baselines.fit_point(lab.model, x, 0, (3, 3, 3), baselines.PointConfig(**point), CPU)
    print("fit_point identical:", torch.equal(e.triggers, f.triggers))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
