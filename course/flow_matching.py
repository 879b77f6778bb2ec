"""Flow matching (Lipman et al. 2023; Liu et al. 2023; Albergo & Vanden-Eijnden 2023) on the
course's one Gaussian-path core.

A Gaussian path x_t = alpha_t x_0 + sigma_t eps (t = 0 data, t = 1 noise) is generated, for one
data point x_0 and one noise draw eps, by the *conditional* velocity

    u_t(x_t | x_0, eps) = alpha'_t x_0 + sigma'_t eps,

and, across the whole data distribution, by the *marginal* velocity

    v_t(x) = E[u_t(x_t | x_0, eps) | x_t = x] = alpha'_t E[x_0 | x] + sigma'_t E[eps | x],

the drift of an ODE whose solution has the marginals p_t. The marginal field is intractable, but
regressing a network onto the conditional one (the conditional flow-matching loss) has the same
gradient as regressing onto the marginal one, because the two losses differ by a constant:

    L_CFM(theta) = E_{t, x_0, eps} |v_theta(x_t, t) - u_t(x_t | x_0, eps)|^2.

The "flow matching matrix" of the slides, in code:

    =========== =========================== ============================ ====================
                probability path            vector field                 loss
    conditional ``path.sample(x0, t, eps)``  ``conditional_velocity``     ``cfm_loss``
    marginal    ``GaussianMixture.sample``  ``oracle_velocity`` (exact   marginal FM loss: the
                pushed through the path     for mixtures)                 same minimiser
    =========== =========================== ============================ ====================

Couplings: the pairs (x_0, eps) can be drawn independently or matched by minibatch optimal
transport (``ot_coupling``, exact assignment with SciPy's ``linear_sum_assignment``; ``ot_pairs``
precomputes such pairs block by block, once, so that training steps stay cheap), or taken
from a trained flow's own ODE (``reflow_pairs``, one rectified-flow step); the latter two give
straighter paths that need fewer steps.

Lipman et al. run time the other way (s = 0 noise, s = 1 data). ``lipman_time`` and
``from_lipman``/``to_lipman`` are the one place where the two conventions meet.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .conversions import convert
from .ode import sample_flow_euler
from .paths import GaussianPath
from .samplers import SamplerStep, check_decreasing_grid, gaussian_like
from .toy_data import GaussianMixture
from .utils import as_time, check_batch, check_positive_int, expand_like

__all__ = [
    "lipman_time",
    "from_lipman",
    "to_lipman",
    "conditional_velocity",
    "oracle_velocity",
    "COUPLINGS",
    "independent_coupling",
    "ot_coupling",
    "ot_pairs",
    "cfm_loss_terms",
    "cfm_loss",
    "reflow_pairs",
    "sample_flow_sde",
    "trajectory_straightness",
]

COUPLINGS = ("independent", "ot")


# ---- time conventions ----------------------------------------------------------------------------
def lipman_time(t):
    """s = 1 - t: the course's time (0 = data) in Lipman et al.'s convention (0 = noise), and back
    (the map is its own inverse)."""
    return 1 - t


def from_lipman(field: Callable) -> Callable:
    """Adapt a velocity field u(x, s) written in Lipman's time (s = 0 noise, s = 1 data) to the
    course's convention: v(x, t) = -u(x, 1 - t) (time runs the other way, so velocities flip)."""

    def v(x: Tensor, t: Tensor, **cond) -> Tensor:
        return -field(x, lipman_time(t), **cond)

    return v


def to_lipman(field: Callable) -> Callable:
    """The inverse of ``from_lipman``: a course velocity v(x, t) as u(x, s) = -v(x, 1 - s)."""

    def u(x: Tensor, s: Tensor, **cond) -> Tensor:
        return -field(x, lipman_time(s), **cond)

    return u


# ---- fields --------------------------------------------------------------------------------------
def conditional_velocity(path: GaussianPath, x0: Tensor, eps: Tensor, t) -> Tensor:
    """u_t(x_t | x_0, eps) = alpha'(t) x_0 + sigma'(t) eps, shaped like ``x0``."""
    check_batch(x0, name="x0")
    if eps.shape != x0.shape:
        raise ValueError(f"expected eps of shape {tuple(x0.shape)}; got {tuple(eps.shape)}")
    d_alpha, d_sigma = path.derivatives(t, x0)
    return d_alpha * x0 + d_sigma * eps


