"""Recovered trigger distributions behind one sampling interface.

MESA (Qiao et al., NeurIPS 2019, Sec. 4.1, eq. 3) approximates the density of valid triggers by a
staircase: the mixture sum_i gamma_i * p_{G_i} of N sub-generators, sub-model i covering the
region where the target probability exceeds beta_i. `TriggerDistribution` is that mixture; the
single-point baseline is `PointDistribution`, a uniform mixture of K optimised triggers. Repair and
the metrics only call `sample(n, generator)`, so they treat both alike; the controls of the
reproduction are samplers too (`UniformPatch`: each pixel U[0, 1]; `ConstantSampler`: the true
trigger). Every `sample` is noise-free by default, as in the authors' repair: MESA's fitting noise
(sigma 0.1) is drawn only when asked (`noise=True`), so no sampler gets noise another does not.
Neural Cleanse's full-image mask + pattern is a `MaskTrigger`, which repair applies instead of
stamping a patch.

MESA and point distributions serialise to tensors only (`to_tensors`, for safetensors) plus a
JSON-able `config()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from mesa_lib.generator import TriggerGenerator


class TriggerSampler(Protocol):
    """Anything that draws triggers: `sample(n, generator) -> (n, C, h, w)` float in [0, 1]."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...


def _weights(gammas: Tensor | Sequence[float] | None, n: int) -> Tensor:
    g = torch.ones(n) if gammas is None else torch.as_tensor(gammas, dtype=torch.float32)
    if g.shape != (n,) or (g < 0).any() or g.sum() <= 0:
        raise ValueError(f"gammas must be {n} non-negative weights with a positive sum, got {g}")
    return g.float().cpu() / g.sum()


class TriggerDistribution:
    """The MESA ensemble: N sub-generators with thresholds, targets and mixture weights.

    Args:
        generator: the batched sub-generators (N models); used in eval mode for sampling.
        betas: (N,) threshold of each sub-model.
        targets: (N,) int64 target class of each sub-model.
        gammas: (N,) mixture weights (normalised here); None = equal.
        noise_std: std of the Gaussian noise added to every sample (0.1 in MESA), the same noise
            the classifier saw during fitting, so samples follow the modelled distribution.
    """

    def __init__(
        self, generator: TriggerGenerator, betas: Tensor | Sequence[float],
        targets: Tensor | Sequence[int], gammas: Tensor | Sequence[float] | None = None,
        noise_std: float = 0.1,
    ) -> None:
        self.generator = generator.eval()
        self.betas = torch.as_tensor(betas, dtype=torch.float32).cpu()
        self.targets = torch.as_tensor(targets, dtype=torch.int64).cpu()
        self.gammas = _weights(gammas, generator.n_models)
        self.noise_std = float(noise_std)
        if self.betas.shape != (generator.n_models,) or self.targets.shape != self.betas.shape:
            raise ValueError(f"betas and targets must have shape ({generator.n_models},)")

    @property
    def n_models(self) -> int:
        """Number of sub-models N."""
        return self.generator.n_models

    @property
    def trigger_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one trigger."""
        return self.generator.trigger_shape

    @property
    def device(self) -> torch.device:
        """Where the generator lives and samples are returned."""
        return self.generator.fcs[0].weight.device

    @torch.no_grad()
    def _all(self, n: int, generator: torch.Generator | None, noise: bool) -> Tensor:
        """n samples from every sub-model: (N, n, C, h, w) in [0, 1]."""
        self.generator.eval()
        out = self.generator(self.generator.sample_noise(n, generator).to(self.device))
        if noise and self.noise_std > 0:
            eps = torch.randn(out.shape, generator=generator).to(self.device)
            out = (out + self.noise_std * eps).clamp(0, 1)
        return out

    def sample(
        self, n: int, generator: torch.Generator | None = None, noise: bool = False
    ) -> Tensor:
        """Draw n triggers from the mixture with weights gamma: (n, C, h, w) float in [0, 1].

        `noise=True` adds the fitting noise (N(0, noise_std^2), clamped), i.e. samples what the
        classifier saw while MESA was fitted; the default is the generators' own G(z).
        """
        if n == 0:
            return torch.empty(0, *self.trigger_shape, device=self.device)
        every = self._all(n, generator, noise)
        pick = torch.multinomial(self.gammas, n, replacement=True, generator=generator)
        return every[pick.to(self.device), torch.arange(n, device=self.device)]

    def sample_submodel(
        self, i: int, n: int, generator: torch.Generator | None = None, noise: bool = False
    ) -> Tensor:
        """Draw n triggers from sub-model i alone: (n, C, h, w) float in [0, 1]."""
        if not 0 <= i < self.n_models:
            raise IndexError(f"sub-model {i} out of range 0..{self.n_models - 1}")
        return self._all(n, generator, noise)[i]

    def reweighted(self, gammas: Tensor | Sequence[float]) -> TriggerDistribution:
        """The same sub-models with other mixture weights (e.g. one beta, or one target)."""
        return TriggerDistribution(self.generator, self.betas, self.targets, gammas,
                                   self.noise_std)

    def submodel(self, i: int) -> TriggerDistribution:
        """The distribution of sub-model i alone (weight 1 on i)."""
        return self.reweighted(torch.eye(self.n_models)[i])

    def for_target(self, target: int) -> TriggerDistribution:
        """The sub-models of one target class, with their relative weights kept."""
        mask = (self.targets == target).float()
        if mask.sum() == 0:
            raise ValueError(f"no sub-model targets class {target}")
        return self.reweighted(self.gammas * mask)

    def config(self) -> dict[str, Any]:
        """JSON-able description needed, with `to_tensors()`, to rebuild the distribution."""
        g = self.generator
        return {"kind": "mesa", "n_models": g.n_models, "trigger_shape": list(g.trigger_shape),
                "noise_dim": g.noise_dim, "chunks": g.chunks, "hidden": g.fcs[0].weight.shape[-1],
                "slope": g.slope, "noise_std": self.noise_std}

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat name -> contiguous CPU tensor dict (safetensors-ready)."""
        out = {f"generator.{k}": v.detach().cpu().contiguous()
               for k, v in self.generator.state_dict().items()}
        out.update(betas=self.betas.clone(), targets=self.targets.clone(),
                   gammas=self.gammas.clone())
        return out

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, Tensor], config: dict[str, Any],
        device: torch.device | str = "cpu",
    ) -> TriggerDistribution:
        """Inverse of `to_tensors` + `config`; raises on a missing or mismatched tensor."""
        if config.get("kind") != "mesa":
            raise ValueError(f"not a MESA distribution config: {config}")
        gen = TriggerGenerator(config["n_models"], tuple(config["trigger_shape"]),
                               config["noise_dim"], config["chunks"], config["hidden"],
                               config["slope"])
        state = {k.removeprefix("generator."): v for k, v in tensors.items()
                 if k.startswith("generator.")}
        gen.load_state_dict(state, strict=True)
        return cls(gen.to(device), tensors["betas"], tensors["targets"], tensors["gammas"],
                   config["noise_std"])


