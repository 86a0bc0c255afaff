"""One switch for seeding and determinism (STYLE habit 9), and every derived seed in one table.

A run has one seed (`base.seed`). Each random draw that must not share a stream with another gets
its own seed, derived here by a NAMED purpose (`derive_seed(seed, "defender_split")`) instead of
`seed + 1` written wherever it is needed, so the stages that must agree on a draw (the data stage
and the scan service both cut the defender split) cannot drift apart. The offsets are the ones the
pipeline has always used: changing one changes every artifact downstream of that draw.
"""

from __future__ import annotations

import random
from types import MappingProxyType

import numpy as np
import torch

# purpose -> offset added to the run's seed. Two purposes may share an offset when their draws
# use different generators for unrelated things (the repair's stamping vs the data split).
SEED_OFFSETS = MappingProxyType({
    "train_subset": 0,      # which training images the data stage keeps
    "fit_subset": 0,        # which defender images MESA and the point baseline are fitted on
    "defender_split": 1,    # defender / held-out split of the test set (data stage, scan)
    "repair_stamps": 1,     # repair: which images get a trigger, which trigger, where
    "scan_subset": 2,       # which defender images a scan uses
    "validation_split": 3,  # reproduction: the defender's fit / validation split
    "injection": 4,         # reproduction: the poisoned batches of the fine-tune injection
    "zoo_attack": 5,        # model zoo: poisoned indices and places of a zoo backdoor
    "zoo_attack_2": 6,      # model zoo: the same for a second trigger in the same model
})


def derive_seed(seed: int, purpose: str) -> int:
    """The seed of one named random draw of a run (see SEED_OFFSETS)."""
    if purpose not in SEED_OFFSETS:
        raise KeyError(f"unknown seed purpose {purpose!r}; known: {sorted(SEED_OFFSETS)}")
    return seed + SEED_OFFSETS[purpose]


def seed_everything(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed Python, NumPy and torch, and optionally force deterministic kernels.

    Args:
        seed: the run's seed.
        deterministic: if True, use deterministic algorithms where torch has them (ops without one
            only warn, so that a GPU run does not fail on a missing kernel). Deterministic cuBLAS
            also needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before CUDA starts;
            the entry points set it (tasks.common.env).

    Returns:
        A CPU `torch.Generator` seeded with `seed`, for callers that want an explicit one.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every new tensor with NaN as a debugging aid; on CPU that
        # costs about 17% of training time and changes no result, so it stays off.
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:N" into a device; "auto" picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device
