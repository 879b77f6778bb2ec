"""Reverse-time samplers for score-based models: plain functions over a score function.

All samplers integrate from t = 1 (prior) down to the last time of an explicit, decreasing grid
``ts`` (see :func:`time_grid`), call ``score_fn(x, t, **cond)`` with ``t`` of shape ``(B,)``,
draw noise only from ``generator``, and return the final samples. ``callback(step)`` receives a
:class:`SamplerStep` after every grid step (for trajectories and plots).

Notation (Song et al. 2021): the grid t_N = 1 > ... > t_0, step dt_i = t_{i+1} - t_i > 0,
s = score_fn, f and g the SDE's drift and diffusion, z ~ N(0, I).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .sde import SDE, VPSDE
from .simulate import euler_maruyama_step
from .utils import as_time, check_batch, check_positive_int, check_time_scalar, expand_like

__all__ = [
    "SamplerStep",
    "time_grid",
    "step_to_time",
    "check_decreasing_grid",
    "gaussian_like",
    "reverse_em_step",
    "reverse_diffusion_step",
    "langevin_step",
    "snr_step_size",
    "sample_reverse_em",
    "sample_pc",
    "sample_vp_pc_algorithm3",
    "langevin_dynamics",
    "CountingScore",
]

PREDICTORS = ("euler_maruyama", "reverse_diffusion", None)


@dataclass(frozen=True)
class SamplerStep:
    """What a callback sees after each step of a sampler."""

    i: int  # step number, 0 for the first step from t = 1
    t: float  # time reached
    x: Tensor  # (B, ...) state at t


def time_grid(n_steps: int, *, t_min: float = 1e-3, t_max: float = 1.0) -> Tensor:
    """Uniform decreasing grid t_max = t_N > ... > t_0 = t_min, shape ``(n_steps + 1,)`` (float64).

    t_min > 0 because the score of the data distribution itself may not exist (sigma(0) = 0).
    """
    n_steps = check_positive_int(n_steps, "n_steps")
    t_min, t_max = check_time_scalar(t_min, "t_min"), check_time_scalar(t_max, "t_max")
    if t_max <= t_min:
        raise ValueError(f"expected t_max > t_min; got t_max={t_max}, t_min={t_min}")
    return torch.linspace(t_max, t_min, n_steps + 1, dtype=torch.float64)


def step_to_time(i, n_steps: int, *, t_min: float = 1e-3) -> Tensor:
    """Continuous time of discrete step i in 0..N: t_i = t_min + (1 - t_min) i / N (float64).

    Step N is t = 1 (the prior) and step 0 is t_min; this is the indexing of Algorithm 3 and
    of DDPM's x_N, ..., x_0.
    """
    n_steps = check_positive_int(n_steps, "n_steps")
    t_min = check_time_scalar(t_min, "t_min")
    i = torch.as_tensor(i, dtype=torch.float64)
    if (i < 0).any() or (i > n_steps).any():
        raise ValueError(f"expected step indices in 0..{n_steps}; got {i.min().item()}..{i.max().item()}")
    return t_min + (1 - t_min) * i / n_steps


def check_decreasing_grid(ts: Tensor) -> list[float]:
    """Validate a strictly decreasing time grid inside [0, 1] and return it as floats."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    if ts.ndim != 1 or len(ts) < 2:
        raise ValueError(f"expected a 1-D time grid with at least 2 times; got shape {tuple(ts.shape)}")
    if not (ts[1:] < ts[:-1]).all() or ts.min() < 0 or ts.max() > 1:
        raise ValueError("expected a strictly decreasing time grid inside [0, 1] (from noise to data)")
    return ts.tolist()


def gaussian_like(x: Tensor, generator) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator``."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def reverse_em_step(x: Tensor, t: Tensor, dt: float, sde: SDE, score_fn: Callable, z: Tensor,
                    **cond) -> Tensor:
    """Euler-Maruyama on the reverse-time SDE from t to t - dt (dt > 0):
    x - [f(x, t) - g(t)^2 s(x, t)] dt + g(t) sqrt(dt) z."""
    def drift(x_, t_):
        return sde.reverse_drift(x_, t_, lambda a, b: score_fn(a, b, **cond))

    return euler_maruyama_step(x, t, -dt, drift, sde.diffusion, z)