class PointDistribution:
    """K fixed triggers drawn uniformly: the single-point baseline as a 'distribution'.

    Args:
        triggers: (K, C, h, w) float in [0, 1].
        target: the class the triggers were optimised for.
    """

    def __init__(self, triggers: Tensor, target: int = 0) -> None:
        if triggers.ndim != 4 or len(triggers) == 0:
            raise ValueError(f"triggers must be (K, C, h, w) with K >= 1, got {triggers.shape}")
        self.triggers = triggers.detach()
        self.target = int(target)

    @property
    def trigger_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one trigger."""
        return tuple(self.triggers.shape[1:])

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n triggers, each one of the K chosen uniformly: (n, C, h, w)."""
        pick = torch.randint(0, len(self.triggers), (n,), generator=generator)
        return self.triggers[pick.to(self.triggers.device)]

    def config(self) -> dict[str, Any]:
        """JSON-able description."""
        return {"kind": "point", "k": len(self.triggers), "target": self.target,
                "trigger_shape": list(self.trigger_shape)}

    def to_tensors(self) -> dict[str, Tensor]:
        """{"triggers": (K, C, h, w)} on the CPU."""
        return {"triggers": self.triggers.cpu().contiguous()}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, Tensor], config: dict[str, Any],
        device: torch.device | str = "cpu",
    ) -> PointDistribution:
        """Inverse of `to_tensors` + `config`."""
        return cls(tensors["triggers"].to(device), config.get("target", 0))


class ConstantSampler:
    """Always the same trigger: the 'true trigger' repair control."""

    def __init__(self, trigger: Tensor) -> None:
        self.trigger = trigger.detach()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, C, h, w) copies of the trigger."""
        return self.trigger.expand(n, *self.trigger.shape).clone()


class UniformPatch:
    """The uniform-random-patch control: every pixel of every trigger U[0, 1].

    Args:
        shape: (C, h, w) of one trigger; repair stamps each at a random place.
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = tuple(int(s) for s in shape)

    @property
    def trigger_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one trigger."""
        return self.shape

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, C, h, w) independent uniform patches."""
        return torch.rand(n, *self.shape, generator=generator)


class MaskTrigger:
    """A full-image trigger x' = (1 - m) x + m p (Neural Cleanse's reverse-engineered form).

    Args:
        mask: (1, H, W) in [0, 1]; pattern: (C, H, W) in [0, 1].
    """

    def __init__(self, mask: Tensor, pattern: Tensor) -> None:
        if mask.ndim != 3 or mask.shape[0] != 1 or pattern.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"mask must be (1, H, W) and pattern (C, H, W), got "
                             f"{tuple(mask.shape)} and {tuple(pattern.shape)}")
        self.mask, self.pattern = mask.detach(), pattern.detach()

    def apply(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Blend the pattern into float images (N, C, H, W) in [0, 1] through the mask (a
        `mesa_lib.geometry.Family`; nothing is drawn)."""
        m, p = self.mask.to(images.device), self.pattern.to(images.device)
        return (1 - m) * images + m * p
