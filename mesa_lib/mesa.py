"""`fit_mesa`: train the MESA staircase of trigger generators against a frozen classifier.

Qiao, Yang, Li, "Defending Neural Backdoors via Generative Distribution Modeling", NeurIPS 2019,
Sec. 4. For sub-model i with threshold beta_i and target t, on clean images x and noise z:

    s_i    = softmax(F(stamp(x, G_i(z) + eps)))[:, t],   eps ~ N(0, sigma^2), clamped to [0, 1]
    loss_G = -mean(min(s_i, beta_i)) - alpha * I_MINE(z; G_i(z))            (Sec. 4.2, eq. 6)

The hinge stops rewarding target probability above beta_i, so the MINE term (an entropy surrogate,
`mesa_lib.mine`) spreads G_i over the whole region {s > beta_i}. One MINE step (maximise the DV
bound on joint vs shuffled (z, G_i(z)) pairs) alternates with one generator step.

All N sub-models (len(betas), or len(targets) x len(betas) for detection) train at once: one
batched generator, one batched MINE, and ONE classifier forward over the N stamped batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mesa_lib.distribution import TriggerDistribution
from mesa_lib.generator import TriggerGenerator
from mesa_lib.geometry import Geometry, anywhere
from mesa_lib.mine import Mine
from mesa_lib.models import CifarResNet


@dataclass(frozen=True)
class MesaConfig:
    """Hyperparameters of `fit_mesa`; defaults are the paper's CIFAR-10 values.

    Attributes:
        betas: staircase thresholds, one sub-model each.
        gammas: mixture weight per beta (None = equal).
        alpha: weight of the MINE entropy term.
        hinge_weight: weight of the hinge term (1; 0 is the "no hinge" ablation).
        epochs: passes over the defender's images.
        batch_size: clean images per step (each sub-model sees all of them).
        lr, adam_betas: Adam settings of both the generators and MINE.
        noise_dim, noise_chunks, hidden, leaky_slope: generator architecture.
        mine_hidden, mine_ema_rate: MINE statistics network width and EMA rate.
        trigger_noise: std of the Gaussian noise added to triggers before stamping.
        seed: seed of every random draw (weights, noise, batches, locations).
    """

    betas: tuple[float, ...] = (0.9, 0.8, 0.5)
    gammas: tuple[float, ...] | None = None
    alpha: float = 0.1
    hinge_weight: float = 1.0
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-4
    adam_betas: tuple[float, float] = (0.5, 0.999)
    noise_dim: int = 64
    noise_chunks: int = 4
    hidden: int = 512
    leaky_slope: float = 0.2
    mine_hidden: int = 512
    mine_ema_rate: float = 0.01
    trigger_noise: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("betas", "gammas", "adam_betas"):  # accept lists (e.g. from YAML)
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if not self.betas or not all(0 < b <= 1 for b in self.betas):
            raise ValueError(f"betas must be non-empty, each in (0, 1], got {self.betas}")
        if self.gammas is not None and len(self.gammas) != len(self.betas):
            raise ValueError(f"gammas {self.gammas} must match betas {self.betas}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2 (BatchNorm)")
        if self.alpha < 0 or self.trigger_noise < 0:
            raise ValueError("alpha and trigger_noise must be >= 0")


@dataclass(frozen=True)
class MesaEpochStats:
    """What the per-epoch callback receives; tuples hold one value per sub-model."""

    epoch: int  # 1-based
    epochs: int
    target_prob: tuple[float, ...]  # mean s_i over the epoch
    hinge: tuple[float, ...]  # mean min(s_i, beta_i)
    mutual_info: tuple[float, ...]  # mean DV bound, nats
    seconds: float


MesaCallback = Callable[[MesaEpochStats], None]


# Our own networks run channels_last inside `frozen` (False: PyTorch's default layout; for
# benchmarks/mask_memory_format.py, which compares the two).
CHANNELS_LAST = True


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and requires_grad=False for the duration; the previous state is restored.

    Our own networks (mesa_lib.models.CifarResNet) also run channels_last meanwhile: the mask
    search is about a third faster on a CPU (benchmarks/results/mask_memory_format.md). Not a
    network of another library: one whose forward calls `.view` on an activation would fail.
    """
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]  # per module: train() would recurse
    # (inside another `frozen` the layout is already changed and left to the outer one)
    ours = CHANNELS_LAST and isinstance(model, CifarResNet) and model.conv1.weight.is_contiguous()
    model.eval().requires_grad_(False)
    if ours:
        model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        if ours:  # the same values, laid out as before (a saved file needs contiguous weights)
            model.to(memory_format=torch.contiguous_format)
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode


