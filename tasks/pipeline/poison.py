"""Task of the `poison` stage: the attacker's training set, and its quality gate.

The attack comes from mesa_lib.poison's registry (`poison.attack` with its `poison.settings`).
BadNets poisons a fixed share of the training set here; the paper's fine-tune injection poisons
batches during training instead, so for it this stage stores the clean set and the train stage
checks the batches it poisoned.
"""

from __future__ import annotations

from typing import Any

import torch
from prefect import task

from tasks.common import catalog, configs
from tasks.common.io import load_npz, save_grid, save_npz
from tasks.common.params import Params
from tasks.pipeline import quality


@task
def poison_training_set(params: Params) -> tuple[dict[str, Any], dict[str, Any]]:
    """Poison the training subset; save it with the trigger; run the poisoned-set suite.

    Returns:
        (metrics, GX summary).
    """
    p = params.poison
    data = load_npz(catalog.path("dataset"))
    images, labels = data["train_images"], data["train_labels"]
    attack = configs.attack(params)
    # static attacks poison the set here; one that poisons batches (the fine-tune injection)
    # leaves it clean, and the train stage checks the batches it poisoned
    poisoned, rate, trigger = attack.poison_dataset(images, labels), attack.static_rate, \
        attack.trigger
    save_npz(catalog.path("poisoned"), {
        "images": poisoned.images, "labels": poisoned.labels, "clean_labels": labels,
        "indices": poisoned.indices, "trigger": trigger})
    save_grid(catalog.path("trigger_png"), trigger[None], nrow=1, scale=16)
    eligible = int((labels != p.target).sum())
    measured = len(poisoned.indices) / max(eligible, 1)
    recorded = torch.zeros(len(labels), dtype=torch.bool)
    recorded[poisoned.indices] = True
    changed = (poisoned.images != images).flatten(1).any(1)
    suites = quality.poison_suite(labels, poisoned.labels, changed, recorded, p.target, measured,
                                  rate, params.validate.poison_rate_tolerance)
    summary = quality.check(suites, catalog.path("poison_quality"))
    metrics = {"poisoned": len(poisoned.indices), "eligible": eligible, "measured_rate": measured,
               "expectations_failed": len(summary["failed"])}
    return metrics, summary