def reverse_diffusion_step(x: Tensor, t: Tensor, dt: float, sde: SDE, score_fn: Callable,
                           z: Tensor, **cond) -> Tensor:
    """The reverse-diffusion predictor (Song et al. eq. 47) from t to t - dt:
    x - f_i + G_i^2 s(x, t) + G_i z with (f_i, G_i) = ``sde.discretize(x, t, dt)``."""
    f_i, g_i = sde.discretize(x, t, dt)
    g_i = expand_like(g_i, x)
    return x - f_i + g_i**2 * score_fn(x, t, **cond) + g_i * z


def snr_step_size(score: Tensor, z: Tensor, snr: float) -> Tensor:
    """Langevin step size eps = 2 (r ||z|| / ||s||)^2 (Song et al. Algorithm 4), a 0-d tensor.

    As in the authors' code, ||z|| and ||s|| are averaged over the batch: in low dimension the
    score of a single sample can be nearly zero (at a mode), and a per-sample rule would then
    take an enormous step.
    """
    s_norm = score.flatten(1).norm(dim=1).mean()
    z_norm = z.flatten(1).norm(dim=1).mean()
    return 2 * (snr * z_norm / s_norm.clamp_min(1e-12)) ** 2


def langevin_step(x: Tensor, t: Tensor, score_fn: Callable, z: Tensor, *, snr: float,
                  **cond) -> Tensor:
    """One Langevin corrector step at time t: x + eps s(x, t) + sqrt(2 eps) z, eps from ``snr``."""
    s = score_fn(x, t, **cond)
    eps = snr_step_size(s, z, snr)
    return x + eps * s + torch.sqrt(2 * eps) * z


def sample_reverse_em(score_fn: Callable, x_init: Tensor, ts: Tensor, *, sde: SDE,
                      denoise: bool = True, generator: torch.Generator | None = None,
                      progress: bool = False, callback: Callable | None = None, **cond) -> Tensor:
    """Euler-Maruyama on the reverse-time SDE over the grid ``ts`` (one score call per step).

    With ``denoise`` the last step adds no noise (returns its mean), as in Song et al.'s code.
    """
    return sample_pc(score_fn, x_init, ts, sde=sde, predictor="euler_maruyama", corrector_steps=0,
                     denoise=denoise, generator=generator, progress=progress, callback=callback,
                     **cond)


