"""A look at Neural Cleanse in feature space, tried for issue 24 and NOT adopted: the fewest
channels of an inner layer that send images to a class.

For each class k: the channel mask m_k (C,) in [0, 1] and pattern p_k (C, H, W) with
f' = (1 - m_k) f + m_k p_k (f: an inner layer's output) classified as k, minimising
CE(tail(f'), k) + lambda_k |m_k|_1 (NC's objective and lambda rule one layer down, as ABS, Liu et
al. CCS 2019, and FeatureRE, Wang et al. NeurIPS 2022, look for backdoor features); each
channel's pattern within the range it takes on the reference images. The layer: the last module
run once per forward whose map is >= 2x the smallest map above 1x1 (a ResNet's second-to-last
stage). Result (benchmarks/results/feature_search_look.md): clean classes are reached through
one or two channels too, and the tiny models' SIG and WaNet targets are not the easiest class,
so there is nothing to score. Kept to be reproducible, not imported by the product.

    python benchmarks/feature_search_look.py cal-r8-0 cal-r8-1
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mesa_lib.masksearch import _adjust, _decode
from mesa_lib.mesa import autocast_for, frozen


@dataclass(frozen=True)
class FeatureSearchConfig:
    """Settings of the search.

    Attributes:
        steps: optimisation steps, every class in each.
        batch_size: images per step and class.
        lr: Adam step size on the tanh-parametrised mask and pattern.
        asr_threshold: a mask succeeds on a batch when this share goes to its class.
        init_cost, cost_step: lambda's start (per channel) and Neural Cleanse's rule.
        min_side: the inner layer's map is at least this wide (`split_layer`).
        seed: seed of the starts and the batches.
    """

    steps: int = field(default=150, metadata={"ge": 1})
    batch_size: int = field(default=8, metadata={"ge": 1})
    lr: float = field(default=0.1, metadata={"gt": 0})
    asr_threshold: float = field(default=0.9, metadata={"gt": 0, "le": 1})
    init_cost: float = field(default=0.01, metadata={"gt": 0})
    cost_step: float = field(default=1.2, metadata={"gt": 1})
    min_side: int = field(default=4, metadata={"ge": 1})
    seed: int = 0


@dataclass(frozen=True)
class FeatureSearchResult:
    """Per searched class (K,): the smallest successful channel mask's |m|_1 (the last iterate's
    when none succeeded) and its attack success on all the images; the layer searched."""

    classes: tuple[int, ...]
    l1: Tensor
    asr: Tensor
    layer: str


def _outputs(model: nn.Module, x: Tensor) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, output shape, calls) of every named module with a 4-D tensor output, in the order
    their forwards finish, for one forward of x."""
    seen: dict[str, list] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, out: object) -> None:
            if isinstance(out, Tensor) and out.dim() == 4:
                entry = seen.pop(name, [None, 0])
                seen[name] = [tuple(out.shape), entry[1] + 1]  # re-inserted: finish order
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [(n, shape, calls) for n, (shape, calls) in seen.items()]


def split_layer(model: nn.Module, x: Tensor, min_side: int) -> str:
    """The module whose output the search changes: of the modules run once per forward, the
    last to finish whose map side is >= max(min_side, 2 x the smallest map side above 1).

    Args:
        x: one image or more, float (B, C, H, W) in [0, 1].
    """
    outs = _outputs(model, x)
    if not outs:
        raise ValueError("the feature search needs a network with 2-D feature maps; this one "
                         "has no module with a 4-D output")
    last = min(s for _, shape, _ in outs if (s := min(shape[-2:])) > 1)  # not a pooled 1x1
    side = max(min_side, 2 * last)
    once = [n for n, shape, calls in outs if calls == 1 and min(shape[-2:]) >= side]
    if not once:
        raise ValueError(f"no module run once per forward has a feature map >= {side} wide")
    return once[-1]