def autocast_for(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA (as `mesa_lib.train` does), nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _targets(target: int | Sequence[int]) -> list[int]:
    targets = [int(target)] if isinstance(target, int) else [int(t) for t in target]
    if not targets or len(set(targets)) != len(targets):
        raise ValueError(f"targets must be non-empty and distinct, got {target}")
    return targets


def _batches(n: int, size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Shuffled index batches; a last batch of one image is dropped (BatchNorm needs two)."""
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, size):
        idx = order[start : start + size]
        if len(idx) >= 2:
            yield idx


def target_probability(
    model: nn.Module, images: Tensor, triggers: Tensor, targets: Tensor, gen: torch.Generator,
    geometry: Geometry | None = None,
) -> Tensor:
    """s for N batches of triggers stamped on the same clean images, in ONE forward pass.

    Args:
        model: classifier mapping float (M, C, H, W) in [0, 1] to logits (M, K).
        images: float (B, C, H, W) in [0, 1], on the model's device.
        triggers: float (N, B, C, h, w) in [0, 1]; triggers[n, b] is stamped on images[b] at a
            random place, or where `geometry` puts it.
        targets: int64 (N,) target class of each sub-model.
        gen: CPU generator of the locations.
        geometry: where triggers go (mesa_lib.geometry); None = the paper's random places.

    Returns:
        (N, B) softmax probability of each sub-model's target class.
    """
    n, b = triggers.shape[:2]
    geometry = geometry or anywhere(tuple(triggers.shape[-2:]))
    stamped = geometry.place(images.repeat(n, 1, 1, 1), triggers.flatten(0, 1), gen)
    with autocast_for(images.device):
        logits = model(stamped)
    probs = F.softmax(logits.float(), dim=1).reshape(n, b, -1)
    return probs.gather(2, targets.to(probs.device)[:, None, None].expand(n, b, 1)).squeeze(2)


def _noisy(trig: Tensor, sigma: float, gen: torch.Generator) -> Tensor:
    if sigma == 0:
        return trig
    return (trig + sigma * torch.randn(trig.shape, generator=gen).to(trig.device)).clamp(0, 1)


def _step(
    model: nn.Module, g: TriggerGenerator, mine: Mine, opt_g: torch.optim.Optimizer,
    opt_t: torch.optim.Optimizer, x: Tensor, tgt: Tensor, betas: Tensor, config: MesaConfig,
    gen: torch.Generator, geometry: Geometry | None,
) -> Tensor:
    """One MINE step then one generator step on clean images x (B, C, H, W) in [0, 1].

    Returns:
        (3, N) detached: mean s, hinge and DV bound of each sub-model on this batch.
    """
    z = g.sample_noise(len(x), gen).to(x.device)
    trig = g(z)  # (N, B, C, h, w); its graph serves the generator step below
    # MINE step: maximise the DV bound of (z, G(z)) for the current generators.
    est = mine(z, trig.detach(), gen, update_ema=True)
    opt_t.zero_grad(set_to_none=True)
    (-est.surrogate.sum()).backward()
    opt_t.step()
    # Generator step: hinge on the target probability + alpha * MINE (T held fixed).
    noisy = _noisy(trig, config.trigger_noise, gen)
    s = target_probability(model, x, noisy, tgt, gen, geometry)
    hinge = torch.minimum(s, betas[:, None]).mean(1)
    mine.requires_grad_(False)
    mi = mine(z, trig, gen).surrogate
    mine.requires_grad_(True)
    loss = -(config.hinge_weight * hinge + config.alpha * mi).sum()
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    return torch.stack([s.detach().mean(1), hinge.detach(), est.bound.detach()])


def fit_mesa(
    model: nn.Module,
    images: Tensor,
    target: int | Sequence[int],
    trigger_shape: tuple[int, int, int],
    config: MesaConfig,
    device: torch.device,
    callback: MesaCallback | None = None,
    geometry: Geometry | None = None,
) -> TriggerDistribution:
    """Fit the staircase of trigger generators to a (possibly backdoored) classifier.

    Args:
        model: classifier, float images (M, C, H, W) in [0, 1] -> logits (M, K); frozen here (eval,
            no parameter gradients) and restored afterwards.
        images: the defender's clean images, uint8 (N_img, C, H, W).
        target: the target class, or several candidate classes (detection): then there is one
            sub-model per (target, beta), target-major, all trained together.
        trigger_shape: (C, h, w) of the triggers to model.
        config: hyperparameters.
        device: where everything runs.
        callback: called after each epoch with `MesaEpochStats`.
        geometry: where triggers are put on images (mesa_lib.geometry: a patch at a fixed or
            random place, or through a recovered blend mask), its size `trigger_shape`'s; None =
            the paper's random places.

    Returns:
        The fitted `TriggerDistribution` (sub-model k = targets[k // len(betas)],
        betas[k % len(betas)]), on `device`.
    """
    targets = _targets(target)
    nb = len(config.betas)
    betas = torch.tensor(config.betas, dtype=torch.float32).repeat(len(targets)).to(device)
    tgt = torch.tensor(targets).repeat_interleave(nb).to(device)
    n = len(tgt)
    gen = torch.Generator().manual_seed(config.seed)
    g = TriggerGenerator(n, trigger_shape, config.noise_dim, config.noise_chunks, config.hidden,
                         config.leaky_slope, generator=gen).to(device)
    mine = Mine(n, config.noise_dim, math.prod(trigger_shape), config.mine_hidden,
                config.mine_ema_rate, config.leaky_slope, generator=gen).to(device)
    opt_g = torch.optim.Adam(g.parameters(), lr=config.lr, betas=config.adam_betas)
    opt_t = torch.optim.Adam(mine.parameters(), lr=config.lr, betas=config.adam_betas)
    images = images.to(device)
    with frozen(model):
        for epoch in range(1, config.epochs + 1):
            g.train()
            start, sums, steps = time.perf_counter(), torch.zeros(3, n, device=device), 0
            for idx in _batches(len(images), config.batch_size, gen):
                x = images[idx.to(device)].float().div_(255)
                sums += _step(model, g, mine, opt_g, opt_t, x, tgt, betas, config, gen,
                              geometry)
                steps += 1
            if callback is not None:
                mean = (sums / max(steps, 1)).cpu().tolist()
                callback(MesaEpochStats(epoch, config.epochs, tuple(mean[0]), tuple(mean[1]),
                                        tuple(mean[2]), time.perf_counter() - start))
    gammas = None if config.gammas is None else list(config.gammas) * len(targets)
    return TriggerDistribution(g.eval(), betas.cpu(), tgt.cpu(), gammas, config.trigger_noise)
