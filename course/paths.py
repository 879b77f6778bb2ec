"""The one Gaussian-path core: x_t = alpha(t) * x_0 + sigma(t) * eps, with eps ~ N(0, I).

Every forward process of the course is an instance: the VE, VP and sub-VP SDEs of
Song et al. (2021) (``course.sde``) and, later, the flow-matching paths. Time runs from
t = 0 (data: alpha = 1, sigma = 0) to t = 1 (noise).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from .utils import as_time, expand_like

__all__ = ["GaussianPath", "PathSample"]


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
