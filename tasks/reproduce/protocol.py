"""One cell of the reproduction: (profile, seed, pattern) -> a JSON record of every method.

Protocol (docs/reproduction.md). The 10,000 CIFAR-10 test images are cut three ways
(`mesa_lib.data.split_protocol`): the defender's fit part (6,000: MESA, the baselines and every
repair are fitted here), the defender's validation part (2,000: every choice, here the repair's
stamp rate and epochs; Neural Cleanse's threshold is a fixed setting and it keeps its mask by its
own criterion on the fit part) and the evaluation part (2,000: read only by `evaluate_cell`, to
write the table).
The functions below make that structural: fitting and repair take the fit part, selection the
validation part; only `evaluate_cell` is given the evaluation part.

A report cell: inject the pattern into the seed's clean model (the authors' fine-tune injection),
fit MESA, the point baseline and Neural Cleanse for the (known) target, repair a copy of the
backdoored model with each sampler and each control under the same budget, and measure clean
accuracy and ASR of the original trigger and its held-out variants on the evaluation part. A
selection cell does the same up to the samplers, then sweeps the repair's stamp rate and epochs
for a few methods on the validation part.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mesa_lib.baselines import PointConfig, fit_point
from mesa_lib.data import ImageSet
from mesa_lib.distribution import ConstantSampler, PointDistribution, UniformPatch
from mesa_lib.evaluate import accuracy, attack_success_rate
from mesa_lib.masksearch import CleanseConfig, neural_cleanse
from mesa_lib.mesa import MesaConfig, fit_mesa
from mesa_lib.metrics import knn_entropy, mean_pairwise_distance
from mesa_lib.poison import build_attack
from mesa_lib.repair import RepairConfig, repair
from mesa_lib.seed import derive_seed
from mesa_lib.train import TrainConfig, train
from tasks.reproduce.data import CellData
from tasks.reproduce.params import Profile, ReproParams

TRIGGER_SHAPE = (3, 3, 3)  # the defender models 3x3 triggers, as the paper does
# The seed offset of the floor's random pattern. It belongs in mesa_lib.seed's table; it is
# here while the zoo jobs that import mesa_lib.seed run (a change there would restart them).
FLOOR_PATTERN_OFFSET = 6


class BinaryPatch:
    """The black-and-white random-patch control: each trigger a fresh random 3x3 pattern of
    0s and 1s, the same in every channel, as the canonical patterns are (the uniform patch
    looks nothing like them)."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = tuple(int(s) for s in shape)

    @property
    def trigger_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one trigger."""
        return self.shape

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, C, h, w) binary patterns, one per trigger."""
        c, h, w = self.shape
        return torch.randint(0, 2, (n, 1, h, w), generator=generator).float().expand(n, c, h, w)


def cell_seed(seed: int, pattern: int) -> int:
    """One integer per (seed, pattern): the seed of the injection, the fits and the repairs."""
    return seed * 64 + pattern


@contextmanager
def timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Add the wall time of the block to seconds[phase]."""
    start = time.perf_counter()
    yield
    seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start


def inject(clean: nn.Module, trigger: torch.Tensor, train_set: ImageSet, profile: Profile,
           target: int, seed: int, device: torch.device) -> nn.Module:
    """The authors' injection into a copy of the clean model (constant SGD lr, momentum 0.9)."""
    s = profile.inject
    attack = build_attack("finetune_injection", trigger=trigger, target=target, prob=s.prob,
                          seed=derive_seed(seed, "injection"))
    cfg = TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, momentum=0.9,
                      nesterov=False, weight_decay=0.0, schedule="constant", seed=seed)
    return train(copy.deepcopy(clean), train_set.images, train_set.labels, cfg, device,
                 attack.batch_hook())


