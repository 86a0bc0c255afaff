"""Training with the whole data set as one tensor on the device (airbench-style).

The loader is tensor indexing: a seeded permutation, a batch of uint8 rows turned into floats,
random crop (pad 4, reflect) and flip as batched tensor ops. A `BatchHook` (poisoning, repair
stamping) then edits the augmented batch, so triggers are never cropped away.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BatchHook = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""(x float (B,C,H,W) in [0,1], y int64 (B,), dataset indices int64 (B,)) -> (x, y): edits a
batch in training (poisoning, repair stamping); see mesa_lib.poison and mesa_lib.repair."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training or fine-tuning run."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # "onecycle" | "cosine" | "constant"
    warmup: float = 0.2  # share of steps rising to lr in "onecycle"
    augment: bool = True
    label_smoothing: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class EpochStats:
    """What the per-epoch callback receives."""

    epoch: int  # 1-based
    epochs: int
    loss: float
    accuracy: float  # on the (augmented, possibly poisoned) training batches
    seconds: float
    images_per_second: float
    lr: float


EpochCallback = Callable[[nn.Module, EpochStats], None]


def augment(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop (reflect-pad `pad`) and horizontal flip, per image: float (B, C, H, W)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    shift = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator).to(x.device)
    rows = (shift[:, :1] + torch.arange(h, device=x.device))[:, :, None]
    cols = (shift[:, 1:] + torch.arange(w, device=x.device))[:, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded[batch, :, rows, cols].permute(0, 3, 1, 2)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def index_batches(n: int, size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Indices of n items in `size`-sized batches of one seeded random order."""
    order = torch.randperm(n, generator=gen)
    yield from (order[s : s + size] for s in range(0, n, size))


def batches(
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    generator: torch.Generator,
    shuffle: bool = True,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield (float images (B,C,H,W) in [0,1], labels (B,), dataset indices (B,)) per batch."""
    n = len(images)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(images.device)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield images[idx].float().div_(255), labels[idx], idx


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=cfg.lr,
            total_steps=max(steps, 1),
            pct_start=cfg.warmup,
            anneal_strategy="linear",
            cycle_momentum=False,
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    raise ValueError(f"schedule must be onecycle, cosine or constant, got {cfg.schedule!r}")


def train(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    config: TrainConfig,
    device: torch.device,
    batch_hook: BatchHook | None = None,
    callback: EpochCallback | None = None,
) -> nn.Module:
    """Train `model` in place on (images uint8 (N,C,H,W), labels int64 (N,)) and return it.

    On CUDA the model runs channels_last under bf16 autocast; on CPU in fp32.
    """
    gen = torch.Generator().manual_seed(config.seed)
    images, labels = images.to(device), labels.to(device)
    cuda = device.type == "cuda"
    model.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = -(-len(images) // config.batch_size)
    sched = _scheduler(opt, config, config.epochs * steps_per_epoch)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    for epoch in range(1, config.epochs + 1):
        model.train()
        start, loss_sum, correct = time.perf_counter(), torch.zeros((), device=device), 0
        for x, y, idx in batches(images, labels, config.batch_size, gen):
            x = augment(x, gen) if config.augment else x
            if batch_hook is not None:
                x, y = batch_hook(x, y, idx)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                out = model(x)
                loss = F.cross_entropy(out, y, label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(x)
            correct += (out.argmax(1) == y).sum()
        seconds = time.perf_counter() - start
        if callback is not None:
            stats = EpochStats(
                epoch,
                config.epochs,
                float(loss_sum) / len(images),
                float(correct) / len(images),
                seconds,
                len(images) / seconds,
                sched.get_last_lr()[0],
            )
            callback(model, stats)
    model.eval()
    return model
