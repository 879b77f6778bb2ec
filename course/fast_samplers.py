"""Discrete-time and accelerated samplers for any Gaussian path x_t = alpha_t x_0 + sigma_t eps:
DDPM ancestral sampling, DDIM (Song, Meng & Ermon 2021) with eta in [0, 1], DDIM inversion, and
DPM-Solver-1/2 (Lu et al. 2022) and DPM-Solver++(2M) (Lu et al. 2023), with uniform, quadratic,
power and log-SNR time grids.

Notation for one step from t to s < t: alpha_t, sigma_t; lambda_t = log(alpha_t / sigma_t) (half
the log-SNR); h = lambda_s - lambda_t > 0; eps_hat = -sigma_t * score(x_t, t) and
x0_hat = (x_t - sigma_t eps_hat) / alpha_t (``course.conversions``).

DDIM step (eq. 12 of Song et al., written for a general path):
    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,
    c = eta * sigma_s * sqrt(1 - (alpha_t sigma_s)^2 / (alpha_s sigma_t)^2),
where c^2 at eta = 1 is the variance of the posterior q(x_s | x_t, x_0) (for VP it is DDIM's
sigma_t(eta)^2 = (1 - abar_s)/(1 - abar_t) (1 - abar_t/abar_s)). eta = 0 is deterministic DDIM;
eta = 1 is DDPM's ancestral step.

DPM-Solver-1 (= DDIM): x_s = (alpha_s / alpha_t) x_t - sigma_s (e^h - 1) eps_hat(x_t, t).
DPM-Solver-2 (Algorithm 1 of Lu et al., r = 1/2): u = DPM-Solver-1 from t to the midpoint m
with lambda_m = lambda_t + h/2, then x_s = (alpha_s / alpha_t) x_t - sigma_s (e^h - 1) eps_hat(u, m).

DPM-Solver++(2M) (Algorithm 2 of Lu et al. 2023) integrates the same ODE written for the data
prediction x0_hat, and reuses the previous step's prediction instead of a second evaluation (one
NFE per step, second order):
    x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D,
    D = x0_hat_t                                            (first step)
    D = (1 + 1/(2r)) x0_hat_t - 1/(2r) x0_hat_prev,  r = h_prev / h   (later steps).
Because x0_hat stays bounded where eps_hat is stiff (small t), it tolerates coarse grids better
than the noise-prediction solvers; benchmarks/bench_04_fast_sampling.py measures by how much.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .conversions import eps_to_x0, score_to_eps
from .paths import GaussianPath
from .samplers import SamplerStep, check_decreasing_grid, gaussian_like, step_to_time
from .utils import as_time, check_batch, check_positive_int

__all__ = [
    "step_to_time",
    "log_snr",
    "time_from_log_snr",
    "sampling_grid",
    "ddim_step",
    "dpm_solver_1_step",
    "dpm_solver_2_step",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpm_solver_2",
    "sample_dpm_solver_pp_2m",
    "ddim_invert",
]

GRIDS = ("uniform", "quadratic", "power", "logsnr")


def log_snr(path: GaussianPath, t: Tensor) -> Tensor:
    """lambda(t) = log(alpha(t) / sigma(t)), decreasing in t."""
    return torch.log(path.alpha(t)) - torch.log(path.sigma(t))


def time_from_log_snr(path: GaussianPath, lam: Tensor, *, iters: int = 80) -> Tensor:
    """Invert lambda(t) by bisection on [0, 1] (lambda is monotone for every path of the course)."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    lo, hi = torch.zeros_like(lam), torch.ones_like(lam)
    for _ in range(iters):
        mid = (lo + hi) / 2
        above = log_snr(path, mid) > lam  # lambda decreases: the root lies to the right
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2


def sampling_grid(n_steps: int, *, path: GaussianPath | None = None, kind: str = "uniform",
                  t_min: float = 1e-3, t_max: float = 1.0, power: float = 2.0) -> Tensor:
    """Decreasing grid t_max = t_N > ... > t_0 = t_min (float64): uniform in t, quadratic in t
    (denser near the data), ``power`` (t - t_min proportional to u**power for uniform u; power 2 is
    the quadratic grid), or uniform in log-SNR (needs ``path``; DPM-Solver's choice)."""
    n_steps = check_positive_int(n_steps, "n_steps")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"expected 0 <= t_min < t_max <= 1; got t_min={t_min}, t_max={t_max}")
    u = torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float64)
    if kind == "uniform":
        return t_min + (t_max - t_min) * u
    if kind in ("quadratic", "power"):
        if kind == "power" and not power >= 1.0:
            raise ValueError(f"expected power >= 1 for the power grid; got {power}")
        return t_min + (t_max - t_min) * u ** (2.0 if kind == "quadratic" else power)
    if kind == "logsnr":
        if path is None:
            raise ValueError("the log-SNR grid needs the path")
        lo, hi = log_snr(path, torch.tensor(t_max, dtype=torch.float64)), log_snr(
            path, torch.tensor(t_min, dtype=torch.float64))
        grid = time_from_log_snr(path, hi + (lo - hi) * u)
        grid[0], grid[-1] = t_max, t_min
        return grid
    raise ValueError(f"unknown grid {kind!r}; expected one of {', '.join(GRIDS)}")


