"""Progressive distillation (Salimans & Ho 2022): a student that takes one deterministic DDIM step
where its teacher takes two, repeated until one step is left (2N -> N -> ... -> 1).

For one student step from t to t'' on the teacher's grid t > t' > t'' (the teacher's two steps),
with x_hat the teacher's data prediction and the deterministic DDIM step of any Gaussian path

    DDIM(z_t, t -> s, x) = alpha_s x + (sigma_s / sigma_t) (z_t - alpha_t x),

the teacher lands at z_{t''} = DDIM(DDIM(z_t, t -> t', x_hat(z_t, t)), t' -> t'', x_hat(z_{t'}, t')).
The student's target is the data prediction x_tilde that makes *one* DDIM step land there
(Algorithm 2 of Salimans & Ho, written for any path):

    x_tilde = (z_{t''} - (sigma_{t''} / sigma_t) z_t) / (alpha_{t''} - (sigma_{t''} / sigma_t) alpha_t).

It is not the teacher's x_hat: x_hat is where the teacher *believes* the data is; x_tilde is
what the student must predict so that its single jump reproduces the teacher's two. On the
linear path (alpha = 1 - t, sigma = t) DDIM with a velocity prediction is exactly Euler's step,
so a rectified-flow teacher sampled by Euler is distilled this way unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .paths import GaussianPath
from .utils import as_time, check_batch

__all__ = ["ddim_x0_step", "sample_ddim_x0", "progressive_distillation_target", "student_grid",
           "truncated_snr_weight", "progressive_distillation_loss"]


def ddim_x0_step(z: Tensor, t, s, x0_hat: Tensor, path: GaussianPath) -> Tensor:
    """The deterministic DDIM step from t to s < t given a data prediction (per-sample times allowed):
    alpha_s x0_hat + (sigma_s / sigma_t) (z - alpha_t x0_hat). Written in x0 form, not through
    ``fast_samplers.ddim_step``'s eps, because eps -> x0 divides by alpha_t, which is 0 at t = 1 of
    the linear path."""
    a_t, s_t = path.coefficients(t, z)
    a_s, s_s = path.coefficients(s, z)
    return a_s * x0_hat + (s_s / s_t) * (z - a_t * x0_hat)


def sample_ddim_x0(x0_fn: Callable, x_init: Tensor, grid: Tensor, *, path: GaussianPath, **cond) -> Tensor:
    """Deterministic DDIM sampling with a data prediction ``x0_fn(x, t, **cond)`` over the decreasing
    ``grid`` (one NFE per step; a PD student with N steps is sampled on its ``student_grid``)."""
    check_batch(x_init, name="x_init")
    g = torch.as_tensor(grid, dtype=torch.float64)
    if g.ndim != 1 or len(g) < 2 or not (g[1:] < g[:-1]).all() or g.min() < 0 or g.max() > 1:
        raise ValueError(f"expected a strictly decreasing grid of at least 2 times in [0, 1] (NFE >= 1); got {g.tolist()}")
    x = x_init
    for t, s in zip(g[:-1].tolist(), g[1:].tolist(), strict=True):
        x = ddim_x0_step(x, t, s, x0_fn(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device), **cond), path)
    return x


@torch.no_grad()
def progressive_distillation_target(teacher_x0: Callable, z_t: Tensor, t, t_mid, t_next, *,
                                    path: GaussianPath, **cond) -> Tensor:
    """x_tilde: the data prediction with which one DDIM step from ``t`` to ``t_next`` lands where two
    teacher steps t -> ``t_mid`` -> ``t_next`` land. ``teacher_x0(z, t, **cond)`` predicts x0."""
    check_batch(z_t, name="z_t")
    t, t_mid, t_next = (as_time(v, z_t, name=n) for v, n in ((t, "t"), (t_mid, "t_mid"), (t_next, "t_next")))
    if not ((t_next < t_mid) & (t_mid < t)).all():
        raise ValueError("expected t > t_mid > t_next for every sample (two teacher steps towards the data)")
    z_mid = ddim_x0_step(z_t, t, t_mid, teacher_x0(z_t, t, **cond), path)
    z_next = ddim_x0_step(z_mid, t_mid, t_next, teacher_x0(z_mid, t_mid, **cond), path)
    a_t, s_t = path.coefficients(t, z_t)
    a_n, s_n = path.coefficients(t_next, z_t)
    ratio = s_n / s_t
    return (z_next - ratio * z_t) / (a_n - ratio * a_t)


def student_grid(teacher_grid: Tensor) -> Tensor:
    """Every other time of the teacher's decreasing grid of 2N steps: the student's N steps."""
    g = torch.as_tensor(teacher_grid, dtype=torch.float64)
    if g.ndim != 1 or len(g) < 3 or len(g) % 2 == 0 or not (g[1:] < g[:-1]).all() or g.min() < 0 or g.max() > 1:
        raise ValueError("expected a strictly decreasing teacher grid of 2N + 1 times in [0, 1] (N >= 1); "
                         f"got {g.tolist()}")
    return g[::2]


def truncated_snr_weight(path: GaussianPath, t: Tensor) -> Tensor:
    """max(SNR(t), 1) with SNR = alpha^2 / sigma^2: Salimans & Ho's weighting of the x-space loss
    (it equals the v-prediction loss' weight near the data and stays finite at pure noise)."""
    return (path.alpha(t) ** 2 / path.sigma(t) ** 2).clamp_min(1.0)


def progressive_distillation_loss(student_x0: Callable, teacher_x0: Callable, x0: Tensor, teacher_grid: Tensor,
                                  *, path: GaussianPath, generator: torch.Generator | None = None,
                                  **cond) -> Tensor:
    """One round's loss: pick a student step i (uniformly among N), draw z_t ~ p(z_t | x0) at
    t = teacher_grid[2i], and regress the student's data prediction onto x_tilde
    (``progressive_distillation_target``) with ``truncated_snr_weight``; squares are averaged over
    data dimensions and the batch."""
    check_batch(x0, name="x0")
    student_grid(teacher_grid)  # validates
    g = torch.as_tensor(teacher_grid, dtype=x0.dtype, device=x0.device)
    i = torch.randint((len(g) - 1) // 2, (x0.shape[0],), generator=generator)
    t, t_mid, t_next = g[2 * i], g[2 * i + 1], g[2 * i + 2]
    z_t = path.sample(x0, t, generator=generator).x_t
    target = progressive_distillation_target(teacher_x0, z_t, t, t_mid, t_next, path=path, **cond)
    err = (student_x0(z_t, t, **cond) - target).pow(2).flatten(1).mean(1)
    return (truncated_snr_weight(path, t) * err).mean()

