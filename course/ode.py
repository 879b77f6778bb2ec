"""The probability-flow ODE: deterministic sampling and exact likelihoods (Song et al. 2021,
Section 4.3 and Appendix D).

    dx/dt = v(x, t) = f(x, t) - 1/2 g(t)^2 s(x, t)

has the same marginals p_t as the forward SDE. Integrated from t = 1 to 0 it is a sampler;
integrated from 0 to 1 it is a continuous normalising flow, whose log-density follows the
instantaneous change of variables (Chen et al. 2018)

    log p_0(x_0) = log p_1(x_1) + int_0^1 div v(x_t, t) dt.

The adaptive solver is SciPy's ``solve_ivp`` (RK45 by default, Dormand-Prince 5(4)): it is
already a dependency of the course, well tested, and the toy problems are small enough that
moving the state to NumPy between steps costs little. (torchdiffeq would keep tensors on the
GPU but adds a dependency the CPU course does not need.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .samplers import SamplerStep, check_decreasing_grid
from .sde import SDE
from .utils import as_time, check_batch, check_positive_int, check_time_scalar

__all__ = [
    "sample_flow_euler",
    "sample_flow_heun",
    "sample_ode_euler",
    "sample_ode_heun",
    "ODESolution",
    "solve_ode",
    "exact_divergence",
    "hutchinson_divergence",
    "LikelihoodResult",
    "log_likelihood",
    "bits_per_dim",
]


def _velocity(sde: SDE, score_fn: Callable, cond: dict):
    def v(x: Tensor, t: Tensor) -> Tensor:
        return sde.probability_flow_drift(x, t, lambda a, b: score_fn(a, b, **cond))
    return v


def sample_flow_euler(velocity_fn: Callable, x_init: Tensor, ts: Tensor, *,
                      callback: Callable | None = None, **cond) -> Tensor:
    """Euler's method on dx/dt = velocity_fn(x, t, **cond) over the decreasing grid ``ts``
    (one NFE per step). The ODE of any model: a flow model's velocity or a diffusion model's
    probability-flow drift."""
    check_batch(x_init, name="x_init")
    grid, x = check_decreasing_grid(ts), x_init
    for i in range(len(grid) - 1):
        t, dt = grid[i], grid[i + 1] - grid[i]  # dt < 0: backwards in time
        x = x + velocity_fn(x, as_time(t, x), **cond) * dt
        if callback is not None:
            callback(SamplerStep(i=i, t=grid[i + 1], x=x))
    return x


def sample_flow_heun(velocity_fn: Callable, x_init: Tensor, ts: Tensor, *,
                     callback: Callable | None = None, **cond) -> Tensor:
    """Heun's method (explicit trapezoid, 2nd order) on dx/dt = velocity_fn(x, t, **cond): two NFE
    per step (Karras et al. 2022, Algorithm 1 without churn). As there, a last step that ends at
    t = 0 is an Euler step, because a field need not be defined at t = 0 (2N - 1 NFE then)."""
    check_batch(x_init, name="x_init")
    grid, x = check_decreasing_grid(ts), x_init
    for i in range(len(grid) - 1):
        t, t_next = grid[i], grid[i + 1]
        dt = t_next - t
        d = velocity_fn(x, as_time(t, x), **cond)
        x_euler = x + d * dt
        if t_next == 0.0:
            x = x_euler
        else:
            x = x + 0.5 * (d + velocity_fn(x_euler, as_time(t_next, x), **cond)) * dt
        if callback is not None:
            callback(SamplerStep(i=i, t=t_next, x=x))
    return x


def sample_ode_euler(score_fn: Callable, x_init: Tensor, ts: Tensor, *, sde: SDE,
                     callback: Callable | None = None, **cond) -> Tensor:
    """Euler's method on the probability-flow ODE over the grid ``ts`` (one NFE per step)."""
    return sample_flow_euler(_velocity(sde, score_fn, cond), x_init, ts, callback=callback)


def sample_ode_heun(score_fn: Callable, x_init: Tensor, ts: Tensor, *, sde: SDE,
                    callback: Callable | None = None, **cond) -> Tensor:
    """Heun's method on the probability-flow ODE (``sample_flow_heun``): two NFE per step."""
    return sample_flow_heun(_velocity(sde, score_fn, cond), x_init, ts, callback=callback)


@dataclass(frozen=True)
class ODESolution:
    x: Tensor  # state at t_end, shaped like the input
    nfe: int  # velocity evaluations used by the solver


def solve_ode(velocity: Callable[[Tensor, Tensor], Tensor], x: Tensor, t_start: float,
              t_end: float, *, rtol: float = 1e-5, atol: float = 1e-5, method: str = "RK45"
              ) -> ODESolution:
    """Integrate dx/dt = velocity(x, t) from ``t_start`` to ``t_end`` with ``scipy.integrate.solve_ivp``.

    The whole batch is one ODE system (a shared step size), in float64.
    """
    from scipy.integrate import solve_ivp

    check_batch(x, name="x")
    t_start, t_end = check_time_scalar(t_start, "t_start"), check_time_scalar(t_end, "t_end")
    shape, nfe = x.shape, 0

    def fun(t, y):
        nonlocal nfe
        nfe += 1
        xt = torch.from_numpy(y).reshape(shape)
        with torch.no_grad():
            return velocity(xt, torch.full((shape[0],), t, dtype=torch.float64)).reshape(-1).numpy()

    y0 = x.detach().double().reshape(-1).cpu().numpy()
    sol = solve_ivp(fun, (t_start, t_end), y0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"the ODE solver failed: {sol.message}")
    out = torch.from_numpy(sol.y[:, -1]).reshape(shape).to(x.dtype)
    return ODESolution(out, nfe)