def sample_pc(score_fn: Callable, x_init: Tensor, ts: Tensor, *, sde: SDE,
              predictor: str | None = "reverse_diffusion", corrector_steps: int = 1,
              snr: float = 0.16, denoise: bool = True, generator: torch.Generator | None = None,
              progress: bool = False, callback: Callable | None = None, **cond) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 1).

    At each grid step: one predictor step from t_{i+1} to t_i (``"reverse_diffusion"``,
    ``"euler_maruyama"``, or ``None`` for corrector-only annealed Langevin dynamics), then
    ``corrector_steps`` Langevin steps at t_i with the SNR step-size rule. With ``denoise`` the
    last predictor step adds no noise and no corrector follows it.
    """
    check_batch(x_init, name="x_init")
    grid = check_decreasing_grid(ts)
    corrector_steps = check_positive_int(corrector_steps, "corrector_steps", allow_zero=True)
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; expected one of {PREDICTORS}")
    if predictor is None and corrector_steps == 0:
        raise ValueError("with predictor=None, corrector_steps must be >= 1")
    if snr <= 0 and corrector_steps > 0:
        raise ValueError(f"expected snr > 0; got {snr}")
    x = x_init
    n = len(grid) - 1
    for i in tqdm(range(n), disable=not progress, desc="sampling"):
        t, t_next = grid[i], grid[i + 1]
        dt, last = t - t_next, i == n - 1
        if predictor is not None:
            z = torch.zeros_like(x) if (denoise and last) else gaussian_like(x, generator)
            step = reverse_em_step if predictor == "euler_maruyama" else reverse_diffusion_step
            x = step(x, as_time(t, x), dt, sde, score_fn, z, **cond)
        if not (denoise and last and predictor is not None):
            tt = as_time(t_next, x)
            for _ in range(corrector_steps):
                x = langevin_step(x, tt, score_fn, gaussian_like(x, generator), snr=snr, **cond)
        if callback is not None:
            callback(SamplerStep(i=i, t=t_next, x=x))
    return x


def sample_vp_pc_algorithm3(score_fn: Callable, x_init: Tensor, n_steps: int, *, sde: VPSDE,
                            corrector_steps: int = 1, snr: float = 0.16, t_min: float = 1e-3,
                            generator: torch.Generator | None = None, **cond) -> Tensor:
    """PC sampling for the VP SDE, written to follow Algorithm 3 of Song et al. (2021) line by line.

    The N-step grid is t_i = t_min + (1 - t_min) i / N, i = 0..N, and beta_i = beta(t_i) dt with
    dt = (1 - t_min) / N, so that x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z is the DDPM chain.
    The corrector step size is eps_i = 2 (r ||z|| / ||s||)^2 (Algorithm 4's rule; Algorithm 5
    multiplies it by 1 - beta_i, a difference of at most beta_max dt).
    """
    n = check_positive_int(n_steps, "n_steps")
    m = check_positive_int(corrector_steps, "corrector_steps", allow_zero=True)
    dt = (1 - t_min) / n
    ts = step_to_time(torch.arange(n + 1), n, t_min=t_min)
    x = x_init  # 1: x_N ~ N(0, I)
    for i in range(n - 1, -1, -1):  # 2: for i = N-1 to 0
        t_next = as_time(float(ts[i + 1]), x)  # time of x_{i+1}
        beta = expand_like(sde.discrete_beta(t_next, dt), x)  # beta_{i+1}
        x = (2 - torch.sqrt(1 - beta)) * x + beta * score_fn(x, t_next, **cond)  # 3: predictor
        z = gaussian_like(x, generator)  # 4
        x = x + torch.sqrt(beta) * z  # 5
        t_i = as_time(float(ts[i]), x)
        for _ in range(m):  # 6: corrector
            z = gaussian_like(x, generator)  # 7
            s = score_fn(x, t_i, **cond)
            eps = snr_step_size(s, z, snr)  # eps_i
            x = x + eps * s + torch.sqrt(2 * eps) * z  # 8
    return x  # 9: return x_0


def langevin_dynamics(score_fn: Callable[[Tensor], Tensor], x_init: Tensor, *, step_size: float,
                      n_steps: int, generator: torch.Generator | None = None,
                      callback: Callable | None = None) -> Tensor:
    """Unadjusted Langevin dynamics x <- x + eps s(x) + sqrt(2 eps) z with a time-free score.

    With the exact score of N(m, v) the chain is Gaussian with stationary variance
    v / (1 - eps / (2 v)): the discretisation bias of an unadjusted chain.
    """
    check_batch(x_init, name="x_init")
    n_steps = check_positive_int(n_steps, "n_steps")
    if step_size <= 0:
        raise ValueError(f"expected step_size > 0; got {step_size}")
    x = x_init
    for i in range(n_steps):
        x = x + step_size * score_fn(x) + math.sqrt(2 * step_size) * gaussian_like(x, generator)
        if callback is not None:
            callback(SamplerStep(i=i, t=float("nan"), x=x))
    return x


class CountingScore:
    """Wraps a score function and counts its calls: the measured NFE of a sampler."""

    def __init__(self, score_fn: Callable):
        self.score_fn, self.calls = score_fn, 0

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        self.calls += 1
        return self.score_fn(x, t, **cond)
