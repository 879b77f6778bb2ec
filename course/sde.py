"""Forward SDEs dx = f(x, t) dt + g(t) dW of Song et al. (2021), "Score-Based Generative
Modeling through Stochastic Differential Equations", Section 3.4 and Appendix B.

Notation (time t in [0, 1], t = 0 data, t = 1 noise):

=============  ==============================  =====================================
symbol         VE                              VP / sub-VP
=============  ==============================  =====================================
f(x, t)        0                               -1/2 beta(t) x
g(t)^2         d/dt sigma(t)^2                 beta(t)  /  beta(t) (1 - e^{-2 B(t)})
alpha(t)       1                               e^{-B(t)/2},  B(t) = int_0^t beta
sigma(t)       s_min sqrt((s_max/s_min)^{2t}-1) sqrt(1 - e^{-B(t)})  /  1 - e^{-B(t)}
prior p_1      N(0, sigma(1)^2 I)              N(0, I)
=============  ==============================  =====================================

Each SDE is a :class:`~course.paths.GaussianPath`, so ``marginal`` and ``sample`` give the
closed-form perturbation kernel x_t | x_0. Given a score function s(x, t) ~ grad log p_t(x),
``reverse_drift`` is the drift of the reverse-time SDE (Anderson 1982; Song et al. eq. 6)
and ``probability_flow_drift`` the drift of the probability-flow ODE (Song et al. eq. 13).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .paths import GaussianPath
from .utils import as_time, check_positive, expand_like

__all__ = ["SDE", "VESDE", "VPSDE", "SubVPSDE", "ScoreFn", "get_sde"]

ScoreFn = Callable[[Tensor, Tensor], Tensor]


class SDE(GaussianPath):
    """A linear forward SDE with Gaussian perturbation kernels."""

    name: str = "sde"

    @abstractmethod
    def drift(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Drift f(x, t), shaped like ``x``."""

    @abstractmethod
    def diffusion(self, t: Tensor | float) -> Tensor:
        """Diffusion coefficient g(t), deterministic, same shape as ``t``."""

    def sigma_dsigma(self, t: Tensor) -> Tensor:
        """sigma sigma' = (1/2) d sigma^2 / dt; for a linear SDE d sigma^2 / dt = 2 f sigma^2 + g^2,
        so where sigma = 0 (t = 0, where sigma' is infinite) it is g(t)^2 / 2."""
        sigma = self.sigma(t)
        limit = 0.5 * self.diffusion(t) ** 2
        inner = sigma * torch.where(sigma == 0, torch.zeros_like(sigma), self.d_sigma(t))
        return torch.where(sigma == 0, limit.to(sigma.dtype), inner)

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std^2 I), summed over all but the batch dimension; shape ``(B,)``."""
        if z.ndim < 1:
            raise ValueError(f"expected z of shape (B, ...); got shape {tuple(z.shape)}")
        s = self.prior_std()
        d = z[0].numel()
        sq = z.flatten(1).pow(2).sum(1) if z.ndim > 1 else z.pow(2)
        return -0.5 * d * math.log(2 * math.pi * s**2) - sq / (2 * s**2)

    def discretize(self, x: Tensor, t: Tensor | float, dt: float) -> tuple[Tensor, Tensor]:
        """Coefficients of the forward step of size ``dt`` that ends at ``t``:
        x_t = x_{t-dt} + f_i + G_i z (Song et al. Appendix E), as ``(f_i, G_i)`` with ``f_i``
        shaped like ``x`` and ``G_i`` of shape ``(B,)``.

        This base version is Euler-Maruyama: f_i = f(x, t) dt, G_i = g(t) sqrt(dt). VP and VE
        override it with their exact discrete chains (DDPM and SMLD).
        """
        t = as_time(t, x)
        return self.drift(x, t) * dt, self.diffusion(t) * math.sqrt(dt)

    def reverse_drift(self, x: Tensor, t: Tensor | float, score_fn: ScoreFn) -> Tensor:
        """Drift of the reverse-time SDE, f(x, t) - g(t)^2 s(x, t), run from t = 1 to t = 0.

        The reverse SDE is dx = [f - g^2 s] dt + g dW_bar with dt < 0 (Song et al. eq. 6).
        """
        t = as_time(t, x)
        g2 = expand_like(self.diffusion(t) ** 2, x)
        return self.drift(x, t) - g2 * score_fn(x, t)

    def probability_flow_drift(self, x: Tensor, t: Tensor | float, score_fn: ScoreFn) -> Tensor:
        """Velocity of the probability-flow ODE, dx/dt = f(x, t) - 1/2 g(t)^2 s(x, t)
        (Song et al. eq. 13); its solutions have the same marginals p_t as the SDE."""
        t = as_time(t, x)
        g2 = expand_like(self.diffusion(t) ** 2, x)
        return self.drift(x, t) - 0.5 * g2 * score_fn(x, t)


@dataclass(frozen=True)
class VESDE(SDE):
    """Variance-exploding SDE: dx = sqrt(d sigma^2/dt) dW, sigma(t) geometric in t.

    Defaults suit the 2-D toys of the course (data within radius ~3); Song et al. use
    sigma_max = 50 for CIFAR-10.
    """

    sigma_min: float = 0.01
    sigma_max: float = 10.0
    name = "VE"

    def __post_init__(self):
        check_positive(self.sigma_min, "sigma_min")
        check_positive(self.sigma_max, "sigma_max")
        if self.sigma_max <= self.sigma_min:
            raise ValueError(
                f"expected sigma_max > sigma_min; got {self.sigma_max} <= {self.sigma_min}"
            )

    @property
    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        # Exact std of x_t - x_0 = int_0^t g dW: sigma_min^2 ((s_max/s_min)^{2t} - 1), so that
        # sigma(0) = 0 (t = 0 is clean data). expm1 keeps it accurate near t = 0.
        return self.sigma_min * torch.sqrt(torch.expm1(2 * self._log_ratio * t))

    def drift(self, x: Tensor, t: Tensor | float) -> Tensor:
        as_time(t, x)
        return torch.zeros_like(x)

    def diffusion(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t)
        return self.sigma_min * torch.exp(self._log_ratio * t) * math.sqrt(2 * self._log_ratio)

    def prior_std(self) -> float:
        return float(self.sigma(torch.tensor(1.0, dtype=torch.float64)))

    def discretize(self, x: Tensor, t: Tensor | float, dt: float) -> tuple[Tensor, Tensor]:
        """SMLD chain: f_i = 0, G_i = sqrt(sigma(t)^2 - sigma(t - dt)^2)."""
        t = as_time(t, x)
        g = torch.sqrt(self.sigma(t) ** 2 - self.sigma((t - dt).clamp(min=0.0)) ** 2)
        return torch.zeros_like(x), g


@dataclass(frozen=True)
class VPSDE(SDE):
    """Variance-preserving SDE (continuous DDPM): dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW,
    with beta(t) = beta_min + t (beta_max - beta_min)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    name = "VP"

    def __post_init__(self):
        check_positive(self.beta_min, "beta_min")
        check_positive(self.beta_max, "beta_max")
        if self.beta_max < self.beta_min:
            raise ValueError(f"expected beta_max >= beta_min; got {self.beta_max} < {self.beta_min}")

    def beta(self, t: Tensor) -> Tensor:
        """Noise rate beta(t)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: Tensor) -> Tensor:
        """B(t) = int_0^t beta(s) ds."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self.integrated_beta(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(-self.integrated_beta(t)))  # sqrt(1 - alpha^2)

    def drift(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = as_time(t, x)
        return -0.5 * expand_like(self.beta(t), x) * x

    def diffusion(self, t: Tensor | float) -> Tensor:
        return torch.sqrt(self.beta(torch.as_tensor(t)))

    def prior_std(self) -> float:
        return 1.0

    def discrete_beta(self, t: Tensor, dt: float) -> Tensor:
        """beta_i = beta(t) dt of the DDPM chain whose step of size ``dt`` ends at ``t``.

        The chain needs beta_i < 1 (it scales by sqrt(1 - beta_i)), i.e. steps with
        dt < 1 / beta_max: more than beta_max steps over [0, 1].
        """
        beta_i = self.beta(torch.as_tensor(t)) * dt
        if (beta_i >= 1).any():
            raise ValueError(
                f"the DDPM discretisation needs beta(t) dt < 1; got {beta_i.max().item():.3g} "
                f"with dt={dt:.3g}: use more than {math.ceil(self.beta_max)} steps over [0, 1]")
        return beta_i

    def discretize(self, x: Tensor, t: Tensor | float, dt: float) -> tuple[Tensor, Tensor]:
        """DDPM chain x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z with beta_i = beta(t) dt:
        f_i = (sqrt(1 - beta_i) - 1) x, G_i = sqrt(beta_i)."""
        t = as_time(t, x)
        beta_i = self.discrete_beta(t, dt)
        return (torch.sqrt(1 - expand_like(beta_i, x)) - 1) * x, torch.sqrt(beta_i)


@dataclass(frozen=True)
class SubVPSDE(VPSDE):
    """Sub-VP SDE: VP drift, g(t)^2 = beta(t) (1 - e^{-2 B(t)}); its variance stays below
    the VP one at every t (Song et al. eq. 11)."""

    name = "sub-VP"

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self.integrated_beta(t))  # 1 - e^{-B(t)}

    def diffusion(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t)
        return torch.sqrt(self.beta(t) * -torch.expm1(-2 * self.integrated_beta(t)))

    def discretize(self, x: Tensor, t: Tensor | float, dt: float) -> tuple[Tensor, Tensor]:
        """Sub-VP has no named discrete chain: Euler-Maruyama coefficients."""
        return SDE.discretize(self, x, t, dt)


_SDES = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE, "sub-vp": SubVPSDE}


def get_sde(name: str, **kwargs) -> SDE:
    """Build an SDE by name: ``"ve"``, ``"vp"`` or ``"subvp"`` (keyword arguments as the class)."""
    key = str(name).lower()
    if key not in _SDES:
        raise ValueError(f"unknown SDE {name!r}; expected one of 've', 'vp', 'subvp'")
    return _SDES[key](**kwargs)