def exact_divergence(velocity: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor
                     ) -> tuple[Tensor, Tensor]:
    """v(x, t) and its divergence sum_i dv_i/dx_i by autograd, one backward pass per dimension
    (exact; cost grows with the dimension). Returns ``(v, div)`` with ``div`` of shape ``(B,)``."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = velocity(x, t)
        flat_v, div = v.flatten(1), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i in range(flat_v.shape[1]):
            grad = torch.autograd.grad(flat_v[:, i].sum(), x, retain_graph=True)[0]
            div = div + grad.flatten(1)[:, i]
    return v.detach(), div.detach()


def hutchinson_divergence(velocity: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor,
                          probes: Tensor) -> tuple[Tensor, Tensor]:
    """v(x, t) and the Hutchinson estimate of its divergence, mean_k eps_k^T (dv/dx) eps_k,
    from ``probes`` of shape ``(K, B, ...)`` with E[eps eps^T] = I (Gaussian or Rademacher).
    Unbiased; one vector-Jacobian product per probe."""
    if probes.shape[1:] != x.shape:
        raise ValueError(f"expected probes of shape (K, {', '.join(map(str, x.shape))}); got {tuple(probes.shape)}")
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = velocity(x, t)
        est = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for eps in probes:
            vjp = torch.autograd.grad(v, x, grad_outputs=eps, retain_graph=True)[0]
            est = est + (vjp * eps).flatten(1).sum(1)
    return v.detach(), (est / len(probes)).detach()


@dataclass(frozen=True)
class LikelihoodResult:
    log_prob: Tensor  # (B,) log p_{t_min}(x) in nats
    prior_log_prob: Tensor  # (B,) log p_1(x_1)
    delta: Tensor  # (B,) int div v dt
    x_end: Tensor  # (B, ...) the encoding x_1
    nfe: int


def log_likelihood(score_fn: Callable, x: Tensor, *, sde: SDE, t_min: float = 1e-5,
                   divergence: str = "exact", n_probes: int = 1, probe: str = "rademacher",
                   rtol: float = 1e-6, atol: float = 1e-6, generator: torch.Generator | None = None,
                   **cond) -> LikelihoodResult:
    """log p_{t_min}(x) by integrating the probability-flow ODE and its divergence from t_min to 1.

    ``divergence="exact"`` uses autograd over every dimension (low-D data); ``"hutchinson"``
    uses ``n_probes`` fixed probes drawn once (FFJORD), Gaussian or Rademacher.
    """
    from scipy.integrate import solve_ivp

    check_batch(x, name="x")
    t_min = check_time_scalar(t_min, "t_min")
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"unknown divergence {divergence!r}; expected 'exact' or 'hutchinson'")
    shape, b = x.shape, x.shape[0]
    velocity = _velocity(sde, score_fn, cond)
    x64 = x.detach().double()
    if divergence == "hutchinson":
        n_probes = check_positive_int(n_probes, "n_probes")
        if probe == "gaussian":
            probes = torch.randn((n_probes, *shape), generator=generator, dtype=torch.float64)
        elif probe == "rademacher":
            probes = torch.randint(0, 2, (n_probes, *shape), generator=generator).double() * 2 - 1
        else:
            raise ValueError(f"unknown probe {probe!r}; expected 'gaussian' or 'rademacher'")
    nfe = 0

    def fun(t, y):
        nonlocal nfe
        nfe += 1
        xt = torch.from_numpy(y[:-b]).reshape(shape)
        tt = torch.full((b,), t, dtype=torch.float64)
        if divergence == "exact":
            v, div = exact_divergence(velocity, xt, tt)
        else:
            v, div = hutchinson_divergence(velocity, xt, tt, probes)
        return np.concatenate([v.reshape(-1).numpy(), div.numpy()])

    y0 = np.concatenate([x64.reshape(-1).numpy(), np.zeros(b)])
    sol = solve_ivp(fun, (t_min, 1.0), y0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"the ODE solver failed: {sol.message}")
    x_end = torch.from_numpy(sol.y[:-b, -1]).reshape(shape)
    delta = torch.from_numpy(sol.y[-b:, -1])
    prior = sde.prior_logp(x_end)
    return LikelihoodResult(prior + delta, prior, delta, x_end, nfe)


def bits_per_dim(log_prob: Tensor, n_dims: int, *, n_bins: int = 256, data_range: float = 2.0
                 ) -> Tensor:
    """Bits per dimension of discrete data from the log-density of its uniformly dequantised,
    rescaled version: pixels k in {0..n_bins-1} mapped to x = (k + u) / n_bins * data_range - ...,
    so log P(k) >= log p(x) + D log(data_range / n_bins) and bpd = -log P / (D log 2)."""
    n_dims = check_positive_int(n_dims, "n_dims")
    log_discrete = log_prob + n_dims * math.log(data_range / n_bins)
    return -log_discrete / (n_dims * math.log(2))
