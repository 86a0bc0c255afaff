"""The MESA trigger generator: N sub-generators G_i evaluated as one batched computation.

Qiao, Yang, Li, "Defending Neural Backdoors via Generative Distribution Modeling", NeurIPS 2019,
Sec. 4 and the authors' code: noise z ~ U[0, 1]^64 is split into four 16-d chunks; an MLP maps
chunk 1 through 16 -> 512, then concatenates each further chunk: (512 + 16) -> 512 twice and
(512 + 16) -> C*h*w, with BatchNorm + LeakyReLU(0.2) between layers and a sigmoid output, so a
trigger lies in [0, 1]^(C x h x w).

The staircase needs one generator per threshold beta_i (and, for detection, per candidate class).
Rather than loop over N small MLPs, every layer stores its parameters with a leading N dimension
and runs as one `torch.baddbmm`; BatchNorm keeps separate statistics per sub-model. The same
building blocks serve the MINE statistics network (`mesa_lib.mine`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BatchedLinear(nn.Module):
    """N independent affine maps applied at once: (N, B, in) -> (N, B, out).

    Initialised like `nn.Linear` (uniform in +-1/sqrt(in)), independently per sub-model.
    """

    def __init__(
        self, n_models: int, in_features: int, out_features: int, bias: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        w = torch.rand(n_models, in_features, out_features, generator=generator) * 2 - 1
        self.weight = nn.Parameter(w * bound)
        b = torch.rand(n_models, 1, out_features, generator=generator) * 2 - 1
        self.bias = nn.Parameter(b * bound) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        """Map x (N, B, in) -> (N, B, out) with sub-model n's weights on x[n]."""
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias, x, self.weight)


class BatchedBatchNorm1d(nn.Module):
    """BatchNorm over the batch dimension with separate statistics and affine per sub-model.

    (N, B, F) is viewed as (B, N*F) so that one `F.batch_norm` call normalises every
    (sub-model, feature) pair on its own, exactly as N separate `nn.BatchNorm1d(F)` would.
    """

    def __init__(self, n_models: int, features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(n_models * features))
        self.bias = nn.Parameter(torch.zeros(n_models * features))
        self.register_buffer("running_mean", torch.zeros(n_models * features))
        self.register_buffer("running_var", torch.ones(n_models * features))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise x (N, B, F) -> (N, B, F); batch statistics in training, running in eval."""
        n, b, f = x.shape
        flat = x.permute(1, 0, 2).reshape(b, n * f)
        out = F.batch_norm(
            flat, self.running_mean, self.running_var, self.weight, self.bias,
            training=self.training, momentum=self.momentum, eps=self.eps,
        )
        return out.reshape(b, n, f).permute(1, 0, 2)


class TriggerGenerator(nn.Module):
    """N trigger generators sharing an architecture, run in one batched pass.

    Args:
        n_models: number of sub-generators N.
        trigger_shape: (C, h, w) of a generated trigger; any sizes.
        noise_dim: dimension of z (64 in the paper).
        chunks: z is split into this many equal chunks (4), one entering each layer.
        hidden: width of the hidden layers (512 for CIFAR-10, 2048 for CIFAR-100).
        slope: LeakyReLU negative slope (0.2).
        generator: RNG for the initial weights, for reproducible fits.
    """

    def __init__(
        self, n_models: int, trigger_shape: tuple[int, int, int], noise_dim: int = 64,
        chunks: int = 4, hidden: int = 512, slope: float = 0.2,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if n_models < 1 or chunks < 2 or noise_dim % chunks:
            raise ValueError(f"need n_models >= 1, chunks >= 2 dividing noise_dim, got "
                             f"{n_models}, {chunks}, {noise_dim}")
        self.n_models, self.noise_dim, self.chunks, self.slope = n_models, noise_dim, chunks, slope
        self.trigger_shape = tuple(int(s) for s in trigger_shape)
        c = noise_dim // chunks
        out = math.prod(self.trigger_shape)
        dims = [c] + [hidden + c] * (chunks - 1)
        outs = [hidden] * (chunks - 1) + [out]
        self.fcs = nn.ModuleList(
            BatchedLinear(n_models, i, o, generator=generator) for i, o in zip(dims, outs,
                                                                              strict=True)
        )
        self.bns = nn.ModuleList(BatchedBatchNorm1d(n_models, hidden) for _ in range(chunks - 1))

    def forward(self, z: Tensor) -> Tensor:
        """Generate triggers from noise.

        Args:
            z: (N, B, noise_dim) float, nominally U[0, 1]; row n feeds sub-generator n.

        Returns:
            (N, B, C, h, w) float in [0, 1].
        """
        parts = z.chunk(self.chunks, dim=-1)
        h = parts[0]
        for i, bn in enumerate(self.bns):
            h = F.leaky_relu(bn(self.fcs[i](h)), self.slope)
            h = torch.cat([h, parts[i + 1]], dim=-1)
        out = torch.sigmoid(self.fcs[-1](h))
        return out.reshape(*z.shape[:2], *self.trigger_shape)

    def sample_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """z ~ U[0, 1]: (N, batch, noise_dim) on the CPU (the caller moves it)."""
        return torch.rand(self.n_models, batch, self.noise_dim, generator=generator)