def ddim_step(x: Tensor, t, s, eps_hat: Tensor, path: GaussianPath, *, eta: float = 0.0,
              z: Tensor | None = None) -> Tensor:
    """One DDIM step from time t to time s given the noise prediction at (x, t).

    For s > t (inversion) use eta = 0. ``z`` is needed when eta > 0.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"expected eta in [0, 1]; got {eta}")
    a_t, s_t = path.coefficients(t, x)
    a_s, s_s = path.coefficients(s, x)
    x0_hat = eps_to_x0(eps_hat, x, as_time(t, x), path)
    c = eta * s_s * torch.sqrt((1 - (a_t * s_s) ** 2 / (a_s * s_t) ** 2).clamp_min(0.0))
    out = a_s * x0_hat + torch.sqrt(s_s**2 - c**2) * eps_hat
    if eta > 0:
        if z is None:
            raise ValueError("ddim_step with eta > 0 needs noise z")
        out = out + c * z
    return out


def dpm_solver_1_step(x: Tensor, t, s, eps_hat: Tensor, path: GaussianPath) -> Tensor:
    """x_s = (alpha_s / alpha_t) x_t - sigma_s (e^h - 1) eps_hat: the exponential integrator of
    order 1, algebraically the same as DDIM with eta = 0."""
    a_t, s_t = path.coefficients(t, x)
    a_s, s_s = path.coefficients(s, x)
    if bool((s_s == 0).all()):  # to sigma = 0: sigma_s (e^h - 1) -> alpha_s sigma_t / alpha_t, so x_s = alpha_s x0_hat
        return (a_s / a_t) * (x - s_t * eps_hat)
    h = torch.log(a_s / s_s) - torch.log(a_t / s_t)
    return (a_s / a_t) * x - s_s * torch.expm1(h) * eps_hat


def dpm_solver_2_step(x: Tensor, t: float, s: float, eps_fn: Callable[[Tensor, Tensor], Tensor],
                      path: GaussianPath) -> Tensor:
    """One DPM-Solver-2 step from t to s (two noise predictions; midpoint in log-SNR). A step to
    sigma = 0 (log-SNR infinite: no midpoint exists) is taken at first order, x_s = alpha_s x0_hat,
    as DPM-Solver++(2M) and the reference implementation do."""
    tt = torch.tensor(t, dtype=torch.float64)
    ss = torch.tensor(s, dtype=torch.float64)
    lam_t, lam_s = log_snr(path, tt), log_snr(path, ss)
    if not bool(torch.isfinite(lam_s)):
        return dpm_solver_1_step(x, t, s, eps_fn(x, as_time(t, x)), path)
    m = float(time_from_log_snr(path, (lam_t + lam_s) / 2))
    u = dpm_solver_1_step(x, t, m, eps_fn(x, as_time(t, x)), path)
    a_t, _ = path.coefficients(t, x)
    a_s, s_s = path.coefficients(s, x)
    h = (lam_s - lam_t).item()
    return (a_s / a_t) * x - s_s * math.expm1(h) * eps_fn(u, as_time(m, x))


def _check_start(grid: list[float], path: GaussianPath, sampler: str) -> None:
    """The noise-prediction samplers need alpha > 0 at the first time: where alpha = 0 (t = 1 of the
    linear path) a noise or score prediction says nothing about x_0."""
    if float(path.alpha(torch.tensor(grid[0], dtype=torch.float64))) == 0.0:
        raise ValueError(f"{sampler} starts at t = {grid[0]:g}, where alpha(t) = 0 on {type(path).__name__}: a noise "
                         "or score prediction does not determine x_0 there; start the grid below it (e.g. "
                         "sampling_grid(n, t_max=0.999)) or sample the velocity with sample_flow_euler")


def _eps_fn(score_fn: Callable, path: GaussianPath, cond: dict):
    def eps(x: Tensor, t: Tensor) -> Tensor:
        return score_to_eps(score_fn(x, t, **cond), x, t, path)
    return eps


def sample_ddim(score_fn: Callable, x_init: Tensor, ts: Tensor, *, path: GaussianPath,
                eta: float = 0.0, generator: torch.Generator | None = None,
                callback: Callable | None = None, **cond) -> Tensor:
    """DDIM over the decreasing grid ``ts`` (one NFE per step); eta = 1 is DDPM ancestral sampling.
    The last step is taken without noise."""
    check_batch(x_init, name="x_init")
    grid, eps_fn, x = check_decreasing_grid(ts), _eps_fn(score_fn, path, cond), x_init
    _check_start(grid, path, "sample_ddim")
    for i in range(len(grid) - 1):
        t, s = grid[i], grid[i + 1]
        last = i == len(grid) - 2
        step_eta = 0.0 if last else eta
        z = gaussian_like(x, generator) if step_eta > 0 else None
        x = ddim_step(x, t, s, eps_fn(x, as_time(t, x)), path, eta=step_eta, z=z)
        if callback is not None:
            callback(SamplerStep(i=i, t=s, x=x))
    return x


def sample_ddpm(score_fn: Callable, x_init: Tensor, ts: Tensor, *, path: GaussianPath,
                generator: torch.Generator | None = None, callback: Callable | None = None,
                **cond) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) = DDIM with eta = 1."""
    return sample_ddim(score_fn, x_init, ts, path=path, eta=1.0, generator=generator,
                       callback=callback, **cond)


