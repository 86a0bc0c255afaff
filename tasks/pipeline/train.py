"""Task of the `train` stage: the backdoored classifier.

BadNets trains from scratch on the poisoned set. The paper's fine-tune injection (MESA.md,
"Reference protocol") first trains a clean model for `train.epochs`, then fine-tunes it for
`train.inject_epochs` at constant `train.inject_lr` while each image is poisoned with probability
its `rate`; every poisoned batch row is recorded and checked by the poisoned-set suite.
"""

from __future__ import annotations

from typing import Any

import torch
from prefect import task
from torch import Tensor, nn

from mesa_lib.evaluate import accuracy, attack_success_rate
from mesa_lib.modelio import Manifest, save_model
from mesa_lib.models import CIFAR10_MEAN, CIFAR10_STD, build_model
from mesa_lib.poison import Attack, BatchHook
from mesa_lib.train import EpochStats, train
from mesa_lib.triggers import corner_location
from tasks.common import catalog, configs, tracking
from tasks.common.configs import arch_kwargs, train_config
from tasks.common.dvcgraph import data_md5
from tasks.common.io import CsvLog, load_npz, write_json
from tasks.common.params import Params
from tasks.common.tracking import StageRun
from tasks.pipeline import quality


def eval_locations(params: Params, trigger: Tensor) -> Tensor | str:
    """Where ASR stamps the trigger: the corner if the attack planted it there, else random."""
    if getattr(configs.attack(params), "location", "random") == "corner":
        return corner_location((32, 32), tuple(trigger.shape[-2:]))
    return "random"


def epoch_sink(run: StageRun, prefix: str, csv: CsvLog, offset: int = 0):
    """A mesa_lib.train callback logging each epoch to MLflow and the plot CSV."""
    log = tracking.epoch_logger(run, prefix)

    def callback(_: nn.Module, s: EpochStats) -> None:
        values = {"loss": s.loss, "accuracy": s.accuracy, "lr": s.lr,
                  "images_per_second": s.images_per_second}
        log(s.epoch + offset, values)
        csv.append({"epoch": s.epoch + offset, "phase": prefix, **values})

    return callback


class InjectionRecorder:
    """Wraps an attack's batch hook; records clean/new labels, changed images, and the rows the
    attack says it poisoned (its `poisoned` list of index tensors, when it keeps one)."""

    def __init__(self, attack: Attack, hook: BatchHook) -> None:
        self.attack, self.hook = attack, hook
        self.poisoned: list[Tensor] = getattr(attack, "poisoned", [])
        self.rows: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []

    def __call__(self, x: Tensor, y: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        before = len(self.poisoned)
        new_x, new_y = self.hook(x, y, index)
        recorded = torch.zeros(len(index), dtype=torch.bool)
        if len(self.poisoned) > before:
            recorded = torch.isin(index.cpu(), self.poisoned[-1])
        changed = (new_x != x).flatten(1).any(1).cpu()
        self.rows.append((y.cpu(), new_y.cpu(), changed, recorded))
        return new_x, new_y

    def suites(self, params: Params) -> list[quality.Suite]:
        clean, new, changed, recorded = (torch.cat(c) for c in zip(*self.rows, strict=True))
        measured = float(recorded.float().mean()) if len(recorded) else 0.0
        return quality.poison_suite(clean, new, changed, recorded, params.poison.target,
                                    measured, self.attack.batch_rate,
                                    params.validate.poison_rate_tolerance, "injected_batches")


@task
def train_backdoored(params: Params, device: torch.device, run: StageRun) -> dict[str, Any]:
    """Train (and, for fine-tune injection, inject) the model; save it; return its metrics."""
    poisoned, data = load_npz(catalog.path("poisoned")), load_npz(catalog.path("dataset"))
    classes = [str(c) for c in data["classes"]]
    model = build_model(params.train.model, len(classes), **arch_kwargs(params))
    curve = CsvLog(catalog.path("train_curve"))
    attack = configs.attack(params)
    hook: BatchHook | None = attack.batch_hook()
    recorder = None
    if hook is not None:  # poisons batches: a clean model first, then the injection
        train(model, poisoned["images"], poisoned["labels"], train_config(params), device,
              callback=epoch_sink(run, "clean", curve))
        hook = recorder = InjectionRecorder(attack, hook)  # its draws start after the clean run
    t = params.train
    epochs, offset = (t.inject_epochs, t.epochs) if recorder else (t.epochs, 0)
    cfg = train_config(params, epochs=epochs, lr=t.inject_lr, schedule="constant") if recorder \
        else train_config(params)
    if epochs:
        train(model, poisoned["images"], poisoned["labels"], cfg, device, batch_hook=hook,
              callback=epoch_sink(run, "poisoned", curve, offset))
    summary = {"success": True, "skipped": "static poisoning is checked in the poison stage",
               "failed": [], "evaluated": 0}
    if recorder is not None and recorder.rows:
        summary = quality.check(recorder.suites(params), catalog.path("injection_quality"))
    else:
        write_json(catalog.path("injection_quality"), summary)
    manifest = Manifest(params.train.model, len(classes), tuple(classes), CIFAR10_MEAN,
                        CIFAR10_STD, data_hash=data_md5(), arch_kwargs=arch_kwargs(params),
                        extra={"attack": params.poison.attack,
                               "trigger": str(params.poison.settings[params.poison.attack]
                                              .get("trigger", "")),
                               "target": params.poison.target, "seed": params.base.seed})
    save_model(model, catalog.path("backdoored"), manifest)
    trigger = poisoned["trigger"]
    metrics = {
        "clean_accuracy": accuracy(model, data["heldout_images"], data["heldout_labels"], device),
        "asr": attack_success_rate(model, data["heldout_images"], data["heldout_labels"],
                                   trigger, params.poison.target, device,
                                   eval_locations(params, trigger), params.base.seed),
        "injection_expectations_failed": len(summary["failed"]),
    }
    return {"metrics": metrics, "quality": summary}
