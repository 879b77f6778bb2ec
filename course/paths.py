"""The one Gaussian-path core: x_t = alpha(t) * x_0 + sigma(t) * eps, with eps ~ N(0, I).

Every forward process of the course is an instance: the VE, VP and sub-VP SDEs of
Song et al. (2021) (``course.sde``) and the flow-matching paths (``LinearPath`` here, the
rectified-flow / conditional-OT path). Time runs from t = 0 (data: alpha = 1, sigma = 0) to
t = 1 (noise).

The time derivatives alpha'(t) and sigma'(t) give the conditional velocity
d/dt x_t = alpha'(t) x_0 + sigma'(t) eps that flow matching regresses onto. They default to
float64 autograd through ``alpha`` and ``sigma`` (exact, never finite differences); paths with
simple formulas override them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from .utils import as_time, expand_like

__all__ = ["GaussianPath", "PathSample", "LinearPath"]


@dataclass(frozen=True)
class PathSample:
    """One draw from the path: ``x_t = alpha(t) x_0 + sigma(t) eps``."""

    x_t: Tensor  # (B, ...)
    t: Tensor  # (B,)
    x_0: Tensor  # (B, ...)
    eps: Tensor  # (B, ...)


class GaussianPath(ABC):
    """A family of conditionals p_t(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I).

    Subclasses define ``alpha`` and ``sigma`` as functions of a time tensor (any shape,
    returned in the same shape); everything else here is derived from them.
    """

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale alpha(t) of x_t given x_0."""

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise standard deviation sigma(t) of x_t given x_0."""

    def d_alpha(self, t: Tensor) -> Tensor:
        """alpha'(t), elementwise; by float64 autograd unless a subclass overrides it."""
        return _derivative(self.alpha, t)

    def d_sigma(self, t: Tensor) -> Tensor:
        """sigma'(t), elementwise; by float64 autograd unless a subclass overrides it."""
        return _derivative(self.sigma, t)

    def sigma_dsigma(self, t: Tensor) -> Tensor:
        """sigma(t) sigma'(t) = (1/2) d sigma^2 / dt, elementwise: the factor of the score in the
        probability-flow velocity, alpha' E[x_0 | x_t] - sigma sigma' grad log p_t. Paths whose
        sigma' is infinite where sigma = 0 (the SDEs at t = 0) override it with the finite limit."""
        return self.sigma(t) * self.d_sigma(t)

    def coefficients(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        """alpha(t) and sigma(t) reshaped to broadcast against ``x`` (``t``: scalar or ``(B,)``)."""
        t = as_time(t, x)
        return expand_like(self.alpha(t), x), expand_like(self.sigma(t), x)

    def derivatives(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        """alpha'(t) and sigma'(t) reshaped to broadcast against ``x``."""
        t = as_time(t, x)
        return expand_like(self.d_alpha(t), x), expand_like(self.d_sigma(t), x)

    def prior_std(self) -> float:
        """Standard deviation of the prior N(0, prior_std^2 I) that stands in for p_1."""
        return float(self.sigma(torch.tensor(1.0, dtype=torch.float64)))

    def prior_sample(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw x_1 ~ N(0, prior_std^2 I) of the given shape ``(B, ...)``."""
        if len(shape) < 1 or any(int(s) < 1 for s in shape):
            raise ValueError(f"expected a shape (B, ...) of positive sizes; got {tuple(shape)}")
        z = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
        return self.prior_std() * z

    def marginal(self, x0: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of x_t given x_0.

        Args:
            x0: data, shape ``(B, ...)``.
            t: times in [0, 1], shape ``(B,)`` or a scalar.
        Returns:
            ``(mean, std)`` with ``mean`` shaped like ``x0`` and ``std`` of shape ``(B,)``.
        """
        t = as_time(t, x0)
        return expand_like(self.alpha(t), x0) * x0, self.sigma(t)

    def sample(
        self,
        x0: Tensor,
        t: Tensor | float,
        *,
        eps: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PathSample:
        """Draw x_t ~ p_t(. | x_0); ``eps`` is drawn with ``generator`` unless given."""
        t = as_time(t, x0)
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        elif eps.shape != x0.shape:
            raise ValueError(f"expected eps of shape {tuple(x0.shape)}; got {tuple(eps.shape)}")
        mean, std = self.marginal(x0, t)
        return PathSample(x_t=mean + expand_like(std, x0) * eps, t=t, x_0=x0, eps=eps)


def _derivative(fn, t: Tensor) -> Tensor:
    """d fn(t) / dt elementwise for an elementwise ``fn``, computed in float64 by autograd and
    returned in the dtype of ``t`` (float64 for integer input)."""
    t = torch.as_tensor(t)
    dtype = t.dtype if t.is_floating_point() else torch.float64
    with torch.enable_grad():
        tt = t.detach().to(torch.float64).requires_grad_(True)
        out = fn(tt)
        if not out.requires_grad:  # a constant, e.g. alpha = 1 for VE
            return torch.zeros_like(tt, dtype=dtype)
        (grad,) = torch.autograd.grad(out.sum(), tt)
    return grad.to(dtype)


@dataclass(frozen=True)
class LinearPath(GaussianPath):
    """The linear (rectified-flow, conditional optimal-transport) path
    x_t = (1 - t) x_0 + (sigma_min + (1 - sigma_min) t) eps.

    With ``sigma_min = 0`` (the default, as in rectified flow and Stable Diffusion 3) it is the
    straight line from data to noise and its conditional velocity is eps - x_0. ``sigma_min > 0``
    is Lipman et al.'s (2023) OT path, which keeps a little noise around each data point at
    t = 0; alpha(1) = 0, so t = 1 is pure noise N(0, I).
    """

    sigma_min: float = 0.0
    name = "linear"

    def __post_init__(self):
        if not 0.0 <= self.sigma_min < 1.0:
            raise ValueError(f"expected 0 <= sigma_min < 1; got {self.sigma_min}")

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min + (1.0 - self.sigma_min) * t

    def d_alpha(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return (1.0 - self.sigma_min) * torch.ones_like(t)