@contextmanager
def _replaced(module: nn.Module, change) -> Iterator[None]:
    """`module`'s output goes through `change` while inside."""
    handle = module.register_forward_hook(lambda mod, args, out: change(out))
    try:
        yield
    finally:
        handle.remove()


class _Masked:
    """The forward hook of a search step: (B, C, H, W) features -> (K*B, C, H, W), class k's
    rows under its mask and pattern. With `copies`, the network already ran on K copies of the
    B images (a skip connection crosses the layer) and the output is (K*B, C, H, W)."""

    def __init__(self, lo: Tensor, hi: Tensor, copies: bool):
        self.lo, self.span, self.copies = lo, hi - lo, copies
        self.mask = self.pattern = None

    def set(self, mask_p: Tensor, pat_p: Tensor) -> None:
        mask, pat = _decode(mask_p, pat_p)          # (K, C), (K, C, H, W) in [0, 1]
        self.mask = mask
        self.pattern = self.lo + self.span * pat

    def __call__(self, f: Tensor) -> Tensor:
        k = len(self.mask)
        f = f.view(k, -1, *f.shape[1:]) if self.copies else f[None]   # (K or 1, B, C, H, W)
        m = self.mask[:, None, :, None, None]
        return ((1 - m) * f + m * self.pattern[:, None]).flatten(0, 1)


def _ranges(model: nn.Module, module: nn.Module, images: Tensor, chunk: int = 128
            ) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """Per channel (C, 1, 1): the smallest and largest value the layer outputs on `images`;
    and the side (H, W) of its map."""
    lo = hi = None
    store = []
    with _replaced(module, lambda out: store.append(out.detach()) or out), torch.no_grad():
        for start in range(0, len(images), chunk):
            model(images[start:start + chunk].float().div(255))
            f = store.pop()
            a, b = f.amin((0, 2, 3)), f.amax((0, 2, 3))
            lo = a if lo is None else torch.minimum(lo, a)
            hi = b if hi is None else torch.maximum(hi, b)
    return lo[:, None, None].float(), hi[:, None, None].float(), tuple(f.shape[-2:])


def _crosses(model: nn.Module, module: nn.Module, x: Tensor) -> bool:
    """True when the network cannot continue from K copies of the layer's output alone (a skip
    connection from before the layer joins after it)."""
    try:
        with _replaced(module, lambda out: torch.cat([out, out])), torch.no_grad():
            model(x[:1])
    except RuntimeError:
        return True
    return False


