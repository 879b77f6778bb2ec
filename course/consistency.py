"""Consistency models (Song, Dhariwal, Chen & Sutskever 2023) for any Gaussian path.

The consistency function of a probability-flow ODE maps every point (x_t, t) of a trajectory to
the point where the trajectory meets the smallest time t_min: f(x_t, t) = x_{t_min}. It is the
identity at t_min (the *boundary condition*) and constant along each trajectory
(*self-consistency*). A network is made to satisfy the boundary condition exactly by the skip
parameterisation

    f_theta(x, t) = c_skip(t) x + c_out(t) F_theta(., t),    c_skip(t_min) = 1, c_out(t_min) = 0.

Notation: alpha_t, sigma_t of the path; sigma_d the data standard deviation. Seen from x_{t_min}
(the consistency function's "data"), the path is again Gaussian,
x_t = abar_t x_{t_min} + sbar_t z with abar_t = alpha_t / alpha_{t_min} and
sbar_t^2 = sigma_t^2 - abar_t^2 sigma_{t_min}^2 (``relative_coefficients``). EDM's rule (Karras
et al. 2022, Appendix B.6) - c_in x and F's target of unit variance, c_skip chosen to make c_out
as small as possible - then gives, in our time convention (t = 0 data):

    c_in  = 1 / sqrt(abar^2 sigma_d^2 + sbar^2)
    c_skip = abar sigma_d^2 / (abar^2 sigma_d^2 + sbar^2)
    c_out = sbar sigma_d / sqrt(abar^2 sigma_d^2 + sbar^2)

which at t_min (abar = 1, sbar = 0) are exactly 1 and 0. (For VE with t_min = 0 they are the
EDM coefficients.) The second parameterisation, ``"ddim"``, reads F as a prediction of the
teacher's kind (velocity, x0, eps, ...) and takes one DDIM step with it from t to t_min; on the
linear path with a velocity network this is f = x - (t - t_min) F, so a consistency model can
start from the teacher's own weights (consistency tuning, Geng et al. 2024).

Losses (``consistency_distillation_loss``, ``consistency_training_loss``) compare
f_theta(x_{t_{n+1}}, t_{n+1}) with a stop-gradient target at the neighbouring time t_n of the
discretisation ``consistency_grid``; ``sample_consistency`` is Algorithm 1 of Song et al.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .conversions import check_prediction, to_eps, to_x0
from .fast_samplers import log_snr
from .ode import solve_ode
from .paths import GaussianPath
from .samplers import SamplerStep
from .utils import check_batch, check_positive, check_positive_int, expand_like

__all__ = ["PARAMETERISATIONS", "relative_coefficients", "ConsistencyFunction", "EMATarget", "consistency_grid",
           "ct_num_steps", "lognormal_step_probs", "pseudo_huber", "ode_step",
           "consistency_distillation_loss", "consistency_training_loss", "sample_consistency",
           "exact_consistency_function", "gaussian_consistency_function"]

PARAMETERISATIONS = ("edm", "ddim")
DISTANCES = ("l2", "pseudo_huber")


def _times(t, x: Tensor, t_min: float) -> Tensor:
    """``t`` as a ``(B,)`` tensor in [t_min, 1] on x's dtype and device, else ``ValueError``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    if t.shape != (x.shape[0],):
        raise ValueError(f"expected t of shape ({x.shape[0]},) or a scalar; got {tuple(t.shape)}")
    if not torch.isfinite(t).all() or t.min() < t_min or t.max() > 1:
        raise ValueError(f"expected t in [t_min, 1] = [{t_min:g}, 1] (the consistency function starts at "
                         f"t_min); got values from {t.min().item():.4g} to {t.max().item():.4g}")
    return t


def relative_coefficients(path: GaussianPath, t: Tensor, t_min: float) -> tuple[Tensor, Tensor]:
    """abar_t = alpha_t / alpha_{t_min} and sbar_t = sqrt(sigma_t^2 - abar_t^2 sigma_{t_min}^2): x_t given
    x_{t_min} is N(abar_t x_{t_min}, sbar_t^2 I). Shapes of ``t``; exactly (1, 0) at t = t_min."""
    t_lo = torch.full_like(t, t_min)  # the same dtype as t, so that t == t_min gives abar == 1 exactly
    abar = path.alpha(t) / path.alpha(t_lo)
    sbar2 = path.sigma(t) ** 2 - (abar * path.sigma(t_lo)) ** 2
    return abar, sbar2.clamp_min(0.0).sqrt()