def oracle_velocity(data: GaussianMixture, path: GaussianPath) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact marginal velocity v_t(x) of mixture data under ``path``, as ``v(x, t)``.

    v = alpha' E[x_0 | x_t] + sigma' E[eps | x_t] = alpha' E[x_0 | x_t] - sigma sigma' grad log p_t,
    from the closed-form posterior mean (``GaussianMixture.posterior_mean``, finite at alpha = 0)
    and score: finite at both ends, where E[eps | x] = (x - alpha E[x_0 | x]) / sigma is 0 / 0 at
    sigma = 0 (its limit there: -x for the linear path, the probability-flow drift for the SDEs)."""
    if not isinstance(data, GaussianMixture):
        raise ValueError(f"oracle_velocity needs a GaussianMixture; got {type(data).__name__}")

    def v(x: Tensor, t: Tensor) -> Tensor:
        t = as_time(t, x)
        d_alpha, _ = path.derivatives(t, x)
        return d_alpha * data.posterior_mean(x, t, path) - expand_like(path.sigma_dsigma(t), x) * \
            data.perturbed_score(x, t, path)

    return v


# ---- couplings -----------------------------------------------------------------------------------
def independent_coupling(x0: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """Pairs as drawn: data and noise independent (the product coupling)."""
    return x0, eps


def ot_coupling(x0: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """Minibatch optimal transport (Tong et al. 2024; Pooladian et al. 2023): reorder the noise so
    that the pairing minimises sum_i |x0_i - eps_pi(i)|^2 exactly (Hungarian algorithm, SciPy's
    ``linear_sum_assignment``; O(B^3), fine for the batch sizes of the course)."""
    from scipy.optimize import linear_sum_assignment

    check_batch(x0, name="x0")
    if eps.shape != x0.shape:
        raise ValueError(f"expected eps of shape {tuple(x0.shape)}; got {tuple(eps.shape)}")
    cost = torch.cdist(x0.detach().flatten(1).double(), eps.detach().flatten(1).double()) ** 2
    _, cols = linear_sum_assignment(cost.cpu().numpy())
    return x0, eps[torch.as_tensor(cols, device=eps.device)]


def ot_pairs(x0: Tensor, eps: Tensor, *, block_size: int = 256) -> tuple[Tensor, Tensor]:
    """A fixed training set of minibatch-OT pairs: ``x0`` and ``eps`` are cut into consecutive
    blocks of ``block_size`` rows (the last may be shorter) and each block is matched exactly by
    ``ot_coupling``. Computing the assignment once, before training, instead of at every step,
    lets the training batch be larger than the OT block at the cost of a step of the independent
    coupling (see ``benchmarks/bench_05_flow_matching.py``). Returns ``(x0, eps_matched)``; the
    noise rows are only reordered, never changed."""
    check_batch(x0, name="x0")
    block_size = check_positive_int(block_size, "block_size")
    if eps.shape != x0.shape:
        raise ValueError(f"expected eps of shape {tuple(x0.shape)}; got {tuple(eps.shape)}")
    matched = [ot_coupling(a, b)[1] for a, b in zip(x0.split(block_size), eps.split(block_size), strict=True)]
    return x0, torch.cat(matched)


def _couple(coupling: str, x0: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    if coupling == "independent":
        return independent_coupling(x0, eps)
    if coupling == "ot":
        return ot_coupling(x0, eps)
    raise ValueError(f"unknown coupling {coupling!r}; expected one of {', '.join(COUPLINGS)}")


# ---- loss ----------------------------------------------------------------------------------------
def cfm_loss_terms(model, x0: Tensor, eps: Tensor, t: Tensor, path: GaussianPath, **cond) -> Tensor:
    """Per-sample conditional flow-matching loss mean_d (v_theta(x_t, t) - u_t(x_t | x_0, eps))^2
    at given ``t`` and paired ``eps``; shape ``(B,)``."""
    target = conditional_velocity(path, x0, eps, t)
    t = as_time(t, x0)
    x_t = path.sample(x0, t, eps=eps).x_t
    return (model(x_t, t, **cond) - target).pow(2).flatten(1).mean(1)


def cfm_loss(model, x0: Tensor, path: GaussianPath, *, coupling: str = "independent",
             eps: Tensor | None = None, generator: torch.Generator | None = None, **cond) -> Tensor:
    """The CFM loss of ``model`` on a batch ``x0``: t ~ U[0, 1], eps ~ N(0, I) (or the given
    ``eps``, e.g. the noise of reflow pairs), paired by ``coupling`` ("independent" or "ot")."""
    check_batch(x0, name="x0")
    if eps is None:
        eps = gaussian_like(x0, generator)
    x0, eps = _couple(coupling, x0, eps)
    t = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype, device=x0.device)
    return cfm_loss_terms(model, x0, eps, t, path, **cond).mean()


def reflow_pairs(velocity_fn: Callable, noise: Tensor, ts: Tensor, *,
                 sampler: Callable | None = None, **cond) -> tuple[Tensor, Tensor]:
    """One rectified-flow step (Liu et al. 2023): push ``noise`` through the flow's ODE to data
    and return the coupled pairs ``(x0, noise)``; training on them (``cfm_loss(..., eps=noise)``
    with the matching ``x0``) straightens the flow."""
    sampler = sample_flow_euler if sampler is None else sampler
    with torch.no_grad():
        x0 = sampler(velocity_fn, noise, ts, **cond)
    return x0, noise


# ---- sampling a velocity model with an SDE --------------------------------------------------------
def sample_flow_sde(velocity_fn: Callable, x_init: Tensor, ts: Tensor, *, path: GaussianPath,
                    diffusion: Callable[[Tensor], Tensor] | None = None,
                    generator: torch.Generator | None = None, callback: Callable | None = None,
                    **cond) -> Tensor:
    """Sample a velocity model with the reverse-time SDE that shares its marginals:

        dx = [v(x, t) - 1/2 w(t) s(x, t)] dt + sqrt(w(t)) dW  (run from t = 1 to 0),

    where s is the score implied by v (``course.conversions``) and w(t) >= 0 is free (w = 0 is
    the ODE). The default w(t) = sigma(t) is SiT's choice (Ma et al. 2024): it vanishes at the
    data end, where the score is stiff. Euler-Maruyama on the grid ``ts``; no noise in the last step.
    """
    check_batch(x_init, name="x_init")
    grid, x = check_decreasing_grid(ts), x_init
    w_fn = path.sigma if diffusion is None else diffusion
    for i in range(len(grid) - 1):
        t, dt = as_time(grid[i], x), grid[i] - grid[i + 1]  # dt > 0, stepping backwards
        v = velocity_fn(x, t, **cond)
        w = expand_like(w_fn(t), x)
        score = convert(v, "velocity", "score", x, t, path)
        x = x - (v - 0.5 * w * score) * dt
        if i < len(grid) - 2:
            x = x + torch.sqrt(w * dt) * gaussian_like(x, generator)
        if callback is not None:
            callback(SamplerStep(i=i, t=grid[i + 1], x=x))
    return x


# ---- diagnostics ---------------------------------------------------------------------------------
def trajectory_straightness(xs: Tensor) -> Tensor:
    """Mean deviation of trajectories from straight lines, per trajectory.

    ``xs`` has shape ``(K + 1, B, ...)``: the states along K steps, from the start to the end of
    each trajectory at evenly spaced fractions k / K (use a uniform time grid). The deviation is
    mean_k |x_k - ((1 - k/K) x_0 + (k/K) x_K)|, 0 for a straight path traversed at constant
    speed; returned with shape ``(B,)``.
    """
    if xs.ndim < 3:
        raise ValueError(f"expected states of shape (K + 1, B, ...); got {tuple(xs.shape)}")
    k = xs.shape[0] - 1
    frac = torch.linspace(0, 1, k + 1, dtype=xs.dtype, device=xs.device).reshape(-1, *[1] * (xs.ndim - 1))
    chord = (1 - frac) * xs[0] + frac * xs[-1]
    return (xs - chord).flatten(2).norm(dim=2).mean(0)