def sample_dpm_solver_2(score_fn: Callable, x_init: Tensor, ts: Tensor, *, path: GaussianPath,
                        callback: Callable | None = None, **cond) -> Tensor:
    """DPM-Solver-2 over the decreasing grid ``ts`` (two NFE per step)."""
    check_batch(x_init, name="x_init")
    grid, eps_fn, x = check_decreasing_grid(ts), _eps_fn(score_fn, path, cond), x_init
    _check_start(grid, path, "sample_dpm_solver_2")
    for i in range(len(grid) - 1):
        x = dpm_solver_2_step(x, grid[i], grid[i + 1], eps_fn, path)
        if callback is not None:
            callback(SamplerStep(i=i, t=grid[i + 1], x=x))
    return x


def sample_dpm_solver_pp_2m(score_fn: Callable, x_init: Tensor, ts: Tensor, *, path: GaussianPath,
                            callback: Callable | None = None, **cond) -> Tensor:
    """DPM-Solver++(2M) over the decreasing grid ``ts`` (one NFE per step; the first step is
    first order, i.e. DDIM)."""
    check_batch(x_init, name="x_init")
    grid, eps_fn, x = check_decreasing_grid(ts), _eps_fn(score_fn, path, cond), x_init
    _check_start(grid, path, "sample_dpm_solver_pp_2m")
    lam = log_snr(path, torch.as_tensor(grid, dtype=torch.float64)).tolist()
    x0_prev = None
    for i in range(len(grid) - 1):
        t, s = grid[i], grid[i + 1]
        tt = as_time(t, x)
        x0_hat = eps_to_x0(eps_fn(x, tt), x, tt, path)
        h = lam[i + 1] - lam[i]
        if x0_prev is None or not math.isfinite(h):  # first step, or a last step to sigma = 0
            d = x0_hat
        else:
            r = (lam[i] - lam[i - 1]) / h
            d = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * x0_prev
        _, s_t = path.coefficients(t, x)
        a_s, s_s = path.coefficients(s, x)
        x = (s_s / s_t) * x - a_s * math.expm1(-h) * d
        x0_prev = x0_hat
        if callback is not None:
            callback(SamplerStep(i=i, t=s, x=x))
    return x


def ddim_invert(score_fn: Callable, x0: Tensor, ts: Tensor, *, path: GaussianPath, **cond
                ) -> Tensor:
    """Run deterministic DDIM forwards, from the smallest time of the decreasing grid ``ts`` up to
    its largest: data -> noise. ``sample_ddim(..., eta=0)`` over the same grid maps it back."""
    check_batch(x0, name="x0")
    grid, eps_fn, x = check_decreasing_grid(ts)[::-1], _eps_fn(score_fn, path, cond), x0
    for i in range(len(grid) - 1):
        t, s = grid[i], grid[i + 1]
        x = ddim_step(x, t, s, eps_fn(x, as_time(t, x)), path)
    return x