def feature_search(model: nn.Module, images: Tensor, classes: tuple[int, ...],
                   config: FeatureSearchConfig, device: torch.device) -> FeatureSearchResult:
    """The smallest successful channel mask of every class of `classes`, all in one batch.

    Args:
        model: classifier, float (B, C, H, W) in [0, 1] -> logits; frozen here.
        images: the defender's clean images, uint8 (N, C, H, W).
        classes: the K classes to search.
    """
    gen = torch.Generator().manual_seed(config.seed)
    images = images.to(device)
    n, k = len(images), len(classes)
    y = torch.tensor(classes, device=device).repeat_interleave(config.batch_size)
    with frozen(model):
        first = images[:1].float().div(255)
        name = split_layer(model, first, config.min_side)
        module = dict(model.named_modules())[name]
        lo, hi, (h, w) = _ranges(model, module, images)
        copies = _crosses(model, module, first)
        c = len(lo)
        mask_p = (torch.randn(k, c, generator=gen) * 0.1).to(device).requires_grad_(True)
        pat_p = (torch.randn(k, c, h, w, generator=gen) * 0.1).to(device).requires_grad_(True)
        opt = torch.optim.Adam([mask_p, pat_p], lr=config.lr, betas=(0.5, 0.9))
        cost = torch.full((k,), config.init_cost, device=device)
        best_l1 = torch.full((k,), float("inf"), device=device)
        best = [v.detach().clone() for v in (mask_p, pat_p)]
        masked = _Masked(lo.to(device), hi.to(device), copies)
        with _replaced(module, masked):
            for _ in range(config.steps):
                pick = torch.randint(0, n, (config.batch_size,), generator=gen).to(device)
                x = images[pick].float().div_(255)
                masked.set(mask_p, pat_p)
                with autocast_for(device):
                    logits = model(x.repeat(k, 1, 1, 1) if copies else x).float()
                ce = F.cross_entropy(logits, y, reduction="none").view(k, -1).mean(1)
                l1 = masked.mask.sum(1)
                won = (logits.argmax(1) == y).view(k, -1).float().mean(1) >= config.asr_threshold
                better = won & (l1.detach() < best_l1)
                best_l1 = torch.where(better, l1.detach(), best_l1)
                for keep, p in zip(best, (mask_p, pat_p), strict=True):  # as measured, before
                    keep[better] = p.detach()[better]                    # the step moves them
                opt.zero_grad(set_to_none=True)
                (ce + cost * l1).sum().backward()
                opt.step()
                cost = _adjust(cost, won, config.cost_step)
            never = torch.isinf(best_l1)  # nothing succeeded: report where the search ended
            for keep, p in zip(best, (mask_p, pat_p), strict=True):
                keep[never] = p.detach()[never]
            masked.set(*best)
            asr = _success(model, images, masked, classes, copies, config.batch_size * 16)
    l1 = masked.mask.sum(1).detach()
    return FeatureSearchResult(tuple(classes), l1.cpu(), asr.cpu(), name)


@torch.no_grad()
def _success(model: nn.Module, images: Tensor, masked: _Masked, classes: tuple[int, ...],
             copies: bool, chunk: int) -> Tensor:
    """(K,) share of `images` (N, C, H, W) uint8 each class's kept mask sends to it."""
    k = len(classes)
    target = torch.tensor(classes, device=images.device)[:, None]
    hits = torch.zeros(k, device=images.device)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].float().div_(255)
        with autocast_for(images.device):
            logits = model(x.repeat(k, 1, 1, 1) if copies else x).float()
        hits += (logits.argmax(1).view(k, -1) == target).float().sum(1)
    return hits / len(images)


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from backdoor_fixture import synthetic_data
    from test_transformdetector import lab

    from mesa_lib.modelio import load_model
    from tasks.common.params import load_params
    from tasks.scan.reference import Reference, reference_batch
    from tasks.zoo.build import load_data, stem_of
    from tasks.zoo.params import load_zoo_params

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    print("| model | layer | |m|_1 per class (channels) | ASR per class |")
    print("|---|---|---|---|")

    def row(label: str, found: FeatureSearchResult) -> None:
        print(f"| {label} | {found.layer} | {[round(float(v), 2) for v in found.l1]} | "
              f"{[round(float(v), 2) for v in found.asr]} |", flush=True)

    if sys.argv[1:]:
        params, zoo = load_params("params.yaml"), load_zoo_params()
        data = load_data(zoo)
        ref = Reference(data.reference.images, data.reference.labels, data.reference.classes,
                        "zoo")
        x, _ = reference_batch(ref, params.scan.images, params.base.seed)
        for name in sys.argv[1:]:
            model, _ = load_model(stem_of(zoo, name), map_location="cpu")
            row(f"{name} (clean)", feature_search(model, x, tuple(range(10)),
                                                  FeatureSearchConfig(), cpu))
    x, _ = synthetic_data(512, 1)
    for attacks in [(), (("sig", 0),), (("wanet", 0),)]:
        label = f"tiny, {attacks[0][0]} to class 0" if attacks else "tiny, clean"
        row(label, feature_search(lab(*attacks), x, tuple(range(6)),
                                  FeatureSearchConfig(steps=300, min_side=2), cpu))


if __name__ == "__main__":
    main()
