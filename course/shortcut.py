"""Shortcut models (Frans, Hafner, Levine & Abbeel 2024): one network for every step size, trained
from scratch with flow matching at step size 0 and a *self-consistency* target for larger steps.

The paper's s(x_t, t, d) is the direction that takes a step of size d; in our time convention
(t = 0 data, t = 1 noise) and with the course's interval networks ``model(x, t, r=r)`` (chapter 07's
MeanFlow U-Net and TimeMLP), a step of size d from t lands at r = t - d and

    z_{t-d} = z_t - d u(z_t, t, t - d),

so s is the average velocity u over [t - d, t]: the same object MeanFlow learns, trained by a
different identity. Two steps of size d make one step of size 2d,

    u(z_t, t, t - 2d) = ( u(z_t, t, t - d) + u(z_{t-d}, t - d, t - 2d) ) / 2,   z_{t-d} = z_t - d u(z_t, t, t - d),

which holds exactly for the true average velocity. Training (Algorithm 1 of Frans et al.): a
share (1 - k) of each batch does flow matching (r = t, target the conditional velocity); the
other k regresses u(z_t, t, t - 2d) onto the stop-gradient right-hand side, with d = 2^-j for
j = 1 .. log2(max_steps) and t a multiple of d in [2d, 1] (the grid the sampler uses). Sampling
in N = 2^j uniform steps is ``course.meanflow.sample_meanflow`` on ``torch.linspace(1, 0, N + 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .flow_matching import conditional_velocity
from .paths import GaussianPath
from .utils import check_batch, check_positive_int, expand_like

__all__ = ["shortcut_times", "shortcut_target", "shortcut_loss"]


def _levels(max_steps: int) -> int:
    max_steps = check_positive_int(max_steps, "max_steps")
    levels = round(math.log2(max_steps)) if max_steps >= 2 else 0
    if max_steps < 2 or 2**levels != max_steps:
        raise ValueError(f"expected max_steps a power of two >= 2 (the finest step is 1 / max_steps); got {max_steps}")
    return levels


def shortcut_times(n: int, *, max_steps: int = 128, generator: torch.Generator | None = None,
                   dtype=torch.float32, device=None) -> tuple[Tensor, Tensor]:
    """(t, d) for the self-consistency part: d = 2^-j with j uniform in 1 .. log2(max_steps), and t
    uniform among the multiples of d in [2d, 1], so both half steps stay on the sampler's grid."""
    levels = _levels(max_steps)
    j = torch.randint(1, levels + 1, (n,), generator=generator, device=device)
    per_level = 2.0**j  # 1 / d
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    k = 2 + torch.floor(u * (per_level - 1)).clamp(max=per_level - 2)  # k in {2, ..., 1/d}
    return (k / per_level).to(dtype), (1.0 / per_level).to(dtype)


@torch.no_grad()
def shortcut_target(model: Callable, z: Tensor, t: Tensor, d: Tensor, **cond) -> Tensor:
    """The stop-gradient target for u(z, t, t - 2d): the mean of two chained half steps of size d."""
    check_batch(z, name="z")
    if t.shape != (z.shape[0],) or d.shape != (z.shape[0],):
        raise ValueError(f"expected t and d of shape ({z.shape[0]},); got {tuple(t.shape)} and {tuple(d.shape)}")
    if (d <= 0).any() or (t - 2 * d < -1e-6).any():
        raise ValueError("expected d > 0 and t - 2d >= 0 for every sample")
    u1 = model(z, t, r=t - d, **cond)
    z_mid = z - expand_like(d, z) * u1
    u2 = model(z_mid, t - d, r=(t - 2 * d).clamp_min(0.0), **cond)
    return 0.5 * (u1 + u2)


def _rows(cond: dict, rows: slice, batch: int) -> dict:
    return {k: v[rows] if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == batch else v
            for k, v in cond.items()}


def shortcut_loss(model: Callable, x0: Tensor, path: GaussianPath, *, bootstrap_share: float = 0.25,
                  max_steps: int = 128, teacher_velocity: Callable | None = None,
                  generator: torch.Generator | None = None, **cond) -> Tensor:
    """The shortcut-model loss on a batch ``x0``: squared error of u(z_t, t, r) against the
    conditional velocity (r = t) on a share 1 - ``bootstrap_share`` of the batch and against
    ``shortcut_target`` (r = t - 2d) on the rest; squares averaged over data dimensions and batch.
    With ``teacher_velocity`` the flow-matching rows regress onto a trained model's (marginal, e.g.
    guided) velocity at (z_t, t) instead: a shortcut model distilled from a teacher."""
    check_batch(x0, name="x0")
    if not 0.0 <= bootstrap_share <= 1.0:
        raise ValueError(f"expected 0 <= bootstrap_share <= 1; got {bootstrap_share}")
    _levels(max_steps)
    b = x0.shape[0]
    n_boot = int(round(b * bootstrap_share))
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    t = torch.rand(b, generator=generator, dtype=x0.dtype, device=x0.device)
    r = t.clone()
    if n_boot:
        t_b, d = shortcut_times(n_boot, max_steps=max_steps, generator=generator, dtype=x0.dtype, device=x0.device)
        t = torch.cat([t_b, t[n_boot:]])
        r = torch.cat([(t_b - 2 * d).clamp_min(0.0), t[n_boot:]])
    z = path.sample(x0, t, eps=eps).x_t
    if teacher_velocity is None:
        target = conditional_velocity(path, x0, eps, t)
    else:
        target = torch.zeros_like(z)
        if n_boot < b:
            with torch.no_grad():
                target[n_boot:] = teacher_velocity(z[n_boot:], t[n_boot:], **_rows(cond, slice(n_boot, b), b))
    if n_boot:
        boot = shortcut_target(model, z[:n_boot], t[:n_boot], d, **_rows(cond, slice(0, n_boot), b))
        target = torch.cat([boot, target[n_boot:]])
    pred = model(z, t, r=r, **cond)
    return (pred - target).pow(2).flatten(1).mean(1).mean()
