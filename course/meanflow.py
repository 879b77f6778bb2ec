"""MeanFlow (Geng, Deng, Bai, Kolter & He 2025): one-step generation from scratch by learning the
*average* velocity of a flow instead of the instantaneous one.

Notation (the paper's, whose time runs like ours: t = 0 data, t = 1 noise, z_t = (1 - t) x + t eps
on the linear path): v(z_t, t) the instantaneous velocity; for r <= t the average velocity

    u(z_t, r, t) = 1 / (t - r) * int_r^t v(z_tau, tau) d tau,      so z_r = z_t - (t - r) u(z_t, r, t).

Differentiating (t - r) u = int_r^t v d tau in t (r fixed) gives the **MeanFlow identity**

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v . grad_z u + du/dt,

the total derivative along the trajectory, which is one Jacobian-vector product of u with the
tangent (dz, dr, dt) = (v, 0, 1). Training regresses u_theta onto the stop-gradient target
v - (t - r) d/dt u_theta with v replaced by the conditional velocity (alpha' x + sigma' eps), as in
flow matching. Our networks are called ``model(x, t, r=r, **cond)`` (t first, the course
convention), so the tangent is (v, 1) for (x, t) and 0 for r; r = t is ordinary flow matching.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .flow_matching import conditional_velocity
from .paths import GaussianPath
from .samplers import SamplerStep, check_decreasing_grid
from .utils import check_batch, expand_like

__all__ = ["sample_time_pairs", "meanflow_target", "meanflow_loss", "sample_meanflow"]


def sample_time_pairs(n: int, *, share_distinct: float = 0.25, p_mean: float = -0.4, p_std: float = 1.0,
                      generator: torch.Generator | None = None, dtype=torch.float32, device=None
                      ) -> tuple[Tensor, Tensor]:
    """(t, r) with r <= t: two logit-normal times (sigmoid of N(p_mean, p_std^2)), sorted; for a share
    1 - ``share_distinct`` of the pairs r = t (the paper's best setting keeps 25 % distinct)."""
    if not 0.0 <= share_distinct <= 1.0:
        raise ValueError(f"expected 0 <= share_distinct <= 1; got {share_distinct}")
    a = torch.sigmoid(p_mean + p_std * torch.randn(2, n, generator=generator, dtype=dtype, device=device))
    t, r = a.max(0).values, a.min(0).values
    same = torch.rand(n, generator=generator, dtype=dtype, device=device) >= share_distinct
    return t, torch.where(same, t, r)


def meanflow_target(model: Callable, z: Tensor, t: Tensor, r: Tensor, v: Tensor, **cond
                    ) -> tuple[Tensor, Tensor]:
    """(u_theta(z, t, r), u_tgt) with u_tgt = v - (t - r) d/dt u_theta computed by one forward-mode
    JVP (``torch.func.jvp``) with tangents v for z, 1 for t and 0 for r; u_tgt is detached."""

    def u(z_, t_, r_):
        return model(z_, t_, r=r_, **cond)

    with warnings.catch_warnings():  # torch.func's first call warns about its own use of torch.jit.script
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        pred, dudt = torch.func.jvp(u, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    target = v - expand_like(t - r, z) * dudt
    return pred, target.detach()


def meanflow_loss(model: Callable, x0: Tensor, path: GaussianPath, *, share_distinct: float = 0.25,
                  adaptive_p: float = 1.0, adaptive_c: float = 1e-3, teacher_velocity: Callable | None = None,
                  generator: torch.Generator | None = None, **cond) -> Tensor:
    """MeanFlow's loss on a batch ``x0``: sg(w) ||u_theta - sg(u_tgt)||^2 with the adaptive weight
    w = 1 / (||delta||^2 + c)^p (p = 0: plain squared error; the paper uses p = 1). Squares are
    averaged over data dimensions. v is the conditional velocity alpha' x0 + sigma' eps, or with
    ``teacher_velocity`` a trained model's (marginal, e.g. guided) velocity at (z_t, t): MeanFlow
    distilled from a teacher."""
    check_batch(x0, name="x0")
    t, r = sample_time_pairs(x0.shape[0], share_distinct=share_distinct, generator=generator,
                             dtype=x0.dtype, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    z = path.sample(x0, t, eps=eps).x_t
    if teacher_velocity is None:
        v = conditional_velocity(path, x0, eps, t)
    else:
        with torch.no_grad():
            v = teacher_velocity(z, t, **cond)
    pred, target = meanflow_target(model, z, t, r, v, **cond)
    err = (pred - target).pow(2).flatten(1).mean(1)
    weight = 1.0 / (err.detach() + adaptive_c) ** adaptive_p
    return (weight * err).mean()


@torch.no_grad()
def sample_meanflow(model: Callable, x_init: Tensor, ts: Tensor, *, callback: Callable | None = None,
                    **cond) -> Tensor:
    """z_r = z_t - (t - r) u(z_t, t, r) over the decreasing grid ``ts`` (one NFE per step);
    ``ts = [1, 0]`` is one-step generation."""
    check_batch(x_init, name="x_init")
    grid, x = check_decreasing_grid(ts), x_init
    for i in range(len(grid) - 1):
        t = torch.full((x.shape[0],), grid[i], dtype=x.dtype, device=x.device)
        r = torch.full_like(t, grid[i + 1])
        x = x - (grid[i] - grid[i + 1]) * model(x, t, r=r, **cond)
        if callback is not None:
            callback(SamplerStep(i=i, t=grid[i + 1], x=x))
    return x