def fit_samplers(backdoored: nn.Module, fit: ImageSet, profile: Profile, target: int, seed: int,
                 device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every sampler a repair can use, fitted on the fit part only; and what the fits logged.

    Returns:
        (method name -> sampler or None, record of the fits: MESA's per-epoch log, per-beta
        breadth and target probability, and Neural Cleanse's kept mask: its epochs, L1 and ASR
        on the fit images).
    """
    m, p, c, strong = profile.mesa, profile.point, profile.cleanse, profile.point_paper
    log: list[dict[str, Any]] = []
    mesa = fit_mesa(backdoored, fit.images, target, TRIGGER_SHAPE,
                    MesaConfig(betas=m.betas, alpha=m.alpha, epochs=m.epochs,
                               batch_size=m.batch_size, lr=m.lr, trigger_noise=m.trigger_noise,
                               seed=seed),
                    device, lambda s: log.append({"epoch": s.epoch, "target_prob": s.target_prob,
                                                  "mutual_info": s.mutual_info}))
    point = fit_point(backdoored, fit.images, target, TRIGGER_SHAPE,
                      PointConfig(starts=p.starts, epochs=p.epochs, lr=p.lr, seed=seed), device)
    paper_point = fit_point(backdoored, fit.images, target, TRIGGER_SHAPE,
                            PointConfig(starts=strong.starts, epochs=strong.epochs, lr=strong.lr,
                                        seed=seed), device)
    cleanse = neural_cleanse(backdoored, fit.images, 10,
                             CleanseConfig(epochs=c.epochs, patience=c.patience,
                                           asr_threshold=c.asr_threshold, seed=seed),
                             device, classes=(target,))
    samplers: dict[str, Any] = {"no trigger": None, "uniform patch": UniformPatch(TRIGGER_SHAPE),
                                "b/w patch": BinaryPatch(TRIGGER_SHAPE),
                                "point mixture": point, "MESA ensemble": mesa,
                                f"point mixture {strong.starts}x{strong.epochs}": paper_point,
                                "Neural Cleanse": cleanse.trigger(target)}
    samplers |= {f"point start {i}": PointDistribution(point.triggers[i: i + 1], target)
                 for i in range(len(point.triggers))}
    samplers |= {f"MESA beta={float(b):g}": mesa.submodel(i) for i, b in enumerate(mesa.betas)}
    gen = torch.Generator().manual_seed(seed)
    breadth = {}
    for i, b in enumerate(mesa.betas):
        smp = mesa.sample_submodel(i, 256, gen).cpu()
        breadth[f"beta={float(b):g}"] = {
            "entropy": knn_entropy(smp), "mean_pairwise_distance": mean_pairwise_distance(smp),
            "target_prob": log[-1]["target_prob"][i] if log else None}
    record = {"mesa_log": log, "breadth": breadth,
              "cleanse": {"epochs": cleanse.epochs, "l1": float(cleanse.l1[0]),
                          "asr": float(cleanse.asr[0])}}
    return samplers, record


def add_true_trigger(samplers: dict[str, Any], trigger: torch.Tensor) -> dict[str, Any]:
    """The oracle control: repair with the attacker's own trigger (the defender never has it)."""
    return {**samplers, "true trigger": ConstantSampler(trigger)}


def repair_config(profile: Profile, rate: float, epochs: int, seed: int) -> RepairConfig:
    """The repair of a profile at a given stamp rate and length (the same for every method)."""
    r = profile.repair
    return RepairConfig(epochs=epochs, batch_size=r.batch_size, lr=r.lr, momentum=r.momentum,
                        weight_decay=r.weight_decay, stamp_rate=rate, augment=r.augment,
                        sample_noise=r.sample_noise, seed=seed)


def repaired(backdoored: nn.Module, fit: ImageSet, sampler: Any, config: RepairConfig,
             device: torch.device, callback: Callable | None = None) -> nn.Module:
    """A copy of the backdoored model repaired on the fit part."""
    return repair(copy.deepcopy(backdoored), fit.images, fit.labels, sampler, config, device,
                  callback)


@torch.no_grad()
def target_rate(model: nn.Module, part: ImageSet, target: int, device: torch.device,
                chunk: int = 500) -> float:
    """Share of the non-target images of `part` the model calls `target` with no trigger."""
    model.eval()
    x = part.images[part.labels != target]
    hits = sum(int((model(x[i:i + chunk].to(device).float().div_(255)).argmax(1) == target)
                   .sum()) for i in range(0, len(x), chunk))
    return hits / max(len(x), 1)


def measure(model: nn.Module, part: ImageSet, triggers: dict[str, torch.Tensor], target: int,
            device: torch.device, seed: int) -> dict[str, Any]:
    """Clean accuracy, ASR of the original trigger and of each held-out variant on `part`, and
    the model's own floors: how often it says `target` with no trigger, and with a random
    pattern of the trigger's shape at the same places (the same seeded draws)."""
    asr = {name: attack_success_rate(model, part.images, part.labels, t, target, device,
                                     seed=seed) for name, t in triggers.items()}
    variants = {k: v for k, v in asr.items() if k != "original"}
    noise = torch.rand(triggers["original"].shape,
                       generator=torch.Generator().manual_seed(seed + FLOOR_PATTERN_OFFSET))
    return {"clean_acc": accuracy(model, part.images, part.labels, device),
            "asr": asr["original"],
            "asr_variants": sum(variants.values()) / len(variants) if variants else None,
            "asr_per_variant": variants,
            "floor_no_trigger": target_rate(model, part, target, device),
            "floor_random_pattern": attack_success_rate(model, part.images, part.labels, noise,
                                                        target, device, seed=seed)}


def evaluate_cell(models: dict[str, nn.Module], evaluation: ImageSet,
                  triggers: dict[str, torch.Tensor], target: int, device: torch.device,
                  seed: int) -> dict[str, Any]:
    """The only reader of the evaluation part: every model's figures for the final table."""
    return {name: measure(m, evaluation, triggers, target, device, seed)
            for name, m in models.items()}


def sweep(backdoored: nn.Module, data: CellData, samplers: dict[str, Any], profile: Profile,
          params: ReproParams, triggers: dict[str, torch.Tensor], target: int, seed: int,
          device: torch.device) -> list[dict[str, Any]]:
    """Validation figures of each swept method at each stamp rate and checkpoint epoch."""
    s = params.selection
    rows = []
    for method in s.methods:
        for rate in s.rates:
            def checkpoint(model: nn.Module, stats: Any, rate: float = rate,
                           method: str = method) -> None:
                if stats.epoch in s.checkpoints:
                    rows.append({"method": method, "rate": rate, "epoch": stats.epoch,
                                 **measure(model, data.validation, triggers, target, device,
                                           seed)})

            cfg = repair_config(profile, rate, max(s.checkpoints), seed)
            repaired(backdoored, data.fit, samplers[method], cfg, device, checkpoint)
    return rows
