"""MINE: the mutual-information estimator MESA uses as its entropy surrogate, batched over N.

Belghazi et al., "Mutual Information Neural Estimation", ICML 2018. For a statistics network T,
the Donsker-Varadhan (DV) bound

    I(Z; Y) >= E_joint[T(z, y)] - log E_marginal[exp T(z, y')]            (MINE, eq. 10)

is maximised over T; marginal pairs (z, y') pair each z with the y of another sample. The plain
mini-batch gradient of the log term is biased; MINE (Sec. 3.2) replaces its denominator
E[exp T] by an exponential moving average (EMA) over batches. Here the EMA is kept in log space
(`log_ema`) so large T cannot overflow, and the bias-corrected surrogate

    E_joint[T] - E_marginal[exp(T - log_ema)]        (log_ema detached)

has exactly the corrected gradient E[grad T] - E[grad T * exp T] / EMA.

MESA (Qiao et al., NeurIPS 2019, Sec. 4.2) estimates I(z; G_i(z)) for each sub-generator; since
G_i is deterministic, maximising it maximises the entropy of the trigger distribution. The
statistics network is T(z, y) = fc(z) + fc(y) -> LeakyReLU -> fc -> LeakyReLU -> fc -> 1, hidden
512, with one independent copy per sub-model, all run as one batched computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mesa_lib.generator import BatchedLinear


@dataclass(frozen=True)
class MineOutput:
    """One MINE evaluation per sub-model.

    Attributes:
        bound: (N,) the DV lower bound on I(z; y) in nats (for reporting).
        surrogate: (N,) the EMA-corrected objective to maximise (its gradient is the unbiased
            MINE gradient; its value is not a bound).
    """

    bound: Tensor
    surrogate: Tensor


class StatisticsNetwork(nn.Module):
    """N statistics networks T_n(z, y) -> scalar, batched: (N,B,z_dim), (N,B,y_dim) -> (N,B)."""

    def __init__(
        self, n_models: int, z_dim: int, y_dim: int, hidden: int = 512, slope: float = 0.2,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.slope = slope
        self.fc_z = BatchedLinear(n_models, z_dim, hidden, generator=generator)
        self.fc_y = BatchedLinear(n_models, y_dim, hidden, bias=False, generator=generator)
        self.fc_h = BatchedLinear(n_models, hidden, hidden, generator=generator)
        self.fc_out = BatchedLinear(n_models, hidden, 1, generator=generator)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        """Score pairs: z (N, B, z_dim), y (N, B, y_dim) -> T (N, B)."""
        h = F.leaky_relu(self.fc_z(z) + self.fc_y(y), self.slope)
        h = F.leaky_relu(self.fc_h(h), self.slope)
        return self.fc_out(h).squeeze(-1)


class Mine(nn.Module):
    """Batched MINE estimator of I(z; y) for N sub-models, with the moving-average correction.

    Args:
        n_models: number of independent estimators N.
        z_dim, y_dim: dimensions of z and of the flattened y.
        hidden: width of T (512 in MESA).
        ema_rate: weight of the newest batch in the EMA of E_marginal[exp T] (0.01 in MINE).
        slope: LeakyReLU slope inside T.
        generator: RNG for the initial weights.
    """

    def __init__(
        self, n_models: int, z_dim: int, y_dim: int, hidden: int = 512, ema_rate: float = 0.01,
        slope: float = 0.2, generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not 0 < ema_rate <= 1:
            raise ValueError(f"ema_rate must be in (0, 1], got {ema_rate}")
        self.ema_rate = ema_rate
        self.net = StatisticsNetwork(n_models, z_dim, y_dim, hidden, slope, generator)
        self.register_buffer("log_ema", torch.zeros(n_models))
        self.register_buffer("ema_started", torch.zeros((), dtype=torch.bool))

    def forward(
        self, z: Tensor, y: Tensor, generator: torch.Generator | None = None,
        update_ema: bool = False,
    ) -> MineOutput:
        """Estimate I(z; y) per sub-model on one batch.

        Args:
            z: (N, B, z_dim) noise fed to the sub-generators.
            y: (N, B, ...) their outputs; flattened to (N, B, y_dim).
            generator: RNG for the marginal shuffle (a CPU generator).
            update_ema: fold this batch's E_marginal[exp T] into the EMA first (do it in the
                statistics network's own step, not in the generator's).

        Returns:
            `MineOutput` with (N,) bound and surrogate.
        """
        y = y.flatten(2)
        b = y.shape[1]
        perm = torch.randperm(b, generator=generator).to(y.device)
        t_joint = self.net(z, y)
        t_marg = self.net(z, y[:, perm])
        log_mean_exp = torch.logsumexp(t_marg, dim=1) - math.log(b)  # (N,)
        if update_ema:
            self._update(log_mean_exp.detach())
        bound = t_joint.mean(1) - log_mean_exp
        surrogate = t_joint.mean(1) - torch.exp(t_marg - self.log_ema[:, None]).mean(1)
        return MineOutput(bound, surrogate)

    @torch.no_grad()
    def _update(self, log_mean_exp: Tensor) -> None:
        if not bool(self.ema_started):
            self.log_ema.copy_(log_mean_exp)
            self.ema_started.fill_(True)
            return
        r = self.ema_rate
        if r == 1:
            self.log_ema.copy_(log_mean_exp)
            return
        # log((1 - r) * ema + r * mean_exp), evaluated in log space.
        self.log_ema.copy_(torch.logaddexp(self.log_ema + math.log1p(-r),
                                           log_mean_exp + math.log(r)))
