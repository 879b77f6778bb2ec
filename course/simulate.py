"""Simulating the forward SDE with Euler-Maruyama, and checking it against the closed form.

Euler-Maruyama (Kloeden & Platen 1992, eq. 9.1.1) for dx = f(x, t) dt + g(t) dW on a grid
t_0 < t_1 < ... < t_N with dt = t_{i+1} - t_i:

    x_{i+1} = x_i + f(x_i, t_i) dt + g(t_i) sqrt(dt) z_i,    z_i ~ N(0, I).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .sde import SDE
from .utils import as_time, check_batch, check_positive_int, check_time_scalar, expand_like

__all__ = [
    "Trajectory",
    "euler_maruyama_step",
    "simulate_forward",
    "MarginalCheck",
    "compare_with_marginal",
]


@dataclass(frozen=True)
class Trajectory:
    """States of a simulation at the saved times."""

    ts: Tensor  # (K,) saved times, increasing
    xs: Tensor  # (K, B, ...) states at those times

    @property
    def final(self) -> Tensor:
        """The last state, shape ``(B, ...)``."""
        return self.xs[-1]

    def at(self, t: float) -> Tensor:
        """The saved state whose time is closest to ``t``, shape ``(B, ...)``."""
        return self.xs[int(torch.argmin((self.ts - t).abs()))]


def euler_maruyama_step(
    x: Tensor,
    t: Tensor,
    dt: float,
    drift: Callable[[Tensor, Tensor], Tensor],
    diffusion: Callable[[Tensor], Tensor],
    z: Tensor,
) -> Tensor:
    """One Euler-Maruyama step x + f(x, t) dt + g(t) sqrt(|dt|) z.

    Args:
        x: current state ``(B, ...)``.
        t: current times ``(B,)``.
        dt: the step; negative when integrating backwards in time (reverse-time SDEs).
        drift: ``f(x, t)``, shaped like ``x``.
        diffusion: ``g(t)``, shape ``(B,)``.
        z: standard normal noise shaped like ``x``.
    """
    if z.shape != x.shape:
        raise ValueError(f"expected noise z of shape {tuple(x.shape)}; got {tuple(z.shape)}")
    g = expand_like(diffusion(t), x)
    return x + drift(x, t) * dt + g * math.sqrt(abs(dt)) * z


def simulate_forward(
    sde: SDE,
    x0: Tensor,
    n_steps: int,
    *,
    t_end: float = 1.0,
    save_every: int = 1,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Trajectory:
    """Run the forward SDE from ``x0`` at t = 0 to ``t_end`` with ``n_steps`` uniform EM steps.

    Returns the states at t = 0, every ``save_every`` steps, and at ``t_end``.
    """
    check_batch(x0, name="x0")
    n_steps = check_positive_int(n_steps, "n_steps")
    save_every = check_positive_int(save_every, "save_every")
    t_end = check_time_scalar(t_end, "t_end")
    if t_end == 0.0:
        raise ValueError("expected t_end > 0 so that the simulation moves forward in time")
    ts = torch.linspace(0.0, t_end, n_steps + 1, dtype=torch.float64)
    x, saved_t, saved_x = x0, [0.0], [x0]
    for i in tqdm(range(n_steps), disable=not progress, desc=f"{sde.name} SDE"):
        t = as_time(float(ts[i]), x)
        dt = float(ts[i + 1] - ts[i])
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = euler_maruyama_step(x, t, dt, sde.drift, sde.diffusion, z)
        if (i + 1) % save_every == 0 or i + 1 == n_steps:
            saved_t.append(float(ts[i + 1]))
            saved_x.append(x)
    return Trajectory(ts=torch.tensor(saved_t), xs=torch.stack(saved_x))


@dataclass(frozen=True)
class MarginalCheck:
    """Standardised residuals z = (x_t - alpha(t) x_0) / sigma(t) at one time; z ~ N(0, 1)
    exactly when the simulation reproduces the closed-form kernel."""

    t: float
    n: int  # number of scalar residuals pooled
    mean: float  # should be 0, standard error 1/sqrt(n)
    std: float  # should be 1, standard error ~ 1/sqrt(2n)
    n_se: float  # tolerance in standard errors

    @property
    def mean_se(self) -> float:
        return abs(self.mean) * math.sqrt(self.n)

    @property
    def std_se(self) -> float:
        return abs(self.std - 1.0) * math.sqrt(2 * self.n)

    @property
    def ok(self) -> bool:
        return self.mean_se <= self.n_se and self.std_se <= self.n_se

    def __str__(self) -> str:
        verdict = "ok" if self.ok else f"outside {self.n_se:g} SE"
        return (f"t={self.t:5.3f}  mean(z)={self.mean:+.4f} ({self.mean_se:.1f} SE)  "
                f"std(z)={self.std:.4f} ({self.std_se:.1f} SE)  {verdict}")


def compare_with_marginal(sde: SDE, x0: Tensor, traj: Trajectory, *, n_se: float = 4.0
                          ) -> list[MarginalCheck]:
    """Compare simulated states with the closed-form x_t | x_0 at every saved t > 0."""
    rows = []
    for t, x_t in zip(traj.ts.tolist(), traj.xs, strict=True):
        if t == 0.0:
            continue
        mean, std = sde.marginal(x0.double(), t)
        z = (x_t.double() - mean) / expand_like(std, mean)
        rows.append(MarginalCheck(t=t, n=z.numel(), mean=z.mean().item(),
                                  std=z.std().item(), n_se=n_se))
    return rows