class ConsistencyFunction(nn.Module):
    """f_theta(x, t, **cond) = c_skip(t) x + c_out(t) F_theta, with the boundary f(x, t_min) = x exact.

    Args:
        net: the network F, called ``net(x_in, t, **cond)``.
        path: the Gaussian path of the probability-flow ODE.
        t_min: the boundary time (> 0 where the path's fields are singular at t = 0).
        parameterisation: ``"edm"`` (F sees c_in x; coefficients from sigma_data) or ``"ddim"``
            (F is a ``prediction`` of a diffusion/flow model and f is one DDIM step to t_min).
        sigma_data: data standard deviation for ``"edm"`` (0.5 in EDM; measure it for your data).
        prediction: what F predicts for ``"ddim"`` (``"velocity"``, ``"x0"``, ``"eps"``, ...).
    """

    def __init__(self, net: nn.Module, path: GaussianPath, *, t_min: float = 1e-3,
                 parameterisation: str = "edm", sigma_data: float = 0.5, prediction: str = "velocity"):
        super().__init__()
        if parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"unknown parameterisation {parameterisation!r}; expected one of "
                             f"{', '.join(PARAMETERISATIONS)}")
        if not 0.0 <= t_min < 1.0:
            raise ValueError(f"expected 0 <= t_min < 1; got {t_min}")
        self.net, self.path, self.t_min = net, path, float(t_min)
        self.parameterisation, self.sigma_data = parameterisation, check_positive(sigma_data, "sigma_data")
        self.prediction = check_prediction(prediction)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in), each of the shape of ``t``."""
        t_lo = torch.full_like(t, self.t_min)
        if self.parameterisation == "edm":
            abar, sbar = relative_coefficients(self.path, t, self.t_min)
            var = abar**2 * self.sigma_data**2 + sbar**2  # Var(x_t) for data of std sigma_data
            return abar * self.sigma_data**2 / var, sbar * self.sigma_data / var.sqrt(), var.rsqrt()
        # "ddim": f = alpha_min x0_hat + sigma_min eps_hat, both linear in (x, F): read off the coefficients
        one, zero = torch.ones_like(t)[:, None], torch.zeros_like(t)[:, None]
        a_lo, s_lo = self.path.alpha(t_lo), self.path.sigma(t_lo)

        def step(x, value):  # (B, 1)
            return (a_lo[:, None] * to_x0(value, self.prediction, x, t, self.path)
                    + s_lo[:, None] * to_eps(value, self.prediction, x, t, self.path))[:, 0]

        at_min = t == self.t_min  # exact boundary (the closed forms agree there only up to rounding)
        c_skip = torch.where(at_min, torch.ones_like(t), step(one, zero))
        c_out = torch.where(at_min, torch.zeros_like(t), step(zero, one))
        return c_skip, c_out, torch.ones_like(t)

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        check_batch(x)
        t = _times(t, x, self.t_min)
        c_skip, c_out, c_in = (expand_like(c, x) for c in self.coefficients(t))
        return c_skip * x + c_out * self.net(c_in * x, t, **cond)


class EMATarget:
    """The target network f_theta^- of consistency distillation: theta^- <- mu theta^- + (1 - mu) theta
    after each update (mu = 0.95 in Song et al. 2023; mu = 0 makes the target the stop-gradient
    of f itself, as in improved consistency training). Called like the model, without gradients."""

    def __init__(self, model: nn.Module, mu: float = 0.95):
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"expected 0 <= mu < 1; got {mu}")
        self.module, self.mu = copy.deepcopy(model).requires_grad_(False), float(mu)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), 1.0 - self.mu)
        for mine, theirs in zip(self.module.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        with torch.no_grad():
            return self.module(x, t, **cond)


def consistency_grid(n: int, *, t_min: float = 1e-3, t_max: float = 1.0, rho: float = 7.0) -> Tensor:
    """The increasing discretisation t_min = t_1 < ... < t_n = t_max of Song et al. (Karras et al.'s
    rho-schedule, written in t): t_i = (t_min^(1/rho) + (i-1)/(n-1) (t_max^(1/rho) - t_min^(1/rho)))^rho."""
    n = check_positive_int(n, "n")
    if n < 2:
        raise ValueError(f"expected at least 2 discretisation times; got n={n}")
    if not 0.0 < t_min < t_max <= 1.0:
        raise ValueError(f"expected 0 < t_min < t_max <= 1; got t_min={t_min}, t_max={t_max}")
    check_positive(rho, "rho")
    u = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    grid = (t_min ** (1 / rho) + u * (t_max ** (1 / rho) - t_min ** (1 / rho))) ** rho
    grid[0], grid[-1] = t_min, t_max
    return grid


def ct_num_steps(step: int, total_steps: int, *, s0: int = 10, s1: int = 1280) -> int:
    """N(k) of the improved consistency-training curriculum (Song & Dhariwal 2023, eq. 6): the
    discretisation doubles from s0 + 1 to s1 + 1 times in log2(s1 / s0) + 1 equal stages."""
    step, total_steps = check_positive_int(step, "step", allow_zero=True), check_positive_int(total_steps, "total_steps")
    s0, s1 = check_positive_int(s0, "s0"), check_positive_int(s1, "s1")
    if s1 < s0:
        raise ValueError(f"expected s1 >= s0; got s0={s0}, s1={s1}")
    stage = max(1, total_steps // (int(math.log2(s1 // s0)) + 1))
    return min(s0 * 2 ** (step // stage), s1) + 1


def lognormal_step_probs(grid: Tensor, path: GaussianPath, *, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """Probabilities of the n - 1 intervals [t_i, t_{i+1}] of an increasing ``grid`` under iCT's
    lognormal noise distribution: log(sigma/alpha) ~ N(p_mean, p_std^2), the EDM noise level
    sigma/alpha of our path (Song & Dhariwal 2023, Section 3.5)."""
    nsr = -log_snr(path, torch.as_tensor(grid, dtype=torch.float64))  # log(sigma / alpha), increasing
    cdf = torch.special.ndtr((nsr - p_mean) / p_std)
    probs = (cdf[1:] - cdf[:-1]).clamp_min(0.0)
    return probs / probs.sum()


def pseudo_huber(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """sqrt(||a - b||^2 + c^2) - c per sample, shape ``(B,)``; c = 0.00054 sqrt(D) by default (iCT)."""
    d = a[0].numel()
    c = 0.00054 * math.sqrt(d) if c is None else check_positive(c, "c")
    return torch.sqrt((a - b).pow(2).flatten(1).sum(1) + c**2) - c


def _distance(a: Tensor, b: Tensor, distance: str) -> Tensor:
    if distance == "l2":
        return (a - b).pow(2).flatten(1).mean(1)
    if distance == "pseudo_huber":
        return pseudo_huber(a, b)
    raise ValueError(f"unknown distance {distance!r}; expected one of {', '.join(DISTANCES)}")


def ode_step(velocity_fn: Callable, x: Tensor, t: Tensor, s: Tensor, *, solver: str = "euler", **cond) -> Tensor:
    """One step of dx/dt = v(x, t) from per-sample times ``t`` to ``s`` (both ``(B,)``): Euler, or
    Heun (the teacher step of consistency distillation, Song et al. 2023, Section 4)."""
    dt = expand_like(s - t, x)
    d = velocity_fn(x, t, **cond)
    if solver == "euler":
        return x + dt * d
    if solver == "heun":
        return x + dt * 0.5 * (d + velocity_fn(x + dt * d, s, **cond))
    raise ValueError(f"unknown solver {solver!r}; expected 'euler' or 'heun'")


def _check_grid(grid: Tensor) -> Tensor:
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.ndim != 1 or len(grid) < 2 or not (grid[1:] > grid[:-1]).all() or grid[0] <= 0 or grid[-1] > 1:
        raise ValueError("expected an increasing discretisation t_min = t_1 < ... < t_N <= 1 with t_min > 0 "
                         "(consistency_grid)")
    return grid


def _neighbours(grid: Tensor, x0: Tensor, generator, probs: Tensor | None) -> tuple[Tensor, Tensor]:
    """Draw interval indices n (uniformly, or by ``probs``) and return (t_n, t_{n+1}) as ``(B,)``."""
    b = x0.shape[0]
    if probs is None:
        n = torch.randint(len(grid) - 1, (b,), generator=generator)
    else:
        n = torch.multinomial(probs, b, replacement=True, generator=generator)
    g = grid.to(dtype=x0.dtype, device=x0.device)
    return g[n], g[n + 1]


def consistency_distillation_loss(f: Callable, f_target: Callable, teacher_velocity: Callable, x0: Tensor,
                                  grid: Tensor, *, path: GaussianPath, solver: str = "heun",
                                  distance: str = "l2", generator: torch.Generator | None = None,
                                  **cond) -> Tensor:
    """Consistency distillation (Algorithm 2 of Song et al. 2023):
    d(f_theta(x_{t_{n+1}}, t_{n+1}), sg f_target(x_hat_{t_n}, t_n)), where x_hat_{t_n} is one teacher
    ODE step from x_{t_{n+1}} ~ p(x_t | x0), n uniform, and ``f_target`` the EMA copy of ``f``."""
    check_batch(x0, name="x0")
    grid = _check_grid(grid)
    t_n, t_next = _neighbours(grid, x0, generator, None)
    x_next = path.sample(x0, t_next, generator=generator).x_t
    with torch.no_grad():
        x_n = ode_step(teacher_velocity, x_next, t_next, t_n, solver=solver, **cond)
        target = f_target(x_n, t_n, **cond)
    return _distance(f(x_next, t_next, **cond), target, distance).mean()


def consistency_training_loss(f: Callable, x0: Tensor, grid: Tensor, *, path: GaussianPath,
                              f_target: Callable | None = None, distance: str = "pseudo_huber",
                              step_probs: Tensor | None = None, weighting: str = "inverse_dt",
                              generator: torch.Generator | None = None, **cond) -> Tensor:
    """Consistency training without a teacher (Song et al. 2023, Algorithm 3, with Song & Dhariwal's
    2023 improvements: the target is f itself under stop-gradient, pseudo-Huber distance,
    ``step_probs`` from ``lognormal_step_probs``, weight 1 / (t_{n+1} - t_n)).

    x_{t_n} and x_{t_{n+1}} share x0 and eps: that is the exact DDIM step between them with the
    one-sample estimate x0 of E[x0 | x_t], so no score model is needed."""
    check_batch(x0, name="x0")
    grid = _check_grid(grid)
    t_n, t_next = _neighbours(grid, x0, generator, step_probs)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    x_next, x_n = path.sample(x0, t_next, eps=eps).x_t, path.sample(x0, t_n, eps=eps).x_t
    with torch.no_grad():
        target = (f if f_target is None else f_target)(x_n, t_n, **cond)
    if weighting == "inverse_dt":
        weight = 1.0 / (t_next - t_n)
    elif weighting == "uniform":
        weight = torch.ones_like(t_n)
    else:
        raise ValueError(f"unknown weighting {weighting!r}; expected 'inverse_dt' or 'uniform'")
    return (weight * _distance(f(x_next, t_next, **cond), target, distance)).mean()


def sample_consistency(f: Callable, x_init: Tensor, ts: Tensor, *, path: GaussianPath, t_min: float,
                       generator: torch.Generator | None = None, callback: Callable | None = None,
                       **cond) -> Tensor:
    """Multistep consistency sampling (Algorithm 1 of Song et al. 2023): x = f(x_init, ts[0]); then for
    each later time tau of the decreasing grid ``ts``, re-noise x_tau = abar x + sbar z and denoise
    x = f(x_tau, tau). One NFE per time; ``ts = [1.0]`` is one-step generation."""
    check_batch(x_init, name="x_init")
    ts = torch.as_tensor(ts)
    if ts.ndim != 1 or len(ts) < 1 or (len(ts) > 1 and not (ts[1:] < ts[:-1]).all()):
        raise ValueError(f"expected a strictly decreasing 1-D grid of at least one time (NFE >= 1); got {ts.tolist()}")
    if ts.min() <= torch.tensor(t_min, dtype=ts.dtype) or ts.max() > 1:  # compared in the grid's own precision
        raise ValueError(f"expected sampling times in (t_min, 1] = ({t_min:g}, 1]; got {ts.tolist()}")
    x = f(x_init, _times(float(ts[0]), x_init, t_min), **cond)
    for i, tau in enumerate(ts[1:].tolist()):
        t = _times(tau, x, t_min)
        abar, sbar = relative_coefficients(path, t, t_min)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = f(expand_like(abar, x) * x + expand_like(sbar, x) * z, t, **cond)
        if callback is not None:
            callback(SamplerStep(i=i, t=tau, x=x))
    return x


def exact_consistency_function(velocity_fn: Callable, x_t: Tensor, t: float, *, t_min: float,
                               rtol: float = 1e-7, atol: float = 1e-7) -> Tensor:
    """The consistency function of a known probability-flow field: the ODE solved accurately (RK45)
    from ``t`` down to ``t_min`` (one scalar time for the whole batch). With the exact velocity of
    mixture data (``course.flow_matching.oracle_velocity``) this is the oracle a student is
    compared with."""
    if not t_min <= float(t) <= 1.0:
        raise ValueError(f"expected t in [t_min, 1] = [{t_min:g}, 1]; got {t}")
    return solve_ode(velocity_fn, x_t, float(t), t_min, rtol=rtol, atol=atol).x


def gaussian_consistency_function(mean: Tensor, std: float, path: GaussianPath, x_t: Tensor, t, *,
                                  t_min: float) -> Tensor:
    """Closed form for data N(mean, std^2 I): p_t = N(alpha_t mean, v_t I) with
    v_t = alpha_t^2 std^2 + sigma_t^2, and the ODE is the affine map between marginals, so
    f(x_t, t) = alpha_min mean + sqrt(v_min / v_t) (x_t - alpha_t mean)."""
    check_batch(x_t, name="x_t")
    t = _times(t, x_t, t_min)
    t_lo = torch.full_like(t, t_min)

    def v(s):
        return path.alpha(s) ** 2 * std**2 + path.sigma(s) ** 2

    a_t, a_lo = expand_like(path.alpha(t), x_t), expand_like(path.alpha(t_lo), x_t)
    mean = torch.as_tensor(mean, dtype=x_t.dtype, device=x_t.device)
    return a_lo * mean + expand_like((v(t_lo) / v(t)).sqrt(), x_t) * (x_t - a_t * mean)
